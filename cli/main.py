"""The ``cbstore`` console script: one click group, one subcommand per stage.

The commands live in small modules beside this one and hold no logic of their own; each calls
into ``cbstore``, ``encoders`` or ``fusion``. Each is decorated with
:func:`cli.errors.reports_errors`: an error deriving from :class:`cbstore.errors.CbstoreError` (the
root of every error the packages raise on purpose) is printed as one line, with exit status 1.

A command's module is imported only when that command runs (or ``cbstore --help`` lists it):
``cbstore build`` then never loads what ``evaluate`` or ``bench`` need (SciPy, the fusion methods),
which took about a second of its start and of its exit.
"""

import atexit
import gc
import importlib

import click

#: Each subcommand: name -> (module, attribute of its click command).
COMMANDS = {
    "synth": ("cli.synth_cmd", "synth"),
    "build": ("cli.build_cmd", "build"),
    "info": ("cli.store_cmds", "info"),
    "validate": ("cli.store_cmds", "validate"),
    "encode": ("cli.encode_cmd", "encode"),
    "fuse": ("cli.fuse_cmd", "fuse"),
    "evaluate": ("cli.evaluate_cmd", "evaluate"),
    "report": ("cli.report_cmd", "report"),
    "bench": ("cli.bench_cmd", "bench"),
}


class LazyGroup(click.Group):
    """A click group whose subcommands (:data:`COMMANDS`) are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS:
            return None
        module, attribute = COMMANDS[cmd_name]
        return getattr(importlib.import_module(module), attribute)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="cbstore")
def cbstore():
    """Build an EHR + chest X-ray feature store from MIMIC and benchmark fusion methods on it.

    Stages: synth (optional) -> build -> encode -> fuse -> evaluate/report.
    """


def main():
    """Entry point of the ``cbstore`` console script."""
    # At exit the interpreter would walk every object left by the command once more for the garbage
    # collector (about 0.3 s after a build, which has loaded pandas, DuckDB and zarr); frozen, they are
    # skipped. Files and connections are closed by the commands themselves.
    atexit.register(gc.freeze)
    cbstore()


if __name__ == "__main__":
    main()
