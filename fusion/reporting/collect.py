"""Read run folders into records with their settings, and the tidy results table.

A report is derived from run folders alone: ``config.json`` (the settings), ``metrics.json`` (the
evaluator's numbers), ``run.json`` (the method's absent-X-ray policy), ``predictions.parquet`` and
``predictions_permuted_<modality>.parquet`` (recomputations: significance, calibration, reliance).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import pandas as pd

from fusion.evaluation import load_predictions
from fusion.permuted import PERMUTED_FILE
from fusion.registry import FusionError

__all__ = ["ReportInputError", "RunRecord", "SETTING_COLUMNS", "find_run_folders", "load_runs",
           "results_frame"]

_COMPLETE = "COMPLETE"
#: Columns of :func:`results_frame` that describe a run (before ``hp.*``, metric and values).
SETTING_COLUMNS = (
    "run_id", "method", "task", "cohort", "fold", "seed", "features", "ehr_encoder", "cxr_encoder",
    "cxr_missing_rate", "missing_at", "mask_seed", "absent_cxr_policy", "n_boot", "n_test",
    "preset", "tuned_on_test", "store_path", "store_config_sha256", "cbstore_version",
)


class ReportInputError(FusionError, ValueError):
    """The given paths hold no usable run folder, or a run folder is malformed."""


@dataclasses.dataclass
class RunRecord:
    """One complete run folder.

    Attributes
    ----------
    run_id : str
    path : pathlib.Path
    config : dict
        ``config.json``.
    metrics : dict
        ``metrics.json``.
    info : dict
        ``run.json`` (empty when absent).
    settings : dict
        Flat settings (:data:`SETTING_COLUMNS` plus ``hp.<name>`` per hyperparameter).
    """

    run_id: str
    path: pathlib.Path
    config: dict
    metrics: dict
    info: dict
    settings: dict

    @property
    def method(self) -> str:
        return self.settings["method"]

    @property
    def task(self) -> str:
        return self.settings["task"]

    @property
    def cohort(self) -> str:
        return self.settings["cohort"]

    @property
    def fold(self) -> int:
        return self.settings["fold"]

    @property
    def seed(self) -> int:
        return self.settings["seed"]

    @property
    def cxr_missing_rate(self) -> float:
        return self.settings["cxr_missing_rate"]

    @property
    def missing_at(self) -> str:
        """Masked parts joined by commas (``""`` at rate 0)."""
        return self.settings["missing_at"]

    @property
    def policy(self) -> str:
        """The method's ``absent_cxr_policy``."""
        return self.settings["absent_cxr_policy"]

    @property
    def variant(self) -> tuple:
        """What makes two runs the same model: method, feature mode and embeddings."""
        s = self.settings
        return (s["method"], s["features"], s["ehr_encoder"], s["cxr_encoder"])

    def predictions(self):
        """``(frame, meta)`` of ``predictions.parquet`` (validated)."""
        return load_predictions(self.path / "predictions.parquet")

    def permuted_predictions(self, modality: str):
        """``(frame, meta)`` of the permuted-``modality`` predictions, or None if not recorded."""
        path = self.path / PERMUTED_FILE.format(modality=modality)
        return load_predictions(path) if path.is_file() else None


def find_run_folders(paths) -> tuple[list[pathlib.Path], list[str]]:
    """Complete run folders among ``paths`` (run folders, or folders holding run folders).

    Returns
    -------
    (list of pathlib.Path, list of str)
        The folders (each once, in order) and notes on what was skipped (incomplete folders,
        failure records).

    Raises
    ------
    ReportInputError
        A path does not exist, or a path is neither a run folder nor holds one.
    """
    found, notes, seen = [], [], set()
    for path in map(pathlib.Path, paths):
        if not path.is_dir():
            raise ReportInputError(f"{path}: no such folder; give run folders or folders of runs "
                                   "(e.g. the --out folder of cbstore fuse or cbstore bench)")
        if (path / _COMPLETE).is_file():
            candidates = [path]
        else:
            children = sorted(p for p in path.iterdir()
                              if p.is_dir() and not p.name.startswith("."))
            candidates = [p for p in children if (p / _COMPLETE).is_file()]
            incomplete = [p.name for p in children if (p / "config.json").is_file()
                          and not (p / _COMPLETE).is_file()]
            failed = sorted(p.name for p in path.glob("*.failed.json"))
            if incomplete:
                notes.append(f"{path}: {len(incomplete)} incomplete run folder(s) skipped "
                             f"({', '.join(incomplete[:5])})")
            if failed:
                notes.append(f"{path}: {len(failed)} failed cell(s) ({', '.join(failed[:5])})")
            if not candidates:
                raise ReportInputError(
                    f"{path}: neither a complete run folder (no {_COMPLETE} file) nor a folder "
                    "holding any; run `cbstore fuse` or `cbstore bench` first")
        for folder in candidates:
            key = folder.resolve()
            if key not in seen:
                seen.add(key)
                found.append(folder)
    return found, notes


def _read_json(path: pathlib.Path, required: bool = True) -> dict:
    if not path.is_file():
        if required:
            raise ReportInputError(f"{path}: missing; the run folder is not complete (rerun it)")
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ReportInputError(f"{path}: not valid JSON ({exc}); rerun the run") from exc


def _settings(run_id: str, config: dict, metrics: dict, info: dict) -> dict:
    """Flat settings of a run (see :data:`SETTING_COLUMNS`)."""
    embeddings = config.get("embeddings") or {}
    store = config.get("store") or {}
    try:
        settings = {
            "run_id": run_id, "method": config["method"], "task": config["task"],
            "cohort": config["cohort"], "fold": int(config["fold"]), "seed": int(config["seed"]),
            "features": config["features"],
            "ehr_encoder": (embeddings.get("ehr") or {}).get("encoder_id"),
            "cxr_encoder": (embeddings.get("cxr") or {}).get("encoder_id"),
            "cxr_missing_rate": float(config.get("cxr_missing_rate") or 0.0),
            "missing_at": ",".join(config.get("missing_at") or []),
            "mask_seed": config.get("mask_seed"),
            "absent_cxr_policy": info.get("absent_cxr_policy")
            or (metrics.get("meta") or {}).get("absent_cxr_policy") or "unknown",
            "n_boot": config.get("n_boot"),
            "n_test": (metrics.get("n") or {}).get("test"),
            "preset": config.get("preset"),
            "tuned_on_test": config.get("tuned_on_test"),
            "store_path": store.get("path"),
            "store_config_sha256": store.get("config_sha256"),
            "cbstore_version": config.get("cbstore_version"),
        }
    except KeyError as exc:
        raise ReportInputError(f"run {run_id}: config.json has no key {exc.args[0]!r}; "
                               "was it written by cbstore fuse?") from None
    for name, value in sorted((config.get("hyperparameters") or {}).items()):
        settings[f"hp.{name}"] = json.dumps(value) if isinstance(value, (list, dict)) else value
    return settings


def load_runs(paths) -> tuple[list[RunRecord], list[str]]:
    """Read every complete run folder under ``paths`` (see :func:`find_run_folders`).

    Returns
    -------
    (list of RunRecord, list of str)
        Records sorted by (task, cohort, method, fold, seed, missing rate, run id), and notes.
        A run id met twice (the same run copied into two folders) is read once.
    """
    folders, notes = find_run_folders(paths)
    runs, ids = [], {}
    for folder in folders:
        config = _read_json(folder / "config.json")
        run_id = config.get("run_id") or folder.name
        if run_id in ids:
            notes.append(f"run {run_id} found twice ({ids[run_id]}, {folder}); the first is used")
            continue
        ids[run_id] = folder
        metrics = _read_json(folder / "metrics.json")
        info = _read_json(folder / "run.json", required=False)
        runs.append(RunRecord(run_id, folder, config, metrics, info,
                              _settings(run_id, config, metrics, info)))
    runs.sort(key=lambda r: (r.task, r.cohort, r.method, r.fold, r.seed, r.cxr_missing_rate,
                             r.missing_at, r.run_id))
    return runs, notes


def results_frame(runs: list[RunRecord]) -> pd.DataFrame:
    """The tidy results: one row per run x headline metric of ``metrics.json``.

    Columns: :data:`SETTING_COLUMNS`, one ``hp.<name>`` column per hyperparameter of any run
    (empty where a method lacks it), then ``metric``, ``value``, ``ci_low``, ``ci_high``.
    """
    rows = []
    for run in runs:
        for metric, entry in (run.metrics.get("metrics") or {}).items():
            entry = entry or {}
            rows.append({**run.settings, "metric": metric, "value": entry.get("value"),
                         "ci_low": entry.get("ci_low"), "ci_high": entry.get("ci_high")})
    frame = pd.DataFrame.from_records(rows)
    hp = sorted(c for c in frame.columns if c.startswith("hp."))
    columns = [*SETTING_COLUMNS, *hp, "metric", "value", "ci_low", "ci_high"]
    return frame.reindex(columns=columns).convert_dtypes()
