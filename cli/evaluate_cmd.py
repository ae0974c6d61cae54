"""``cbstore evaluate``: score a predictions file (thin wrapper over ``fusion.evaluation``)."""

from __future__ import annotations

import pathlib

import click

from cli.errors import reports_errors
from fusion.evaluation import compare_files, evaluate_file, render_summary, write_json

_FILE = click.Path(exists=True, dir_okay=False, path_type=pathlib.Path)


@click.command("evaluate")
@click.argument("predictions", type=_FILE)
@click.option("--n-boot", type=click.IntRange(min=0), default=1000, show_default=True,
              help="Bootstrap resamples for the 95% CIs (0: point estimates only).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the bootstrap and permutations.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=pathlib.Path), default=None,
              help="Metrics JSON to write [default: <PREDICTIONS stem>.metrics.json next to it].")
@click.option("--fairness/--no-fairness", default=True, show_default=True,
              help="Subgroup metrics by the demographic columns of the predictions.")
@click.option("--min-group-size", type=click.IntRange(min=1), default=30, show_default=True,
              help="Groups with fewer test stays are flagged small and left out of gaps.")
@click.option("--compare", "other", type=_FILE, default=None,
              help="Second predictions file: paired permutation tests PREDICTIONS vs this one.")
@click.option("--n-perm", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Permutations for --compare.")
@reports_errors
def evaluate(predictions: pathlib.Path, n_boot: int, seed: int, out: pathlib.Path | None,
             fairness: bool, min_group_size: int, other: pathlib.Path | None,
             n_perm: int) -> None:
    """Score PREDICTIONS (a predictions parquet) on its test part.

    Prints a summary and writes the metrics JSON (values, 95% bootstrap CIs, threshold chosen on
    the val part, fairness by group, SHA-256 of the file).
    """
    out = out or predictions.with_name(f"{predictions.stem}.metrics.json")
    result = evaluate_file(predictions, n_boot=n_boot, seed=seed, fairness=fairness,
                           min_group_size=min_group_size)
    if other is not None:
        result["comparison"] = compare_files(predictions, other, n_perm=n_perm, seed=seed)
    write_json(result, out)
    click.echo(render_summary(result))
    click.echo(f"\nwrote {out}")
