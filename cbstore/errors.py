"""Exceptions raised by cbstore and the packages built on it.

Every error that ``cbstore``, ``encoders`` or ``fusion`` raises on purpose derives from
:class:`CbstoreError`, so a caller (and the ``cbstore`` command line) catches them all with one
``except CbstoreError``. Each message names the path, array, column or value at fault and says what
to do about it. Other packages import these (``from cbstore.errors import StoreError``) and derive
their own errors from :class:`CbstoreError`.

Most classes also derive from the matching built-in exception (``ValueError``, ``KeyError``,
``FileNotFoundError`` ...), so code that catches the built-in keeps working.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass


class CbstoreError(Exception):
    """Base class of all cbstore errors (store, build, encoders, fusion, evaluation, CLI)."""


class StoreError(CbstoreError):
    """A store is missing, incomplete, unreadable, read-only or otherwise unusable."""


class StoreVersionError(StoreError):
    """The store's format version has a different major version than this cbstore supports."""


class StoreContentError(StoreError, ValueError):
    """Content handed to the writer does not fit the store layout (shape, dtype, values, attrs)."""


class StoreExistsError(StoreError, FileExistsError):
    """The target of a write exists and ``overwrite`` was not given."""


class StoreReadOnlyError(StoreError, PermissionError):
    """The store cannot be written (read-only filesystem or permissions)."""


class EmbeddingError(StoreError):
    """An embedding group is missing, incomplete or inconsistent."""


class SourceError(CbstoreError, ValueError):
    """A source file (MIMIC-IV, MIMIC-CXR-JPG or synthetic) is missing, truncated or malformed."""


class SchemaDefinitionError(CbstoreError, ValueError):
    """A JSON Schema is not valid draft 2020-12 or uses a keyword the draft does not define."""


class ConfigError(CbstoreError, ValueError):
    """A configuration (build settings, a fusion run's options or file) is invalid."""


class UnknownTaskError(CbstoreError, ValueError):
    """A task name is not one of :data:`cbstore.format.tasks.TASKS`; the message lists them."""


class MaskError(CbstoreError, ValueError):
    """Invalid missing-modality mask parameters (rate outside [0, 1], bad stay ids)."""


class InputsError(StoreError, ValueError):
    """A request for model inputs does not fit the store (shapes, parts, cohorts, input kinds)."""


@dataclass(frozen=True)
class InvalidValue:
    """One problem of a validated mapping: the key path, the value found and what is allowed."""

    key: str
    value: object
    allowed: str


def invalid_values(errors: Iterable[Mapping], words: Mapping[str, str],
                   keys_of: Callable[[tuple], Sequence[str]]) -> list[InvalidValue]:
    """Describe the errors of a pydantic ``ValidationError`` for an error message.

    Parameters
    ----------
    errors : iterable of mapping
        ``ValidationError.errors()``: each with ``type``, ``loc``, ``msg`` and ``input``.
    words : mapping of str to str
        What a top-level key holds, in words; put before pydantic's own detail.
    keys_of : callable
        The valid keys at an error's location (for an unknown key).

    Returns
    -------
    list of InvalidValue
        Keys as dotted paths with indexes (``methods[1].name``).
    """
    # a missing key's "input" is the whole mapping; there is no value to show
    return [InvalidValue(_key_of(e["loc"]), None if e["type"] == "missing" else e.get("input"),
                         _allowed(e, words, keys_of)) for e in errors]


def first_invalid_field(model: type, errors: Iterable[Mapping]) -> InvalidValue:
    """The first error of a flat pydantic model, with the fields' descriptions as the words.

    Parameters
    ----------
    model : type
        The pydantic model class (its ``model_fields``).
    errors : iterable of mapping
        ``ValidationError.errors()`` of that model.

    Returns
    -------
    InvalidValue
    """
    fields = model.model_fields
    words = {name: field.description for name, field in fields.items() if field.description}
    return invalid_values(errors, words, lambda loc: list(fields))[0]


def _key_of(loc: tuple) -> str:
    return "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc).lstrip(".")


def _allowed(error: Mapping, words: Mapping[str, str], keys_of: Callable[[tuple], Sequence[str]]) -> str:
    message = error["msg"]
    if error["type"] == "extra_forbidden":
        return f"one of the keys {', '.join(keys_of(error['loc']))} ({message.lower()})"
    if message.startswith("Value error, "):  # a validator's own message says it all
        return message[len("Value error, "):]
    detail = message.removeprefix("Input should be ")
    key_words = words.get(error["loc"][0]) if error["loc"] else None
    return f"{key_words} ({detail})" if key_words else detail
