"""``cbstore build``: MIMIC-IV + MIMIC-CXR-JPG -> a complete store.

Order of work (each step in its own module):

1. check the sources (:mod:`cbstore.sources`) and the definition files;
2. in a fresh work folder (outside the sources; removed at the end and on failure) open DuckDB
   over the raw files (:mod:`cbstore.extract`);
3. cohort steps 1-4 (:mod:`cbstore.cohort`), the hourly EHR tensor (:mod:`cbstore.ehr`), cohort
   step 5 (stays with EHR data), labels (:mod:`cbstore.labels`);
4. X-ray selection and decoding (:mod:`cbstore.cxr`), in a thread that runs alongside step 3 (it
   needs only the cohort of steps 1-4); only the decoded films are kept, in memory;
5. patient-level splits stratified by ICU mortality (:mod:`cbstore.splits`) and per-fold
   training statistics (:mod:`cbstore.stats`);
6. the store writer (:class:`cbstore.store.StoreWriter`) writes into ``<out>.partial-*``, the
   films shard by shard, and renames it to ``out`` only once complete, so a failed build leaves
   nothing at ``out``.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from cbstore.cohort import keep_with_ehr, read_stays, select_cohort, stays_table
from cbstore.config import BuildConfig, ConfigError, config_sha256
from cbstore.content import StoreContent
from cbstore.cxr import NO_ELIGIBLE_FILM, iter_image_batches, read_cxr_metadata, select_films
from cbstore.ehr import Variables, extract_hourly, load_variables
from cbstore.errors import SourceError, StoreExistsError
from cbstore.extract import Extractor
from cbstore.labels import compute_labels
from cbstore.phenotypes import PhenotypeDefinitionError, Phenotypes, load_phenotypes
from cbstore.sources import MimicCxrSource, MimicIVSource, locate_mimic_cxr, locate_mimic_iv
from cbstore.splits import assign_folds
from cbstore.stats import fold_statistics
from cbstore.store import StoreWriter

log = logging.getLogger(__name__)

#: Stays per EHR chunk and per image shard of the written store.
CHUNK_STAYS = 256


def build_store(mimic_iv: str | Path, mimic_cxr: str | Path, out: str | Path, config: BuildConfig | None = None,
                overwrite: bool = False, progress: bool = True) -> Path:
    """Build a store from MIMIC-IV and MIMIC-CXR-JPG.

    Parameters
    ----------
    mimic_iv : str or Path
        MIMIC-IV release folder (``hosp/`` and ``icu/``), v2.2 or v3.x, or a synthetic source.
    mimic_cxr : str or Path
        MIMIC-CXR-JPG release folder (metadata table and ``files/``).
    out : str or Path
        Store path to create (conventionally ``*.zarr``).
    config : BuildConfig, optional
        Build settings; defaults to ``BuildConfig()``.
    overwrite : bool
        Replace an existing store at ``out`` (only once the new one is complete).
    progress : bool
        Show a progress bar while decoding images and log each step at INFO level.

    Returns
    -------
    Path
        The absolute path of the complete store.

    Raises
    ------
    SourceError
        Missing, truncated or malformed source files (the message names the file).
    ConfigError
        Invalid settings or definition files.
    StoreExistsError
        ``out`` exists and ``overwrite`` is false.
    """
    config = config if config is not None else BuildConfig()
    started = time.perf_counter()
    out = Path(out).expanduser().absolute()
    iv = locate_mimic_iv(mimic_iv)
    cx = locate_mimic_cxr(mimic_cxr)
    roots = (iv.root, cx.root)
    _refuse_inside(out, roots, "the output store")
    if out.exists() and not overwrite:
        raise StoreExistsError(f"{out} exists; pass --overwrite (overwrite=True) to replace it")
    variables = _load_variables(config)
    phenotypes = _load_phenotypes(config)
    say = log.info if progress else log.debug

    with _work_directory(config.work_dir, roots) as work:
        with Extractor(iv, work, memory_limit=config.memory_limit, threads=config.threads) as ex:
            all_stays = read_stays(ex)
            candidates, flow = select_cohort(all_stays, min_age=config.min_age, window_hours=config.window_hours)
            _require_stays(candidates, flow)
            say("cohort: %d of %d ICU stays before EHR extraction", len(candidates), len(all_stays))
            # The X-rays depend only on the cohort, so they are selected and decoded in a thread
            # while DuckDB extracts the EHR (PIL and DuckDB release the GIL). Stays that cohort
            # step 5 drops are decoded too and left out afterwards (the selection is per stay).
            stop = threading.Event()
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="cbstore-build-xray") as pool:
                decoding = pool.submit(_decode_xrays, cx, stays_table(candidates, config.min_age), config,
                                       progress, stop)
                try:
                    values = extract_hourly(ex, candidates, variables, config.window_hours)
                    stays, values = keep_with_ehr(candidates, values, flow)
                    _require_stays(stays, flow)
                    say("EHR: %d stays x %d h x %d variables (%s)", *values.shape, _timings(ex.timings))
                    labels = compute_labels(ex, stays, phenotypes.code_table(), list(phenotypes.names))
                    decoded = decoding.result()
                finally:
                    stop.set()  # on an error, the decoding thread stops after its current block
        table = stays_table(stays, config.min_age)
        positions = pd.Index(candidates["stay_id"]).get_indexer(stays["stay_id"])
        cxr, skips = _xray_table(decoded, positions, table.index)
        say("CXR: %d of %d stays with a film; skipped %s", int(cxr["present"].sum()), len(cxr), skips)
        splits = assign_folds(table["subject_id"].to_numpy(), labels["mortality"], n_folds=config.n_folds,
                              val_fraction=config.val_fraction, seed=config.seed)
        stats = fold_statistics(values, splits, feature_names=variables.names)
        content = StoreContent(
            stays=table, labels=labels, phenotype_names=list(phenotypes.names),
            features=variables.features_table(), ehr_values=values, cxr=cxr, images=None,
            splits=splits, stats=stats,
            attrs=_attrs(iv, cx, config, variables, phenotypes, flow, len(table), skips),
        )
        with StoreWriter(out, content, config.image_size, overwrite, chunk_stays=CHUNK_STAYS) as writer:
            for start in range(0, writer.n_stays, writer.shard_stays):
                writer.write_images(start, decoded.images(positions[start:start + writer.shard_stays]))
            path = writer.finish()
        del decoded
    say("store written to %s in %.1f s", path, time.perf_counter() - started)
    return path


def format_cohort_flow(flow: list[dict]) -> str:
    """The cohort flow as an aligned text table (step, stays, excluded, note)."""
    lines = [f"{'step':<20} {'stays':>9} {'excluded':>9}  note"]
    previous = None
    for row in flow:
        dropped = "" if previous is None else str(previous - row["n"])
        lines.append(f"{row['step']:<20} {row['n']:>9} {dropped:>9}  {row['note']}")
        previous = row["n"]
    return "\n".join(lines)


def _refuse_inside(path: Path, roots: tuple[Path, ...], what: str) -> None:
    resolved = path.resolve()
    for root in roots:
        if resolved == root or resolved.is_relative_to(root):
            raise ConfigError(f"{what} {path} lies inside the source folder {root}; cbstore never writes into "
                              f"a source folder, choose a path outside it")


@contextmanager
def _work_directory(base: str | None, roots: tuple[Path, ...]):
    """A fresh folder under ``base`` (default: the system temporary folder), removed afterwards."""
    parent = Path(base).expanduser() if base else Path(tempfile.gettempdir())
    _refuse_inside(parent.absolute(), roots, "the work folder")
    parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="cbstore-build-", dir=parent))
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _load_variables(config: BuildConfig) -> Variables:
    return load_variables(config.variables)


def _load_phenotypes(config: BuildConfig) -> Phenotypes:
    try:
        return load_phenotypes(config.phenotypes)
    except FileNotFoundError:
        raise ConfigError(f"phenotype definitions file {config.phenotypes} does not exist") from None
    except PhenotypeDefinitionError as err:
        raise ConfigError(f"invalid phenotype definitions: {err}") from None


def _require_stays(stays: pd.DataFrame, flow: list[dict]) -> None:
    if len(stays) == 0:
        raise SourceError("no ICU stay is left after the cohort steps:\n" + format_cohort_flow(flow))


def _timings(timings: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.1f} s" for k, v in timings.items() if k.startswith("ehr_"))


@dataclass
class _DecodedXrays:
    """Films selected and decoded for the cohort candidates (before cohort step 5), in their order."""

    selection: pd.DataFrame
    present: np.ndarray  # bool [candidate]
    reasons: np.ndarray  # absent_reason [candidate]
    films: np.ndarray  # uint8 [film, S, S]: only the decoded films, in candidate order
    film_row: np.ndarray  # int64 [candidate]: the candidate's row in films, -1 where it has none

    def images(self, positions: np.ndarray) -> np.ndarray:
        """uint8 [len(positions), S, S]: the films of the candidates at ``positions``, zeros where absent."""
        rows = self.film_row[positions]
        out = np.zeros((len(rows), *self.films.shape[1:]), dtype=np.uint8)
        have = rows >= 0
        out[have] = self.films[rows[have]]
        return out


def _decode_xrays(cx: MimicCxrSource, stays: pd.DataFrame, config: BuildConfig, progress: bool,
                  stop: threading.Event) -> _DecodedXrays | None:
    """Select and decode each stay's film, keeping only the decoded films (in memory).

    Returns None when ``stop`` was set before all blocks were decoded (the build failed meanwhile).
    """
    metadata = read_cxr_metadata(cx.root)
    selection = select_films(metadata, stays[["subject_id", "intime", "prediction_time"]],
                             views=config.views, lookback_hours=config.cxr_lookback_hours)
    n, size = len(stays), config.image_size
    # sized for every selected film; pages of films that fail to decode are never touched
    n_selected = int((selection["path"].fillna("").astype(str) != "").sum())
    films = np.empty((n_selected, size, size), dtype=np.uint8)
    film_row = np.full(n, -1, dtype=np.int64)
    n_films = 0
    present = np.zeros(n, dtype=bool)
    reasons = np.full(n, "", dtype=object)
    batches = iter_image_batches(cx.root, selection, size, workers=config.workers, batch_stays=CHUNK_STAYS)
    with closing(batches), tqdm(total=n, desc="decoding X-rays", unit="stay", disable=not progress) as bar:
        for start, block, block_present, block_reasons in batches:
            if stop.is_set():
                return None
            stop_at = start + len(block)
            rows = np.flatnonzero(block_present)
            films[n_films:n_films + rows.size] = block[rows]
            film_row[start + rows] = np.arange(n_films, n_films + rows.size)
            n_films += rows.size
            present[start:stop_at] = block_present
            reasons[start:stop_at] = block_reasons
            bar.update(len(block))
    return _DecodedXrays(selection=selection, present=present, reasons=reasons, films=films[:n_films],
                         film_row=film_row)


def _xray_table(decoded: _DecodedXrays, positions: np.ndarray,
                index: pd.Index) -> tuple[pd.DataFrame, dict[str, int]]:
    """The ``cxr`` table of the stays at ``positions`` of the candidates, and the skip counts.

    Returns the table (indexed by ``index``, the stays' ids) and the counts of selected films
    that could not be used, by reason.
    """
    if (positions < 0).any():  # keep_with_ehr only drops candidates
        raise AssertionError("a cohort stay is not among the candidates")
    selection = decoded.selection.iloc[positions]
    present = decoded.present[positions]
    reasons = decoded.reasons[positions]

    skips = Counter({"decode_error": 0, "file_missing": 0})
    for reason in reasons:
        if reason and reason != NO_ELIGIBLE_FILM:
            skips[reason.split(":", 1)[0]] += 1
    for reason in sorted({r for r in reasons if r and r != NO_ELIGIBLE_FILM}):
        log.warning("X-ray not used: %s", reason)

    film = selection["dicom_id"].to_numpy(dtype=object) != ""
    cxr = pd.DataFrame({
        "present": present,
        "dicom_id": np.where(present, selection["dicom_id"].to_numpy(dtype=object), ""),
        "study_id": np.where(present, selection["study_id"].to_numpy(np.int64), -1).astype(np.int64),
        "study_time": pd.Series(selection["study_time"].to_numpy()).where(present).to_numpy(),
        "hours_before_prediction": np.where(present, selection["hours_before_prediction"].to_numpy(np.float32),
                                            np.nan).astype(np.float32),
        "view_position": np.where(present, selection["view_position"].to_numpy(dtype=object), ""),
        "n_eligible": selection["n_eligible"].to_numpy(np.int16),
        "absent_reason": np.where(present, "", np.where(film, reasons, NO_ELIGIBLE_FILM)),
    }, index=index)
    return cxr, dict(sorted(skips.items()))


def _attrs(iv: MimicIVSource, cx: MimicCxrSource, config: BuildConfig, variables: Variables,
           phenotypes: Phenotypes, flow: list[dict], n_stays: int, skips: dict[str, int]) -> dict:
    return {
        "sources": {"mimic-iv": iv.describe(), "mimic-cxr-jpg": cx.describe()},
        "config": config.content_dict(),
        "config_sha256": config_sha256(config),
        "runtime": config.runtime_dict(),
        "variables_sha256": variables.sha256,
        "phenotypes_sha256": phenotypes.sha256,
        "cohort_flow": flow,
        "n_stays": int(n_stays),
        "window_hours": int(config.window_hours),
        "n_folds": int(config.n_folds),
        "image_size": int(config.image_size),
        "cxr_skips": skips,
    }
