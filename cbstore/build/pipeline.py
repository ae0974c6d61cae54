"""``cbstore build``: MIMIC-IV + MIMIC-CXR-JPG -> a complete store, partition by partition.

Order of work (each step in its own module; store_layout.md, "How the build bounds memory"):

1. check the sources (:mod:`cbstore.build.sources`) and the definition files; open (or start over)
   the resume state ``<out>.build/`` beside the output (:mod:`cbstore.build.resume`);
2. open DuckDB over the raw files with its spill files in a fresh work folder (outside the
   sources; removed at the end and on failure) (:mod:`cbstore.build.extract`); cohort steps 1-4
   in SQL (:mod:`cbstore.build.cohort`);
3. read each event table once, keeping the cohort's events of the variables' items inside each
   stay's window, into Parquet in the resume state, bucketed by stay (:mod:`cbstore.build.ehr`).
   Nothing so far needs pandas or zarr: a thread imports them (:func:`_prepare_alongside`), reads
   the candidates' rows, makes their stays table (:mod:`cbstore.build.stays`) and chooses their
   films (:mod:`cbstore.build.cxr`) while DuckDB reads; then cohort step 5 (stays with an EHR
   value) from the events keeps their rows; labels (:mod:`cbstore.build.labels`) and
   patient-level splits (:mod:`cbstore.build.splits`), all per stay and small;
4. per partition (a run of whole 256-stay chunks of the store, in store order): the hourly EHR
   tensor of its stays and, in a thread alongside, its films decoded shard by shard; both are
   written into the unfinished store (:class:`cbstore.store.writer.PartitionedStoreWriter`), then the
   partition is recorded as finished, so an interrupted build continues after it;
5. per-fold training statistics read back from the written tensor (:mod:`cbstore.build.stats`); the
   other arrays and the attributes; the manifest last; the unfinished store is renamed to
   ``out`` and the resume state removed, so a failed build leaves nothing at ``out``.
"""

from __future__ import annotations

import importlib
import logging
import shutil
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cbstore import __version__
from cbstore.build.cohort import keep_with_ehr, read_candidates, select_cohort
from cbstore.build.config import BuildConfig, ConfigError, config_sha256
from cbstore.build.ehr import Variables, hourly_values, load_ehr_tables, load_variables, stays_with_ehr, write_events
from cbstore.build.extract import Extractor
from cbstore.build.memory import release_free_memory
from cbstore.build.phenotypes import PhenotypeDefinitionError, Phenotypes, load_phenotypes
from cbstore.build.resume import BuildState, source_files, state_folder
from cbstore.build.sources import MimicCxrSource, MimicIVSource, locate_mimic_cxr, locate_mimic_iv
from cbstore.build.splits import assign_folds
from cbstore.build.stats import fold_statistics
from cbstore.errors import SourceError, StoreExistsError
from cbstore.format.content import StoreContent

if TYPE_CHECKING:  # loaded alongside the extraction (_LOADED_ALONGSIDE)
    import pandas as pd

    from cbstore.store.writer import PartitionedStoreWriter

log = logging.getLogger(__name__)

#: What the build needs only once it has extracted the events, besides pandas (about 0.5 s to
#: import), the X-ray step and the stays table, which :func:`_prepare_alongside` uses itself: the
#: labels, zarr under the store writer (0.2 s), jsonschema (0.08 s). That thread imports them while
#: DuckDB reads the event tables, in time the extraction's threads leave over, so the start of a
#: build waits for none of them.
_LOADED_ALONGSIDE = ("cbstore.build.labels", "cbstore.store.writer", "jsonschema")
#: Stays per EHR chunk and per image shard of the written store.
CHUNK_STAYS = 256
#: Cohort stays per partition when ``partitions`` is not set (before cohort step 5): 6 chunks. The
#: default count is the one that makes partitions closest to this size, so that each partition
#: of a large source holds the same stays (and the same working set) whatever the source's size.
PARTITION_STAYS = 6 * CHUNK_STAYS


def build_store(mimic_iv: str | Path, mimic_cxr: str | Path, out: str | Path, config: BuildConfig | None = None,
                overwrite: bool = False, progress: bool = True) -> Path:
    """Build a store from MIMIC-IV and MIMIC-CXR-JPG, partition by partition, resuming an interrupted build.

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
        Replace an existing store at ``out`` (only once the new one is complete), and start over
        instead of resuming an interrupted build.
    progress : bool
        Log each step and each partition (with an estimate of the time left) at INFO level.

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

    Notes
    -----
    An interrupted build leaves its state in ``<out>.build/``; running the same build again
    continues after the last finished partition, unless the sources, the settings or the
    partition count changed (it then starts over and logs why).
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
            flow = select_cohort(ex, min_age=config.min_age, window_hours=config.window_hours)
            n_candidates = flow[-1]["n"]
            _require_stays(n_candidates, flow)
            n_partitions = _partition_count(config, n_candidates)
            bucket_stays = -(-n_candidates // n_partitions)
            state = BuildState(state_folder(out), _resume_key(iv, cx, config, variables, phenotypes, n_partitions),
                               restart=overwrite)
            say("cohort: %d of %d ICU stays before EHR extraction; %d partition(s); state in %s",
                n_candidates, flow[0]["n"], n_partitions, state.folder)
            load_ehr_tables(ex, variables)
            # What needs no EHR event runs in a thread while DuckDB extracts the events (it releases
            # the GIL): the imports of _LOADED_ALONGSIDE, the candidates' rows and their films.
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="cbstore-build-side") as side, \
                    closing(ex.cursor()) as reader:
                prepared = side.submit(_prepare_alongside, reader, cx, config)
                if state.events_dir.is_dir():
                    say("EHR events: extracted by an earlier run")
                else:
                    state.write_events(lambda folder: write_events(ex, variables, folder, bucket_stays))
                    say("EHR events: extracted in %.1f s", ex.timings["ehr_events"])
                candidates, candidate_table, candidate_films = prepared.result()
            from cbstore.build.labels import compute_labels  # these two: loaded by _prepare_alongside
            from cbstore.store.writer import PartitionedStoreWriter

            with_ehr = stays_with_ehr(ex, state.events_dir)
            stays = keep_with_ehr(candidates, with_ehr, flow)
            _require_stays(len(stays), flow)
            labels = compute_labels(ex, stays, phenotypes.code_table(), list(phenotypes.names))
            table, selection = candidate_table.iloc[with_ehr], candidate_films.iloc[with_ehr]
            del candidate_table, candidate_films
            release_free_memory()  # what the candidates' rows held, before the partitions
            splits = assign_folds(table["subject_id"].to_numpy(), labels["mortality"], n_folds=config.n_folds,
                                  val_fraction=config.val_fraction, seed=config.seed)
            writer = PartitionedStoreWriter(state.partial_store, len(table), config.window_hours,
                                            len(variables.items), config.image_size, chunk_stays=CHUNK_STAYS)
            plan = partition_rows(len(table), writer.shard_stays, n_partitions)
            _run_partitions(plan, state, say, lambda start, stop: _process_partition(
                ex, writer, cx, config, variables, state.events_dir, with_ehr[start:stop], bucket_stays,
                selection.iloc[start:stop], start))
        present, reasons = _xray_outcome(state, len(plan))
        cxr, skips = _xray_table(selection, present, reasons)
        say("CXR: %d of %d stays with a film; skipped %s", int(cxr["present"].sum()), len(cxr), skips)
        stats = fold_statistics(writer.values, splits, feature_names=variables.names)
        content = StoreContent(
            stays=table, labels=labels, phenotype_names=list(phenotypes.names),
            features=variables.features_table(), ehr_values=None, cxr=cxr, images=None,
            splits=splits, stats=stats,
            attrs=_attrs(iv, cx, config, variables, phenotypes, flow, len(table), skips),
        )
        path = writer.finish(out, content, overwrite)
        state.remove()
    say("store written to %s in %.1f s", path, time.perf_counter() - started)
    return path


def partition_rows(n_stays: int, chunk_stays: int, partitions: int) -> list[tuple[int, int]]:
    """Row ranges ``(start, stop)`` of the partitions: runs of whole chunks, as equal as possible.

    At most one partition per chunk of ``chunk_stays`` stays (the last chunk may be shorter).
    """
    n_chunks = -(-n_stays // chunk_stays)
    k = max(1, min(partitions, n_chunks))
    bounds = [p * n_chunks // k * chunk_stays for p in range(k)] + [n_stays]
    return [(bounds[p], min(bounds[p + 1], n_stays)) for p in range(k)]


def _partition_count(config: BuildConfig, n_candidates: int) -> int:
    """Partitions asked for (default: closest to PARTITION_STAYS candidates each), at most one per chunk of candidates."""
    wanted = config.partitions or round(n_candidates / PARTITION_STAYS)
    return max(1, min(wanted, -(-n_candidates // CHUNK_STAYS)))


def _resume_key(iv: MimicIVSource, cx: MimicCxrSource, config: BuildConfig, variables: Variables,
                phenotypes: Phenotypes, n_partitions: int) -> dict:
    return {"cbstore_version": __version__, "config_sha256": config_sha256(config),
            "variables_sha256": variables.sha256, "phenotypes_sha256": phenotypes.sha256,
            "partitions": n_partitions, "chunk_stays": CHUNK_STAYS, "sources": source_files(iv, cx)}


def _run_partitions(plan: list[tuple[int, int]], state: BuildState, say, process) -> None:
    """Run ``process(start, stop)`` for each unfinished partition, record it, log progress with an ETA."""
    todo = [p for p in range(len(plan)) if not state.partition_done(p)]
    if len(todo) < len(plan):
        say("resuming: %d of %d partitions already finished", len(plan) - len(todo), len(plan))
    t0 = time.perf_counter()
    for done, p in enumerate(todo, start=1):
        start, stop = plan[p]
        record = process(start, stop)
        state.save_partition(p, {"partition": p, "start": start, "stop": stop, **record})
        release_free_memory()  # what the partition freed, so that it does not add up over the partitions
        elapsed = time.perf_counter() - t0
        say("partition %d/%d (stays %d-%d) done; %d left, about %.0f s", p + 1, len(plan), start, stop - 1,
            len(todo) - done, elapsed / done * (len(todo) - done))


def _prepare_alongside(reader: Extractor, cx: MimicCxrSource,
                       config: BuildConfig) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Import :data:`_LOADED_ALONGSIDE`; read the cohort candidates, their stays table and their films.

    Then hand back to the operating system what the MIMIC-CXR metadata table held
    (:func:`cbstore.build.memory.release_free_memory`).

    Runs in a thread while the build's own connection extracts the events, so it reads through
    ``reader`` (:meth:`Extractor.cursor`). Returns the candidates (:func:`cbstore.build.cohort.read_candidates`),
    :func:`cbstore.build.stays.stays_table` of them and :func:`cbstore.build.cxr.select_films` of
    them, row for row: each row depends on its own stay only, so the rows of the stays that cohort
    step 5 keeps are the stays' rows.
    """
    for module in _LOADED_ALONGSIDE:
        importlib.import_module(module)
    from cbstore.build.cxr import read_cxr_metadata, select_films
    from cbstore.build.stays import stays_table

    candidates = read_candidates(reader)
    table = stays_table(candidates, config.min_age)
    # only the rows of the cohort's subjects and of the accepted views: no other film is eligible
    metadata = read_cxr_metadata(cx.root, views=config.views, subjects=table["subject_id"].to_numpy())
    films = select_films(metadata, table[["subject_id", "intime", "prediction_time"]],
                         views=config.views, lookback_hours=config.cxr_lookback_hours)
    del metadata
    # now, not after the extraction: the build's peak is DuckDB's extraction, and the freed metadata
    # table would add to it
    release_free_memory()
    return candidates, table, films


def _process_partition(ex: Extractor, writer: PartitionedStoreWriter, cx: MimicCxrSource, config: BuildConfig,
                       variables: Variables, events: Path, stay_idx: np.ndarray, bucket_stays: int,
                       selection: pd.DataFrame, start: int) -> dict:
    """Write the EHR tensor and the films of one partition; return its X-ray outcome (JSON types).

    The films are decoded and written in a thread while DuckDB aggregates the EHR (PIL and
    DuckDB release the GIL).
    """
    stop = threading.Event()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="cbstore-build-xray") as pool:
        decoding = pool.submit(_decode_films, cx, selection, writer, start, config, stop)
        try:
            values = hourly_values(ex, events, stay_idx, bucket_stays, variables, config.window_hours)
            writer.write_ehr(start, values)
            del values
        except BaseException:
            stop.set()  # the decoding thread stops after its current block
            raise
        present, reasons = decoding.result()
    return {"present": present.tolist(), "reasons": reasons}


def _decode_films(cx: MimicCxrSource, selection: pd.DataFrame, writer: PartitionedStoreWriter, start: int,
                  config: BuildConfig, stop: threading.Event) -> tuple[np.ndarray, list[str]]:
    """Decode the selected films of the stays ``start ..`` shard by shard and write them.

    Returns whether each stay's film was decoded and the absent reasons.
    """
    from cbstore.build.cxr import iter_image_batches  # not at the top: see _LOADED_ALONGSIDE

    present = np.zeros(len(selection), dtype=bool)
    reasons: list[str] = []
    batches = iter_image_batches(cx.root, selection, config.image_size, workers=config.workers,
                                 batch_stays=writer.shard_stays)
    with closing(batches):
        for offset, block, block_present, block_reasons in batches:
            if stop.is_set():
                break
            writer.write_images(start + offset, block, block_present)
            present[offset:offset + len(block)] = block_present
            reasons.extend(block_reasons)
    return present, reasons


def _xray_outcome(state: BuildState, n_partitions: int) -> tuple[np.ndarray, np.ndarray]:
    """Per stay, in store order: film decoded, absent reason (from the partition records)."""
    present, reasons = [], []
    for p in range(n_partitions):
        record = state.load_partition(p)
        present.extend(record["present"])
        reasons.extend(record["reasons"])
    return np.asarray(present, dtype=bool), np.asarray(reasons, dtype=object)


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


def _require_stays(n_stays: int, flow: list[dict]) -> None:
    if n_stays == 0:
        raise SourceError("no ICU stay is left after the cohort steps:\n" + format_cohort_flow(flow))


def _xray_table(selection: pd.DataFrame, present: np.ndarray,
                reasons: np.ndarray) -> tuple[pd.DataFrame, dict[str, int]]:
    """The ``cxr`` table of the stays and the skip counts.

    ``selection`` is :func:`cbstore.build.cxr.select_films` of the stays (indexed by stay id);
    ``present`` and ``reasons`` say, per stay, whether its film was decoded and why not. Returns
    the table and the counts of selected films that could not be used, by reason.
    """
    import pandas as pd  # these two not at the top: see _LOADED_ALONGSIDE

    from cbstore.build.cxr import NO_ELIGIBLE_FILM

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
    }, index=selection.index)
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
