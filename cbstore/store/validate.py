"""Check a store against ``store_layout.md``: ``validate_store(path) -> list of problems``.

The checks read the hierarchy from disk (not from the consolidated metadata, which is checked
separately), so a store edited or damaged after its build is judged by what it really holds.
Large arrays are read in blocks of stays.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from cbstore.format.content import PART_CODES, STAT_NAMES, TRAIN
from cbstore.format.schema import (
    ARRAYS,
    EMBEDDINGS_GROUP,
    FORMAT_VERSION,
    GROUPS,
    LOS_CLASS_EDGES,
    MANIFEST_NAME,
    MAP_SPEC,
    MODALITIES,
    ROOT_ATTRS_KEY,
    check_packaged,
    config_sha256,
    major,
)
from cbstore.format.stats import training_stats
from cbstore.store.zarr_io import quiet_zarr_warnings

log = logging.getLogger(__name__)

#: Largest ``ehr/values`` (bytes) for which the per-fold statistics are recomputed and compared.
MAX_STATS_RECOMPUTE_BYTES = 2 * 1024**3

#: Most offending ids quoted in one message.
_QUOTE = 5


def _ids(values: np.ndarray) -> str:
    values = np.asarray(values).tolist()
    more = f" ... ({len(values)} in all)" if len(values) > _QUOTE else ""
    return f"{values[:_QUOTE]}{more}"


class _Validator:
    """Collects problems; each ``check_*`` method covers one part of the layout."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.problems: list[str] = []
        self.root: zarr.Group | None = None
        self.attrs: dict = {}
        self.dims: dict[str, int] = {}
        self.cache: dict[str, np.ndarray] = {}

    def problem(self, message: str) -> None:
        self.problems.append(message)

    def read(self, key: str) -> np.ndarray | None:
        """Whole small array ``key`` (cached), or None when it is missing (already reported)."""
        if key not in self.cache:
            try:
                arr = self.root[key]
            except KeyError:
                return None
            self.cache[key] = np.asarray(arr[...])
        return self.cache[key]

    def run(self) -> list[str]:
        with quiet_zarr_warnings():
            return self._run()

    def _run(self) -> list[str]:
        steps = [self.check_folder, self.check_manifest, self.check_attrs, self.check_groups,
                 self.check_stay_axis, self.check_stays, self.check_labels, self.check_ehr,
                 self.check_stats, self.check_cxr, self.check_images, self.check_splits,
                 self.check_embeddings, self.check_consolidated]
        for step in steps:
            try:
                stop = step()
            except Exception as exc:  # a damaged store must give a report, not a traceback
                self.problem(f"{step.__name__[6:]}: could not be checked ({type(exc).__name__}: {exc})")
                stop = False
            if stop:
                break
        return self.problems

    # -- structure -----------------------------------------------------------------------------

    def check_folder(self) -> bool:
        p = self.path
        if not p.is_dir():
            self.problem(f"no store at {p} (not a folder)")
            return True
        if not (p / "zarr.json").is_file():
            self.problem(f"{p} is not a Zarr v3 group (no zarr.json)")
            return True
        try:
            self.root = zarr.open_group(str(p), mode="r", use_consolidated=False)
        except Exception as exc:
            self.problem(f"{p}: cannot open as a zarr group ({exc})")
            return True
        if self.root.metadata.zarr_format != 3:
            self.problem(f"{p}: zarr format {self.root.metadata.zarr_format}, expected 3")
        return False

    def check_manifest(self) -> None:
        mpath = self.path / MANIFEST_NAME
        if not mpath.is_file():
            self.problem(f"no {MANIFEST_NAME}: the build did not finish (incomplete store)")
            return
        try:
            manifest = json.loads(mpath.read_text())
        except ValueError as exc:
            self.problem(f"{MANIFEST_NAME} is not valid JSON ({exc})")
            return
        self.problems += check_packaged(manifest, "manifest", MANIFEST_NAME)
        for key, meta in (manifest.get("arrays") or {}).items():
            try:
                arr = self.root[key]
            except KeyError:
                self.problem(f"{MANIFEST_NAME} lists {key} but the store has no such array")
                continue
            if isinstance(meta, dict) and list(arr.shape) != meta.get("shape"):
                self.problem(f"{key}: shape {list(arr.shape)} differs from the manifest's {meta.get('shape')}")
        self.manifest = manifest

    def check_attrs(self) -> None:
        attrs = self.root.attrs.get(ROOT_ATTRS_KEY)
        if not isinstance(attrs, dict):
            self.problem(f"root attrs have no {ROOT_ATTRS_KEY!r} object")
            return
        self.attrs = attrs
        self.problems += check_packaged(attrs, "root_attrs", f"attrs.{ROOT_ATTRS_KEY}")
        version = attrs.get("format_version")
        try:
            if major(version) != major(FORMAT_VERSION):
                self.problem(f"format_version {version} has another major version than {FORMAT_VERSION}")
        except (TypeError, ValueError):
            pass  # already reported by the schema
        manifest = getattr(self, "manifest", None)
        if manifest is not None:
            for key in ("format_version", "n_stays"):
                if key in manifest and key in attrs and manifest[key] != attrs[key]:
                    self.problem(f"{MANIFEST_NAME} {key} = {manifest[key]!r} but attrs say {attrs[key]!r}")
        if isinstance(attrs.get("config"), dict) and attrs.get("config_sha256") != config_sha256(attrs["config"]):
            self.problem("attrs.config_sha256 is not the SHA-256 of attrs.config")
        flow = attrs.get("cohort_flow")
        if isinstance(flow, list) and flow and all(isinstance(s, dict) and isinstance(s.get("n"), int) for s in flow):
            counts = [s["n"] for s in flow]
            if any(b > a for a, b in zip(counts, counts[1:])):
                self.problem(f"attrs.cohort_flow counts increase: {counts}")
            if "n_stays" in attrs and counts[-1] != attrs["n_stays"]:
                self.problem(f"attrs.cohort_flow ends at {counts[-1]} stays but n_stays is {attrs['n_stays']}")

    def check_groups(self) -> None:
        for group in GROUPS:
            if group not in self.root:
                self.problem(f"group {group}/ is missing")
                continue
            gattrs = self.root[group].attrs
            for key in ("encoding-type", "encoding-version"):
                if key not in gattrs:
                    self.problem(f"group {group}/ has no attr {key!r}")
        for key, spec in ARRAYS.items():
            try:
                arr = self.root[key]
            except KeyError:
                if key.split("/")[0] in self.root:
                    self.problem(f"array {key} is missing")
                continue
            want = np.dtype(object) if spec.is_string else np.dtype(spec.dtype)
            got = arr.dtype
            if spec.is_string:
                if got.kind not in "OTU":
                    self.problem(f"{key}: dtype {got}, expected variable-length UTF-8 strings")
            elif got != want:
                self.problem(f"{key}: dtype {got}, expected {want}")
            dims = tuple(arr.metadata.dimension_names or ())
            if dims != spec.dims:
                self.problem(f"{key}: dimension_names {dims}, expected {spec.dims}")
                continue
            for dim, size in zip(dims, arr.shape):
                if self.dims.setdefault(dim, size) != size:
                    self.problem(f"{key}: dimension {dim!r} has length {size}, elsewhere {self.dims[dim]}")
        for attr, dim in (("n_stays", "stay"), ("window_hours", "time"), ("n_folds", "fold"),
                          ("image_size", "y"), ("image_size", "x")):
            if attr in self.attrs and dim in self.dims and self.attrs[attr] != self.dims[dim]:
                self.problem(f"attrs.{attr} = {self.attrs[attr]} but dimension {dim!r} has length {self.dims[dim]}")
        for key, chunks in (self.attrs.get("chunks") or {}).items():
            try:
                arr = self.root[key]
            except KeyError:
                self.problem(f"attrs.chunks names {key}, which does not exist")
                continue
            if list(arr.chunks) != list(chunks):
                self.problem(f"{key}: chunks {list(arr.chunks)} differ from attrs.chunks {list(chunks)}")

    def check_stay_axis(self) -> None:
        stay = self.read("stays/stay")
        if stay is None:
            return
        if (np.diff(stay) <= 0).any():
            bad = stay[1:][np.diff(stay) <= 0]
            self.problem(f"stays/stay is not sorted ascending and unique (at stay ids {_ids(bad)})")
        for group in GROUPS:
            other = self.read(f"{group}/stay") if group != "stays" else stay
            if other is not None and group != "stats" and not np.array_equal(other, stay):
                self.problem(f"{group}/stay differs from stays/stay (the stay coordinate must be identical)")
        for key, want in (("ehr/time", np.arange(self.dims.get("time", 0))),
                          ("splits/fold", np.arange(self.dims.get("fold", 0))),
                          ("stats/fold", np.arange(self.dims.get("fold", 0)))):
            got = self.read(key)
            if got is not None and not np.array_equal(got, want):
                self.problem(f"{key} must be 0..{len(want) - 1}")
        feat, sfeat = self.read("ehr/feature"), self.read("stats/feature")
        if feat is not None and sfeat is not None and list(map(str, feat)) != list(map(str, sfeat)):
            self.problem("stats/feature differs from ehr/feature")
        if feat is not None and len(set(map(str, feat))) != len(feat):
            self.problem("ehr/feature names are not unique")

    # -- content -------------------------------------------------------------------------------

    def check_stays(self) -> None:
        stay = self.read("stays/stay")
        intime, outtime, pred = (self.read(f"stays/{c}") for c in ("intime", "outtime", "prediction_time"))
        if stay is None or intime is None or outtime is None or pred is None:
            return
        bad = outtime <= intime
        if bad.any():
            self.problem(f"stays/outtime is not after intime for stays {_ids(stay[bad])}")
        window = self.dims.get("time")
        if window is not None:
            bad = pred != intime + window * 3600
            if bad.any():
                self.problem(f"stays/prediction_time is not intime + {window} h for stays {_ids(stay[bad])}")

    def check_labels(self) -> None:
        stay = self.read("stays/stay")
        if stay is None:
            return
        for key in ("mortality", "mortality_hosp", "phenotype_labels"):
            arr = self.read(f"labels/{key}")
            if arr is None:
                continue
            bad = ~np.isin(arr, (0, 1))
            if bad.any():
                rows = np.flatnonzero(bad.reshape(len(arr), -1).any(axis=1))
                self.problem(f"labels/{key}: values outside 0/1 for stays {_ids(stay[rows])}")
        los, los_class = self.read("labels/los"), self.read("labels/los_class")
        if los is None or los_class is None:
            return
        if not np.isfinite(los).all() or (los < 0).any():
            self.problem(f"labels/los: negative or non-finite for stays {_ids(stay[~(np.isfinite(los) & (los >= 0))])}")
        want = np.searchsorted(np.asarray(LOS_CLASS_EDGES), np.nan_to_num(los), side="right") - 1
        bad = los_class != want
        if bad.any():
            self.problem(f"labels/los_class does not match labels/los for stays {_ids(stay[bad])}")
        intime, outtime = self.read("stays/intime"), self.read("stays/outtime")
        if intime is not None and outtime is not None:
            bad = np.abs((outtime - intime) / 86400.0 - los) > 1e-3
            if bad.any():
                self.problem(f"labels/los is not (outtime - intime) in days for stays {_ids(stay[bad])}")

    def _blocks(self, n: int, size: int):
        for start in range(0, n, size):
            yield slice(start, min(start + size, n))

    def check_ehr(self) -> None:
        stay = self.read("stays/stay")
        kind, normalize = self.read("ehr/kind"), self.read("ehr/normalize")
        if kind is not None:
            bad = sorted(set(map(str, kind)) - {"continuous", "binary"})
            if bad:
                self.problem(f"ehr/kind: unknown kinds {bad}")
            if normalize is not None:
                binary_scaled = np.array([str(k) == "binary" for k in kind]) & normalize.astype(bool)
                if binary_scaled.any():
                    self.problem("ehr/normalize is true for binary features (binary features are never scaled)")
        if stay is None or "ehr/values" not in self.root or "ehr/observed" not in self.root:
            return
        values, observed = self.root["ehr/values"], self.root["ehr/observed"]
        step = max(1, values.chunks[0])
        mismatch, infinite = [], []
        for sl in self._blocks(values.shape[0], step):
            v, o = np.asarray(values[sl]), np.asarray(observed[sl])
            mismatch += stay[sl][(o != ~np.isnan(v)).reshape(len(v), -1).any(axis=1)].tolist()
            infinite += stay[sl][np.isinf(v).reshape(len(v), -1).any(axis=1)].tolist()
        if mismatch:
            self.problem(f"ehr/observed is not exactly the non-NaN entries of ehr/values for stays {_ids(mismatch)}")
        if infinite:
            self.problem(f"ehr/values holds inf for stays {_ids(infinite)}")

    def check_stats(self) -> None:
        stats = {s: self.read(f"stats/{s}") for s in STAT_NAMES}
        if any(v is None for v in stats.values()):
            return
        n_obs = stats["n_observed"]
        if (n_obs < 0).any():
            self.problem("stats/n_observed has negative counts")
        for s in ("median", "iqr", "mean", "std", "min", "max"):
            if not np.isfinite(stats[s][n_obs > 0]).all():
                self.problem(f"stats/{s} is not finite for a feature observed in training")
        part = self.read("splits/part")
        if part is None or "ehr/values" not in self.root:
            return
        values = self.root["ehr/values"]
        if values.nbytes > MAX_STATS_RECOMPUTE_BYTES:
            log.info("ehr/values is %d bytes; training statistics are not recomputed", values.nbytes)
            return
        data = np.asarray(values[...])
        names = [str(f) for f in (self.read("ehr/feature") if self.read("ehr/feature") is not None else [])]
        for k in range(part.shape[1]):
            fresh = training_stats(data, part[:, k] == TRAIN)
            for s in STAT_NAMES:
                stored = stats[s][k]
                if not np.allclose(stored, fresh[s], rtol=1e-4, atol=1e-5, equal_nan=True):
                    bad = np.flatnonzero(~np.isclose(stored, fresh[s], rtol=1e-4, atol=1e-5, equal_nan=True))
                    which = [names[i] if i < len(names) else i for i in bad[:_QUOTE]]
                    self.problem(
                        f"stats/{s} of fold {k} is not the statistic of that fold's training stays "
                        f"(features {which})"
                    )

    def check_cxr(self) -> None:
        stay = self.read("stays/stay")
        cols = {c: self.read(f"cxr/{c}") for c in ("present", "dicom_id", "study_id", "study_time",
                                                   "hours_before_prediction", "absent_reason", "n_eligible")}
        if stay is None or any(v is None for v in cols.values()):
            return
        present = cols["present"].astype(bool)
        has_id = np.array([len(str(d)) > 0 for d in cols["dicom_id"]])
        bad = present != has_id
        if bad.any():
            self.problem(f"cxr/present disagrees with cxr/dicom_id (present <=> non-empty id) for stays {_ids(stay[bad])}")
        hours = cols["hours_before_prediction"]
        bad = present & ~(np.isfinite(hours) & (hours >= 0))
        if bad.any():
            self.problem(
                f"cxr/hours_before_prediction is negative or missing for stays {_ids(stay[bad])} "
                "(a film after the prediction time leaks the future)"
            )
        bad = ~present & ~np.isnan(hours)
        if bad.any():
            self.problem(f"cxr/hours_before_prediction must be NaN without a film, stays {_ids(stay[bad])}")
        pred = self.read("stays/prediction_time")
        study_time = cols["study_time"]
        if pred is not None:
            ok = present & np.isfinite(hours)
            bad = ok & (np.abs((pred - study_time) / 3600.0 - np.nan_to_num(hours)) > 0.01)
            if bad.any():
                self.problem(f"cxr/hours_before_prediction is not prediction_time - study_time for stays {_ids(stay[bad])}")
        bad = present & ((cols["study_id"] < 0) | (study_time < 0) | (cols["n_eligible"] < 1))
        if bad.any():
            self.problem(f"cxr: stays with a film lack study_id/study_time/n_eligible: {_ids(stay[bad])}")
        bad = ~present & ((cols["study_id"] != -1) | (study_time != -1))
        if bad.any():
            self.problem(f"cxr: stays without a film must have study_id and study_time -1: {_ids(stay[bad])}")
        reason = np.array([len(str(r)) > 0 for r in cols["absent_reason"]])
        bad = present == reason
        if bad.any():
            self.problem(f"cxr/absent_reason must be empty exactly for stays with a film: {_ids(stay[bad])}")

    def check_images(self) -> None:
        stay, present = self.read("stays/stay"), self.read("cxr/present")
        if stay is None or present is None or "cxr/images" not in self.root:
            return
        images = self.root["cxr/images"]
        step = (images.shards or images.chunks)[0]
        leftover, blank = [], []
        for sl in self._blocks(images.shape[0], max(1, step)):
            nonzero = np.asarray(images[sl]).reshape(sl.stop - sl.start, -1).any(axis=1)
            leftover += stay[sl][nonzero & ~present[sl]].tolist()
            blank += stay[sl][~nonzero & present[sl].astype(bool)].tolist()
        if leftover:
            self.problem(f"cxr/images is not zero for stays without a film: {_ids(leftover)}")
        if blank:
            self.problem(f"cxr/images is all zero for stays marked present: {_ids(blank)}")

    def check_splits(self) -> None:
        part, subject = self.read("splits/part"), self.read("stays/subject_id")
        if part is None or subject is None:
            return
        codes = set(PART_CODES.values())
        bad = ~np.isin(part, list(codes))
        if bad.any():
            self.problem(f"splits/part has codes {sorted(set(np.unique(part[bad]).tolist()))}; valid are 0, 1, 2")
        names = {v: k for k, v in PART_CODES.items()}
        for k in range(part.shape[1]):
            for code in (PART_CODES["train"], PART_CODES["test"]):
                if not (part[:, k] == code).any():
                    self.problem(f"splits: fold {k} has no {names[code]} stays")
            parts_of = {}
            for code in codes:
                for s in np.unique(subject[part[:, k] == code]):
                    parts_of.setdefault(int(s), set()).add(code)
            leaked = sorted(s for s, ps in parts_of.items() if len(ps) > 1)
            if leaked:
                self.problem(f"splits: fold {k} puts patients (subject_id) in more than one part: {_ids(np.array(leaked))}")

    def check_embeddings(self) -> None:
        if EMBEDDINGS_GROUP not in self.root:
            return
        stay = self.read("stays/stay")
        emb = self.root[EMBEDDINGS_GROUP]
        for name, _ in emb.members():
            if name not in MODALITIES:
                self.problem(f"{EMBEDDINGS_GROUP}/{name}: unknown modality (expected {list(MODALITIES)})")
        for modality in MODALITIES:
            if modality not in emb:
                continue
            for enc, grp in emb[modality].groups():
                self._check_embedding(f"{EMBEDDINGS_GROUP}/{modality}/{enc}", modality, enc, grp, stay)

    def _check_embedding(self, where: str, modality: str, enc: str, grp: zarr.Group, stay: np.ndarray | None) -> None:
        attrs = dict(grp.attrs)
        problems = check_packaged(attrs, "embedding_attrs", f"{where} attrs")
        self.problems += problems
        if attrs.get("modality") != modality or attrs.get("encoder_id") != enc:
            self.problem(f"{where}: attrs name {attrs.get('modality')}/{attrs.get('encoder_id')}, not {modality}/{enc}")
        if attrs.get("complete") is not True:
            log.info("%s is not complete; readers ignore it", where)
            return
        for key in ("values", "present", "done", "stay"):
            if key not in grp:
                self.problem(f"{where}: array {key} is missing")
                return
        done = np.asarray(grp["done"][...], dtype=bool)
        if not done.all():
            self.problem(f"{where}: marked complete but {int((~done).sum())} region flag(s) in done are false")
        if stay is not None and not np.array_equal(np.asarray(grp["stay"][...]), stay):
            self.problem(f"{where}/stay differs from stays/stay")
        present = np.asarray(grp["present"][...], dtype=bool)
        values = grp["values"]
        per_fold = bool(attrs.get("per_fold"))
        want = ((self.dims.get("fold"),) if per_fold else ()) + (len(present), attrs.get("dim"))
        if tuple(values.shape) != want:
            self.problem(f"{where}/values: shape {tuple(values.shape)}, expected {want}")
            return
        self._check_map(where, attrs, grp, len(present))
        nan_allowed = bool(attrs.get("nan_allowed", False))
        data = np.asarray(values[...]).reshape(-1, len(present), values.shape[-1])
        for f, block in enumerate(data):
            fold = f" fold {f}" if per_fold else ""
            finite = np.isfinite(block).all(axis=1) if not nan_allowed else ~np.isinf(block).any(axis=1)
            bad = present & ~finite
            if bad.any():
                ids = stay[bad] if stay is not None else np.flatnonzero(bad)
                self.problem(f"{where}/values{fold}: NaN/inf for present stays {_ids(ids)}")
            bad = ~present & ~np.isnan(block).all(axis=1)
            if bad.any():
                ids = stay[bad] if stay is not None else np.flatnonzero(bad)
                self.problem(f"{where}/values{fold}: values for absent stays {_ids(ids)} (must be NaN)")

    def _check_map(self, where: str, attrs: dict, grp: zarr.Group, n: int) -> None:
        """The spatial ``map`` array of a spatial-map embedding (format 1.1): shape, dtype, dims."""
        shape = attrs.get("map_shape")
        if shape is None:
            if "map" in grp:
                self.problem(f"{where}: has a map array but no attrs.map_shape")
            return
        if "map" not in grp:
            self.problem(f"{where}: attrs.map_shape is {shape} but the map array is missing")
            return
        arr = grp["map"]
        if tuple(arr.shape) != (n, *shape):
            self.problem(f"{where}/map: shape {tuple(arr.shape)}, expected {(n, *shape)}")
        if arr.dtype != np.dtype(MAP_SPEC.dtype):
            self.problem(f"{where}/map: dtype {arr.dtype}, expected {MAP_SPEC.dtype}")
        dims = tuple(arr.metadata.dimension_names or ())
        if dims != MAP_SPEC.dims:
            self.problem(f"{where}/map: dimension_names {list(dims)}, expected {list(MAP_SPEC.dims)}")

    def check_consolidated(self) -> None:
        try:
            cons = zarr.open_group(str(self.path), mode="r", use_consolidated=True)
        except ValueError:
            self.problem("root metadata is not consolidated (readers open stores with consolidated metadata)")
            return
        on_disk = {name for name, _ in self.root.members(max_depth=None)}
        listed = {name for name, _ in cons.members(max_depth=None)}
        missing = sorted(on_disk - listed)
        extra = sorted(listed - on_disk)
        if extra:
            self.problem(f"consolidated metadata lists nodes that do not exist: {extra[:_QUOTE]}")
        # incomplete embeddings of a running pass may be missing from it; anything else may not
        missing = [m for m in missing if not m.startswith(EMBEDDINGS_GROUP + "/")]
        if missing:
            self.problem(f"consolidated metadata lacks nodes: {missing[:_QUOTE]}")
        if EMBEDDINGS_GROUP in self.root:
            for name, node in self.root[EMBEDDINGS_GROUP].members(max_depth=1):
                if not isinstance(node, zarr.Group) or name.count("/") != 1:
                    continue
                disk = node.attrs.get("complete")
                try:
                    seen = cons[f"{EMBEDDINGS_GROUP}/{name}"].attrs.get("complete")
                except KeyError:
                    seen = None
                if disk is True and seen is not True:
                    self.problem(f"{EMBEDDINGS_GROUP}/{name} is complete but the consolidated metadata says otherwise (stale)")


def validate_store(path: str | Path) -> list[str]:
    """Check a store against the layout; return the problems found (empty: the store is valid).

    Parameters
    ----------
    path : str or pathlib.Path
        Store folder.

    Returns
    -------
    list of str
        One human-readable message per problem, naming the array, attribute, stays or fold.
    """
    return _Validator(Path(path).absolute()).run()


def format_report(path: str | Path, problems: list[str], format_version: Any = FORMAT_VERSION) -> str:
    """Text of ``cbstore validate``: an OK line, or the problems one per line."""
    path = Path(path).absolute()
    if not problems:
        return f"OK: {path} is a valid cbstore store (format {format_version})"
    lines = [f"INVALID: {path} has {len(problems)} problem(s):"]
    lines += [f"  - {p}" for p in problems]
    return "\n".join(lines)


def validation_report(path: str | Path) -> tuple[str, bool]:
    """Validate ``path`` and return ``(report text, valid)`` (what ``cbstore validate`` prints)."""
    validator = _Validator(Path(path).absolute())
    problems = validator.run()
    version = validator.attrs.get("format_version", FORMAT_VERSION)
    return format_report(path, problems, version), not problems
