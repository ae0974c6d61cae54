"""The command group: every subcommand resolves, and a command loads only what it needs."""

import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

from cli.main import COMMANDS, cbstore


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_resolves_to_the_command_of_that_name(name):
    command = cbstore.get_command(click.Context(cbstore), name)
    assert isinstance(command, click.Command)
    assert command.name == name


def test_an_unknown_command_is_refused():
    result = CliRunner().invoke(cbstore, ["nope"])
    assert result.exit_code == 2
    assert "No such command 'nope'" in result.output


def test_help_lists_every_command():
    result = CliRunner().invoke(cbstore, ["--help"])
    assert result.exit_code == 0
    listed = result.output.split("Commands:", 1)[1].split()
    assert set(COMMANDS) <= set(listed)


def test_build_loads_neither_the_other_commands_nor_scipy():
    code = ("import sys; from cli.main import cbstore; cbstore(['build', '--help'], standalone_mode=False); "
            "print(' '.join(sorted(m for m in sys.modules if m.startswith(('cli.', 'fusion', 'encoders', 'scipy')))), "
            "file=sys.stderr)")
    loaded = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stderr.split()
    assert sorted(m for m in loaded if not m.startswith("cli.")) == []
    assert sorted(m for m in loaded if m.startswith("cli.")) == ["cli.build_cmd", "cli.errors", "cli.main"]


def test_the_build_module_does_not_read_the_packaged_json_schemas():
    code = ("import cbstore.build.pipeline, cbstore.format.schema as s; "
            "print(s.packaged_schema.cache_info().currsize)")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.strip() == "0"


def test_the_build_starts_without_what_it_loads_alongside_its_extraction():
    # pandas, zarr, PIL and jsonschema are imported by the build while DuckDB extracts the events
    # (cbstore.build.pipeline._LOADED_ALONGSIDE), not before: about 0.8 s of a small build
    code = ("import sys; from cli.main import cbstore; cbstore(['build', '--help'], standalone_mode=False); "
            "print(' '.join(sorted({m.split('.')[0] for m in sys.modules} & {'pandas', 'pyarrow', 'zarr', 'PIL', "
            "'jsonschema'})), file=sys.stderr)")
    loaded = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stderr.split()
    assert loaded == []


def test_the_console_script_freezes_the_garbage_collector_at_exit():
    # registered before main(), this handler runs after main's (atexit runs last-in, first-out)
    code = ("import atexit, gc, sys; atexit.register(lambda: print(gc.get_freeze_count() > 0)); "
            "sys.argv = ['cbstore', '--help']; from cli.main import main; main()")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "True"
