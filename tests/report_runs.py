"""Tiny run folders for the report tests, written directly in the run-folder format.

``make_run`` writes what ``cbstore fuse`` leaves in a run folder (``config.json``,
``predictions.parquet``, ``predictions_permuted_<modality>.parquet``, ``metrics.json`` from the
evaluator, ``run.json``, ``COMPLETE``) from synthetic scores, without a store or a fit: the
scores are the label plus noise, ``signal`` setting how well a method separates the classes.
"""

from __future__ import annotations

import hashlib
import json
import pathlib

import numpy as np
import pandas as pd

from fusion.evaluation import evaluate_predictions, write_json, write_predictions

GROUPS = {"gender": ["F", "M"], "age_group": ["18-40", "40-65", "65+"],
          "race": ["WHITE", "BLACK", "ASIAN"], "insurance": ["Medicare", "Other"],
          "admission_type": ["EMERGENCY", "URGENT"]}
POLICIES = {"lgbm-ehr": "not_used", "lgbm-cxr": "train_prevalence", "lgbm-early": "native",
            "lgbm-late": "ehr_only"}
MODALITIES = {"lgbm-ehr": ("ehr",), "lgbm-cxr": ("cxr",), "lgbm-early": ("cxr", "ehr"),
              "lgbm-late": ("cxr", "ehr")}


def _labels(fold: int, n: int) -> np.ndarray:
    """The labels of a fold's stays: the same for every method (they come from the store)."""
    rng = np.random.default_rng(1000 + fold)
    return (rng.random(n) < 0.35).astype(np.int64)


def _frame(fold: int, y: np.ndarray, scores: np.ndarray, part: np.ndarray, stay0: int):
    n = y.size
    rng = np.random.default_rng(7 + fold)
    frame = pd.DataFrame({"stay_id": np.arange(stay0, stay0 + n, dtype=np.int64), "part": part,
                          "fold": fold, "task": "mortality", "y_true_mortality": y,
                          "y_prob_mortality": scores, "cxr_present": rng.random(n) < 0.4,
                          "cxr_masked": False})
    for column, values in GROUPS.items():
        # the last value is rare (a small group)
        weights = np.r_[np.ones(len(values) - 1) * 10, 1.0]
        frame[column] = rng.choice(values, size=n, p=weights / weights.sum())
    return frame


def make_run(out, method: str, *, fold: int = 0, seed: int = 0, signal: float = 2.0,
             rate: float = 0.0, at=("train", "test"), n_test: int = 40, n_val: int = 20,
             cohort: str = "full", config_extra: dict | None = None,
             permuted: bool = True) -> pathlib.Path:
    """Write one complete run folder under ``out``; return it."""
    n = n_val + n_test
    y = _labels(fold, n)
    rng = np.random.default_rng([fold, seed, len(method), int(rate * 100), int(signal * 10)])
    logits = signal * (y - 0.5) + rng.normal(0.0, 1.0, n) - rate * signal * (y - 0.5)
    scores = 1.0 / (1.0 + np.exp(-logits))
    part = np.array(["val"] * n_val + ["test"] * n_test)
    run_id = hashlib.sha256(json.dumps([method, fold, seed, rate, list(at), signal, cohort,
                                        config_extra]).encode()).hexdigest()[:12]
    folder = pathlib.Path(out) / run_id
    folder.mkdir(parents=True)
    df = _frame(fold, y, scores, part, stay0=10_000 * (fold + 1))
    meta = {"task": "mortality", "labels": ["mortality"], "method": method, "run_id": run_id,
            "fold": fold, "seed": seed, "absent_cxr_policy": POLICIES[method]}
    write_predictions(df, meta, folder / "predictions.parquet")
    if permuted:
        test = df[df["part"] == "test"].reset_index(drop=True)
        for modality in MODALITIES[method]:
            shuffled = test.copy()
            shuffled["y_prob_mortality"] = rng.permutation(test["y_prob_mortality"].to_numpy())
            write_predictions(shuffled, {**meta, "permuted_modality": modality},
                              folder / f"predictions_permuted_{modality}.parquet")
    config = {"run_id": run_id, "cbstore_version": "0.1.0",
              "store": {"path": "/tmp/store.zarr", "config_sha256": "c0ffee" * 4,
                        "format_version": "1.0.0"},
              "method": method, "hyperparameters": {"n_estimators": 10, "num_leaves": 4},
              "task": "mortality", "fold": fold, "seed": seed, "features": "cached",
              "embeddings": {m: {"encoder_id": f"{m}-test"} for m in MODALITIES[method]},
              "cohort": cohort, "cxr_missing_rate": rate, "missing_at": list(at) if rate else [],
              "mask_seed": seed if rate else None, "predicted_parts": ["val", "test"],
              "n_boot": 50, **(config_extra or {})}
    write_json(config, folder / "config.json")
    metrics = evaluate_predictions(df, meta, n_boot=50, seed=seed, min_group_size=5,
                                   intersections=False)
    write_json(metrics, folder / "metrics.json")
    write_json({"run_id": run_id, "absent_cxr_policy": POLICIES[method]}, folder / "run.json")
    (folder / "COMPLETE").write_text(run_id + "\n")
    return folder


def make_grid(out, *, folds=(0, 1), seeds=(0, 1), rates=(0.5, 1.0)) -> list[pathlib.Path]:
    """Runs of three methods over folds x seeds, masked runs of lgbm-early, and two methods on
    the matched cohort (fold 0, seed 0)."""
    signals = {"lgbm-ehr": 1.5, "lgbm-cxr": 0.5, "lgbm-early": 2.5}
    folders = []
    for method, signal in signals.items():
        for fold in folds:
            for seed in seeds:
                folders.append(make_run(out, method, fold=fold, seed=seed, signal=signal))
    for rate in rates:
        for fold in folds:
            for seed in seeds:
                folders.append(make_run(out, "lgbm-early", fold=fold, seed=seed, signal=2.5,
                                        rate=rate))
    for method in ("lgbm-ehr", "lgbm-early"):
        folders.append(make_run(out, method, signal=signals[method], cohort="matched"))
    return folders
