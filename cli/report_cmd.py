"""``cbstore report``: a comparison table of finished runs (thin wrapper over ``fusion.compare``)."""

from __future__ import annotations

import pathlib

import click

from cli.errors import reports_errors
from fusion.compare import PRIMARY_METRICS, collect_runs, comparison_table, per_label_table


@click.command("report")
@click.argument("runs_dir", type=click.Path(exists=True, file_okay=False, path_type=pathlib.Path))
@click.option("--task", type=click.Choice(sorted(PRIMARY_METRICS)), default=None,
              help="Only runs of this task.")
@click.option("--per-label", "per_label", type=click.Choice(["auroc", "auprc"]), default=None,
              help="Also a table of this metric per phenotype label (a column per run).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=pathlib.Path), default=None,
              help="Also write the tables to this Markdown file.")
@reports_errors
def report(runs_dir: pathlib.Path, task: str | None, per_label: str | None,
           out: pathlib.Path | None) -> None:
    """Compare the complete runs under RUNS_DIR: test metrics with 95% bootstrap CIs."""
    runs = collect_runs(runs_dir)
    if not runs:
        raise click.ClickException(f"no complete runs under {runs_dir}; run `cbstore fuse` first")
    text = comparison_table(runs, task)
    if not text:
        raise click.ClickException(f"no complete runs of task {task!r} under {runs_dir}")
    if per_label and task in (None, "phenotype"):
        labels = per_label_table(runs, per_label)
        text = f"{text}\n\n{labels}" if labels else text
    click.echo(text)
    if out is not None:
        out.write_text(text + "\n")
        click.echo(f"\nwrote {out}")
