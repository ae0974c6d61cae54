"""Methods whose modules may start from pretrained weights (``cxr_weights``).

:class:`StartsFromPretrained` is mixed into a :class:`fusion.methods.base.TorchMethod` whose
``build_module`` builds an X-ray backbone. Fitting reads the weights file (offline, see
:func:`fusion.modules.load_imagenet_resnet50`); restoring a saved method rebuilds the same
architecture without reading it, since the saved state replaces every weight.
"""

from __future__ import annotations

import pathlib

__all__ = ["StartsFromPretrained"]


class StartsFromPretrained:
    """Mixin: pretrained weights at fit time, none needed to restore a saved method.

    Attributes
    ----------
    weights_dir : path-like or None
        Directory searched first for weight files (then ``$CBSTORE_WEIGHTS_DIR``, then the
        library caches). Where files live does not change results, so it is not a hyperparameter.
    """

    weights_dir = None
    _load_pretrained = True

    def encoder_options(self) -> dict:
        """Keyword arguments for :func:`fusion.modules.build_encoder` (pretrained, weights_dir)."""
        return {"pretrained": self._load_pretrained, "weights_dir": self.weights_dir}

    def _restore(self, state: dict, folder: pathlib.Path) -> None:
        self._load_pretrained = False
        try:
            super()._restore(state, folder)
        finally:
            self._load_pretrained = True
