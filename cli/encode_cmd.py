"""``cbstore encode``: thin click wrapper over :func:`encoders.pass_.run_encoding_pass`."""

from __future__ import annotations

import logging

import click

from cli.errors import reports_errors
from encoders.registry import ENCODERS


def _encoder_help() -> str:
    return "; ".join(f"{name} ({spec.modality})" for name, spec in sorted(ENCODERS.items()))


@click.command("encode")
@click.argument("store", type=click.Path(path_type=str))
@click.option("--encoder", "encoder_name", required=True, metavar="NAME",
              help=f"Encoder to run: {_encoder_help()}.")
@click.option("--weights", metavar="NAME|random",
              help="Weights name (default: the encoder's own) or 'random' (seeded); other "
                   "weights add a suffix to the encoder id.")
@click.option("--weights-dir", type=click.Path(file_okay=False, path_type=str),
              help="Folder holding weight files named like their release assets (searched before "
                   "$CBSTORE_WEIGHTS_DIR and the library caches). Nothing is downloaded.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True,
              help="Films per forward call.")
@click.option("--workers", type=click.IntRange(min=0), default=0, show_default=True,
              help="DataLoader processes reading films.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="torch threads (default: torch's choice in-process, 1 per Dask worker).")
@click.option("--dask-scheduler", metavar="ADDRESS",
              help="Distribute regions (or folds) over a running Dask scheduler, e.g. tcp://host:8786.")
@click.option("--dask-workers", type=click.IntRange(min=1),
              help="Start a local Dask cluster with N single-threaded worker processes.")
@click.option("--region-stays", type=click.IntRange(min=1), default=1024, show_default=True,
              help="Stays per region (resume unit), used when the embedding is created.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed for random weights and learned EHR encoders.")
@click.option("--input-size", type=click.IntRange(min=8), default=None,
              help="Resize films to this size instead of the weights' input resolution (CXR; "
                   "for quick demos and tests; recorded in the embedding's provenance).")
@click.option("--overwrite", is_flag=True, help="Recompute a complete embedding (or restart an incomplete one).")
@click.option("--quiet", is_flag=True, help="No progress bar or log lines.")
@reports_errors
def encode(store, encoder_name, weights, weights_dir, device, batch_size, workers, threads,
           dask_scheduler, dask_workers, region_stays, seed, input_size, overwrite, quiet):
    """Embed one modality of STORE with an encoder and cache the result in the store.

    Resumable: an interrupted pass continues with the regions not yet written; a finished one is
    left alone unless --overwrite.
    """
    from encoders.pass_ import ALREADY_COMPLETE, run_encoding_pass

    if dask_scheduler and dask_workers:
        raise click.UsageError("give either --dask-scheduler or --dask-workers, not both")
    if not quiet:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    summary = run_encoding_pass(
        store, encoder_name, device=device, batch_size=batch_size, workers=workers,
        overwrite=overwrite, weights=weights, weights_dir=weights_dir,
        dask_scheduler=dask_scheduler, dask_workers=dask_workers, progress=not quiet,
        region_stays=region_stays, seed=seed, threads=threads, input_size=input_size)
    where = f"embeddings/{summary['modality']}/{summary['encoder_id']}"
    if summary["status"] == ALREADY_COMPLETE:
        click.echo(f"{where} is already complete in {summary['store']}; nothing to do "
                   "(pass --overwrite to recompute)")
        return
    rate = summary.get("items_per_s", float("nan"))
    unit = "films" if summary["modality"] == "cxr" else "stays"
    click.echo(f"wrote {where} (dim {summary['dim']}{', per fold' if summary['per_fold'] else ''}): "
               f"{summary['items']} {unit} in {summary['seconds']:.1f} s ({rate:.1f}/s), "
               f"{summary['regions_computed']} of {summary['regions_total']} regions computed "
               f"on {summary['device']}{' via dask' if summary['dask'] else ''}")
