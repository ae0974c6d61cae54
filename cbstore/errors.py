"""Exceptions raised by cbstore.

Every error names the path, array, column or value at fault and says what to do about it.
Other packages may import these (``from cbstore.errors import StoreError``).
"""

from __future__ import annotations


class CbstoreError(Exception):
    """Base class of all cbstore errors."""


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
