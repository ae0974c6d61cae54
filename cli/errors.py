"""The one error boundary of the command line.

Every error that cbstore, encoders and fusion raise on purpose derives from
:class:`cbstore.errors.CbstoreError`. :func:`reports_errors` turns such an error into a click
error: one line on stderr (``Error: ...``, no traceback) and exit status 1. Anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

import functools

import click

from cbstore.errors import CbstoreError


def one_line(err: BaseException) -> str:
    """The message of ``err`` on one line (its lines joined with single spaces)."""
    return " ".join(part.strip() for part in str(err).splitlines() if part.strip()) or type(err).__name__


def reports_errors(command):
    """Decorate a click command's function so a :class:`CbstoreError` exits with one clear line."""
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except CbstoreError as err:
            raise click.ClickException(one_line(err)) from None
    return wrapper
