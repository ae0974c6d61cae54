"""Exceptions raised by the encoders and the encoding pass.

They derive from :class:`cbstore.errors.CbstoreError`, so a caller can catch every cbstore error at
once; each message names the encoder, file, store or stays at fault and says what to do.
"""

from __future__ import annotations

from cbstore.errors import CbstoreError


class EncoderError(CbstoreError):
    """Base class of the errors of the ``encoders`` package."""


class UnknownEncoderError(EncoderError, KeyError):
    """An encoder name is not in :data:`encoders.registry.ENCODERS`."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0]) if self.args else ""


class WeightsError(EncoderError):
    """A weights name is unknown, or a weights file is unreadable or does not fit the model."""


class WeightsNotFoundError(WeightsError, FileNotFoundError):
    """The file of a named set of weights is in none of the searched directories."""


class EncodingInputError(EncoderError, ValueError):
    """The store lacks what the encoder needs (e.g. no X-ray present, no EHR arrays)."""


class NonFiniteEmbeddingError(EncoderError, FloatingPointError):
    """An encoder produced NaN or infinite values; the message lists the stay ids."""
