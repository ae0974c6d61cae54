"""ShaSpec: shared and specific encoders; an absent X-ray's feature generated from the EHR's shared one.

Each modality has a *shared* feature ``r`` (one Transformer trunk, the same weights for both
modalities, behind a per-modality token adapter) and a *specific* feature ``s`` (its own encoder).
The fused feature is ``f = r + g([r ; s])`` with one projection ``g`` for both modalities; the head
reads ``[f_E ; f_C]``. For a stay without an X-ray, ``f_C`` is the EHR's shared feature ``r_E``.
Two auxiliary losses: distribution alignment ``mean |r_E - r_C|`` over the stays with a film, and
domain classification on the *specific* features (each must identify its modality).
"""

from __future__ import annotations

import torch
from torch import nn

from fusion.methods.base import TORCH_HYPERPARAMETERS, TORCH_TEST_HYPERPARAMETERS, TorchMethod
from fusion.methods.pretrained import StartsFromPretrained
from fusion.modules import (
    AUGMENT_HYPERPARAMETERS, CXR_WEIGHTS, EmbeddingInput, EncoderOutput, ImageTokens, MapTokens,
    MLPHead, PatchTokens, RandomAffine, build_encoder, hourly_tokens, image_backbone,
    run_on_present,
)
from fusion.registry import HyperparameterError, register

__all__ = ["ShaSpec", "ShaSpecNet", "TokenTrunk"]


class TokenTrunk(nn.Module):
    """Transformer encoder over a token set, mean-pooled to one vector ``[B, dim]``."""

    def __init__(self, dim: int, n_heads: int, n_layers: int, dropout: float):
        super().__init__()
        layer = nn.TransformerEncoderLayer(dim, n_heads, dim_feedforward=4 * dim, dropout=dropout,
                                           activation="gelu", batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.encoder(tokens).mean(dim=1)


class HourTokens(nn.Module):
    """Raw EHR as hourly tokens: ``Linear(3F -> dim)`` of :func:`hourly_tokens` + learned hour positions."""

    def __init__(self, n_features: int, window: int, dim: int):
        super().__init__()
        self.proj = nn.Linear(3 * n_features, dim)
        self.position = nn.Parameter(torch.zeros(window, dim))

    def forward(self, batch: dict) -> torch.Tensor:
        x = hourly_tokens(batch)
        return self.proj(x) + self.position[: x.shape[1]]


class EmbeddingTokens(nn.Module):
    """A cached embedding (standardised, :class:`EmbeddingInput`) cut into ``n_tokens`` tokens."""

    def __init__(self, key: str, dim_in: int, n_tokens: int, dim: int):
        super().__init__()
        self.input = EmbeddingInput(key, dim_in)
        self.tokens = PatchTokens(dim_in, n_tokens, dim)

    def forward(self, batch: dict) -> torch.Tensor:
        return self.tokens(self.input(batch))


class ImageBatchTokens(nn.Module):
    """:class:`ImageTokens` of ``batch["cxr"]``."""

    def __init__(self, tokens: ImageTokens):
        super().__init__()
        self.tokens = tokens

    def forward(self, batch: dict) -> torch.Tensor:
        return self.tokens(batch["cxr"])


class SpecificTokens(nn.Module):
    """A specific encoder over its own token adapter: a Transformer, mean-pooled (``pooled``)."""

    def __init__(self, tokens: nn.Module, trunk: nn.Module):
        super().__init__()
        self.tokens, self.trunk = tokens, trunk

    def forward(self, batch: dict) -> EncoderOutput:
        return EncoderOutput(pooled=self.trunk(self.tokens(batch)))


class ShaSpecNet(nn.Module):
    """Shared trunk + adapters, specific encoders, residual fusion, head and the two auxiliary losses.

    Parameters
    ----------
    shared_ehr, shared_cxr : nn.Module
        Token adapters of the shared branch: batch -> ``[B, N, dim]``.
    specific_ehr, specific_cxr : nn.Module
        Specific encoders: batch -> :class:`fusion.modules.EncoderOutput` (``pooled`` ``[B, dim]``).
    dim, n_outputs : int
    n_heads, shared_layers : int
        The shared trunk.
    alpha, beta : float
        Weights of the alignment and domain losses.
    head_layers, hidden : int
    dropout : float
    film_dropout : float
        Probability of hiding each available film in training (after ``film_dropout_warmup``
        epochs); a hidden film is absent for fusion and for the losses.
    film_dropout_warmup : int
    augment : nn.Module, optional
        Raw films: the augmentation (:class:`fusion.modules.RandomAffine`) applied once per film,
        so that both X-ray branches see the same transformed image.
    """

    def __init__(self, shared_ehr, shared_cxr, specific_ehr, specific_cxr, *, dim: int,
                 n_outputs: int, n_heads: int = 4, shared_layers: int = 1, alpha: float = 0.1,
                 beta: float = 0.02, head_layers: int = 1, hidden: int = 256, dropout: float = 0.2,
                 film_dropout: float = 0.0, film_dropout_warmup: int = 0,
                 augment: nn.Module | None = None):
        super().__init__()
        self.augment = augment
        self.shared_ehr, self.shared_cxr = shared_ehr, shared_cxr
        self.trunk = TokenTrunk(dim, n_heads, shared_layers, dropout)
        self.specific_ehr, self.specific_cxr = specific_ehr, specific_cxr
        self.fuse = nn.Linear(2 * dim, dim, bias=False)
        self.domain = nn.Linear(dim, 2)
        self.head = MLPHead(2 * dim, n_outputs, hidden, head_layers, dropout)
        self.dim, self.alpha, self.beta = dim, alpha, beta
        self.film_dropout, self.film_dropout_warmup = film_dropout, film_dropout_warmup
        self.dropping_films = False

    def on_train_epoch_start(self, ctx) -> None:
        self.dropping_films = self.film_dropout > 0 and ctx.epoch > self.film_dropout_warmup

    def _cxr_features(self, sub: dict) -> torch.Tensor:
        if self.augment is not None:
            sub = {**sub, "cxr": self.augment(sub["cxr"])}
        return torch.cat([self.trunk(self.shared_cxr(sub)), self.specific_cxr(sub).pooled], dim=1)

    def forward(self, batch: dict) -> dict:
        present = batch["cxr_present"]
        if self.training and self.dropping_films:
            present = present & (torch.rand(present.shape, device=present.device) >= self.film_dropout)
        r_e = self.trunk(self.shared_ehr(batch))
        s_e = self.specific_ehr(batch).pooled
        # The X-ray branches run on the stays with a film only (batch norm needs 2 in training).
        both, used = run_on_present(self._cxr_features, batch, present, 2 * self.dim,
                                    min_rows=2 if self.training else 1)
        r_c, s_c = both[:, : self.dim], both[:, self.dim:]
        f_e = r_e + self.fuse(torch.cat([r_e, s_e], dim=1))
        f_c = torch.where(used.unsqueeze(1), r_c + self.fuse(torch.cat([r_c, s_c], dim=1)), r_e)
        logits = self.head(torch.cat([f_e, f_c], dim=1))

        weight = used.to(r_e.dtype)
        n_films = weight.sum().clamp_min(1.0)
        align = ((r_e - r_c).abs().mean(dim=1) * weight).sum() / n_films
        cross_entropy = nn.functional.cross_entropy
        ehr_label = torch.zeros(len(s_e), dtype=torch.long, device=s_e.device)
        domain = (cross_entropy(self.domain(s_e), ehr_label)
                  + (cross_entropy(self.domain(s_c), ehr_label + 1, reduction="none") * weight).sum()
                  / n_films)
        return {"logits": logits, "aux_loss": self.alpha * align + self.beta * domain,
                "loss_align": align, "loss_domain": domain, "f_cxr": f_c, "r_ehr": r_e,
                "cxr_used": used}


@register("shaspec")
class ShaSpec(StartsFromPretrained, TorchMethod):
    """ShaSpec: shared-specific feature modelling, the absent X-ray's feature generated from the EHR.

    Shared branch: per-modality token adapters (raw EHR: one token per hour of values, observed
    mask and hours since observation, with learned hour positions; raw X-ray: the backbone's last
    feature map, one token per cell with learned 2-D positions; cached EHR: the standardised
    embedding cut into ``ehr_tokens`` chunks; cached X-ray: the cells of the stored spatial map,
    input ``cxr_map``, each layer-normalised and projected, with learned 2-D positions), then one
    Transformer trunk with the same weights for both modalities, mean-pooled to ``r``. Specific
    encoders: a Transformer over the hours (raw EHR), a second backbone (raw X-ray), an MLP on the
    embedding (cached EHR), a Transformer of ``specific_layers`` over the map's cells through its
    own adapter (cached X-ray). The shared and specific branches share no parameter. Raw films are
    augmented in training (:data:`AUGMENT_HYPERPARAMETERS`), once per film for both branches. ``f = r + g([r ; s])``; head on ``[f_E ; f_C]``;
    loss = task + ``alpha`` * alignment + ``beta`` * domain.

    Notes
    -----
    Paper and code (``billhhh/ShaSpec`` @ 081fe7a): shared and specific 3-D U-Net encoders on MRI
    sequences; L1 alignment of shared features over modality pairs; a domain classifier on the
    globally pooled *specific* features; alpha 0.1, beta 0.02; a missing modality's fused feature
    is the shared feature of an available one (code: the first; paper, unverified: the mean; the
    same here, where the EHR is always present). The code still encodes zero-filled absent inputs
    and computes the losses on them; here nothing is computed on an absent film (alignment over
    the stays with a film; domain loss = mean EHR term + mean X-ray term over the stays with a
    film, averaged separately so that stays without a film do not swamp the X-ray term).

    CareBench (spec 5.14) applied the domain classifier to the *shared* features, pushing them
    apart while the L1 term pulls them together; here it reads the specific features. It ran the
    shared encoder as a Python loop over 2B single stays (here batched), averaged the fused
    features (here concatenated) and turned label weights on for this method only (here the same
    label policy as every method).

    Cached mode keeps the whole mechanism (two branches, alignment, domain loss, generation of the
    absent feature) and the image's spatial layout: both X-ray branches read the same frozen
    spatial map (the card's 49 map tokens at 224 px), so end-to-end feature learning is lost. ``film_dropout`` (default 0, natural missingness only) is the paper's second
    training stage analogue: each available film is hidden with that probability after
    ``film_dropout_warmup`` epochs.

    Absent X-ray (``absent_cxr_policy = "generated_from_shared"``): per stay, ``f_C = r_E``; the
    X-ray branches never see the stay.

    Reference: Wang H. et al., "Multi-modal Learning with Missing Modality via Shared-Specific
    Feature Modelling", CVPR 2023, arXiv 2307.14126.
    """

    inputs = {"raw": frozenset({"ehr_ts", "cxr_img"}), "cached": frozenset({"ehr_emb", "cxr_map"})}
    modalities = frozenset({"ehr", "cxr"})
    handles_missing_cxr = True
    absent_cxr_policy = "generated_from_shared"
    hyperparameters = {**TORCH_HYPERPARAMETERS, "head_layers": 1, "alpha": 0.1, "beta": 0.02,
                       "n_heads": 4, "shared_layers": 1, "specific_layers": 1, "ehr_tokens": 16,
                       "film_dropout": 0.0, "film_dropout_warmup": 0, "backbone": "resnet50",
                       "cxr_weights": "imagenet", **AUGMENT_HYPERPARAMETERS}
    hyperparameter_choices = {"backbone": ("resnet50", "small"), "cxr_weights": CXR_WEIGHTS}
    test_hyperparameters = {**TORCH_TEST_HYPERPARAMETERS, "n_heads": 2, "ehr_tokens": 3,
                            "backbone": "small", "cxr_weights": "random"}
    paper = ("Wang H., Chen Y., Ma C., Avery J., Hull L., Carneiro G., Multi-modal learning with "
             "missing modality via shared-specific feature modelling, CVPR 2023 (arXiv 2307.14126)")

    def _check_params(self) -> None:
        super()._check_params()
        p = self.params
        self._check_heads()
        for key in ("shared_layers", "specific_layers", "ehr_tokens"):
            if p[key] < 1:
                raise HyperparameterError(f"method {self.name!r}: {key} must be >= 1, got {p[key]}")
        if min(p["alpha"], p["beta"]) < 0:
            raise HyperparameterError(f"method {self.name!r}: alpha and beta must be >= 0")
        if not 0.0 <= p["film_dropout"] <= 1.0 or p["film_dropout_warmup"] < 0:
            raise HyperparameterError(f"method {self.name!r}: film_dropout must be in [0, 1] and "
                                      "film_dropout_warmup >= 0")

    def build_module(self, spec: dict) -> ShaSpecNet:
        self._check_params()
        p = self.params
        dim = p["hidden"]
        options = self.encoder_options()
        augment = None
        if spec["features"] == "cached":
            map_shape = self._map_shape(spec)
            shared_ehr = EmbeddingTokens("ehr_emb", spec["ehr_dim"], p["ehr_tokens"], dim)
            shared_cxr = MapTokens(map_shape, dim)
            specific_ehr = build_encoder("ehr", "ehr_emb", spec, p)
            specific_cxr = SpecificTokens(MapTokens(map_shape, dim),
                                          TokenTrunk(dim, p["n_heads"], p["specific_layers"],
                                                     p["dropout"]))
        else:
            shared_ehr = HourTokens(spec["n_features"], spec["window_hours"], dim)
            shared_cxr = ImageBatchTokens(ImageTokens(image_backbone(p, **options), dim,
                                                      spec["image_size"]))
            specific_ehr = build_encoder("ehr", "ehr_ts", spec,
                                         {**p, "ehr_model": "transformer",
                                          "num_layers": p["specific_layers"]})
            # one augmentation for both X-ray branches (ShaSpecNet applies it), none of its own
            specific_cxr = build_encoder("cxr", "cxr_img", spec, {**p, "augment": False}, **options)
            augment = RandomAffine.from_params(p)
        return ShaSpecNet(shared_ehr, shared_cxr, specific_ehr, specific_cxr, dim=dim,
                          n_outputs=spec["n_outputs"], n_heads=p["n_heads"],
                          shared_layers=p["shared_layers"], alpha=p["alpha"], beta=p["beta"],
                          head_layers=p["head_layers"], hidden=p["hidden"], dropout=p["dropout"],
                          film_dropout=p["film_dropout"],
                          film_dropout_warmup=p["film_dropout_warmup"], augment=augment)
