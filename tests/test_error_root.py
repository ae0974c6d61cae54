"""One error root: every deliberate error derives from CbstoreError; the CLI prints one line."""

from __future__ import annotations

import importlib
import inspect

import click
import pytest
from click.testing import CliRunner

from cbstore.errors import CbstoreError, ConfigError
from cli.errors import one_line, reports_errors
from cli.main import cbstore
from support import EHR_ID, make_fusion_store

MODULES = ("cbstore.errors", "cbstore.build.config", "cbstore.inputs.masks", "cbstore.build.ehr", "cbstore.build.phenotypes",
           "encoders.errors", "fusion.registry", "fusion.config", "fusion.data",
           "fusion.evaluation.predictions")


@pytest.mark.parametrize("name", MODULES)
def test_every_error_class_derives_from_cbstore_error(name):
    module = importlib.import_module(name)
    errors = [cls for _, cls in inspect.getmembers(module, inspect.isclass)
              if issubclass(cls, Exception) and cls.__module__.split(".")[0] in ("cbstore", "encoders", "fusion")]
    assert errors, f"{name} defines or re-exports its errors"
    for cls in errors:
        assert issubclass(cls, CbstoreError), f"{name}.{cls.__name__}"


def test_one_config_error():
    import cbstore.build.config
    import fusion.config

    assert cbstore.build.config.ConfigError is fusion.config.ConfigError is ConfigError
    assert issubclass(ConfigError, ValueError)


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "store.zarr"
    make_fusion_store(path, n_stays=40)
    return str(path)


def _run(*args):
    return CliRunner().invoke(cbstore, list(args))


def _one_clear_line(result) -> str:
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = [line for line in result.output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("Error: ")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    return errors[0]


def test_cli_unknown_method_is_one_line(store_path, tmp_path):
    line = _one_clear_line(_run("fuse", store_path, "--method", "late-fusion", "--ehr-encoder", EHR_ID,
                                "--out", str(tmp_path / "runs"), "--no-progress"))
    assert "unknown fusion method 'late-fusion'" in line and "latefusion" in line


def test_cli_unknown_task_lists_the_tasks(store_path, tmp_path):
    result = _run("fuse", store_path, "--method", "lgbm-early", "--task", "survival")
    assert result.exit_code == 2 and "'survival' is not one of" in result.output
    assert "mortality_hosp" in result.output and "los" in result.output
    config = tmp_path / "run.yaml"
    config.write_text("task: survival\n")
    line = _one_clear_line(_run("fuse", store_path, "--method", "lgbm-early", "--config", str(config),
                                "--out", str(tmp_path / "runs")))
    assert "task: got 'survival'; allowed: 'mortality', 'mortality_hosp', 'phenotype' or 'los'" in line


def test_cli_store_errors_are_one_line(tmp_path):
    line = _one_clear_line(_run("info", str(tmp_path / "nowhere.zarr")))
    assert "nowhere.zarr" in line


def test_multi_line_messages_are_joined():
    @click.command()
    @reports_errors
    def command():
        raise ConfigError("first line\n  - second\n\nthird")

    result = CliRunner().invoke(command, [])
    assert result.exit_code == 1
    assert result.output == "Error: first line - second third\n"
    assert one_line(ValueError()) == "ValueError"


def test_other_exceptions_are_bugs_and_keep_their_traceback():
    @click.command()
    @reports_errors
    def command():
        raise ZeroDivisionError("a bug")

    result = CliRunner().invoke(command, [])
    assert isinstance(result.exception, ZeroDivisionError)
