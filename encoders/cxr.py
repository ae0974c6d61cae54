"""Chest X-ray encoders: frozen image models that turn a stored film into one vector.

All follow the torchxrayvision input convention: one channel, intensities scaled from uint8
``[0, 255]`` to ``[-1024, 1024]`` as ``(2 * x / 255 - 1) * 1024`` (``xrv.utils.normalize`` with
``maxval=255``), square images at the weights' input resolution. Stored films (``cxr/images``,
already centre-cropped squares of the store's ``image_size``) whose size differs from the input
resolution are resized with bilinear interpolation and antialiasing, the same operation
torchxrayvision's ``fix_resolution`` performs; cbstore does it itself so the library prints
nothing. ``input_size`` overrides the resolution (only meant for fast tests; it is recorded in
the embedding's provenance).

Encoders (output dimension):

``densenet121-res224-<weights>`` (1024)
    torchxrayvision DenseNet-121; embedding = ``features2``: ReLU of the last feature map,
    global average pooled. Weights ``all``, ``chex``, ``mimic_ch``, ``mimic_nb``, ``nih``, ``pc``,
    ``rsna`` at 224 px. **Leakage caveat:** ``all``, ``mimic_ch`` and ``mimic_nb`` were trained
    on MIMIC-CXR images, which include films of the patients in cbstore's evaluation splits;
    embeddings from them may carry label information about test patients. Prefer ``chex``,
    ``nih``, ``pc`` or ``rsna`` for leakage-free comparisons.
``resnet-ae-101-elastic`` (4608)
    torchxrayvision ResNet-101 autoencoder; embedding = the encoder's ``[512, 3, 3]`` latent
    map, flattened in C-order (channel-major). The autoencoder has no pooling of its own and its
    latent is a spatial code: pooling it to 512 would discard where in the chest a finding is.
    Trained on NIH, PadChest, RSNA, MIMIC-CXR and CheXpert (same leakage caveat as above).
``resnet50-imagenet`` (2048)
    torchvision ResNet-50 with ImageNet weights (``IMAGENET1K_V1`` by default, or
    ``IMAGENET1K_V2``), adapted to one channel by summing ``conv1`` over its RGB filters (a grey
    image fed to all three channels gives the same response). The xrv-range input is mapped to
    ``[0, 1]`` as ``(x + 1024) / 2048`` and standardised with the mean of the ImageNet channel
    means and stds, ``(x01 - 0.449) / 0.226``. Embedding = global-average-pooled ``layer4``.

**Spatial-map encoders** store a frozen backbone's intermediate feature map per stay (float16
``map`` array, see ``store_layout.md``) so that intermediate-fusion methods train the remaining
stage(s) on it; their ``values`` are the map's global average pool:

``resnet50-imagenet-layer3`` (map ``[1024, S/16, S/16]``; 1024 x 14 x 14 at 224 px)
    The output of ``layer3`` of ``resnet50-imagenet``; ``layer4`` runs live in the method
    (:func:`map_tail`).
``densenet121-res224-<weights>-block3`` (map ``[512, S/32, S/32]``; 512 x 7 x 7 at 224 px)
    The output of dense block 3 and its transition layer (``transition3``: BN, ReLU, 1x1 conv,
    2x2 average pool) of ``densenet121-res224-<weights>``; ``denseblock4`` and ``norm5`` run
    live in the method.

Weights are resolved and loaded by :mod:`encoders.weights`; ``weights="random"`` gives a seeded
random initialisation (for tests and as a no-pretraining baseline).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from encoders.errors import EncodingInputError, WeightsError
from encoders.weights import (
    FORMAT_STATE_DICT, RANDOM, file_sha256, load_into, load_state_dict, resolve_weights_file,
    weights_source,
)

#: ImageNet channel statistics averaged over RGB (for a grey image fed to a colour network).
IMAGENET_GRAY_MEAN = float(np.mean([0.485, 0.456, 0.406]))
IMAGENET_GRAY_STD = float(np.mean([0.229, 0.224, 0.225]))

#: Intensity scaling applied to every stored uint8 film (torchxrayvision convention).
XRV_SCALING = "x_float = (2 * (x_uint8 / 255) - 1) * 1024  (xrv.utils.normalize, maxval=255)"


class CxrEncoder:
    """A frozen image model with its preprocessing and provenance.

    Parameters
    ----------
    name : str
        Registry name (e.g. ``"densenet121-res224-chex"``).
    module : torch.nn.Module
        The network, in eval mode.
    embed_fn : callable
        ``embed_fn(module, x) -> [B, dim]`` for ``x`` float32 ``[B, 1, S, S]`` in xrv range.
    dim : int
        Output dimension.
    input_size : int
        Side length the films are resized to before the network.
    native_resolution : int
        The weights' training resolution.
    weights : str
        Weights name, or ``"random"``.
    weights_sha256 : str or None
        SHA-256 of the weights file (``None`` for random weights).
    seed : int or None
        Seed of a random initialisation (``None`` for named weights).
    preprocessing : dict
        Human-readable description of every step, stored as provenance.

    Attributes
    ----------
    targets : list of str
        Pathology names of the classifier head where the weights define them, else ``[]``.
    map_stage : str or None
        Spatial-map encoders: the stage whose output is stored (``layer3``, ``block3``).
    map_shape : tuple of int or None
        Spatial-map encoders: ``(C, h, w)`` of the stored map at :attr:`input_size`.
    """

    modality = "cxr"

    def __init__(self, name: str, module: nn.Module, embed_fn: Callable, dim: int, input_size: int,
                 native_resolution: int, weights: str, weights_sha256: str | None,
                 seed: int | None, preprocessing: dict, targets: list[str] | None = None,
                 map_fn: Callable | None = None, map_stage: str | None = None):
        self.name = name
        self.module = module.eval()
        self._map_fn = map_fn
        self.map_stage = map_stage
        self._embed_fn = embed_fn if map_fn is None else _pooled_map(map_fn)
        self.dim = dim
        self.input_size = input_size
        self.native_resolution = native_resolution
        self.weights = weights
        self.weights_sha256 = weights_sha256
        self.seed = seed
        self.preprocessing = preprocessing
        self.targets = list(targets or [])
        for parameter in self.module.parameters():
            parameter.requires_grad_(False)
        self.map_shape = None
        if map_fn is not None:
            with torch.inference_mode():
                probe = map_fn(self.module, torch.zeros(1, 1, input_size, input_size))
            self.map_shape = tuple(int(v) for v in probe.shape[1:])

    def to(self, device: torch.device | str) -> "CxrEncoder":
        """Move the network to ``device`` (returns self)."""
        self.module.to(device)
        return self

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Scale uint8 films ``[B, H, W]`` to float32 ``[B, 1, S, S]`` in ``[-1024, 1024]``.

        Films are resized to :attr:`input_size` (bilinear, antialias) when ``H != S``.
        """
        if images.ndim != 3:
            raise EncodingInputError(f"expected films shaped [batch, y, x], got {tuple(images.shape)}")
        if images.shape[1] != images.shape[2]:
            raise EncodingInputError(
                f"films must be square (the store centre-crops them); got {tuple(images.shape[1:])}")
        x = images.to(torch.float32).unsqueeze(1)
        x = (2.0 * (x / 255.0) - 1.0) * 1024.0
        if x.shape[-1] != self.input_size:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear",
                              align_corners=False, antialias=True)
        return x

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Embedding of preprocessed films ``x`` (float ``[B, 1, S, S]``) -> ``[B, dim]``."""
        return self._embed_fn(self.module, x)

    def embed_map(self, x: torch.Tensor) -> torch.Tensor:
        """Spatial map of preprocessed films ``x`` -> ``[B, C, h, w]`` (spatial-map encoders only)."""
        if self._map_fn is None:
            raise EncodingInputError(f"encoder {self.name} stores no spatial map")
        return self._map_fn(self.module, x)

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Preprocess uint8 films and embed them (float32 ``[B, dim]``)."""
        return self.embed(self.preprocess(images)).float()

    def provenance(self) -> dict:
        """Attributes describing this encoder, for the embedding group."""
        return {
            "weights": self.weights,
            "weights_sha256": self.weights_sha256,
            "seed": self.seed,
            "input_resolution": self.input_size,
            "native_resolution": self.native_resolution,
            "preprocessing": self.preprocessing,
            "targets": self.targets,
            **({"map_stage": self.map_stage, "map_shape": list(self.map_shape)}
               if self.map_shape is not None else {}),
        }


def _pooled_map(map_fn: Callable) -> Callable:
    """``embed_fn`` of a spatial-map encoder: the global average pool of its map."""
    def embed(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return map_fn(module, x).float().mean(dim=(2, 3))

    return embed


def _seeded(seed: int, build: Callable[[], nn.Module]) -> nn.Module:
    """Build a module under a local RNG seed without touching the global generator."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _preprocessing(input_size: int, extra: str | None = None) -> dict:
    steps = {
        "input": "cxr/images uint8 [y, x], centre-cropped square film as stored",
        "scaling": XRV_SCALING,
        "channels": 1,
        "resize": (f"bilinear, antialias=True to {input_size}x{input_size} when the stored "
                   "image_size differs (as xrv.utils.fix_resolution)"),
    }
    if extra:
        steps["network_input"] = extra
    return steps


def _named_file(weights: str, weights_dir) -> tuple[object, str, dict]:
    path = resolve_weights_file(weights, weights_dir)
    source = weights_source(weights)
    return path, file_sha256(path), load_state_dict(path, source.file_format)


# ---------------------------------------------------------------------------------------- DenseNet

def _densenet_features(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    # == DenseNet.features2 without its resize/normalisation print-checks (done in preprocess)
    out = F.relu(module.features(x))
    return F.adaptive_avg_pool2d(out, (1, 1)).flatten(1)


#: Index in ``DenseNet.features`` of the first live layer after the stored ``block3`` map.
DENSENET_BLOCK3_END = 10


def _densenet_block3(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    # conv0 .. denseblock3, transition3: [B, 512, S/32, S/32]
    return module.features[:DENSENET_BLOCK3_END](x)


def build_densenet(variant: str, weights: str | None = None, *, weights_dir=None,
                   input_size: int | None = None, seed: int = 0,
                   map_stage: str | None = None) -> CxrEncoder:
    """torchxrayvision DenseNet-121 encoder (1024-d, ``features2``), or its ``block3`` map.

    Parameters
    ----------
    variant : str
        One of :data:`DENSENET_WEIGHTS` (the weights the registry entry stands for).
    weights : str, optional
        ``None`` or the full name ``"densenet121-res224-<variant>"`` for those weights;
        ``"random"`` for a seeded random initialisation.
    weights_dir : path-like, optional
        Directory searched first for the weights file (see :mod:`encoders.weights`).
    input_size : int, optional
        Override the 224 px input resolution (tests only).
    seed : int
        Seed of a random initialisation.
    map_stage : {None, "block3"}
        ``"block3"``: the spatial-map encoder ``densenet121-res224-<variant>-block3`` (512-d
        pooled values, map after ``transition3``).

    Returns
    -------
    CxrEncoder
    """
    import torchxrayvision as xrv

    if map_stage not in (None, "block3"):
        raise WeightsError(f"DenseNet spatial maps are stored after 'block3', not {map_stage!r}")
    full = f"densenet121-res224-{variant}"
    weights = full if weights is None else weights
    native = int(xrv.models.model_urls[full]["input_resolution"])
    size = int(input_size or native)
    module = _seeded(seed, lambda: xrv.models.DenseNet(weights=None))
    if weights == RANDOM:
        sha, used_seed, targets = None, seed, []
    elif weights == full:
        path, sha, state = _named_file(weights, weights_dir)
        load_into(module, state, path)
        used_seed, targets = None, list(xrv.models.model_urls[full]["labels"])
    else:
        raise WeightsError(f"encoder densenet121-res224-{variant} takes weights {full!r} or "
                           f"{RANDOM!r}, not {weights!r}")
    if map_stage is None:
        return CxrEncoder(full, module, _densenet_features, 1024, size, native, weights, sha,
                          used_seed, _preprocessing(size), targets)
    return CxrEncoder(f"{full}-{map_stage}", module, None, 512, size, native, weights, sha,
                      used_seed, _preprocessing(size, "map = features[:10] (through transition3)"),
                      targets, map_fn=_densenet_block3, map_stage=map_stage)


# ---------------------------------------------------------------------------------- ResNet AE

def _ae_features(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return module.encode(x, check_resolution=False).flatten(1)


def build_resnet_ae(weights: str | None = None, *, weights_dir=None, input_size: int | None = None,
                    seed: int = 0) -> CxrEncoder:
    """torchxrayvision ResNet-101 autoencoder encoder (flattened ``[512, 3, 3]`` latent, 4608-d).

    Parameters are those of :func:`build_densenet`; weights ``"101-elastic"`` or ``"random"``.
    The latent is 3x3 only at 224 px; another ``input_size`` gives another spatial size, so the
    dimension is checked against 4608 at build time.
    """
    import torchxrayvision as xrv

    name = "101-elastic"
    weights = name if weights is None else weights
    native = int(xrv.autoencoders.model_urls[name]["resolution"])
    size = int(input_size or native)
    module = _seeded(seed, xrv.autoencoders.ResNetAE101)
    if weights == RANDOM:
        sha, used_seed = None, seed
    elif weights == name:
        path, sha, state = _named_file(weights, weights_dir)
        load_into(module, state, path)
        used_seed = None
    else:
        raise WeightsError(f"encoder resnet-ae-101-elastic takes weights {name!r} or {RANDOM!r}, "
                           f"not {weights!r}")
    with torch.inference_mode():
        dim = int(_ae_features(module.eval(), torch.zeros(1, 1, size, size)).shape[1])
    return CxrEncoder("resnet-ae-101-elastic", module, _ae_features, dim, size, native, weights, sha,
                      used_seed, _preprocessing(size, "latent [512, h, w] flattened channel-major"))


# ------------------------------------------------------------------------------ ResNet-50 ImageNet

class ImagenetGrayResNet(nn.Module):
    """torchvision ResNet-50 trunk for 1-channel xrv-range input (see the module docstring)."""

    def __init__(self, resnet: nn.Module):
        super().__init__()
        self.resnet = resnet

    def layer3(self, x: torch.Tensor) -> torch.Tensor:
        """Output of ``layer3`` ``[B, 1024, S/16, S/16]`` for xrv-range images."""
        r = self.resnet
        x = ((x + 1024.0) / 2048.0 - IMAGENET_GRAY_MEAN) / IMAGENET_GRAY_STD
        x = r.maxpool(r.relu(r.bn1(r.conv1(x))))
        return r.layer3(r.layer2(r.layer1(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.resnet
        return torch.flatten(r.avgpool(r.layer4(self.layer3(x))), 1)


def gray_conv1(state: dict) -> dict:
    """Sum the RGB filters of ``conv1.weight`` into one input channel (``[64,3,7,7] -> [64,1,7,7]``)."""
    state = dict(state)
    weight = state["conv1.weight"]
    if weight.shape[1] == 3:
        state["conv1.weight"] = weight.sum(dim=1, keepdim=True)
    return state


def build_resnet50_imagenet(weights: str | None = None, *, weights_dir=None,
                            input_size: int | None = None, seed: int = 0,
                            map_stage: str | None = None) -> CxrEncoder:
    """torchvision ResNet-50 (ImageNet) adapted to one channel (2048-d), or its ``layer3`` map.

    Parameters are those of :func:`build_densenet`; weights ``"IMAGENET1K_V1"`` (default),
    ``"IMAGENET1K_V2"`` or ``"random"``; ``map_stage="layer3"`` gives the spatial-map encoder
    ``resnet50-imagenet-layer3`` (1024-d pooled values).
    """
    if map_stage not in (None, "layer3"):
        raise WeightsError(f"ResNet-50 spatial maps are stored after 'layer3', not {map_stage!r}")
    import torchvision

    weights = "IMAGENET1K_V1" if weights is None else weights
    native = 224

    def make() -> nn.Module:
        net = torchvision.models.resnet50(weights=None)
        net.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
        net.fc = nn.Identity()
        return net

    net = _seeded(seed, make)
    if weights == RANDOM:
        sha, used_seed = None, seed
    elif weights in torchvision.models.ResNet50_Weights.__members__:
        path = resolve_weights_file(weights, weights_dir)
        sha = file_sha256(path)
        state = gray_conv1(load_state_dict(path, FORMAT_STATE_DICT))
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        load_into(net, state, path)
        used_seed = None
    else:
        raise WeightsError(f"encoder resnet50-imagenet takes weights 'IMAGENET1K_V1', "
                           f"'IMAGENET1K_V2' or {RANDOM!r}, not {weights!r}")
    size = int(input_size or native)
    extra = (f"x01 = (x + 1024) / 2048; z = (x01 - {IMAGENET_GRAY_MEAN:.4f}) / {IMAGENET_GRAY_STD:.4f}; "
             "conv1 = sum of the ImageNet RGB filters")
    if map_stage is None:
        return CxrEncoder("resnet50-imagenet", ImagenetGrayResNet(net), lambda m, x: m(x), 2048,
                          size, native, weights, sha, used_seed, _preprocessing(size, extra))
    return CxrEncoder(f"resnet50-imagenet-{map_stage}", ImagenetGrayResNet(net), None, 1024, size,
                      native, weights, sha, used_seed,
                      _preprocessing(size, extra + "; map = output of layer3"),
                      map_fn=lambda m, x: m.layer3(x), map_stage=map_stage)


def map_tail(encoder, stage: str) -> nn.Module:
    """The stages of a built spatial-map encoder that follow its stored map, as a trainable copy.

    Parameters
    ----------
    encoder
        An encoder built by the registry entry that made the map (its ``module`` holds the network).
    stage : str
        The stored map's stage: ``layer3`` (ResNet-50) or ``block3`` (DenseNet-121).

    Returns
    -------
    torch.nn.Module
        Trainable module mapping the map ``[B, C, h, w]`` to ``[B, C', h', w']`` (ResNet-50:
        ``layer4``, 2048 channels; DenseNet: ``denseblock4`` + ``norm5`` + ReLU, 1024 channels),
        with attribute ``out_channels``.
    """
    import copy

    module = encoder.module
    if stage == "layer3":
        tail = copy.deepcopy(module.resnet.layer4)
        tail.out_channels = 2048
    else:
        tail = nn.Sequential(copy.deepcopy(module.features[DENSENET_BLOCK3_END:]), nn.ReLU())
        tail.out_channels = 1024
    for parameter in tail.parameters():
        parameter.requires_grad_(True)
    return tail.train()
