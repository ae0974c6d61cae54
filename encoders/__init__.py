"""Encoders: models that turn a modality of a cbstore store into vectors, and the encoding pass.

- :mod:`encoders.registry` — ``ENCODERS`` (name -> :class:`~encoders.registry.EncoderSpec`) and
  ``get_encoder(name)``.
- :mod:`encoders.cxr` — chest X-ray encoders (torchxrayvision DenseNet-121 and ResNet autoencoder,
  torchvision ResNet-50 ImageNet), torchxrayvision input conventions.
- :mod:`encoders.ehr_stats` — ``ehr-stats``, deterministic summary statistics.
- :mod:`encoders.ehr_seq` — ``ehr-lstm``, a self-supervised LSTM trained per fold.
- :mod:`encoders.weights` — offline resolution and safe loading of named weights.
- :mod:`encoders.pass_` — ``run_encoding_pass``: resumable, region-wise, optionally on Dask.

Importing this package does not import torch; the model modules do.
"""

from encoders.registry import ENCODERS, EncoderSpec, get_encoder

__all__ = ["ENCODERS", "EncoderSpec", "get_encoder", "run_encoding_pass"]


def __getattr__(name: str):
    """Load :func:`encoders.pass_.run_encoding_pass` (and with it the store and torch) on first use."""
    if name == "run_encoding_pass":
        from encoders.pass_ import run_encoding_pass

        return run_encoding_pass
    raise AttributeError(f"module 'encoders' has no attribute {name!r}")
