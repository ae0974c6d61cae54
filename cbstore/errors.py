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
