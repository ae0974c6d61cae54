"""Named hyperparameter presets: the shipped files, their validation, precedence and runs."""

import json
import pathlib

import pytest
from click.testing import CliRunner

from cli.fuse_cmd import fuse
from fusion.config import make_config
from fusion.presets import PresetError, check_preset_file, list_presets, preset_hyperparameters
import fusion.presets as presets
from support import EHR_ID, make_fusion_store

SHIPPED = sorted(pathlib.Path(presets.__file__).parent.glob("*.yaml"))

PRESET = """
carebench:
  description: "test values (configs/lgbm.yaml)"
  tuned_on_test: true
  all: {n_estimators: 12, num_leaves: 4, learning_rate: 0.2}
  tasks:
    mortality:
      all: {num_leaves: 5}
      matched: {num_leaves: 6, min_child_samples: 2}
plain:
  description: "no tuning"
  tuned_on_test: false
  all: {n_estimators: 10, min_child_samples: 2}
"""


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_every_shipped_preset_file_is_valid(path):
    """Keys are real hyperparameters of the method; values pass the method's coercion."""
    assert check_preset_file(path)


@pytest.fixture
def preset_dir(tmp_path, monkeypatch):
    (tmp_path / "lgbm-early.yaml").write_text(PRESET)
    monkeypatch.setattr(presets, "PRESET_DIR", tmp_path)
    return tmp_path


def test_precedence_all_then_task_then_cohort(preset_dir):
    assert list_presets("lgbm-early") == ["carebench", "plain"]
    values, record = preset_hyperparameters("lgbm-early", "carebench", "mortality", "full")
    assert values == {"n_estimators": 12, "num_leaves": 5, "learning_rate": 0.2}
    assert record["tuned_on_test"] is True and record["name"] == "carebench"
    values, _ = preset_hyperparameters("lgbm-early", "carebench", "mortality", "matched")
    assert values["num_leaves"] == 6 and values["min_child_samples"] == 2
    values, _ = preset_hyperparameters("lgbm-early", "carebench", "mortality", "matched_to_full")
    assert values["num_leaves"] == 6, "a cross cohort takes the entry of the cohort it trains on"
    values, _ = preset_hyperparameters("lgbm-early", "carebench", "phenotype", "matched")
    assert values["num_leaves"] == 4


@pytest.mark.parametrize("body,message", [
    ("p: {description: d, tuned_on_test: true, all: {no_such: 1}}", "no hyperparameter.*no_such"),
    ("p: {description: d, tuned_on_test: true, all: {num_leaves: abc}}", "num_leaves must be an integer"),
    ("p: {description: d, tuned_on_test: true, tasks: {survival: {all: {}}}}", "unknown task.*survival"),
    ("p: {description: d, tuned_on_test: true, tasks: {los: {paired: {}}}}", "unknown key.*paired"),
    ("p: {description: d, all: {}}", "tuned_on_test: true or false is required"),
    ("p: {tuned_on_test: false}", "description: a non-empty string"),
    ("p: {description: d, tuned_on_test: true, grid: {}}", "unknown key.*grid"),
])
def test_malformed_preset_files_are_refused_naming_the_key(tmp_path, body, message):
    path = tmp_path / "lgbm-early.yaml"
    path.write_text(body)
    with pytest.raises(PresetError, match=message):
        check_preset_file(path)


def test_unknown_presets_and_methods_without_presets(preset_dir):
    with pytest.raises(PresetError, match="no preset 'tuned'.*carebench, plain"):
        preset_hyperparameters("lgbm-early", "tuned", "mortality")
    with pytest.raises(PresetError, match="method 'lgbm-ehr' ships no presets"):
        preset_hyperparameters("lgbm-ehr", "carebench", "mortality")


def test_run_records_the_preset_and_set_overrides_it(preset_dir, tmp_path):
    store = tmp_path / "store.zarr"
    make_fusion_store(store, n_stays=80)
    args = [str(store), "--method", "lgbm-early", "--out", str(tmp_path / "runs"), "--n-boot", "10",
            "--no-progress", "--ehr-encoder", EHR_ID, "--preset", "carebench",
            "--set", "min_child_samples=2", "--set", "n_estimators=11"]
    result = CliRunner().invoke(fuse, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    (folder,) = [p for p in (tmp_path / "runs").iterdir() if not p.name.startswith(".")]
    config = json.loads((folder / "config.json").read_text())
    assert config["preset"] == {"name": "carebench", "tuned_on_test": True}
    hyper = config["hyperparameters"]
    assert hyper["n_estimators"] == 11, "--set wins over the preset"
    assert hyper["num_leaves"] == 5 and hyper["learning_rate"] == 0.2
    result = CliRunner().invoke(fuse, [*args[:-4], "--preset", "nope"])
    assert result.exit_code == 1 and "no preset 'nope'" in result.output


def test_config_field_and_file(tmp_path):
    cfg = make_config(options={"store": "s", "method": "m", "preset": "carebench"})
    assert cfg.preset == "carebench"
    with pytest.raises(Exception, match="preset: got 3; allowed: a non-empty string"):
        make_config(options={"store": "s", "method": "m"}, set_pairs=["preset=3"])
