"""``cbstore synth``: thin click wrapper over :func:`cbstore.synth.write_synthetic_source`."""

from __future__ import annotations

import click

from cbstore.synth import write_synthetic_source
from cli.errors import reports_errors


@click.command("synth")
@click.argument("out", type=click.Path(file_okay=False, path_type=str))
@click.option("--stays", "n_stays", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Number of ICU stays.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Random seed.")
@click.option("--image-size", type=click.IntRange(min=8), default=64, show_default=True,
              help="Film size in pixels (most films square, some taller or wider).")
@click.option("--no-images", is_flag=True, help="Write the CXR tables but no JPEG files (faster).")
@click.option("--chartevents-per-stay", type=click.FloatRange(min=1.0), default=None,
              help="Mean chartevents rows per stay [about 650: hourly vital signs].")
@click.option("--chunk-stays", type=click.IntRange(min=1), default=None,
              help="Stays generated and held in memory at once; the output does not depend on it "
                   "[about 1,000,000 chartevents rows: 909 stays at 1,100 rows per stay].")
@click.option("--overwrite", is_flag=True, help="Replace a synthetic source already in OUT.")
@reports_errors
def synth(out, n_stays, seed, image_size, no_images, chartevents_per_stay, chunk_stays, overwrite):
    """Write a synthetic MIMIC-IV + MIMIC-CXR-JPG source with planted ground truth into OUT.

    OUT receives mimic-iv/ and mimic-cxr-jpg/ (pass them to `cbstore build`) and truth.json.
    Stays are generated and written in chunks, so memory does not grow with --stays; the files are
    the same whatever --chunk-stays is.
    """
    summary = write_synthetic_source(out, n_stays, seed, image_size, images=not no_images,
                                     chartevents_per_stay=chartevents_per_stay, overwrite=overwrite,
                                     chunk_stays=chunk_stays)
    rows = summary.rows
    films = f"{summary.n_images} films" + ("" if summary.images_written else " (metadata only, no JPEGs)")
    click.echo(f"{summary.out_dir}: {summary.n_stays} stays, {summary.n_patients} patients, "
               f"{summary.n_admissions} admissions; {rows['icu/chartevents']} chartevents rows, "
               f"{rows['hosp/labevents']} labevents rows; {films}; "
               f"{summary.n_eligible_stays} stays ({100 * summary.eligible_share:.1f} %) with an eligible film; "
               f"{summary.seconds:.1f} s")
    click.echo(f"  MIMIC-IV:      {summary.mimic_iv}\n  MIMIC-CXR-JPG: {summary.mimic_cxr}\n"
               f"  truth:         {summary.truth}")
