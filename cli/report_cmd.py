"""``cbstore report``: tables, tests and figures of finished runs (over ``fusion.reporting``)."""

from __future__ import annotations

import pathlib

import click

from cli.errors import reports_errors
from fusion.compare import PRIMARY_METRICS


@click.command("report")
@click.argument("runs", nargs=-1, required=True,
                type=click.Path(exists=True, file_okay=False, path_type=pathlib.Path))
@click.option("--out", required=True, type=click.Path(path_type=pathlib.Path),
              help="Report folder: report.md, report.html, figures/, results.csv.")
@click.option("--baseline", default=None,
              help="Method the others are tested against [default: the best unimodal method].")
@click.option("--task", type=click.Choice(sorted(PRIMARY_METRICS)), default=None,
              help="Only runs of this task.")
@click.option("--per-label", "per_label", type=click.Choice(["auroc", "auprc"]), default=None,
              help="Also a table of this metric per phenotype label (a column per method).")
@click.option("--n-perm", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Permutations of each significance test.")
@click.option("--n-boot", type=click.IntRange(min=0), default=200, show_default=True,
              help="Bootstrap resamples of the modality-reliance CIs.")
@click.option("--alpha", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.05,
              show_default=True, help="Level of the tests and of the critical difference.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the permutations and bootstrap.")
@reports_errors
def report(runs: tuple, out: pathlib.Path, baseline: str | None, task: str | None,
           per_label: str | None, n_perm: int, n_boot: int, alpha: float, seed: int) -> None:
    """Report on the complete runs under RUNS (run folders or folders of runs).

    Writes OUT/report.md, a self-contained OUT/report.html, OUT/figures/ (PNG and SVG) and
    OUT/results.csv, and prints the main tables.
    """
    from fusion.reporting import ReportOptions, build_report  # scipy and matplotlib: only when used

    options = ReportOptions(baseline=baseline, n_perm=n_perm, seed=seed, alpha=alpha,
                            n_boot=n_boot, task=task, per_label=per_label)
    result = build_report(runs, out, options)
    click.echo(result["main"].rstrip())
    click.echo(f"\n{result['n_runs']} runs; wrote {result['markdown']}, {result['html']}, "
               f"{result['csv']} and {len(result['figures'])} figure files in "
               f"{out / 'figures'}")
