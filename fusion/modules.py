"""Shared torch building blocks: EHR encoders, CXR backbones, embedding inputs and MLP heads.

Method files compose these and keep only their own mechanism. Every encoder maps a batch to a
feature vector ``[B, out_dim]``:

* :class:`EHRLSTMEncoder` and :class:`EHRTransformerEncoder` read ``batch["ehr"]`` and
  ``batch["ehr_mask"]`` (``[B, T, F]``; the mask is appended to the values as extra channels);
* :class:`CXREncoder` reads ``batch["cxr"]`` (``[B, 1, H, W]`` in ``[-1024, 1024]``);
* :class:`EmbeddingInput` reads a cached embedding (``batch["ehr_emb"]`` / ``batch["cxr_emb"]``),
  standardises it with training statistics kept as buffers (so they are saved with the weights)
  and zeroes the rows whose modality is absent; :func:`build_encoder` follows it with
  ``Linear -> ReLU -> Dropout`` to ``hidden``, so every encoder ends in a ``hidden``-d feature and
  heads are linear by default (``head_layers = 0``).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from fusion.tasks import logit_of_mean_probability

__all__ = ["CXREncoder", "EHRLSTMEncoder", "EHRTransformerEncoder", "EmbeddingInput", "MLPHead",
           "SmallCNN", "build_encoder", "logit_of_mean_probability", "resnet50_1ch"]

#: Scale of the torchxrayvision input range; images are divided by it before a CNN.
XRV_SCALE = 1024.0


class EHRLSTMEncoder(nn.Module):
    """Linear input projection -> (bi)LSTM -> final hidden states -> Linear to ``hidden``.

    Parameters
    ----------
    n_features : int
        EHR variables F (the mask doubles the input channels).
    hidden : int
        LSTM hidden size and output size.
    num_layers : int
    bidirectional : bool
    dropout : float
        Dropout on the output feature (and between LSTM layers when ``num_layers > 1``).
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

    def forward(self, batch: dict) -> torch.Tensor:
        x = torch.cat([batch["ehr"], batch["ehr_mask"]], dim=-1)
        _, (h, _) = self.lstm(self.proj(x))
        directions = 2 if self.lstm.bidirectional else 1
        last = h[-directions:]                      # final layer, each direction: [dirs, B, H]
        return self.out(last.transpose(0, 1).reshape(x.shape[0], -1))


class EHRTransformerEncoder(nn.Module):
    """Linear projection + learned positions -> Transformer encoder -> mask-aware mean pooling.

    Time steps flagged invalid in ``batch["ehr_valid"]`` (bool ``[B, T]``, optional; default all
    valid) are excluded from attention (boolean key padding mask) and from the mean.

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

    def forward(self, batch: dict) -> torch.Tensor:
        x = torch.cat([batch["ehr"], batch["ehr_mask"]], dim=-1)
        steps = x.shape[1]
        if steps > self.position.shape[1]:
            raise ValueError(f"sequence of {steps} steps is longer than max_len "
                             f"{self.position.shape[1]}")
        valid = batch.get("ehr_valid")
        if valid is None:
            valid = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        h = self.encoder(self.proj(x) + self.position[:, :steps], src_key_padding_mask=~valid)
        weight = valid.unsqueeze(-1).to(h.dtype)
        pooled = (h * weight).sum(dim=1) / weight.sum(dim=1).clamp_min(1.0)
        return self.dropout(pooled)


class SmallCNN(nn.Module):
    """Three conv-BN-ReLU blocks with stride 2 and global average pooling (tests, tiny images)."""

    def __init__(self, width: int = 16):
        super().__init__()
        layers, channels = [], 1
        for out in (width, 2 * width, 4 * width):
            layers += [nn.Conv2d(channels, out, 3, stride=2, padding=1, bias=False),
                       nn.BatchNorm2d(out), nn.ReLU()]
            channels = out
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.out_dim = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def resnet50_1ch() -> nn.Module:
    """torchvision ResNet-50 without pretrained weights, 1-channel ``conv1``, no classifier (2048-d)."""
    from torchvision.models import resnet50

    model = resnet50(weights=None)
    model.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    model.fc = nn.Identity()
    model.out_dim = 2048
    return model


class CXREncoder(nn.Module):
    """CNN backbone on ``batch["cxr"]`` (scaled to about [-1, 1]) -> Linear to ``hidden`` -> ReLU.

    Parameters
    ----------
    backbone : str
        ``resnet50`` (torchvision, random init) or ``small`` (:class:`SmallCNN`).
    hidden : int
    dropout : float
    """

    def __init__(self, backbone: str = "resnet50", hidden: int = 256, dropout: float = 0.2):
        super().__init__()
        if backbone == "resnet50":
            self.backbone = resnet50_1ch()
        elif backbone == "small":
            self.backbone = SmallCNN()
        else:
            raise ValueError(f"unknown CXR backbone {backbone!r}; valid: resnet50, small")
        self.proj = nn.Sequential(nn.Linear(self.backbone.out_dim, hidden), nn.ReLU(),
                                  nn.Dropout(dropout))
        self.out_dim = hidden

    def forward(self, batch: dict) -> torch.Tensor:
        return self.proj(self.backbone(batch["cxr"] / XRV_SCALE))


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


def build_encoder(modality: str, kind: str, spec: dict, params: dict) -> nn.Module:
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
        ``n_heads``, ``dropout``, ``backbone`` (missing keys take the defaults of the classes).
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
        return CXREncoder(params.get("backbone", "resnet50"), hidden=hidden, dropout=dropout)
    if kind in ("ehr_emb", "cxr_emb"):
        encoder = nn.Sequential(EmbeddingInput(kind, spec[f"{modality}_dim"]),
                                nn.Linear(spec[f"{modality}_dim"], hidden), nn.ReLU(),
                                nn.Dropout(dropout))
        encoder.out_dim = hidden
        return encoder
    raise ValueError(f"unknown input kind {kind!r} for modality {modality!r}")
