"""The ``cbstore`` console script: one click group, one subcommand per stage.

The commands live in small modules beside this one and hold no logic of their own; each calls
into ``cbstore``, ``encoders`` or ``fusion``. Each is decorated with
:func:`cli.errors.reports_errors`: an error deriving from :class:`cbstore.errors.CbstoreError` (the
root of every error the packages raise on purpose) is printed as one line, with exit status 1.
"""

import click

from cli.bench_cmd import bench
from cli.build_cmd import build
from cli.encode_cmd import encode
from cli.evaluate_cmd import evaluate
from cli.fuse_cmd import fuse
from cli.report_cmd import report
from cli.store_cmds import info, validate
from cli.synth_cmd import synth


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="cbstore")
def cbstore():
    """Build an EHR + chest X-ray feature store from MIMIC and benchmark fusion methods on it.

    Stages: synth (optional) -> build -> encode -> fuse -> evaluate/report.
    """


for _command in (synth, build, info, validate, encode, fuse, evaluate, report, bench):
    cbstore.add_command(_command)


def main():
    """Entry point of the ``cbstore`` console script."""
    cbstore()


if __name__ == "__main__":
    main()
