"""One fusion run: resolve and hash its configuration, fit, predict, evaluate, write its folder.

A run is identified by the first 12 hex digits of the SHA-256 of its resolved configuration
(canonical JSON): store path and ``config_sha256``, the embeddings used (id and creation time),
method and every hyperparameter (defaults included), task, fold, seed, feature mode, cohort,
missing-modality mask, number of bootstrap resamples, the cbstore version and, when one is used,
the hyperparameter preset (name and ``tuned_on_test``). The output folder,
``--overwrite``, the device and the progress bar do not enter the id.

Run folder ``<out>/<run-id>/``::

    config.json          resolved configuration (+ run id and the options outside the hash)
    predictions.parquet  val and test predictions (fusion.evaluation.write_predictions format)
    predictions_permuted_<modality>.parquet
                         test predictions with that modality's inputs permuted across test
                         stays, one file per modality the method reads (fusion.permuted)
    metrics.json         fusion.evaluation.evaluate_predictions of predictions.parquet
    fairness.csv         per-group table, when the evaluator provides one
    run.json             timings, part sizes, training history
    weights/             the fitted method (method.save)
    COMPLETE             written last

The folder is assembled in a hidden work folder ``<out>/.<run-id>.partial/`` and renamed into
place, so a folder named after a run id is either complete or left over from a crash (then
replaced). A complete run with the same id is reused unless ``overwrite`` is set.

Resuming: a method that can resume (``resumable``, the neural ones) keeps an epoch checkpoint in
the work folder (``checkpoint.pt``, deleted when the run completes). A run that was killed, or
failed, after some epochs keeps its work folder; rerunning the same configuration resumes the fit
from its last completed epoch and ends bit-identical on CPU to an uninterrupted run.
``overwrite`` discards the work folder. A run that fails before any checkpoint leaves nothing.

Processes: while a run works, it holds an exclusive lock on ``<out>/.<run-id>.lock`` (``flock``,
released by the system if the process dies; the file is removed afterwards), so a second process
with the same run id waits and then reuses the finished run. Runs are made with the process's
file-creation mask as it is (the umask is never changed).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fcntl
import hashlib
import json
import logging
import os
import pathlib
import shutil
import time
from collections.abc import Callable
from importlib import metadata

import numpy as np
import pandas as pd

from fusion.config import PARTS, RunConfig
from fusion.data import load_fusion_data, resolve_encoder
from fusion.evaluation import (
    evaluate_predictions, format_table, load_predictions, write_json, write_predictions)
from fusion.permuted import PERMUTED_FILE, permutation_generator, permuted_data
from fusion.registry import get_method

__all__ = ["CHECKPOINT_FILE", "COMPLETE_MARKER", "DEMOGRAPHICS", "PREDICTED_PARTS", "RunResult", "predictions_frame",
           "resolve", "run_fusion", "run_id_of", "summary_lines"]

log = logging.getLogger(__name__)

COMPLETE_MARKER = "COMPLETE"
#: Epoch checkpoint of a resumable method, inside the run's work folder.
CHECKPOINT_FILE = "checkpoint.pt"
#: Demographic columns joined from ``stays/`` into the predictions.
DEMOGRAPHICS = ("gender", "age_group", "race", "insurance", "admission_type")
#: Parts written to the predictions file (val: threshold selection; test: scores).
PREDICTED_PARTS = ("val", "test")
#: Length of a run id (hex digits of the configuration hash).
RUN_ID_LENGTH = 12


@dataclasses.dataclass
class RunResult:
    """Outcome of :func:`run_fusion`.

    Attributes
    ----------
    run_id : str
    path : pathlib.Path
        The complete run folder.
    reused : bool
        True if an existing complete run was reused.
    config : dict
        The resolved configuration.
    metrics : dict
        Content of ``metrics.json``.
    """

    run_id: str
    path: pathlib.Path
    reused: bool
    config: dict
    metrics: dict


def _package_version() -> str:
    try:
        return metadata.version("cbstore")
    except metadata.PackageNotFoundError:  # running from a source tree without install
        return "unknown"


def _canonical(doc) -> str:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def run_id_of(resolved: dict) -> str:
    """First :data:`RUN_ID_LENGTH` hex digits of the SHA-256 of the canonical JSON of ``resolved``."""
    return hashlib.sha256(_canonical(resolved).encode("utf-8")).hexdigest()[:RUN_ID_LENGTH]


def _embedding_record(entry: dict) -> dict:
    return {"encoder_id": entry["encoder_id"], "per_fold": bool(entry.get("per_fold")),
            "dim": int(entry.get("dim", 0)), "created_at": entry.get("created_at"),
            "weights": entry.get("weights"), "weights_sha256": entry.get("weights_sha256")}


def resolve(cfg: RunConfig, store) -> dict:
    """Check ``cfg`` against the registry and the store; return the configuration that is hashed.

    Raises
    ------
    UnknownMethodError, UnsupportedFeaturesError, HyperparameterError
        Unknown method, feature mode or task the method does not support, bad hyperparameter.
    FusionDataError
        Embedding missing from the store, or no labels for the task.
    """
    cls = get_method(cfg.method)
    cls.check_task(cfg.task)
    inputs = cls.inputs_for(cfg.features)
    preset_values, preset = {}, None
    if cfg.preset is not None:
        from fusion.presets import preset_hyperparameters

        preset_values, preset = preset_hyperparameters(cls.name, cfg.preset, cfg.task, cfg.cohort)
    # defaults < cached-mode defaults < preset < config file < --set
    hyper = cls.resolve_hyperparameters({**preset_values, **cfg.hyperparameters},
                                        features=cfg.features)
    embeddings = {}
    for key, modality, given in (("ehr", "ehr", cfg.ehr_encoder), ("cxr", "cxr", cfg.cxr_encoder),
                                 ("cxr_map", "cxr", cfg.cxr_map_encoder)):
        kind = "cxr_map" if key == "cxr_map" else f"{modality}_emb"
        needed = cfg.features == "cached" and kind in inputs
        if needed or given is not None:
            entry = resolve_encoder(store, modality, given, kind)
            if needed:
                embeddings[key] = _embedding_record(entry)
    masked = cfg.cxr_missing_rate > 0
    resolved = {
        "cbstore_version": _package_version(),
        "store": {"path": str(pathlib.Path(store.path).resolve()),
                  "config_sha256": store.attrs.get("config_sha256"),
                  "format_version": store.attrs.get("format_version")},
        "method": cls.name,
        "hyperparameters": hyper,
        "task": cfg.task,
        "fold": cfg.fold,
        "seed": cfg.seed,
        "features": cfg.features,
        "embeddings": embeddings,
        "cohort": cfg.cohort,
        "cxr_missing_rate": cfg.cxr_missing_rate,
        # without a mask the parts and seed of the mask change nothing, so they stay out of the id
        "missing_at": list(cfg.missing_at) if masked else [],
        "mask_seed": (cfg.seed if cfg.mask_seed is None else cfg.mask_seed) if masked else None,
        "predicted_parts": list(PREDICTED_PARTS),
        "n_boot": cfg.n_boot,
    }
    if preset is not None:  # only when given, so that the ids of runs without one do not change
        resolved["preset"] = {"name": preset["name"], "tuned_on_test": preset["tuned_on_test"]}
    return resolved


def predictions_frame(method, data, store, *, run_id: str,
                      parts=PREDICTED_PARTS) -> tuple[pd.DataFrame, dict]:
    """Predictions of a fitted ``method`` on ``parts`` of ``data`` in the predictions format.

    Returns
    -------
    (pandas.DataFrame, dict)
        One row per (stay, part): ids, labels, probabilities (per modality where the method
        gives them), X-ray flags and demographics; and the file meta.
    """
    task, names = data.task, list(data.label_names)
    prob_names = names
    frames = []
    demographics = store.stays.loc[:, list(DEMOGRAPHICS)]
    for part in parts:
        item = data.part(part)
        prob = np.asarray(method.predict_proba(data, part), dtype=np.float64)
        expected = (len(item), data.n_outputs)
        if prob.shape != expected:
            raise ValueError(f"method {method.name!r} returned probabilities of shape {prob.shape} "
                             f"for part {part!r}, expected {expected}")
        frame = {"stay_id": item.stay_id.astype(np.int64), "part": part,
                 "fold": np.full(len(item), data.fold, dtype=np.int64), "task": task}
        if data.multiclass:
            frame[f"y_true_{task}"] = item.y.astype(np.int64)
        else:
            for j, name in enumerate(names):
                frame[f"y_true_{name}"] = item.y[:, j].astype(np.int64)
        for j, name in enumerate(prob_names):
            frame[f"y_prob_{name}"] = prob[:, j]
        for modality, values in method.predict_modality_proba(data, part).items():
            for j, name in enumerate(prob_names):
                frame[f"y_prob_{modality}_{name}"] = np.asarray(values, dtype=np.float64)[:, j]
        frame["cxr_present"] = item.cxr_present.astype(bool)
        frame["cxr_masked"] = item.cxr_masked.astype(bool)
        df = pd.DataFrame(frame)
        demo = demographics.loc[item.stay_id]
        for col in DEMOGRAPHICS:
            df[col] = demo[col].to_numpy()
        frames.append(df)
    meta = {"task": task, "labels": [task] if data.multiclass else names, "method": method.name,
            "run_id": run_id, "fold": data.fold, "seed": method.seed, "features": data.features,
            "cohort": data.cohort, "cxr_missing_rate": data.cxr_missing_rate,
            "absent_cxr_policy": method.absent_cxr_policy}
    if data.multiclass:
        meta["class_names"] = names
    return pd.concat(frames, ignore_index=True), meta


def summary_lines(metrics: dict) -> list[str]:
    """Headline test metrics of ``metrics.json`` with their 95% CIs, as a Markdown table."""
    rows = [{"test metric": name, "estimate [95% CI]": value}
            for name, value in (metrics.get("metrics") or {}).items()]
    lines = format_table(rows, digits=4).splitlines() if rows else []
    return lines + [f"note: {note}" for note in metrics.get("notes") or []]


def _fairness_csv(metrics: dict, path: pathlib.Path) -> bool:
    """Write the evaluator's per-group table of the test part; return whether it had rows.

    The table is :func:`fusion.evaluation.fairness_table` of the run's predictions (same
    defaults), read from the fairness section that :func:`evaluate_predictions` has already
    computed rather than computed a second time (that took seconds on 20,000 stays).
    """
    attributes = (metrics.get("fairness") or {}).get("attributes") or {}
    tables = []
    for name, entry in attributes.items():
        table = pd.DataFrame.from_records(entry["groups"])
        table.insert(0, "attribute", name)
        tables.append(table)
    table = pd.concat(tables, ignore_index=True) if tables else None
    if table is None or len(table) == 0:
        return False
    first = ["attribute", "group", "n", "small"]
    table[first + [c for c in table.columns if c not in first]].to_csv(path, index=False)
    return True


def _write_permuted(method, data, store, run_id: str, seed: int, folder: pathlib.Path) -> None:
    """Test predictions with each modality the method reads permuted (modality reliance)."""
    rng = permutation_generator(seed)
    for modality in sorted(method.modalities):
        permuted = permuted_data(data, modality, rng)
        df, meta = predictions_frame(method, permuted, store, run_id=run_id, parts=("test",))
        meta["permuted_modality"] = modality
        write_predictions(df, meta, folder / PERMUTED_FILE.format(modality=modality))


def _execute(cfg: RunConfig, store, resolved: dict, run_id: str, folder: pathlib.Path,
             echo: Callable[[str], None]) -> dict:
    started = time.perf_counter()
    cls = get_method(cfg.method)
    data = load_fusion_data(
        store, cfg.task, cfg.fold, cohort=cfg.cohort, features=cfg.features,
        inputs=cls.inputs_for(cfg.features),
        ehr_encoder=resolved["embeddings"].get("ehr", {}).get("encoder_id"),
        cxr_encoder=resolved["embeddings"].get("cxr", {}).get("encoder_id"),
        cxr_map_encoder=resolved["embeddings"].get("cxr_map", {}).get("encoder_id"),
        cxr_missing_rate=cfg.cxr_missing_rate, missing_at=cfg.missing_at,
        mask_seed=resolved["mask_seed"] or 0, parts=PARTS)
    loaded = time.perf_counter()
    method = cls(seed=cfg.seed, features=cfg.features, **resolved["hyperparameters"])
    method.weights_dir = cfg.weights_dir  # where pretrained files are; methods without any ignore it
    resume = {"checkpoint": folder / CHECKPOINT_FILE} if cls.resumable else {}
    method.fit(data, device=cfg.device, progress=cfg.progress, **resume)
    fitted = time.perf_counter()
    method.save(folder / "weights")
    df, meta = predictions_frame(method, data, store, run_id=run_id)
    write_predictions(df, meta, folder / "predictions.parquet")
    _write_permuted(method, data, store, run_id, cfg.seed, folder)
    predicted = time.perf_counter()
    df, meta = load_predictions(folder / "predictions.parquet")  # score exactly what was written
    metrics = evaluate_predictions(df, meta, n_boot=cfg.n_boot, seed=cfg.seed)
    write_json(metrics, folder / "metrics.json")
    fairness = _fairness_csv(metrics, folder / "fairness.csv")
    evaluated = time.perf_counter()
    write_json({
        "run_id": run_id,
        "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "seconds": {"load": round(loaded - started, 3), "fit": round(fitted - loaded, 3),
                    "predict": round(predicted - fitted, 3),
                    "evaluate": round(evaluated - predicted, 3),
                    "total": round(evaluated - started, 3)},
        "parts": {name: {"n_stays": len(p), "n_cxr_present": int(p.cxr_present.sum()),
                         "n_cxr_masked": int(p.cxr_masked.sum())} for name, p in data.parts.items()},
        "absent_cxr_policy": method.absent_cxr_policy,
        "history": dict(getattr(method, "history_", {}) or {}),
        "fairness_csv": fairness,
    }, folder / "run.json")
    return metrics


@contextlib.contextmanager
def _run_lock(path: pathlib.Path, on_wait: Callable[[], None]):
    """Hold an exclusive ``flock`` on ``path`` (created, and removed on release).

    The system releases the lock when the holder dies, so a crash leaves no stale lock. A waiter
    that gets the lock on a file the holder has just removed opens the new file and waits again.
    """
    waited = False
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not waited:
                    on_wait()
                    waited = True
                fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                current = os.stat(path)
            except FileNotFoundError:
                current = None
            held = os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise
        if current is not None and (current.st_dev, current.st_ino) == (held.st_dev, held.st_ino):
            break
        os.close(fd)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)  # before unlocking, so that a waiter sees it was removed
        os.close(fd)


def _work_folder(work: pathlib.Path, *, fresh: bool, echo: Callable[[str], None]) -> pathlib.Path:
    """The run's work folder: kept with only its checkpoint after an interruption, else new."""
    if work.exists() and (fresh or not (work / CHECKPOINT_FILE).is_file()):
        shutil.rmtree(work)
    if work.exists():
        echo(f"resuming from the epoch checkpoint in {work}")
        for entry in work.iterdir():  # outputs of the interrupted attempt are written again
            if entry.is_dir():
                shutil.rmtree(entry)
            elif entry.name != CHECKPOINT_FILE:
                entry.unlink()
    else:
        work.mkdir()  # mode 0o777 filtered by the process umask, like any folder
    return work


def run_fusion(cfg: RunConfig, *, echo: Callable[[str], None] | None = None) -> RunResult:
    """Run (or reuse) the fusion run described by ``cfg``.

    Parameters
    ----------
    cfg : RunConfig
    echo : callable, optional
        Receives short progress and summary lines (the CLI passes ``click.echo``); default: log.

    Returns
    -------
    RunResult

    Raises
    ------
    cbstore.errors.StoreError
        The store cannot be opened.
    fusion.registry.FusionError
        Any invalid method, hyperparameter, encoder, task or data (specific subclasses).
    """
    from cbstore.store.reader import open_store

    echo = echo or log.info
    store = open_store(cfg.store)
    resolved = resolve(cfg, store)
    run_id = run_id_of(resolved)
    out = pathlib.Path(cfg.out)
    final = out / run_id
    if (final / COMPLETE_MARKER).is_file() and not cfg.overwrite:
        echo(f"reusing run {run_id} ({final})")
        metrics = json.loads((final / "metrics.json").read_text())
        return RunResult(run_id, final, True, resolved, metrics)

    out.mkdir(parents=True, exist_ok=True)
    with _run_lock(out / f".{run_id}.lock", lambda: echo(
            f"run {run_id} is being computed by another process; waiting for it")):
        if (final / COMPLETE_MARKER).is_file() and not cfg.overwrite:
            echo(f"reusing run {run_id} ({final}), completed by another process")
            metrics = json.loads((final / "metrics.json").read_text())
            return RunResult(run_id, final, True, resolved, metrics)
        work = _work_folder(out / f".{run_id}.partial", fresh=cfg.overwrite, echo=echo)
        try:
            write_json({"run_id": run_id, **resolved,
                        "not_hashed": {"out": str(out), "overwrite": cfg.overwrite,
                                       "device": cfg.device, "progress": cfg.progress,
                                       "weights_dir": cfg.weights_dir}},
                       work / "config.json")
            echo(f"run {run_id}: {cfg.method} on {cfg.task}, fold {cfg.fold}, seed {cfg.seed}, "
                 f"{cfg.features} features, cohort {cfg.cohort}"
                 + (f", X-ray missing rate {cfg.cxr_missing_rate:g} at {','.join(cfg.missing_at)}"
                    if cfg.cxr_missing_rate > 0 else ""))
            metrics = _execute(cfg, store, resolved, run_id, work, echo)
            (work / CHECKPOINT_FILE).unlink(missing_ok=True)
            (work / COMPLETE_MARKER).write_text(run_id + "\n")
            if final.exists():  # an older complete run (--overwrite) or a crashed, incomplete one
                shutil.rmtree(final)
            os.replace(work, final)
        except BaseException:
            if not (work / CHECKPOINT_FILE).is_file():  # nothing to resume from
                shutil.rmtree(work, ignore_errors=True)
            raise
    echo(f"run {run_id} complete: {final}")
    for line in summary_lines(metrics):
        echo(line)
    return RunResult(run_id, final, False, resolved, metrics)
