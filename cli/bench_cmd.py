"""``cbstore bench``: thin click wrapper over :mod:`fusion.bench` (expand, then run or dry-run)."""

from __future__ import annotations

import click

from cbstore.errors import CbstoreError
from fusion.registry import FusionError


def _parse_resources(pairs) -> dict:
    resources = {}
    for pair in pairs:
        name, sep, amount = pair.partition("=")
        try:
            resources[name.strip()] = float(amount)
        except ValueError:
            sep = ""
        if not sep or not name.strip():
            raise click.BadParameter(f"{pair!r}: expected NAME=AMOUNT, e.g. GPU=1",
                                     param_hint="--resources")
    return resources


@click.command("bench")
@click.argument("experiment", metavar="NAME_OR_PATH")
@click.option("--store", type=click.Path(path_type=str),
              help="Store of the grid [the experiment file's 'store'].")
@click.option("--out", type=click.Path(file_okay=False, path_type=str), default="runs",
              show_default=True, help="Folder of the run folders.")
@click.option("--workers", type=click.IntRange(min=0),
              help="Worker processes of the local Dask cluster, one single-threaded fit each; "
                   "0 runs the cells one by one in this process [CPU cores].")
@click.option("--scheduler", metavar="ADDRESS",
              help="Use an existing Dask cluster (e.g. tcp://host:8786) instead of a local one.")
@click.option("--resources", "resources", multiple=True, metavar="NAME=AMOUNT",
              help="Resource each local worker declares, e.g. GPU=1 (raw-feature cells then "
                   "ask for one GPU); repeatable.")
@click.option("--dry-run", is_flag=True,
              help="Print the grid size, the complete and failed cells and the time left; "
                   "run nothing.")
def bench(experiment, store, out, workers, scheduler, resources, dry_run):
    """Run the benchmark grid of experiment NAME_OR_PATH (a shipped name or a YAML file).

    Every cell is a normal run folder in --out: complete cells are skipped, failed cells
    (<run-id>.failed.json) are retried. The exit status is 1 when a cell failed.
    """
    from fusion.bench import expand_grid, load_experiment, run_grid, status_lines
    from fusion.bench.runner import default_workers, write_manifest

    resources = _parse_resources(resources)
    try:
        exp, path = load_experiment(experiment)
        store = store or exp.store
        if store is None:
            raise click.UsageError("no store: pass --store or set 'store' in the experiment file")
        grid = expand_grid(exp, store=store, out=out, name=path.stem, source=path)
        n_workers = default_workers() if workers is None else workers
        for line in status_lines(grid, n_workers):
            click.echo(line)
        if dry_run:
            return
        write_manifest(grid, str(path))
        outcome = run_grid(grid, workers=n_workers, scheduler=scheduler,
                           resources=resources, echo=click.echo)
    except (FusionError, CbstoreError) as err:
        raise click.ClickException(str(err)) from None
    click.echo(f"grid {grid.name}: {outcome.complete} of {outcome.total} cells complete, "
               f"{outcome.failed} failed, {outcome.ran} run now")
    if not outcome.ok:
        raise click.exceptions.Exit(1)
