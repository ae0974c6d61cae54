"""``cbstore build``: thin click wrapper over :func:`cbstore.build.pipeline.build_store`."""

from __future__ import annotations

import logging

import click

from cbstore.build.config import load_config
from cbstore.build.pipeline import build_store, format_cohort_flow
from cli.errors import reports_errors


@click.command("build")
@click.option("--mimic-iv", "mimic_iv", required=True, type=click.Path(file_okay=False, path_type=str),
              help="MIMIC-IV release folder (holds hosp/ and icu/), v2.2 or v3.x.")
@click.option("--mimic-cxr", "mimic_cxr", required=True, type=click.Path(file_okay=False, path_type=str),
              help="MIMIC-CXR-JPG release folder (metadata table and files/).")
@click.option("--out", required=True, type=click.Path(path_type=str), help="Store to create, e.g. STORE.zarr.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=str),
              help="Settings file (YAML or TOML); see cbstore/build/resources/build.yaml.")
@click.option("--window-hours", type=int, help="Observation window in hours [48].")
@click.option("--image-size", type=int, help="Side of the stored square images in pixels [224].")
@click.option("--workers", type=int, help="Threads decoding X-ray JPEGs [2].")
@click.option("--threads", type=int, help="DuckDB threads [2].")
@click.option("--memory-limit", type=str, help="DuckDB memory limit, e.g. 2GB [2GB].")
@click.option("--work-dir", type=click.Path(file_okay=False, path_type=str),
              help="Folder for DuckDB's spill files (default: the system temporary folder).")
@click.option("--partitions", type=int,
              help="Process the stays in this many partitions (runs of whole 256-stay chunks) [the count "
                   "closest to 1,536 cohort stays per partition].")
@click.option("--overwrite", is_flag=True,
              help="Replace an existing store at --out once the new one is complete; start over instead of "
                   "resuming an interrupted build.")
@click.option("--quiet", is_flag=True, help="No progress output.")
@reports_errors
def build(mimic_iv, mimic_cxr, out, config_file, window_hours, image_size, workers, threads, memory_limit,
          work_dir, partitions, overwrite, quiet):
    """Build a feature store from MIMIC-IV and MIMIC-CXR-JPG (or a synthetic source).

    Prints the cohort flow (stays left after each selection step) and a short summary. An
    interrupted build keeps its state in OUT.build/; the same command continues it.
    """
    if not quiet:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    config = load_config(config_file, window_hours=window_hours, image_size=image_size, workers=workers,
                         threads=threads, memory_limit=memory_limit, work_dir=work_dir,
                         partitions=partitions)
    path = build_store(mimic_iv, mimic_cxr, out, config, overwrite=overwrite, progress=not quiet)
    # imported here: zarr, which the reader needs, is loaded by the build alongside its extraction
    from cbstore.store.reader import open_store

    store = open_store(path)
    attrs = store.attrs
    click.echo(format_cohort_flow(attrs["cohort_flow"]))
    n_cxr = int(store.cxr_present.sum())
    skips = ", ".join(f"{k} {v}" for k, v in attrs["cxr_skips"].items())
    click.echo(f"\n{path}: {store.n_stays} stays, {len(store.features)} EHR variables x {store.window_hours} h, "
               f"{n_cxr} with an X-ray ({100.0 * n_cxr / max(store.n_stays, 1):.1f} %), {store.n_folds} folds; "
               f"X-rays skipped: {skips}; config {attrs['config_sha256'][:12]}")
