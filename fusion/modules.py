"""Shared torch building blocks: encoders, image backbones, embedding inputs, heads, missing X-rays.

Method files compose these and keep only their own mechanism.

**Encoders** map a batch (a dict of tensors, see :mod:`cbstore.inputs.dataset`) to an
:class:`EncoderOutput`: ``pooled`` ``[B, H]`` always, and for the EHR encoders also ``sequence``
``[B, T, H]`` (one vector per hour, for methods that fuse tokens) and ``valid`` ``[B, T]``:

* :class:`EHRLSTMEncoder` and :class:`EHRTransformerEncoder` read ``batch["ehr"]`` and
  ``batch["ehr_mask"]`` (``[B, T, F]``; the mask is appended to the values as extra channels);
* :class:`CXREncoder` reads ``batch["cxr"]`` (``[B, 1, H, W]`` in ``[-1024, 1024]``);
* :class:`EmbeddingEncoder` reads a cached embedding (``batch["ehr_emb"]`` / ``batch["cxr_emb"]``)
  through :class:`EmbeddingInput`, which standardises it with training statistics kept as
  buffers (saved with the weights) and zeroes the rows whose modality is absent, followed by
  ``Linear -> ReLU -> Dropout`` to ``hidden``.

Every encoder ends in a ``hidden``-d feature (``out_dim``), so heads are linear by default.

**Image backbones** (:class:`ResNet50Backbone`, :class:`SmallCNN`) expose their stages so that a
fusion module can sit between them::

    h = backbone.stem(backbone.prepare(images))
    for stage in backbone.stages:
        h = stage(h)            # e.g. exchange information with the EHR branch here
    pooled = backbone.pool(h)   # [B, out_dim]

``backbone.forward_stages(images)`` returns the map after every stage; ``backbone(images)`` the
pooled vector. ``prepare`` maps the xrv range ``[-1024, 1024]`` to what the weights expect.

**ImageNet weights** (``cxr_weights = "imagenet"``, the raw-mode default of methods with a
ResNet-50, as in the reference): torchvision's ``IMAGENET1K_V1`` file ``resnet50-0676ba61.pth``,
found offline exactly as ``cbstore encode --encoder resnet50-imagenet`` finds it
(:mod:`encoders.weights`: a ``weights_dir``, then ``$CBSTORE_WEIGHTS_DIR``, then torch's hub
cache). The RGB filters of ``conv1`` are summed into one channel and images are scaled to the
ImageNet grey-level mean and std. ``cxr_weights = "random"`` starts from a seeded random
initialisation instead.

**Augmentation** of raw images (:class:`RandomAffine`, hyperparameters
:data:`AUGMENT_HYPERPARAMETERS`, on by default): a random affine transform per image in training,
drawn from a generator seeded from the fit's seed.

**Missing X-rays**: :func:`run_on_present` runs an X-ray branch only on the stays that have one
and scatters the result back (a zero or learned vector for the others); :class:`PresentOnly`
wraps a branch module with that rule.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from fusion.registry import HyperparameterError
from fusion.tasks import logit_of_mean_probability

__all__ = ["AUGMENT_HYPERPARAMETERS", "CACHED_TAILS", "DenseTail", "MapInput", "RandomAffine",
           "RawImageInput", "channels_last", "image_stream", "map_tail", "present_rows",
           "seed_augmentations", "CXREncoder", "EHRLSTMEncoder", "EHRTransformerEncoder", "EmbeddingEncoder",
           "EmbeddingInput", "EncoderOutput", "IMAGENET_WEIGHTS", "MLPHead", "PresentOnly",
           "ResNet50Backbone", "SmallCNN", "build_backbone", "build_encoder", "check_backbone",
           "load_imagenet_resnet50", "logit_of_mean_probability", "resnet50_1ch", "run_on_present"]

#: Scale of the torchxrayvision input range; images are divided by it for randomly initialised CNNs.
XRV_SCALE = 1024.0
#: torchvision weights used for ``cxr_weights = "imagenet"`` (the ``cbstore encode`` default too).
IMAGENET_WEIGHTS = "IMAGENET1K_V1"
#: Values of the ``cxr_weights`` hyperparameter.
CXR_WEIGHTS = ("imagenet", "random")


@dataclasses.dataclass
class EncoderOutput:
    """What an encoder returns.

    Attributes
    ----------
    pooled : Tensor
        ``[B, H]`` one vector per stay.
    sequence : Tensor or None
        ``[B, T, H]`` one vector per hour (EHR encoders), else None.
    valid : Tensor or None
        bool ``[B, T]``: hours that are part of the stay (all True unless ``batch["ehr_valid"]``
        says otherwise), with ``sequence``.
    """

    pooled: torch.Tensor
    sequence: torch.Tensor | None = None
    valid: torch.Tensor | None = None


def _ehr_input(batch: dict) -> torch.Tensor:
    return torch.cat([batch["ehr"], batch["ehr_mask"]], dim=-1)


def _valid_steps(batch: dict, x: torch.Tensor) -> torch.Tensor:
    valid = batch.get("ehr_valid")
    if valid is None:
        valid = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    return valid


class EHRLSTMEncoder(nn.Module):
    """Linear input projection -> (bi)LSTM -> final hidden states -> Linear to ``hidden``.

    ``pooled`` is the projection of the final hidden states (both directions); ``sequence`` the
    same projection (without dropout) of the LSTM output at every hour.

    Parameters
    ----------
    n_features : int
        EHR variables F (the mask doubles the input channels).
    hidden : int
        LSTM hidden size and output size.
    num_layers : int
    bidirectional : bool
    dropout : float
        Dropout on the pooled feature (and between LSTM layers when ``num_layers > 1``).
    """

    def __init__(self, n_features: int, hidden: int = 256, num_layers: int = 1,
                 bidirectional: bool = True, dropout: float = 0.2):
        super().__init__()
        self.proj = nn.Linear(2 * n_features, hidden)
        self.lstm = nn.LSTM(hidden, hidden, num_layers=num_layers, batch_first=True,
                            bidirectional=bidirectional, dropout=dropout if num_layers > 1 else 0.0)
        directions = 2 if bidirectional else 1
        self.out = nn.Sequential(nn.Dropout(dropout), nn.Linear(directions * hidden, hidden),
                                 nn.ReLU())
        self.out_dim = hidden

    def forward(self, batch: dict) -> EncoderOutput:
        x = _ehr_input(batch)
        steps, (h, _) = self.lstm(self.proj(x))
        directions = 2 if self.lstm.bidirectional else 1
        last = h[-directions:]                      # final layer, each direction: [dirs, B, H]
        pooled = self.out(last.transpose(0, 1).reshape(x.shape[0], -1))
        sequence = self.out[2](self.out[1](steps))  # [B, T, dirs * H] -> [B, T, H]
        return EncoderOutput(pooled, sequence, _valid_steps(batch, x))


class EHRTransformerEncoder(nn.Module):
    """Linear projection + learned positions -> Transformer encoder -> mask-aware mean pooling.

    Time steps flagged invalid in ``batch["ehr_valid"]`` (bool ``[B, T]``, optional; default all
    valid) are excluded from attention (boolean key padding mask) and from the mean. ``sequence``
    is the encoder output at every hour.

    Parameters
    ----------
    n_features : int
    d_model : int
    n_heads : int
    n_layers : int
    dropout : float
    max_len : int
        Longest supported sequence.
    """

    def __init__(self, n_features: int, d_model: int = 256, n_heads: int = 4, n_layers: int = 1,
                 dropout: float = 0.2, max_len: int = 512):
        super().__init__()
        self.proj = nn.Linear(2 * n_features, d_model)
        self.position = nn.Parameter(torch.empty(1, max_len, d_model).uniform_(-0.1, 0.1))
        layer = nn.TransformerEncoderLayer(d_model, n_heads, dim_feedforward=4 * d_model,
                                           dropout=dropout, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.dropout = nn.Dropout(dropout)
        self.out_dim = d_model

    def forward(self, batch: dict) -> EncoderOutput:
        x = _ehr_input(batch)
        steps = x.shape[1]
        if steps > self.position.shape[1]:
            raise HyperparameterError(f"sequence of {steps} steps is longer than the transformer's "
                                      f"max_len {self.position.shape[1]}")
        valid = _valid_steps(batch, x)
        h = self.encoder(self.proj(x) + self.position[:, :steps], src_key_padding_mask=~valid)
        weight = valid.unsqueeze(-1).to(h.dtype)
        pooled = (h * weight).sum(dim=1) / weight.sum(dim=1).clamp_min(1.0)
        return EncoderOutput(self.dropout(pooled), h, valid)


class _StagedBackbone:
    """``prepare -> stem -> stages -> pool`` for an image backbone (mixed into an ``nn.Module``)."""

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Scale xrv-range images ``[-1024, 1024]`` to about ``[-1, 1]`` (random weights)."""
        return x / XRV_SCALE

    def forward_stages(self, x: torch.Tensor) -> list:
        """Feature maps ``[B, C_k, H_k, W_k]`` after each stage, for xrv-range images."""
        h = self.stem(self.prepare(x))
        maps = []
        for stage in self.stages:
            h = stage(h)
            maps.append(h)
        return maps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled feature ``[B, out_dim]`` of xrv-range images."""
        return self.pool(self.forward_stages(x)[-1])


class SmallCNN(_StagedBackbone, nn.Module):
    """Three conv-BN-ReLU stages with stride 2 and global average pooling (tests, tiny images).

    ``stem`` is the identity; ``stages`` are the three blocks.
    """

    def __init__(self, width: int = 16):
        super().__init__()
        layers, channels = [], 1
        for out in (width, 2 * width, 4 * width):
            layers += [nn.Conv2d(channels, out, 3, stride=2, padding=1, bias=False),
                       nn.BatchNorm2d(out), nn.ReLU()]
            channels = out
        # One Sequential keeps the parameter names of saved models; stages are views of it.
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.stem = nn.Identity()
        self.stage_channels = (width, 2 * width, 4 * width)
        self.out_dim = channels

    @property
    def stages(self) -> tuple:
        """The three conv-BN-ReLU blocks (views sharing the parameters of ``body``)."""
        return tuple(self.body[i:i + 3] for i in (0, 3, 6))

    def pool(self, h: torch.Tensor) -> torch.Tensor:
        """Global average pooling to ``[B, out_dim]``."""
        return self.body[10](self.body[9](h))


class ResNet50Backbone(_StagedBackbone, nn.Module):
    """torchvision ResNet-50 with a one-channel ``conv1`` and no classifier (2048-d).

    ``stem`` is conv1-bn-relu-maxpool, ``stages`` are ``layer1`` .. ``layer4`` (256, 512, 1024 and
    2048 channels), ``pool`` global average pooling. The layers are torchvision's, under their
    torchvision names (so state dicts match torchvision's and earlier cbstore models); torchvision
    is imported when a backbone is built.

    Parameters
    ----------
    imagenet_input : bool
        Scale inputs as the ImageNet weights expect (grey-level mean and std of ImageNet) instead
        of dividing by 1024; set by :func:`load_imagenet_resnet50`.
    """

    stage_channels = (256, 512, 1024, 2048)

    def __init__(self, imagenet_input: bool = False):
        super().__init__()
        from torchvision.models import resnet50

        net = resnet50(weights=None)
        net.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
        net.fc = nn.Identity()
        for name, child in net.named_children():
            setattr(self, name, child)
        self.out_dim = 2048
        self.imagenet_input = imagenet_input

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """xrv range -> ``[-1, 1]`` (random weights) or ImageNet-normalised grey levels."""
        if not self.imagenet_input:
            return x / XRV_SCALE
        from encoders.cxr import IMAGENET_GRAY_MEAN, IMAGENET_GRAY_STD

        return ((x + XRV_SCALE) / (2 * XRV_SCALE) - IMAGENET_GRAY_MEAN) / IMAGENET_GRAY_STD

    @property
    def stem(self) -> nn.Sequential:
        """conv1 -> bn1 -> relu -> maxpool (a view sharing the parameters)."""
        return nn.Sequential(self.conv1, self.bn1, self.relu, self.maxpool)

    @property
    def stages(self) -> tuple:
        """``layer1`` .. ``layer4``."""
        return (self.layer1, self.layer2, self.layer3, self.layer4)

    def pool(self, h: torch.Tensor) -> torch.Tensor:
        """Global average pooling to ``[B, 2048]``."""
        return torch.flatten(self.avgpool(h), 1)


def resnet50_1ch() -> ResNet50Backbone:
    """A randomly initialised :class:`ResNet50Backbone` (1-channel ``conv1``, no classifier, 2048-d)."""
    return ResNet50Backbone()


def load_imagenet_resnet50(backbone: ResNet50Backbone, weights_dir=None) -> str:
    """Load torchvision's ImageNet ResNet-50 weights into ``backbone``, offline.

    The file is looked up like ``cbstore encode --encoder resnet50-imagenet`` looks it up
    (:func:`encoders.weights.resolve_weights_file`); ``conv1``'s RGB filters are summed into one
    channel and the classifier is dropped. The backbone then scales its inputs as ImageNet
    weights expect.

    Parameters
    ----------
    backbone : ResNet50Backbone
    weights_dir : path-like, optional
        Directory searched first (then ``$CBSTORE_WEIGHTS_DIR``, then torch's hub cache).

    Returns
    -------
    str
        SHA-256 of the weights file.

    Raises
    ------
    encoders.errors.WeightsNotFoundError
        The file is in none of the searched directories; the message names the file, the
        directories, where to download it and the setting that chooses random weights.
    """
    from encoders.cxr import gray_conv1
    from encoders.errors import WeightsNotFoundError
    from encoders.weights import (
        FORMAT_STATE_DICT, file_sha256, load_into, load_state_dict, resolve_weights_file,
    )

    try:
        path = resolve_weights_file(IMAGENET_WEIGHTS, weights_dir)
    except WeightsNotFoundError as exc:
        raise WeightsNotFoundError(
            f"{exc}\nThe ResNet-50 X-ray branch starts from these ImageNet weights "
            "(cxr_weights=imagenet, the default with --features raw). To train it from random "
            "weights instead, pass --set cxr_weights=random.") from None
    state = gray_conv1(load_state_dict(path, FORMAT_STATE_DICT))
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    load_into(backbone, state, path)
    backbone.imagenet_input = True
    return file_sha256(path)


def check_backbone(name: str, weights: str) -> None:
    """Refuse an unknown backbone or weights, and ImageNet weights for the small CNN.

    Raises
    ------
    HyperparameterError
        Naming the value and the valid ones.
    """
    if name not in ("resnet50", "small"):
        raise HyperparameterError(f"unknown CXR backbone {name!r}; valid: resnet50, small")
    if weights not in CXR_WEIGHTS:
        raise HyperparameterError(f"cxr_weights={weights!r} is not one of {', '.join(CXR_WEIGHTS)}")
    if name == "small" and weights == "imagenet":
        raise HyperparameterError("backbone=small has no ImageNet weights; set cxr_weights=random "
                                  "(--set cxr_weights=random) or use backbone=resnet50")


def build_backbone(name: str, *, weights: str = "random", weights_dir=None) -> nn.Module:
    """An image backbone: ``resnet50`` (:class:`ResNet50Backbone`) or ``small`` (:class:`SmallCNN`).

    Parameters
    ----------
    name : str
    weights : str
        ``imagenet`` (ResNet-50 only; :func:`load_imagenet_resnet50`) or ``random``.
    weights_dir : path-like, optional
        Directory searched first for the ImageNet file.

    Raises
    ------
    HyperparameterError
        See :func:`check_backbone`.
    """
    check_backbone(name, weights)
    if name == "small":
        return SmallCNN()
    backbone = ResNet50Backbone()
    if weights == "imagenet":
        load_imagenet_resnet50(backbone, weights_dir)
    return backbone


class CXREncoder(nn.Module):
    """[augmentation ->] image backbone on ``batch["cxr"]`` -> Linear to ``hidden`` -> ReLU -> Dropout.

    Parameters
    ----------
    backbone : str or nn.Module
        ``resnet50`` or ``small`` (random weights, see :func:`build_backbone`), or a backbone.
    hidden : int
    dropout : float
    augment : RandomAffine, optional
        Applied to the images in training mode (:class:`RandomAffine`).
    """

    def __init__(self, backbone="resnet50", hidden: int = 256, dropout: float = 0.2,
                 augment: nn.Module | None = None):
        super().__init__()
        self.backbone = build_backbone(backbone) if isinstance(backbone, str) else backbone
        self.proj = nn.Sequential(nn.Linear(self.backbone.out_dim, hidden), nn.ReLU(),
                                  nn.Dropout(dropout))
        self.augment = augment
        self.out_dim = hidden

    def forward(self, batch: dict) -> EncoderOutput:
        images = batch["cxr"] if self.augment is None else self.augment(batch["cxr"])
        return EncoderOutput(self.proj(self.backbone(images)))


class EmbeddingInput(nn.Module):
    """A cached embedding, standardised with training mean/std, zero where the modality is absent.

    Parameters
    ----------
    key : str
        ``ehr_emb`` or ``cxr_emb``.
    dim : int
        Embedding size.
    mean, std : array-like, optional
        Training statistics (``[dim]``); set at fit time, restored from the state dict on load.
    """

    def __init__(self, key: str, dim: int, mean=None, std=None):
        super().__init__()
        self.key = key
        self.register_buffer("mean", torch.zeros(dim) if mean is None else
                             torch.as_tensor(np.asarray(mean, dtype=np.float32)))
        self.register_buffer("std", torch.ones(dim) if std is None else
                             torch.as_tensor(np.asarray(std, dtype=np.float32)))
        self.out_dim = dim

    @staticmethod
    def statistics(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per-dimension mean and std over the non-NaN training values (std 0 or none -> 1)."""
        values = np.asarray(values, dtype=np.float64)
        observed = ~np.isnan(values)
        count = observed.sum(axis=0)
        filled = np.where(observed, values, 0.0)
        mean = np.divide(filled.sum(axis=0), count, out=np.zeros(values.shape[1]), where=count > 0)
        sq = np.where(observed, (values - mean) ** 2, 0.0).sum(axis=0)
        std = np.sqrt(np.divide(sq, count, out=np.zeros(values.shape[1]), where=count > 0))
        std[~(std > 0)] = 1.0
        return mean.astype(np.float32), std.astype(np.float32)

    def forward(self, batch: dict) -> torch.Tensor:
        # NaN (absent modality, or a dimension an encoder could not compute) -> 0 = the training mean
        x = torch.nan_to_num((batch[self.key] - self.mean) / self.std, nan=0.0)
        if self.key == "cxr_emb":
            x = x * batch["cxr_present"].unsqueeze(1).to(x.dtype)
        return x


class MLPHead(nn.Module):
    """``Linear -> ReLU -> Dropout`` x ``layers``, then ``Linear`` to the outputs.

    ``layers = 0`` gives a linear head.
    """

    def __init__(self, in_dim: int, n_outputs: int, hidden: int = 256, layers: int = 1,
                 dropout: float = 0.2):
        super().__init__()
        blocks, width = [], in_dim
        for _ in range(layers):
            blocks += [nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(dropout)]
            width = hidden
        blocks.append(nn.Linear(width, n_outputs))
        self.net = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class EmbeddingEncoder(nn.Sequential):
    """:class:`EmbeddingInput` -> ``Linear -> ReLU -> Dropout`` to ``hidden``, as an encoder.

    A ``Sequential`` so that saved weights keep their names (``0.mean``, ``1.weight`` ...).
    """

    def __init__(self, key: str, dim: int, hidden: int, dropout: float):
        super().__init__(EmbeddingInput(key, dim), nn.Linear(dim, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.out_dim = hidden

    def forward(self, batch: dict) -> EncoderOutput:
        return EncoderOutput(super().forward(batch))


def build_encoder(modality: str, kind: str, spec: dict, params: dict, *,
                  pretrained: bool = True, weights_dir=None) -> nn.Module:
    """Encoder of ``modality`` (``ehr``/``cxr``) for input ``kind`` from shapes and hyperparameters.

    Parameters
    ----------
    modality : str
    kind : str
        ``ehr_ts``, ``cxr_img``, ``ehr_emb`` or ``cxr_emb``.
    spec : dict
        Shapes: ``n_features`` (raw EHR), ``ehr_dim``/``cxr_dim`` (embeddings).
    params : dict
        Hyperparameters: ``ehr_model`` (``lstm``/``transformer``), ``hidden``, ``num_layers``,
        ``n_heads``, ``dropout``, ``backbone``, ``cxr_weights`` (``imagenet``/``random``; missing
        keys take the defaults of the classes, and random weights), and the augmentation of raw
        images (:data:`AUGMENT_HYPERPARAMETERS`; on unless ``augment`` is false).
    pretrained : bool
        Load pretrained weights where ``cxr_weights`` asks for them. False builds the same
        architecture without reading the weights file (to restore a saved model).
    weights_dir : path-like, optional
        Directory searched first for a weights file.

    Returns
    -------
    nn.Module
        Maps a batch to an :class:`EncoderOutput`; ``out_dim`` is the size of ``pooled``.
    """
    hidden = params.get("hidden", 256)
    dropout = params.get("dropout", 0.2)
    if kind == "ehr_ts":
        if params.get("ehr_model", "lstm") == "transformer":
            return EHRTransformerEncoder(spec["n_features"], d_model=hidden,
                                         n_heads=params.get("n_heads", 4),
                                         n_layers=params.get("num_layers", 1), dropout=dropout,
                                         max_len=max(512, spec.get("window_hours", 0)))
        return EHRLSTMEncoder(spec["n_features"], hidden=hidden,
                              num_layers=params.get("num_layers", 1),
                              bidirectional=params.get("bidirectional", True), dropout=dropout)
    if kind == "cxr_img":
        backbone = image_backbone(params, pretrained=pretrained, weights_dir=weights_dir)
        return CXREncoder(backbone, hidden=hidden, dropout=dropout,
                          augment=RandomAffine.from_params(params))
    if kind in ("ehr_emb", "cxr_emb"):
        return EmbeddingEncoder(kind, spec[f"{modality}_dim"], hidden, dropout)
    raise HyperparameterError(f"unknown input kind {kind!r} for modality {modality!r}")


def run_on_present(branch: Callable[[dict], torch.Tensor], batch: dict, present: torch.Tensor,
                   out_dim: int, *, fill: torch.Tensor | None = None, min_rows: int = 1,
                   keys: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run an X-ray branch only on the stays that have an X-ray; scatter the result back.

    Absent (or masked) X-rays are never encoded: a zero image is not evidence. The rows of
    ``batch`` where ``present`` is True go through ``branch`` as one smaller batch, in their
    order; every other row gets ``fill``.

    Parameters
    ----------
    branch : callable
        ``branch(sub_batch) -> Tensor [k, out_dim]`` (e.g. encoder then head).
    batch : dict
        The batch; its tensors have a leading batch dimension B.
    present : Tensor
        bool ``[B]``, usually ``batch["cxr_present"]``.
    out_dim : int
        D, the size of the branch's output.
    fill : Tensor, optional
        ``[D]`` vector for the rows without an X-ray (e.g. a learned parameter); default zeros.
    min_rows : int
        Fewest present rows worth a branch call. With fewer, no row uses the branch (every row
        gets ``fill``). Pass 2 while training a branch with batch norm, which cannot normalise a
        single sample.
    keys : tuple of str, optional
        Batch keys handed to the branch (default: those starting with ``cxr``).

    Returns
    -------
    out : Tensor
        ``[B, D]``.
    used : Tensor
        bool ``[B]``: rows whose value came from the branch.
    """
    rows = torch.nonzero(present, as_tuple=False).squeeze(1)
    n = present.shape[0]
    if fill is None:
        out = torch.zeros((n, out_dim), device=present.device)
    else:
        out = fill.unsqueeze(0).expand(n, out_dim)
    if rows.numel() < max(1, min_rows):
        return out, torch.zeros(n, dtype=torch.bool, device=present.device)
    names = keys if keys is not None else tuple(k for k in batch if k.startswith("cxr"))
    values = branch({k: batch[k][rows] for k in names})
    used = torch.zeros(n, dtype=torch.bool, device=present.device).index_fill(0, rows, True)
    return out.to(values.dtype).index_copy(0, rows, values), used


class PresentOnly(nn.Module):
    """A branch module run only on the stays with an X-ray (:func:`run_on_present`).

    Parameters
    ----------
    branch : nn.Module
        Maps a batch to ``[k, out_dim]`` (a tensor, or an :class:`EncoderOutput` whose ``pooled``
        is used).
    out_dim : int
    absent : str
        ``zero``: stays without an X-ray get a zero vector; ``learned``: a learned vector
        (a parameter initialised to zeros and trained with the rest).
    """

    def __init__(self, branch: nn.Module, out_dim: int, absent: str = "zero"):
        super().__init__()
        if absent not in ("zero", "learned"):
            raise HyperparameterError(f"absent={absent!r} is not one of zero, learned")
        self.branch, self.out_dim = branch, out_dim
        self.absent_vector = nn.Parameter(torch.zeros(out_dim)) if absent == "learned" else None

    def _run(self, sub: dict) -> torch.Tensor:
        out = self.branch(sub)
        return out.pooled if isinstance(out, EncoderOutput) else out

    def forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """``(features [B, out_dim], used [B])``; in training, fewer than 2 X-rays use none."""
        return run_on_present(self._run, batch, batch["cxr_present"], self.out_dim,
                              fill=self.absent_vector, min_rows=2 if self.training else 1)


# --------------------------------------------------------------------------- raw-image augmentation

#: Hyperparameters of the random affine augmentation of raw X-ray branches (as the reference trains
#: images: rotation up to 45 degrees, scale 0.85-1.15, translation up to 15 % of the side). A method
#: with a raw image branch merges these into its ``hyperparameters`` so that they are recorded in
#: the run's configuration and can be switched off (``--set augment=false``).
AUGMENT_HYPERPARAMETERS = {"augment": True, "augment_degrees": 45.0, "augment_scale": 0.15,
                           "augment_translate": 0.15}
#: Stream of the augmentation generator, mixed with the fit's seed (apart from the batch order).
AUGMENT_STREAM = 0xA0F1


class RandomAffine(nn.Module):
    """Random affine transform of xrv-range images ``[B, 1, H, W]`` in training mode only.

    Per image: a rotation uniform in ``[-degrees, degrees]``, a scale uniform in
    ``[1 - scale, 1 + scale]`` and a translation uniform in ``[-translate, translate]`` times the
    side, each axis, about the image centre (bilinear; the area moved in from outside is black,
    -1024). The parameters are drawn from the module's own ``torch.Generator``, seeded by
    :meth:`reseed` from the fit's seed (:meth:`fusion.methods.base.TorchMethod.fit`), never from
    the global generator; its state is part of the module's state dict (extra state), so a
    resumed fit draws what an uninterrupted one draws. In eval mode images pass unchanged.

    Parameters
    ----------
    degrees, scale, translate : float
    """

    def __init__(self, degrees: float = 45.0, scale: float = 0.15, translate: float = 0.15):
        super().__init__()
        if not (0.0 <= degrees <= 180.0 and 0.0 <= scale < 1.0 and 0.0 <= translate < 1.0):
            raise HyperparameterError(
                f"augmentation needs 0 <= augment_degrees <= 180, 0 <= augment_scale < 1 and "
                f"0 <= augment_translate < 1; got {degrees}, {scale}, {translate}")
        self.degrees, self.scale, self.translate = float(degrees), float(scale), float(translate)
        self.generator = torch.Generator()
        self.generator.manual_seed(0)

    @classmethod
    def from_params(cls, params: dict) -> "RandomAffine | None":
        """The augmentation ``params`` ask for (:data:`AUGMENT_HYPERPARAMETERS` are the defaults),
        or None when ``augment`` is false."""
        p = {**AUGMENT_HYPERPARAMETERS, **{k: v for k, v in params.items() if k in AUGMENT_HYPERPARAMETERS}}
        if not p["augment"]:
            return None
        return cls(p["augment_degrees"], p["augment_scale"], p["augment_translate"])

    def reseed(self, seed: int) -> None:
        """Seed the generator from the fit's ``seed`` (a stream of its own)."""
        state = np.random.SeedSequence([int(seed), AUGMENT_STREAM]).generate_state(1)[0]
        self.generator.manual_seed(int(state))

    def get_extra_state(self):
        return {"generator": self.generator.get_state()}

    def set_extra_state(self, state) -> None:
        self.generator.set_state(state["generator"])

    def theta(self, n: int) -> torch.Tensor:
        """Draw ``n`` transforms: ``[n, 2, 3]`` sampling matrices of ``F.affine_grid``."""
        u = torch.rand(n, 4, generator=self.generator, dtype=torch.float64)
        angle = (2 * u[:, 0] - 1) * self.degrees * np.pi / 180.0
        scale = 1.0 + (2 * u[:, 1] - 1) * self.scale
        shift = (2 * u[:, 2:] - 1) * self.translate * 2.0  # normalised coordinates span 2
        cos, sin = torch.cos(angle), torch.sin(angle)
        # forward map p -> s R p + t; the grid samples the input at R^T (q - t) / s
        inv = torch.stack([torch.stack([cos, sin], 1), torch.stack([-sin, cos], 1)], 1) / scale[:, None, None]
        offset = -(inv @ shift.unsqueeze(-1))
        return torch.cat([inv, offset], dim=2).to(torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or x.shape[0] == 0:
            return x
        theta = self.theta(x.shape[0]).to(x.device)
        grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
        out = torch.nn.functional.grid_sample(x + XRV_SCALE, grid, mode="bilinear",
                                              padding_mode="zeros", align_corners=False)
        return out - XRV_SCALE


def seed_augmentations(module: nn.Module, seed: int) -> None:
    """Seed every :class:`RandomAffine` of ``module`` from the fit's ``seed``."""
    for layer in module.modules():
        if isinstance(layer, RandomAffine):
            layer.reseed(seed)


# ---------------------------------------------------------------------- live stages after a map

#: Values of the ``cached_tail`` hyperparameter of methods on stored spatial maps.
CACHED_TAILS = ("backbone", "conv")


def map_tail(spec: dict, params: dict, *, pretrained: bool = True, weights_dir=None) -> nn.Module:
    """The live stage(s) a method runs on a stored spatial map (input kind ``cxr_map``).

    ``cached_tail = "backbone"`` (default): the backbone's own stages after the stored one, with
    the weights that made the map (:func:`encoders.registry.build_map_tail`: ResNet-50 ``layer4`` after
    ``resnet50-imagenet-layer3``; DenseNet ``denseblock4`` + ``norm5`` + ReLU after
    ``densenet121-res224-<weights>-block3``). ``"conv"``: one conv3x3-BN-ReLU stage to
    ``hidden`` channels (cheap; for tests and quick sweeps).

    Parameters
    ----------
    spec : dict
        ``cxr_map_shape`` ``[C, h, w]`` and ``cxr_map_attrs`` (the map's provenance).
    params : dict
        ``cached_tail`` and ``hidden``.
    pretrained : bool
        Load the weights (False: architecture only, to restore a saved model).
    weights_dir : path-like, optional

    Returns
    -------
    nn.Module
        Maps ``[B, C, h, w]`` to ``[B, out_channels, h', w']``; attribute ``out_channels``.
    """
    kind = params.get("cached_tail", "backbone")
    if kind not in CACHED_TAILS:
        raise HyperparameterError(f"cached_tail={kind!r} is not one of {', '.join(CACHED_TAILS)}")
    channels = int(spec["cxr_map_shape"][0])
    if kind == "conv":
        hidden = int(params.get("hidden", 256))
        tail = nn.Sequential(nn.Conv2d(channels, hidden, 3, padding=1, bias=False),
                             nn.BatchNorm2d(hidden), nn.ReLU())
        tail.out_channels = hidden
        return channels_last(tail)
    attrs = spec.get("cxr_map_attrs") or {}
    if not attrs.get("encoder_name"):
        raise HyperparameterError(
            f"spatial-map embedding {attrs.get('encoder_id')!r} records no backbone to continue "
            "(no encoder_name in its attrs); use --set cached_tail=conv")
    from encoders.registry import build_map_tail

    tail = build_map_tail(attrs, pretrained=pretrained, weights_dir=weights_dir)
    return channels_last(DenseTail(tail) if DenseTail.fits(tail) else tail)


class DenseTail(nn.Sequential):
    """DenseNet's ``denseblock4`` + ``norm5`` + ReLU on a stored ``-block3`` map, in less CPU time.

    The same function, parameters, buffers and state-dict names as the tail it wraps
    (``Sequential(Sequential(denseblock4, norm5), ReLU)``, :func:`encoders.cxr.map_tail`), in
    training and evaluation alike. The map's cells are the rows of a ``[B * h * w, C]`` matrix
    (the memory of a channels-last map as it is), so each dense layer's 1x1 convolution is one
    matmul and each batch norm a batch norm over the rows (statistics over batch and cells, as
    ``BatchNorm2d``'s); on maps of at most 2x2 cells the 3x3 convolution (padding 1) is one
    matmul too, since every output cell then sees every input cell: its weight laid out as a
    ``[cells * C, cells * C']`` matrix. On ``[128, 512, 2, 2]`` a training step's forward and
    backward took about 20 % less CPU time than the channels-last convolutions.
    """

    def __init__(self, tail: nn.Sequential):
        if not self.fits(tail):
            raise HyperparameterError("DenseTail wraps a DenseNet tail Sequential(Sequential("
                                      "denseblock4, norm5), ReLU) of plain dense layers")
        super().__init__(*tail)
        self.out_channels = getattr(tail, "out_channels", tail[0].norm5.num_features)

    @staticmethod
    def fits(tail: nn.Module) -> bool:
        """Whether ``tail`` is a DenseNet tail of plain dense layers (no dropout, 1x1 then 3x3 /
        padding 1 convolutions without bias, batch norms with running statistics)."""
        try:
            block, norm5 = tail[0].denseblock4, tail[0].norm5
            relu_last = isinstance(tail[1], nn.ReLU) and len(tail) == 2 and len(tail[0]) == 2
            layers = list(block.children())
        except (AttributeError, IndexError, TypeError):
            return False
        norms = [norm5] + [n for layer in layers for n in (getattr(layer, "norm1", None),
                                                           getattr(layer, "norm2", None))]
        return (relu_last and bool(layers) and all(_plain_dense_layer(layer) for layer in layers)
                and all(isinstance(n, nn.BatchNorm2d) and n.track_running_stats and n.affine
                        and n.momentum is not None for n in norms))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        features = x.permute(0, 2, 3, 1).reshape(n * h * w, c)
        taps = _cell_taps(h, w, x.device) if h <= 2 and w <= 2 else None
        for layer in self[0].denseblock4.children():
            y = torch.relu_(_row_batch_norm(layer.norm1, features))
            y = nn.functional.linear(y, layer.conv1.weight.flatten(1))
            y = torch.relu_(_row_batch_norm(layer.norm2, y))
            y = _conv3x3_rows(y, layer.conv2.weight, (n, h, w), taps)
            features = torch.cat([features, y], 1)
        out = torch.relu_(_row_batch_norm(self[0].norm5, features))
        return out.view(n, h, w, -1).permute(0, 3, 1, 2)


def _plain_dense_layer(layer: nn.Module) -> bool:
    conv1, conv2 = getattr(layer, "conv1", None), getattr(layer, "conv2", None)
    return (isinstance(conv1, nn.Conv2d) and isinstance(conv2, nn.Conv2d)
            and not getattr(layer, "drop_rate", 0) and conv1.bias is None and conv2.bias is None
            and conv1.kernel_size == (1, 1) and conv1.stride == (1, 1) and conv1.groups == 1
            and conv2.kernel_size == (3, 3) and conv2.stride == (1, 1) and conv2.groups == 1
            and conv2.padding == (1, 1) and conv2.dilation == (1, 1))


def _row_batch_norm(norm: nn.BatchNorm2d, rows: torch.Tensor) -> torch.Tensor:
    """``norm`` (a ``BatchNorm2d`` with running statistics and momentum) applied to the rows of
    ``[cells, C]``: the statistics ``BatchNorm2d`` computes over batch and positions."""
    if norm.training:
        norm.num_batches_tracked.add_(1)
    return nn.functional.batch_norm(rows, norm.running_mean, norm.running_var, norm.weight,
                                    norm.bias, norm.training, norm.momentum, norm.eps)


def _cell_taps(h: int, w: int, device) -> torch.Tensor:
    """``[h w, h w]``: the 3x3 tap (``3 di + dj``) linking input cell to output cell of a map of
    at most 2x2 cells (every pair is linked there)."""
    i = torch.arange(h, device=device).repeat_interleave(w)
    j = torch.arange(w, device=device).repeat(h)
    return (i[:, None] - i[None, :] + 1) * 3 + (j[:, None] - j[None, :] + 1)


def _conv3x3_rows(rows: torch.Tensor, weight: torch.Tensor, shape: tuple,
                  taps: torch.Tensor | None) -> torch.Tensor:
    """3x3 convolution (padding 1, no bias) of the map whose cells are ``rows`` ``[n h w, C]``."""
    n, h, w = shape
    out_c, in_c = weight.shape[:2]
    if taps is None:
        grid = rows.view(n, h, w, in_c).permute(0, 3, 1, 2)
        out = nn.functional.conv2d(grid, weight, padding=1)
        return out.permute(0, 2, 3, 1).reshape(n * h * w, out_c)
    cells = h * w
    per_tap = weight.permute(2, 3, 1, 0).reshape(9, in_c, out_c)
    dense = per_tap[taps].permute(0, 2, 1, 3).reshape(cells * in_c, cells * out_c)
    return (rows.view(n, cells * in_c) @ dense).view(n * cells, out_c)


def _to_channels_last(module: nn.Module, args: tuple) -> tuple:
    return tuple(a.contiguous(memory_format=torch.channels_last)
                 if isinstance(a, torch.Tensor) and a.dim() == 4 else a for a in args)


def channels_last(module: nn.Module) -> nn.Module:
    """``module`` with its weights and its 4-d inputs in the channels-last layout (the same values).

    Stored maps are small (e.g. ``[512, 2, 2]``): in the default layout the CPU kernels of batch
    norm and 1x1 convolutions walk them with a stride per channel, and one training step of
    DenseNet's ``denseblock4`` takes about twice as long. Parameter names are unchanged.
    """
    module.to(memory_format=torch.channels_last)
    module.register_forward_pre_hook(_to_channels_last)
    return module


def present_rows(present: torch.Tensor, training: bool) -> torch.Tensor:
    """Indices of the rows whose X-ray a branch with batch norm may use.

    In training, a single X-ray is left out (batch norm cannot normalise one sample), as in
    :func:`run_on_present`.
    """
    rows = torch.nonzero(present, as_tuple=False).squeeze(1)
    if training and rows.numel() < 2:
        return rows[:0]
    return rows


# ------------------------------------------------------- X-ray stream of stage-wise fusion methods

class RawImageInput(nn.Module):
    """Raw films of the given rows: augmentation (training), the backbone's scaling, its stem."""

    def __init__(self, backbone: nn.Module, augment: nn.Module | None):
        super().__init__()
        self.stem = backbone.stem
        self.augment = augment
        self._prepare = backbone.prepare  # a bound method: reads backbone.imagenet_input

    def forward(self, batch: dict, rows: torch.Tensor) -> torch.Tensor:
        x = batch["cxr"][rows]
        if self.augment is not None:
            x = self.augment(x)
        return self.stem(self._prepare(x))


class MapInput(nn.Module):
    """Stored spatial maps of the given rows (input kind ``cxr_map``)."""

    def forward(self, batch: dict, rows: torch.Tensor) -> torch.Tensor:
        return batch["cxr_map"][rows].contiguous(memory_format=torch.channels_last)


def image_stream(spec: dict, params: dict, *, pretrained: bool, weights_dir) -> tuple:
    """The X-ray stream of a method that fuses between CNN stages, in the run's feature mode.

    Returns
    -------
    image_input : nn.Module
        ``(batch, rows) -> [k, C, h, w]``: raw films through augmentation, scaling and the
        backbone's stem (:class:`RawImageInput`), or the stored maps (:class:`MapInput`).
    stages : list of nn.Module
        Raw: the backbone's stages; cached: the live tail (:func:`map_tail`).
    channels : list of int
        Raw: the channels after each stage; cached: the stored map's, then the tail's.
    cached : bool
    """
    if spec["features"] == "cached":
        tail = map_tail(spec, params, pretrained=pretrained, weights_dir=weights_dir)
        return MapInput(), [tail], [int(spec["cxr_map_shape"][0]), tail.out_channels], True
    check_backbone(params["backbone"], params["cxr_weights"])
    backbone = build_backbone(params["backbone"],
                              weights=params["cxr_weights"] if pretrained else "random",
                              weights_dir=weights_dir)
    if params["cxr_weights"] == "imagenet" and isinstance(backbone, ResNet50Backbone):
        backbone.imagenet_input = True
    augment = RandomAffine.from_params(params)
    return (RawImageInput(backbone, augment), list(backbone.stages), list(backbone.stage_channels),
            False)


# Token builders shared by the token-level fusion methods (ShaSpec, HEALNet, Flex-MoE, UMSE).
__all__ += ["GridTokens", "ImageTokens", "MapTokens", "PatchTokens", "hourly_tokens",
            "hours_since_observed", "image_backbone"]


def hours_since_observed(mask: torch.Tensor) -> torch.Tensor:
    """Hours from each cell back to the last observation of its variable, at or before that hour.

    Parameters
    ----------
    mask : Tensor
        ``[B, T, F]``, 1 where a value was observed in that hour.

    Returns
    -------
    Tensor
        float ``[B, T, F]``: 0 where observed; ``t + 1`` (the hours since the window opened) before
        the variable's first observation.
    """
    steps = torch.arange(mask.shape[1], device=mask.device, dtype=torch.float32).view(1, -1, 1)
    last = torch.where(mask > 0, steps, torch.full_like(steps, -1.0)).cummax(dim=1).values
    return steps - last


def hourly_tokens(batch: dict) -> torch.Tensor:
    """One token per hour: ``[values ; observed mask ; hours since observed / T]`` ``[B, T, 3F]``.

    The values are ``batch["ehr"]`` (imputed and normalised with training statistics) and the mask
    ``batch["ehr_mask"]``; the third block (:func:`hours_since_observed` divided by the window
    length) tells a model how stale each imputed value is.
    """
    mask = batch["ehr_mask"]
    since = hours_since_observed(mask) / mask.shape[1]
    return torch.cat([batch["ehr"], mask, since.to(batch["ehr"].dtype)], dim=-1)


class PatchTokens(nn.Module):
    """A vector cut into ``n_tokens`` equal chunks, each projected to ``dim`` by one shared Linear.

    The vector is zero-padded to ``n_tokens * ceil(in_dim / n_tokens)`` first (Flex-MoE's
    ``PatchEmbeddings``).

    Parameters
    ----------
    in_dim : int
    n_tokens : int
    dim : int
    """

    def __init__(self, in_dim: int, n_tokens: int, dim: int):
        super().__init__()
        if n_tokens < 1 or in_dim < 1:
            raise HyperparameterError(f"PatchTokens needs in_dim >= 1 and n_tokens >= 1, got "
                                      f"{in_dim} and {n_tokens}")
        self.n_tokens = n_tokens
        self.chunk = -(-in_dim // n_tokens)
        self.pad = self.chunk * n_tokens - in_dim
        self.proj = nn.Linear(self.chunk, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, in_dim]`` -> ``[B, n_tokens, dim]``."""
        x = nn.functional.pad(x, (0, self.pad))
        return self.proj(x.view(x.shape[0], self.n_tokens, self.chunk))


def image_backbone(params: dict, *, pretrained: bool = True, weights_dir=None) -> nn.Module:
    """The image backbone that hyperparameters ``backbone`` and ``cxr_weights`` ask for.

    Parameters
    ----------
    params : dict
        ``backbone`` (``resnet50``/``small``, default ``resnet50``) and ``cxr_weights``
        (``imagenet``/``random``, default ``random``).
    pretrained : bool
        Read the pretrained weights file; False builds the same architecture (input scaling
        included) without reading it, to restore a saved model.
    weights_dir : path-like, optional
        Directory searched first for the weights file.

    Raises
    ------
    HyperparameterError
        See :func:`check_backbone`.
    """
    name = params.get("backbone", "resnet50")
    weights = params.get("cxr_weights", "random")
    check_backbone(name, weights)
    backbone = build_backbone(name, weights=weights if pretrained else "random",
                              weights_dir=weights_dir)
    if weights == "imagenet":  # a restored model scales its inputs as it was trained
        backbone.imagenet_input = True
    return backbone


class GridTokens(nn.Module):
    """The cells of a feature map ``[B, C, h, w]`` as tokens: ``Linear(C -> dim)`` + learned 2-D positions.

    Parameters
    ----------
    channels : int
        ``C``.
    dim : int
    max_side : int
        Largest side of the map.
    norm : bool
        LayerNorm over each cell's channels before the projection (for stored maps, whose scale
        depends on the encoder that wrote them).
    """

    def __init__(self, channels: int, dim: int, max_side: int, norm: bool = False):
        super().__init__()
        self.norm = nn.LayerNorm(channels) if norm else nn.Identity()
        self.proj = nn.Linear(channels, dim)
        self.row = nn.Parameter(torch.zeros(max_side, dim))
        self.col = nn.Parameter(torch.zeros(max_side, dim))

    def cells(self, fmap: torch.Tensor) -> torch.Tensor:
        """``[B, C, h, w]`` -> tokens ``[B, h * w, dim]`` (row-major cells)."""
        h, w = fmap.shape[-2:]
        if h > self.row.shape[0] or w > self.col.shape[0]:
            raise HyperparameterError(f"feature map {h}x{w} is larger than the {self.row.shape[0]} "
                                      f"positions {type(self).__name__} was built for")
        position = (self.row[:h, None, :] + self.col[None, :w, :]).reshape(h * w, -1)
        return self.proj(self.norm(fmap.flatten(2).transpose(1, 2))) + position


class MapTokens(GridTokens):
    """The stored spatial map of a batch (input kind ``cxr_map``, ``[B, C, h, w]``) as tokens.

    Each cell's channels are layer-normalised, projected to ``dim`` and given a learned 2-D
    position (:class:`GridTokens`); rows without a film hold NaN, so a method runs it on the
    stays with one only.

    Parameters
    ----------
    map_shape : sequence of int
        ``(C, h, w)`` of the stored maps (``spec["cxr_map_shape"]``).
    dim : int
    """

    def __init__(self, map_shape, dim: int):
        channels, h, w = (int(v) for v in map_shape)
        super().__init__(channels, dim, max(h, w), norm=True)

    def forward(self, batch: dict) -> torch.Tensor:
        return self.cells(batch["cxr_map"])


class ImageTokens(GridTokens):
    """An image backbone's last feature map as tokens: ``Linear(C -> dim)`` + learned 2-D positions.

    Parameters
    ----------
    backbone : nn.Module
        A staged backbone (:class:`SmallCNN`, :class:`ResNet50Backbone`).
    dim : int
    max_side : int
        Largest side of the feature map (the image side is always enough).
    """

    def __init__(self, backbone: nn.Module, dim: int, max_side: int):
        super().__init__(backbone.stage_channels[-1], dim, max_side)
        self.backbone = backbone

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """xrv-range images ``[B, 1, H, W]`` -> tokens ``[B, h * w, dim]`` (row-major cells)."""
        return self.cells(self.backbone.forward_stages(images)[-1])


# ------------------------------------------------------------------ attention and dropout, lean

__all__ += ["Attention", "Dropout", "dropout"]


#: Dropout masks are drawn as 15-bit uniform integers, four from each 64-bit draw of the generator.
_MASK_LEVELS = 1 << 15


def keep_mask(shape: tuple, p: float, device=None) -> tuple[torch.Tensor, float]:
    """A boolean keep mask of ``shape`` that drops each element independently, and its keep rate.

    The draws are 15-bit uniform integers, four from each 64-bit number of the (global, seeded)
    generator (``random_`` on int64 yields 63 random bits): an element is dropped when its draw is
    below ``round(p * 2**15)``, so the drop rate is ``p`` rounded to a multiple of ``2**-15``
    (0.1 -> 0.100006). On CPU that costs about a third of ``torch.rand(shape) >= p`` (one 32-bit
    draw per element).

    Parameters
    ----------
    shape : tuple of int
    p : float
        Drop probability, in ``[0, 1)``.
    device : torch.device, optional

    Returns
    -------
    mask : Tensor
        bool, True where the element is kept.
    keep_rate : float
        The probability that an element is kept, ``1 - round(p * 2**15) / 2**15`` (> 0).
    """
    n = math.prod(shape)
    cut = min(round(p * _MASK_LEVELS), _MASK_LEVELS - 1)
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_()
    draws = words.view(torch.int16)[:n].bitwise_and_(_MASK_LEVELS - 1)  # the low 15 bits of each
    return (draws >= cut).view(shape), 1.0 - cut / _MASK_LEVELS


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """``F.dropout``: each element zeroed with probability ``p``, the others scaled to keep the mean.

    On CPU the mask comes from :func:`keep_mask` instead of ``F.dropout``'s ``bernoulli_`` (about a
    fifth of its CPU time: on the ``[128, 48, 256]`` activations of a feed-forward layer 1.7 ms
    against 7.7 ms on two threads): the drop rate is ``p`` to within ``2**-16`` and the kept values
    are scaled by the inverse of the exact keep rate, so the mean is kept exactly. The masks drawn
    differ from ``F.dropout``'s for the same seed. Other devices use ``F.dropout``.

    Parameters
    ----------
    x : Tensor
    p : float
        Drop probability, in ``[0, 1)``.
    training : bool
        False (or ``p == 0``) returns ``x`` unchanged.

    Returns
    -------
    Tensor
    """
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu":
        return nn.functional.dropout(x, p, True)
    mask, keep_rate = keep_mask(tuple(x.shape), p, x.device)
    return x * mask.to(x.dtype).mul_(1.0 / keep_rate)


class Dropout(nn.Dropout):
    """``nn.Dropout`` drawing its mask as :func:`dropout` does (cheaper on CPU, same law)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)


class Attention(nn.Module):
    """Multi-head attention on batch-first ``[B, T, d]`` tensors without masks, in the math and
    with the parameters of ``nn.MultiheadAttention(d, n_heads, dropout, batch_first=True)``.

    ``Attention(x)`` is self-attention, ``Attention(x, context)`` lets ``x`` attend to
    ``context``: ``softmax(q k^T / sqrt(d / H))`` per head, dropout on the attention weights in
    training (:func:`dropout`), times ``v``, heads concatenated, ``out_proj``. The parameters
    keep ``nn.MultiheadAttention``'s names, shapes and initialisation (``in_proj_weight``
    ``[3d, d]``, ``in_proj_bias``, ``out_proj``), so its state dicts load and, from the same
    generator state, the same weights are drawn.

    Less work than ``nn.MultiheadAttention`` on CPU: no transposes to sequence-first and back, no
    mask handling (its math path checks every row for a full mask), and ``key`` / ``value``
    projected by one matmul; without dropout (evaluation) it runs
    ``F.scaled_dot_product_attention``'s fused kernel.

    Parameters
    ----------
    d : int
    n_heads : int
        Must divide ``d``.
    dropout : float
        On the attention weights, in training.
    """

    def __init__(self, d: int, n_heads: int, dropout: float = 0.0):
        super().__init__()
        if n_heads < 1 or d % n_heads:
            raise HyperparameterError(f"attention width {d} must be divisible by n_heads "
                                      f"({n_heads})")
        self.d, self.n_heads, self.dropout = d, n_heads, float(dropout)
        self.in_proj_weight = nn.Parameter(torch.empty(3 * d, d))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * d))
        self.out_proj = nn.Linear(d, d)
        # nn.MultiheadAttention's order of draws: out_proj's default init, then in_proj_weight
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.in_proj_bias)
        nn.init.zeros_(self.out_proj.bias)

    def _split(self, x: torch.Tensor, parts: int) -> tuple:
        """``[B, T, parts * d]`` -> ``parts`` views ``[B, H, T, d / H]``."""
        b, t, _ = x.shape
        heads = x.view(b, t, parts, self.n_heads, self.d // self.n_heads)
        return heads.permute(2, 0, 3, 1, 4).unbind(0)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, T, d]`` attending to ``context`` ``[B, S, d]`` (default: itself)."""
        weight, bias, d = self.in_proj_weight, self.in_proj_bias, self.d
        if context is None:
            q, k, v = self._split(nn.functional.linear(x, weight, bias), 3)
        else:
            (q,) = self._split(nn.functional.linear(x, weight[:d], bias[:d]), 1)
            k, v = self._split(nn.functional.linear(context, weight[d:], bias[d:]), 2)
        if self.training and self.dropout > 0.0:
            scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)
            out = dropout(torch.softmax(scores, dim=-1), self.dropout, True) @ v
        else:
            out = nn.functional.scaled_dot_product_attention(q, k, v)
        b, _, t, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, t, self.d))
