"""The encoder registry: every encoder ``cbstore encode --encoder NAME`` knows.

Each entry is an :class:`EncoderSpec`. The registry name is also the ``encoder_id`` written to
the store (``embeddings/<modality>/<encoder_id>``), except when non-default weights are used:
then ``-<weights tag>`` is appended (e.g. ``densenet121-res224-chex-random``), so an embedding
from random or other weights can never pass for the pretrained one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from encoders.errors import UnknownEncoderError, WeightsError
from encoders.weights import RANDOM


@dataclass(frozen=True)
class EncoderSpec:
    """Description of one encoder.

    Attributes
    ----------
    name : str
        Registry name and default ``encoder_id``.
    modality : str
        ``"cxr"`` or ``"ehr"``.
    dim : int or None
        Output dimension at the native input; ``None`` when it depends on the store (``ehr-stats``:
        number of variables). The built encoder's ``dim`` attribute is authoritative.
    per_fold : bool
        Whether one model is trained per split fold (values ``[fold, stay, dim]``).
    description : str
        One line for ``--help`` and docs.
    factory : callable
        ``factory(store, **options) -> encoder``; the options each kind accepts are listed in
        :func:`encoders.pass_.run_encoding_pass`.
    default_weights : str or None
        Weights used when none are given (``None``: the encoder has no pretrained weights).
    weights_options : tuple of str
        Accepted weights names besides :data:`~encoders.weights.RANDOM`.
    nan_allowed : bool
        Whether NaN in the output is by design (``ehr-stats``); otherwise NaN stops the pass.
    leakage_note : str
        Caveat recorded in the embedding's attrs ("" when none).
    map_stage : str or None
        Spatial-map encoders: the backbone stage whose output map is stored (``map`` array).
    """

    name: str
    modality: str
    dim: int | None
    per_fold: bool
    description: str
    factory: Callable[..., Any]
    default_weights: str | None = None
    weights_options: tuple[str, ...] = field(default_factory=tuple)
    nan_allowed: bool = False
    leakage_note: str = ""
    map_stage: str | None = None

    def encoder_id(self, weights: str | None) -> str:
        """``encoder_id`` written to the store for ``weights`` (see the module docstring)."""
        if weights is None or weights == self.default_weights:
            return self.name
        if weights == RANDOM:
            return f"{self.name}-random"
        return f"{self.name}-{weights.lower().replace('_', '-')}"

    def check_weights(self, weights: str | None) -> str | None:
        """Resolve ``None`` to the default weights and refuse names the encoder cannot load."""
        if weights is None:
            return self.default_weights
        if self.default_weights is None:
            raise WeightsError(f"encoder {self.name!r} has no pretrained weights; do not pass --weights")
        if weights != RANDOM and weights not in self.weights_options:
            raise WeightsError(f"encoder {self.name!r} takes weights {list(self.weights_options)} or "
                               f"{RANDOM!r}, not {weights!r}")
        return weights


#: DenseNet weights offered (torchxrayvision names without the ``densenet121-res224-`` prefix).
DENSENET_WEIGHTS = ("all", "chex", "mimic_ch", "mimic_nb", "nih", "pc", "rsna")

#: Weights trained on MIMIC-CXR images (leakage caveat, see :mod:`encoders.cxr`).
MIMIC_TRAINED = ("all", "mimic_ch", "mimic_nb", "101-elastic")

_MIMIC_LEAK = ("weights were trained on MIMIC-CXR images, which overlap the patients of the "
               "evaluation splits; test-set results may be optimistic")


def _densenet_factory(variant: str, map_stage: str | None = None) -> Callable[..., Any]:
    def factory(store=None, *, weights=None, weights_dir=None, input_size=None, seed=0):
        from encoders.cxr import build_densenet

        return build_densenet(variant, weights, weights_dir=weights_dir, input_size=input_size,
                              seed=seed, map_stage=map_stage)

    factory.__name__ = f"densenet_{variant}_factory"
    return factory


def _resnet_ae_factory(store=None, *, weights=None, weights_dir=None, input_size=None, seed=0):
    from encoders.cxr import build_resnet_ae

    return build_resnet_ae(weights, weights_dir=weights_dir, input_size=input_size, seed=seed)


def _resnet50_factory(store=None, *, weights=None, weights_dir=None, input_size=None, seed=0):
    from encoders.cxr import build_resnet50_imagenet

    return build_resnet50_imagenet(weights, weights_dir=weights_dir, input_size=input_size, seed=seed)


def _resnet50_layer3_factory(store=None, *, weights=None, weights_dir=None, input_size=None, seed=0):
    from encoders.cxr import build_resnet50_imagenet

    return build_resnet50_imagenet(weights, weights_dir=weights_dir, input_size=input_size, seed=seed,
                                   map_stage="layer3")


def _ehr_stats_factory(store):
    from encoders.ehr_stats import EhrStatsEncoder

    return EhrStatsEncoder(store.features["name"].tolist(), store.window_hours)


def _ehr_lstm_factory(store, *, device="cpu", config=None):
    from encoders.ehr_seq import EhrLstmEncoder

    return EhrLstmEncoder(len(store.features), store.window_hours, config, device=device)


def _specs() -> dict[str, EncoderSpec]:
    specs = {}
    for variant in DENSENET_WEIGHTS:
        name = f"densenet121-res224-{variant}"
        specs[name] = EncoderSpec(
            name, "cxr", 1024, False,
            f"torchxrayvision DenseNet-121 ({variant} weights), features2 -> 1024-d at 224 px",
            _densenet_factory(variant), default_weights=name, weights_options=(name,),
            leakage_note=_MIMIC_LEAK if variant in MIMIC_TRAINED else "")
        specs[f"{name}-block3"] = EncoderSpec(
            f"{name}-block3", "cxr", 512, False,
            f"torchxrayvision DenseNet-121 ({variant} weights), spatial map after dense block 3 and "
            "transition3 (float16 [512, 7, 7] at 224 px); values = its average pool (512-d)",
            _densenet_factory(variant, "block3"), default_weights=name, weights_options=(name,),
            leakage_note=_MIMIC_LEAK if variant in MIMIC_TRAINED else "", map_stage="block3")
    specs["resnet-ae-101-elastic"] = EncoderSpec(
        "resnet-ae-101-elastic", "cxr", 4608, False,
        "torchxrayvision ResNet-101 autoencoder (101-elastic), latent [512,3,3] flattened -> 4608-d",
        _resnet_ae_factory, default_weights="101-elastic", weights_options=("101-elastic",),
        leakage_note=_MIMIC_LEAK)
    specs["resnet50-imagenet"] = EncoderSpec(
        "resnet50-imagenet", "cxr", 2048, False,
        "torchvision ResNet-50 ImageNet weights, conv1 summed to 1 channel, pooled -> 2048-d",
        _resnet50_factory, default_weights="IMAGENET1K_V1",
        weights_options=("IMAGENET1K_V1", "IMAGENET1K_V2"))
    specs["resnet50-imagenet-layer3"] = EncoderSpec(
        "resnet50-imagenet-layer3", "cxr", 1024, False,
        "torchvision ResNet-50 ImageNet weights, spatial map after layer3 (float16 [1024, 14, 14] "
        "at 224 px); values = its average pool (1024-d)",
        _resnet50_layer3_factory, default_weights="IMAGENET1K_V1",
        weights_options=("IMAGENET1K_V1", "IMAGENET1K_V2"), map_stage="layer3")
    specs["ehr-stats"] = EncoderSpec(
        "ehr-stats", "ehr", None, False,
        "per-variable statistics over the window and sub-windows + missingness (NaN where unobserved)",
        _ehr_stats_factory, nan_allowed=True)
    specs["ehr-lstm"] = EncoderSpec(
        "ehr-lstm", "ehr", 64, True,
        "self-supervised next-hour-forecasting LSTM trained per fold on training stays (hidden 64)",
        _ehr_lstm_factory)
    return specs


#: Registry: encoder name -> :class:`EncoderSpec`.
ENCODERS: dict[str, EncoderSpec] = _specs()


def get_encoder(name: str) -> EncoderSpec:
    """Look up an encoder by name.

    Raises
    ------
    UnknownEncoderError
        The name is not registered; the message lists the valid names.
    """
    try:
        return ENCODERS[name]
    except KeyError:
        raise UnknownEncoderError(
            f"unknown encoder {name!r}; valid encoders: {', '.join(sorted(ENCODERS))}") from None


def build_map_tail(attrs: dict, *, pretrained: bool = True, weights_dir=None):
    """The live stages that follow a stored spatial map, with the weights that made the map.

    Parameters
    ----------
    attrs : dict
        The spatial-map embedding's attrs (``encoder_name``, ``weights``, ``seed``,
        ``map_stage``), as :meth:`cbstore.store.reader.Store.embeddings` lists them.
    pretrained : bool
        Load the weights (named weights: their file; ``random``: the recorded seed). False
        builds the architecture only (a saved model's state replaces every weight).
    weights_dir : path-like, optional
        Directory searched first for the weights file.

    Returns
    -------
    torch.nn.Module
        See :func:`encoders.cxr.map_tail`.

    Raises
    ------
    WeightsError
        The attrs do not describe a spatial-map encoder.
    """
    from encoders.cxr import map_tail

    name, stage = attrs.get("encoder_name"), attrs.get("map_stage")
    if not name or not stage:
        raise WeightsError(f"embedding {attrs.get('encoder_id')!r} stores no spatial map "
                           "(no encoder_name/map_stage in its attrs)")
    spec = get_encoder(name)
    weights = attrs.get("weights") if pretrained else RANDOM
    seed = attrs.get("seed") if weights == RANDOM and attrs.get("seed") is not None else 0
    encoder = spec.factory(None, weights=weights, weights_dir=weights_dir, seed=int(seed))
    return map_tail(encoder, stage)
