"""HEALNet: a shared latent array updated by iterative cross-attention to each modality.

Each modality is a set of tokens with Fourier-encoded positions appended to their channels. A
learned latent array is updated, layer after layer, by one cross-attention step per modality
(latents query the modality's tokens), each followed by a self-normalising feed-forward block.
A stay without an X-ray skips the X-ray step in every layer: its latents follow exactly the
EHR-only computation with the same weights. The prediction reads the mean latent.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fusion.methods.base import TORCH_HYPERPARAMETERS, TORCH_TEST_HYPERPARAMETERS, TorchMethod
from fusion.modules import (
    AUGMENT_HYPERPARAMETERS, XRV_SCALE, EmbeddingInput, MLPHead, RandomAffine, hourly_tokens,
)
from fusion.registry import HyperparameterError, register

__all__ = ["HEALNet", "HEALNetNet", "fourier_positions", "image_patches"]

#: Weight sharing across layers: every layer shares one set per modality (paper figure); layer 1
#: own, layers 2..d share one set (official code's tied mode); every layer its own set.
WEIGHT_TIES = ("all", "code", "none")


def fourier_positions(sizes: tuple, bands: int, max_freq: float, device=None) -> torch.Tensor:
    """Fourier features of a grid: per axis ``sin(pi f p), cos(pi f p)`` and ``p`` itself.

    Parameters
    ----------
    sizes : tuple of int
        Grid sizes ``(n_1, ..., n_a)``; positions ``p = linspace(-1, 1, n)`` per axis.
    bands : int
        F frequencies ``linspace(1, max_freq / 2, F)``.
    max_freq : float
    device : torch.device, optional

    Returns
    -------
    Tensor
        ``[n_1 * ... * n_a, a * (2F + 1)]``, row-major over the grid.
    """
    axes = [torch.linspace(-1.0, 1.0, n, device=device) for n in sizes]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)   # [n_1, ..., n_a, a]
    freqs = torch.linspace(1.0, max_freq / 2, bands, device=device)
    scaled = grid.unsqueeze(-1) * freqs * math.pi                        # [..., a, F]
    features = torch.cat([scaled.sin(), scaled.cos(), grid.unsqueeze(-1)], dim=-1)
    return features.reshape(-1, len(sizes) * (2 * bands + 1))


def image_patches(images: torch.Tensor, patch: int) -> torch.Tensor:
    """Non-overlapping ``patch x patch`` patches of one-channel images ``[B, 1, H, W]``.

    Returns ``[B, (H / patch) * (W / patch), patch * patch]``, patches row-major.
    """
    b, _, h, w = images.shape
    x = images.reshape(b, h // patch, patch, w // patch, patch)
    return x.permute(0, 1, 3, 2, 4).reshape(b, (h // patch) * (w // patch), patch * patch)


class CrossAttention(nn.Module):
    """Latents attend to a modality's tokens: pre-LayerNorm on both, temperature 0.5, LeakyReLU out."""

    temperature = 0.5

    def __init__(self, dim: int, context_dim: int, heads: int, head_dim: int, dropout: float):
        super().__init__()
        self.norm_latent, self.norm_context = nn.LayerNorm(dim), nn.LayerNorm(context_dim)
        self.query = nn.Linear(dim, heads * head_dim, bias=False)
        self.key_value = nn.Linear(context_dim, 2 * heads * head_dim, bias=False)
        self.out = nn.Sequential(nn.Linear(heads * head_dim, dim), nn.LeakyReLU(0.01))
        self.dropout = nn.Dropout(dropout)
        self.heads, self.head_dim = heads, head_dim
        self.keep_attention = False
        self.attention = None

    def forward(self, latents: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        if context.shape[-1] != self.norm_context.normalized_shape[0]:
            raise ValueError(f"context tokens have {context.shape[-1]} channels, this "
                             f"cross-attention expects {self.norm_context.normalized_shape[0]}")
        b = latents.shape[0]

        def split(x):
            return x.view(b, x.shape[1], self.heads, self.head_dim).transpose(1, 2)

        q = split(self.query(self.norm_latent(latents)))
        k, v = (split(t) for t in self.key_value(self.norm_context(context)).chunk(2, dim=-1))
        scores = q @ k.transpose(-1, -2) / (math.sqrt(self.head_dim) * self.temperature)
        attention = scores.softmax(dim=-1)
        if self.keep_attention:
            self.attention = attention.detach()
        out = (self.dropout(attention) @ v).transpose(1, 2).reshape(b, latents.shape[1], -1)
        return self.out(out)


class SelfAttention(nn.Module):
    """Pre-LayerNorm multi-head self-attention over the latents."""

    def __init__(self, dim: int, heads: int, head_dim: int, dropout: float):
        super().__init__()
        self.inner = CrossAttention(dim, dim, heads, head_dim, dropout)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.inner(latents, latents)


class FeedForward(nn.Module):
    """Pre-LayerNorm gated feed-forward ``D -> 8D -> (a * act(g)) -> D``; act = SELU (snn) or GELU."""

    def __init__(self, dim: int, dropout: float, snn: bool = True):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.up, self.down = nn.Linear(dim, 8 * dim), nn.Linear(4 * dim, dim)
        self.act = nn.SELU() if snn else nn.GELU()
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, g = self.up(self.norm(x)).chunk(2, dim=-1)
        return self.dropout(self.down(a * self.act(g)))


class ModalityStep(nn.Module):
    """One modality's update of the latents: cross-attention + FF, then optional latent self-attention."""

    def __init__(self, dim: int, context_dim: int, *, cross_heads: int, cross_head_dim: int,
                 latent_heads: int, latent_head_dim: int, self_blocks: int, dropout: float,
                 snn: bool):
        super().__init__()
        self.cross = CrossAttention(dim, context_dim, cross_heads, cross_head_dim, dropout)
        self.ff = FeedForward(dim, dropout, snn)
        self.self_blocks = nn.ModuleList(
            nn.ModuleList([SelfAttention(dim, latent_heads, latent_head_dim, dropout),
                           FeedForward(dim, dropout, snn)]) for _ in range(self_blocks))

    def forward(self, latents: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        latents = latents + self.cross(latents, tokens)
        latents = latents + self.ff(latents)
        for attention, ff in self.self_blocks:
            latents = latents + attention(latents)
            latents = latents + ff(latents)
        return latents


class _RawEHR(nn.Module):
    """Hourly tokens (values, mask, hours since observed) + Fourier positions over the hours."""

    def __init__(self, bands: int, max_freq: float, fourier: bool):
        super().__init__()
        self.bands, self.max_freq, self.fourier = bands, max_freq, fourier

    def forward(self, batch: dict) -> torch.Tensor:
        x = hourly_tokens(batch)
        return _with_positions(x, (x.shape[1],), self)


class _CachedEHR(nn.Module):
    """The standardised cached EHR embedding as the channels of one token (tabular: no positions)."""

    def __init__(self, dim: int):
        super().__init__()
        self.input = EmbeddingInput("ehr_emb", dim)

    def forward(self, batch: dict) -> torch.Tensor:
        return self.input(batch).unsqueeze(1)


class _RawCXR(nn.Module):
    """Image patches (films augmented in training, one channel, scaled to about [-1, 1]) + 2-D
    Fourier positions."""

    def __init__(self, patch: int, bands: int, max_freq: float, fourier: bool,
                 augment: nn.Module | None):
        super().__init__()
        self.patch, self.bands, self.max_freq, self.fourier = patch, bands, max_freq, fourier
        self.augment = augment

    def forward(self, sub: dict) -> torch.Tensor:
        images = sub["cxr"] if self.augment is None else self.augment(sub["cxr"])
        images = images / XRV_SCALE
        grid = (images.shape[-2] // self.patch, images.shape[-1] // self.patch)
        return _with_positions(image_patches(images, self.patch), grid, self)


class _CachedCXR(nn.Module):
    """The stored spatial map's cells as tokens ``[k, h * w, C]`` + 2-D Fourier positions."""

    def __init__(self, bands: int, max_freq: float, fourier: bool):
        super().__init__()
        self.bands, self.max_freq, self.fourier = bands, max_freq, fourier

    def forward(self, sub: dict) -> torch.Tensor:
        maps = sub["cxr_map"]
        tokens = maps.flatten(2).transpose(1, 2)
        return _with_positions(tokens, tuple(maps.shape[-2:]), self)


def _with_positions(tokens: torch.Tensor, grid: tuple, owner) -> torch.Tensor:
    if not owner.fourier:
        return tokens
    positions = fourier_positions(grid, owner.bands, owner.max_freq, tokens.device).to(tokens.dtype)
    return torch.cat([tokens, positions.expand(tokens.shape[0], -1, -1)], dim=-1)


class HEALNetNet(nn.Module):
    """Latent array, per-modality steps repeated over ``depth`` layers, the per-stay X-ray skip, head.

    Parameters
    ----------
    ehr_tokens : nn.Module
        batch -> ``[B, N_E, c_E]``.
    cxr_tokens : nn.Module
        X-ray sub-batch (stays with a film) -> ``[k, N_C, c_C]``.
    ehr_channels, cxr_channels : int
        ``c_E``, ``c_C`` (checked: a wrong-shaped context raises).
    dim, n_latents, depth, n_outputs : int
    weight_tie : str
        One of :data:`WEIGHT_TIES`.
    cxr_first : bool
        Run the X-ray step before the EHR step in each layer.
    l1_weight : float
        Weight of the L1 penalty on every trainable parameter (added as ``aux_loss``).
    **step
        :class:`ModalityStep` settings (heads, head sizes, ``self_blocks``, dropout, ``snn``).
    """

    def __init__(self, ehr_tokens, cxr_tokens, *, ehr_channels: int, cxr_channels: int,
                 dim: int, n_latents: int, depth: int, n_outputs: int, weight_tie: str = "all",
                 cxr_first: bool = False, l1_weight: float = 0.0, head_layers: int = 0,
                 hidden: int = 256, **step):
        super().__init__()
        self.ehr_tokens, self.cxr_tokens = ehr_tokens, cxr_tokens
        self.latents = nn.Parameter(torch.randn(n_latents, dim))
        n_sets = {"all": 1, "code": min(depth, 2), "none": depth}[weight_tie]
        self.ehr_steps = nn.ModuleList(ModalityStep(dim, ehr_channels, **step) for _ in range(n_sets))
        self.cxr_steps = nn.ModuleList(ModalityStep(dim, cxr_channels, **step) for _ in range(n_sets))
        self.depth, self.cxr_first, self.l1_weight = depth, cxr_first, l1_weight
        self.norm = nn.LayerNorm(dim)
        self.head = MLPHead(dim, n_outputs, hidden, head_layers, step.get("dropout", 0.0))

    def _cxr_step(self, latents, step, rows, tokens):
        if tokens is None:  # no stay of the batch has a film: the step is skipped for all
            return latents
        return latents.index_copy(0, rows, step(latents[rows], tokens))

    def encode(self, batch: dict) -> torch.Tensor:
        """Latents ``[B, n_latents, dim]`` after the last layer."""
        ehr = self.ehr_tokens(batch)
        rows = torch.nonzero(batch["cxr_present"], as_tuple=False).squeeze(1)
        cxr = None
        if rows.numel():
            cxr = self.cxr_tokens({k: v[rows] for k, v in batch.items() if k.startswith("cxr")})
        latents = self.latents.expand(ehr.shape[0], -1, -1)
        for layer in range(self.depth):
            index = min(layer, len(self.ehr_steps) - 1)
            ehr_step, cxr_step = self.ehr_steps[index], self.cxr_steps[index]
            if self.cxr_first:
                latents = ehr_step(self._cxr_step(latents, cxr_step, rows, cxr), ehr)
            else:
                latents = self._cxr_step(ehr_step(latents, ehr), cxr_step, rows, cxr)
        return latents

    def forward(self, batch: dict) -> dict:
        latents = self.encode(batch)
        out = {"logits": self.head(self.norm(latents.mean(dim=1))), "latents": latents}
        if self.l1_weight > 0:
            out["aux_loss"] = self.l1_weight * sum(p.abs().sum() for p in self.parameters()
                                                   if p.requires_grad)
        return out


@register("healnet")
class HEALNet(TorchMethod):
    """HEALNet: iterative cross-attention of a shared latent array to each modality.

    EHR tokens: raw, one per hour (values, observed mask, hours since observation / T) with 1-D
    Fourier positions over the hours; cached, the standardised EHR embedding as the channels of
    one token (HEALNet's tabular input). X-ray tokens: raw, ``patch_size`` x ``patch_size``
    one-channel patches of the film (augmented in training, :data:`AUGMENT_HYPERPARAMETERS`) (224 px / 16 = 196 tokens of 256 intensities) with 2-D Fourier positions;
    cached, the stored spatial map's cells (input ``cxr_map``, e.g. a 14 x 14 or 7 x 7 map) with
    2-D Fourier positions. ``depth`` layers, each an EHR step then an X-ray step (``cxr_first``
    swaps them); head on the LayerNorm of the mean latent. Loss: task + ``l1_weight`` * sum |theta|.

    Notes
    -----
    Paper and code (``konst-int-i/healnet`` @ 90459b6): latent array N(0, 1); per modality a
    cross-attention (queries from the latents, no biases, scores divided by temperature 0.5,
    LeakyReLU output) and a SELU-gated feed-forward ("snn"), with pre-LayerNorms; Fourier positions
    ``sin/cos(pi f p)`` plus ``p`` per axis with ``f = linspace(1, max_freq / 2, F)``; L1 penalty on
    all parameters (``l1_weight``, default 0 as CareBench; the authors tuned 7e-6 to 3e-4).
    Defaults are the constructor's (depth 3, 128 latents x 128, 8 heads x 64, F 2, max_freq 10,
    dropout 0); ``self_per_cross_attn`` 0 as in the authors' tuned configurations (the code
    default is 1). Weight sharing is unverified: the paper figure shares each modality's weights
    across all layers (``weight_tie="all"``, default); the code's tied mode keeps layer 1 separate
    (``"code"``; the code additionally shares one cross-FF across modalities there, not done
    here); ``"none"``: every layer its own weights. The skip of an absent modality is stated per
    sample but implemented per batch in the code (a ``continue`` inside ``if verbose`` and a bare
    ``except: pass`` swallowing the error of attending to ``None``); here it is per stay, and a
    context with the wrong number of channels raises.

    CareBench (spec 5.9) fed 50,176 RGB pixel tokens (batch size 4 everywhere) and, for a stay
    without a film, a zero image through the X-ray cross-attention (``has_cxr`` read but unused);
    it reported logits. Here: patches or map cells, one channel; the X-ray step runs only for the
    stays with a film.

    Cached mode keeps per-modality cross-attention, 2-D positions, the iterative fusion and the
    skip; it loses end-to-end learning from pixels (the authors themselves fed pre-extracted
    patch features of slides).

    Absent X-ray (``absent_cxr_policy = "skipped_update"``): per stay, the X-ray cross-attention
    and its feed-forward are skipped in every layer, so the stay's latents are those of the
    EHR-only computation; the X-ray weights get no gradient from it.

    Reference: Hemker K., Simidjievski N., Jamnik M., "HEALNet: Multimodal Fusion for
    Heterogeneous Biomedical Data", NeurIPS 2024, arXiv 2311.09115.
    """

    inputs = {"raw": frozenset({"ehr_ts", "cxr_img"}), "cached": frozenset({"ehr_emb", "cxr_map"})}
    modalities = frozenset({"ehr", "cxr"})
    handles_missing_cxr = True
    absent_cxr_policy = "skipped_update"
    hyperparameters = {**TORCH_HYPERPARAMETERS, "dropout": 0.0, "hidden": 128, "depth": 3,
                       "n_latents": 128, "cross_heads": 8, "cross_head_dim": 64, "latent_heads": 8,
                       "latent_head_dim": 64, "self_per_cross_attn": 0, "freq_bands": 2,
                       "max_freq": 10.0, "fourier": True, "snn": True, "weight_tie": "all",
                       "cxr_first": False, "patch_size": 16, "l1_weight": 0.0,
                       **AUGMENT_HYPERPARAMETERS}
    hyperparameter_choices = {"weight_tie": WEIGHT_TIES}
    test_hyperparameters = {**TORCH_TEST_HYPERPARAMETERS, "depth": 2, "n_latents": 4,
                            "cross_heads": 2, "cross_head_dim": 4, "latent_heads": 2,
                            "latent_head_dim": 4, "patch_size": 4}
    paper = ("Hemker K., Simidjievski N., Jamnik M., HEALNet: multimodal fusion for heterogeneous "
             "biomedical data, NeurIPS 2024 (arXiv 2311.09115)")

    def _check_params(self) -> None:
        super()._check_params()
        p = self.params
        for key in ("depth", "n_latents", "cross_heads", "cross_head_dim", "latent_heads",
                    "latent_head_dim", "freq_bands", "patch_size"):
            if p[key] < 1:
                raise HyperparameterError(f"method {self.name!r}: {key} must be >= 1, got {p[key]}")
        if p["self_per_cross_attn"] < 0 or p["l1_weight"] < 0 or p["max_freq"] <= 0:
            raise HyperparameterError(f"method {self.name!r}: self_per_cross_attn and l1_weight "
                                      "must be >= 0 and max_freq > 0")

    def build_module(self, spec: dict) -> HEALNetNet:
        self._check_params()
        p = self.params
        bands, max_freq, fourier = p["freq_bands"], p["max_freq"], p["fourier"]
        positions = 2 * bands + 1 if fourier else 0
        if spec["features"] == "cached":
            ehr, ehr_channels = _CachedEHR(spec["ehr_dim"]), spec["ehr_dim"]
            cxr = _CachedCXR(bands, max_freq, fourier)
            cxr_channels = self._map_shape(spec)[0] + 2 * positions
        else:
            size, patch = spec["image_size"], p["patch_size"]
            if size % patch:
                raise HyperparameterError(f"method {self.name!r}: patch_size {patch} must divide "
                                          f"the image size {size}")
            ehr, ehr_channels = _RawEHR(bands, max_freq, fourier), 3 * spec["n_features"] + positions
            cxr = _RawCXR(patch, bands, max_freq, fourier, RandomAffine.from_params(p))
            cxr_channels = patch * patch + 2 * positions
        return HEALNetNet(ehr, cxr, ehr_channels=ehr_channels, cxr_channels=cxr_channels,
                          dim=p["hidden"], n_latents=p["n_latents"], depth=p["depth"],
                          n_outputs=spec["n_outputs"], weight_tie=p["weight_tie"],
                          cxr_first=p["cxr_first"], l1_weight=p["l1_weight"],
                          head_layers=p["head_layers"], hidden=p["hidden"],
                          cross_heads=p["cross_heads"], cross_head_dim=p["cross_head_dim"],
                          latent_heads=p["latent_heads"], latent_head_dim=p["latent_head_dim"],
                          self_blocks=p["self_per_cross_attn"], dropout=p["dropout"], snn=p["snn"])
