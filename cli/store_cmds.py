"""`cbstore info` and `cbstore validate` (thin wrappers; the lead adds them to the group)."""

from __future__ import annotations

from pathlib import Path

import click

from cbstore.errors import StoreError


@click.command("info")
@click.argument("store", type=click.Path(path_type=Path))
def info(store: Path) -> None:
    """Summarise STORE: cohort, splits, labels, CXR coverage, embeddings, size."""
    from cbstore.info import store_summary
    from cbstore.store import open_store

    try:
        opened = open_store(store)
    except StoreError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(store_summary(opened))


@click.command("validate")
@click.argument("store", type=click.Path(path_type=Path))
def validate(store: Path) -> None:
    """Check STORE against the store layout; exit 1 when problems are found."""
    from cbstore.validate import validation_report

    text, ok = validation_report(store)
    click.echo(text)
    if not ok:
        raise SystemExit(1)
