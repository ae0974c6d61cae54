"""`cbstore info` and `cbstore validate` (thin wrappers; the lead adds them to the group)."""

from __future__ import annotations

from pathlib import Path

import click

from cli.errors import reports_errors


@click.command("info")
@click.argument("store", type=click.Path(path_type=Path))
@reports_errors
def info(store: Path) -> None:
    """Summarise STORE: cohort, splits, labels, CXR coverage, embeddings, size."""
    from cbstore.store.info import store_summary
    from cbstore.store.reader import open_store

    click.echo(store_summary(open_store(store)))


@click.command("validate")
@click.argument("store", type=click.Path(path_type=Path))
@reports_errors
def validate(store: Path) -> None:
    """Check STORE against the store layout; exit 1 when problems are found."""
    from cbstore.store.validate import validation_report

    text, ok = validation_report(store)
    click.echo(text)
    if not ok:
        raise SystemExit(1)
