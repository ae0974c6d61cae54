"""RunConfig: canonical values (they enter run ids) and errors that name the key, value and what is allowed."""

from __future__ import annotations

import math
import pathlib

import pytest

from cbstore.errors import ConfigError, InvalidValue, invalid_values
from fusion.config import RunConfig, make_config, parse_missing_at


def test_values_are_made_canonical():
    cfg = RunConfig(store=pathlib.Path("s.zarr"), method="m", fold="3", seed=2.0, mask_seed="4",
                    cxr_missing_rate="0.5", missing_at=["val,train", "val"], out=pathlib.Path("r"))
    assert (cfg.store, cfg.fold, cfg.seed, cfg.mask_seed, cfg.out) == ("s.zarr", 3, 2, 4, "r")
    assert cfg.cxr_missing_rate == 0.5 and isinstance(RunConfig(store="s", method="m").cxr_missing_rate, float)
    assert cfg.missing_at == ("train", "val")
    assert RunConfig.field_names()[:3] == ["store", "method", "task"]


@pytest.mark.parametrize("values, message", [
    ({"task": "survival"}, "task: got 'survival'; allowed: 'mortality', 'mortality_hosp', 'phenotype' or 'los'"),
    ({"fold": -1}, "fold: got -1; allowed: an integer >= 0"),
    ({"seed": 1.5}, "seed: got 1.5; allowed: an integer >= 0"),
    ({"n_boot": True}, "n_boot: got True; allowed: an integer, not true or false"),
    ({"mask_seed": "x"}, "mask_seed: got 'x'; allowed: an integer >= 0 or null"),
    ({"cxr_missing_rate": math.nan}, "cxr_missing_rate: got nan; allowed: a number in [0, 1]"),
    ({"cxr_missing_rate": 1.5}, "cxr_missing_rate: got 1.5; allowed: a number in [0, 1]"),
    ({"missing_at": "val,testing"}, "missing_at: got 'val,testing'; allowed: unknown part 'testing'"),
    ({"ehr_encoder": ""}, "ehr_encoder: got ''; allowed: a non-empty string or null"),
    ({"hyperparameters": [1]}, "hyperparameters: got [1]; allowed: a mapping of name to value"),
    ({"progress": "yes"}, "progress: got 'yes'; allowed: true or false"),
    ({"store": ""}, "store: got ''; allowed: a store path"),
    ({"colour": "red"}, "colour: got 'red'; allowed: one of the keys store, method, task"),
])
def test_error_names_key_value_and_allowed(values, message):
    with pytest.raises(ConfigError) as err:
        RunConfig(**{"store": "s.zarr", "method": "m", **values})
    assert str(err.value).startswith(message), str(err.value)


def test_missing_required_option():
    with pytest.raises(ConfigError, match=r"^store: got None; allowed: a store path \(Field required\)"):
        RunConfig(method="m")
    with pytest.raises(ConfigError, match="method: not given"):
        make_config(options={"store": "s.zarr"})


def test_parse_missing_at_keeps_its_error():
    assert parse_missing_at("test, train") == ("train", "test")
    with pytest.raises(ConfigError, match=r"^missing_at: unknown part 'x'; valid parts: train, val, test$"):
        parse_missing_at(["x"])
    with pytest.raises(ConfigError, match=r"^missing_at: name at least one of"):
        parse_missing_at(",")


def test_invalid_values_describes_pydantic_errors():
    errors = [
        {"type": "extra_forbidden", "loc": ("methods", 1, "lr"), "msg": "Extra inputs are not permitted", "input": 1},
        {"type": "value_error", "loc": ("folds",), "msg": "Value error, must be >= 0, got -1", "input": [-1]},
        {"type": "int_type", "loc": ("n",), "msg": "Input should be a valid integer", "input": "x"},
        {"type": "missing", "loc": ("m",), "msg": "Field required", "input": {"n": "x"}},
    ]
    assert invalid_values(errors, {"n": "an integer"}, lambda loc: ["name", "lr2"]) == [
        InvalidValue("methods[1].lr", 1, "one of the keys name, lr2 (extra inputs are not permitted)"),
        InvalidValue("folds", [-1], "must be >= 0, got -1"),
        InvalidValue("n", "x", "an integer (a valid integer)"),
        InvalidValue("m", None, "Field required"),
    ]
