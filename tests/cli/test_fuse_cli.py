"""``cbstore fuse``: complete run folders, reuse, --overwrite, config files and clear errors."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from cbstore.store.reader import Store
from cli.fuse_cmd import fuse
from fusion.evaluation import load_predictions
from fusion.runs import COMPLETE_MARKER, DEMOGRAPHICS
from support import CXR_ID, EHR_ID, make_fusion_store

torch.set_num_threads(1)

FAST_LGBM = ["--set", "n_estimators=10", "--set", "min_child_samples=2", "--set", "num_leaves=4"]
FAST_NN = ["--set", "max_epochs=2", "--set", "hidden=8", "--set", "patience=1"]


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "store.zarr"
    make_fusion_store(path, n_stays=80)
    return str(path)


def _fuse(store_path, out, *args, method="lgbm-early", extra=FAST_LGBM):
    args = [store_path, "--method", method, "--out", str(out), "--n-boot", "20", "--no-progress",
            "--ehr-encoder", EHR_ID, *extra, *args]
    return CliRunner().invoke(fuse, args, catch_exceptions=False)


def _run_dir(out):
    (folder,) = [p for p in out.iterdir() if not p.name.startswith(".")]
    return folder


def test_fuse_writes_a_complete_run_folder(store_path, tmp_path):
    result = _fuse(store_path, tmp_path)
    assert result.exit_code == 0, result.output
    folder = _run_dir(tmp_path)
    for name in ("config.json", "predictions.parquet", "metrics.json", "run.json",
                 "weights/method.json", COMPLETE_MARKER):
        assert (folder / name).is_file(), name
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary folder left"
    config = json.loads((folder / "config.json").read_text())
    assert config["run_id"] == folder.name and len(folder.name) == 12
    assert config["method"] == "lgbm-early" and config["embeddings"]["cxr"]["encoder_id"] == CXR_ID
    assert config["hyperparameters"]["n_estimators"] == 10
    assert config["hyperparameters"]["learning_rate"] == 0.1, "defaults are part of the config"
    assert config["store"]["config_sha256"]

    df, meta = load_predictions(folder / "predictions.parquet")
    assert set(df["part"]) == {"val", "test"}
    assert meta["method"] == "lgbm-early" and meta["run_id"] == folder.name
    assert {"cxr_present", "cxr_masked", *DEMOGRAPHICS} <= set(df.columns)
    assert not df.duplicated(["stay_id", "part"]).any()
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["run_id"] == folder.name and "auroc" in metrics["metrics"]
    assert f"run {folder.name} complete" in result.output
    assert "auroc" in result.output, "the command prints a metrics summary"

    # fairness.csv is the metrics' fairness section, one row per (attribute, group)
    fairness = pd.read_csv(folder / "fairness.csv")
    assert list(fairness.columns[:4]) == ["attribute", "group", "n", "small"]
    by_gender = fairness[fairness["attribute"] == "gender"]
    assert by_gender["n"].sum() == (df["part"] == "test").sum()


def test_permuted_input_predictions_for_each_modality(store_path, tmp_path):
    assert _fuse(store_path, tmp_path).exit_code == 0
    folder = _run_dir(tmp_path)
    df, _ = load_predictions(folder / "predictions.parquet")
    test = df[df["part"] == "test"].reset_index(drop=True)
    for modality in ("cxr", "ehr"):
        permuted, meta = load_predictions(folder / f"predictions_permuted_{modality}.parquet")
        assert meta["permuted_modality"] == modality and set(permuted["part"]) == {"test"}
        # same stays, labels and demographics; only the inputs moved
        pd.testing.assert_frame_equal(permuted[["stay_id", "y_true_mortality", "gender"]],
                                      test[["stay_id", "y_true_mortality", "gender"]])
        assert not np.allclose(permuted["y_prob_mortality"], test["y_prob_mortality"])
    cxr, _ = load_predictions(folder / "predictions_permuted_cxr.parquet")
    assert cxr["cxr_present"].sum() == test["cxr_present"].sum()
    assert not (cxr["cxr_present"].to_numpy() == test["cxr_present"].to_numpy()).all()


def test_rerun_reuses_and_overwrite_recomputes_identically(store_path, tmp_path):
    assert _fuse(store_path, tmp_path).exit_code == 0
    folder = _run_dir(tmp_path)
    marker = (folder / COMPLETE_MARKER).stat().st_mtime_ns
    before = pd.read_parquet(folder / "predictions.parquet")

    again = _fuse(store_path, tmp_path)
    assert again.exit_code == 0 and f"reusing run {folder.name}" in again.output
    assert (folder / COMPLETE_MARKER).stat().st_mtime_ns == marker

    redo = _fuse(store_path, tmp_path, "--overwrite")
    assert redo.exit_code == 0 and "reusing" not in redo.output
    assert _run_dir(tmp_path) == folder, "--overwrite keeps the run id"
    assert (folder / COMPLETE_MARKER).stat().st_mtime_ns != marker
    pd.testing.assert_frame_equal(pd.read_parquet(folder / "predictions.parquet"), before)


def test_incomplete_folder_is_replaced(store_path, tmp_path):
    assert _fuse(store_path, tmp_path).exit_code == 0
    folder = _run_dir(tmp_path)
    (folder / COMPLETE_MARKER).unlink()
    (folder / "leftover.tmp").write_text("crash")
    result = _fuse(store_path, tmp_path)
    assert result.exit_code == 0 and "reusing" not in result.output
    assert (folder / COMPLETE_MARKER).is_file() and not (folder / "leftover.tmp").exists()


def test_settings_change_the_run_id(store_path, tmp_path):
    _fuse(store_path, tmp_path)
    _fuse(store_path, tmp_path, "--set", "learning_rate=0.2")
    _fuse(store_path, tmp_path, "--seed", "3")
    assert len([p for p in tmp_path.iterdir()]) == 3


def test_masked_run_records_the_mask(store_path, tmp_path):
    result = _fuse(store_path, tmp_path, "--cxr-missing-rate", "0.5", "--missing-at", "test")
    assert result.exit_code == 0, result.output
    folder = _run_dir(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    assert config["cxr_missing_rate"] == 0.5 and config["missing_at"] == ["test"]
    df, _ = load_predictions(folder / "predictions.parquet")
    assert df.loc[df["part"] == "test", "cxr_masked"].any()
    assert not df.loc[df["part"] == "val", "cxr_masked"].any()
    assert not (df["cxr_masked"] & df["cxr_present"]).any()


def test_late_fusion_writes_per_modality_probabilities(store_path, tmp_path):
    result = _fuse(store_path, tmp_path, "--task", "los", method="latefusion", extra=FAST_NN)
    assert result.exit_code == 0, result.output
    df, meta = load_predictions(_run_dir(tmp_path) / "predictions.parquet")
    ehr = [c for c in df.columns if c.startswith("y_prob_ehr_")]
    cxr = [c for c in df.columns if c.startswith("y_prob_cxr_")]
    assert len(ehr) == len(cxr) == len(meta["class_names"]) == 7
    assert df.loc[~df["cxr_present"], cxr].isna().all().all()
    assert df.loc[df["cxr_present"], cxr].notna().all().all()
    np.testing.assert_allclose(df[[f"y_prob_{c}" for c in meta["class_names"]]].sum(axis=1), 1.0,
                               atol=1e-5)
    hyper = json.loads((_run_dir(tmp_path) / "config.json").read_text())["hyperparameters"]
    assert (hyper["batch_size"], hyper["lr"]) == (128, 3e-4), "the cached-feature defaults"


def test_raw_features_run(store_path, tmp_path):
    # the small CNN has no ImageNet weights: this run says it trains from random weights
    result = _fuse(store_path, tmp_path, "--features", "raw", "--set", "backbone=small",
                   "--set", "cxr_weights=random", method="latefusion", extra=FAST_NN)
    assert result.exit_code == 0, result.output
    config = json.loads((_run_dir(tmp_path) / "config.json").read_text())
    assert config["features"] == "raw" and config["embeddings"] == {}
    for modality in ("cxr", "ehr"):  # images and EHR tensors permuted across test stays
        assert (_run_dir(tmp_path) / f"predictions_permuted_{modality}.parquet").is_file()
    hyper = config["hyperparameters"]
    assert (hyper["batch_size"], hyper["lr"]) == (16, 1e-4), "the reference protocol's defaults"


@pytest.mark.parametrize("suffix", [".yaml", ".toml"])
def test_config_file_and_command_line_precedence(store_path, tmp_path, suffix):
    path = tmp_path / f"run{suffix}"
    if suffix == ".yaml":
        path.write_text("task: phenotype\nseed: 5\nhyperparameters:\n  n_estimators: 7\n"
                        "  learning_rate: 2.0e-1\n")
    else:
        path.write_text('task = "phenotype"\nseed = 5\n[hyperparameters]\nn_estimators = 7\n'
                        "learning_rate = 0.2\n")
    out = tmp_path / "runs"
    result = _fuse(store_path, out, "--config", str(path), "--seed", "2", "--set",
                   "n_estimators=9", extra=[])
    assert result.exit_code == 0, result.output
    config = json.loads((_run_dir(out) / "config.json").read_text())
    assert config["task"] == "phenotype", "file value"
    assert config["seed"] == 2, "the command line overrides the file"
    assert config["hyperparameters"]["n_estimators"] == 9
    assert config["hyperparameters"]["learning_rate"] == 0.2


def _error(store_path, tmp_path, *args, method="lgbm-early", encoder=True):
    base = [store_path, "--method", method, "--out", str(tmp_path / "runs"), "--no-progress"]
    if encoder:
        base += ["--ehr-encoder", EHR_ID]
    result = CliRunner().invoke(fuse, [*base, *args])
    assert result.exit_code != 0
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir()), \
        "a failed run leaves nothing behind"
    return result.output


def test_error_unknown_method(store_path, tmp_path):
    output = _error(store_path, tmp_path, method="late-fusion")
    assert "unknown fusion method 'late-fusion'" in output and "latefusion" in output


def test_error_unknown_task(store_path, tmp_path):
    assert "survival" in _error(store_path, tmp_path, "--task", "survival")


def test_error_unknown_encoder_lists_available(store_path, tmp_path):
    output = _error(store_path, tmp_path, "--cxr-encoder", "densenet121-res224-all")
    assert "unknown cxr encoder 'densenet121-res224-all'" in output and CXR_ID in output


def test_error_ambiguous_encoder(store_path, tmp_path):
    output = _error(store_path, tmp_path, encoder=False)
    assert "several ehr embeddings" in output and "--ehr-encoder" in output


def test_error_store_without_embeddings(tmp_path):
    path = tmp_path / "bare.zarr"
    make_fusion_store(path, n_stays=40, embeddings=False)
    output = _error(str(path), tmp_path, encoder=False)
    assert "holds no complete ehr embedding" in output and "cbstore encode" in output


def test_error_missing_store(tmp_path):
    assert "no store at" in _error(str(tmp_path / "nowhere.zarr"), tmp_path)


def test_error_store_without_labels_for_the_task(store_path, tmp_path, monkeypatch):
    monkeypatch.setattr(Store, "task_mask", lambda self, task: np.zeros(self.n_stays, dtype=bool))
    output = _error(store_path, tmp_path, "--task", "los")
    assert "no stay with a label for task 'los'" in output


def test_error_unsupported_feature_mode(store_path, tmp_path):
    output = _error(store_path, tmp_path, "--features", "raw")
    assert "'lgbm-early' does not support --features raw" in output and "cached" in output


def test_error_bad_hyperparameters(store_path, tmp_path):
    output = _error(store_path, tmp_path, "--set", "n_trees=5")
    assert "n_trees" in output and "valid hyperparameters" in output and "n_estimators" in output
    assert "must be an integer" in _error(store_path, tmp_path, "--set", "n_estimators=many")
    assert "must be >= 1" in _error(store_path, tmp_path, "--set", "n_estimators=0")


@pytest.mark.parametrize("rate", ["1.5", "-0.2", "nan"])
def test_error_missing_rate_outside_unit_interval(store_path, tmp_path, rate):
    output = _error(store_path, tmp_path, "--cxr-missing-rate", rate)
    assert "cxr_missing_rate: got " in output and "allowed: a number in [0, 1]" in output


def test_error_bad_missing_at_and_config_key(store_path, tmp_path):
    assert "unknown part 'testing'" in _error(store_path, tmp_path, "--missing-at", "val,testing")
    path = tmp_path / "bad.yaml"
    path.write_text("taks: mortality\n")
    output = _error(store_path, tmp_path, "--config", str(path))
    assert "unknown key(s) taks" in output and "valid keys" in output
