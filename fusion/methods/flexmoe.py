"""Flex-MoE: a missing-modality bank and a sparse mixture of experts routed by modality combination.

Each modality becomes a set of tokens (``n_tokens`` chunks of a vector, or the cells of a stored
spatial map); an absent modality's tokens come from a learned bank indexed by the stay's modality
combination. The tokens of both modalities go through
self-attention, then, per modality, a sparse mixture-of-experts feed-forward whose router is
trained with a combination-aware gate loss: tokens of complete stays are balanced over every
expert (generalised experts); tokens of a stay with a missing modality are tied to the expert of
its combination (specialised experts).
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
from torch import nn

from fusion.methods.base import TORCH_HYPERPARAMETERS, TORCH_TEST_HYPERPARAMETERS, TorchMethod
from fusion.methods.pretrained import StartsFromPretrained
from fusion.modules import (
    AUGMENT_HYPERPARAMETERS, CXR_WEIGHTS, EmbeddingInput, MapTokens, MLPHead, PatchTokens,
    RandomAffine, image_backbone, run_on_present,
)
from fusion.registry import HyperparameterError, register

__all__ = ["COMBINATIONS", "MODALITIES", "FlexMoE", "FlexMoELayer", "FlexMoENet", "SparseMoE",
           "combination_index", "gate_loss"]

#: Modality order of the bank and of the tokens.
MODALITIES = ("ehr", "cxr")
#: Every non-empty subset of :data:`MODALITIES`, largest first (Flex-MoE's ordering): the
#: complete combination is index 0, {ehr} is 1, {cxr} is 2. Index c is also expert c's role.
COMBINATIONS = tuple(s for r in range(len(MODALITIES), 0, -1)
                     for s in itertools.combinations(range(len(MODALITIES)), r))
FULL = 0


def combination_index(present: torch.Tensor) -> torch.Tensor:
    """Index in :data:`COMBINATIONS` of each stay's present modalities.

    Parameters
    ----------
    present : Tensor
        bool ``[B, M]``, column m = modality ``MODALITIES[m]`` is present.

    Returns
    -------
    Tensor
        int64 ``[B]``.

    Raises
    ------
    ValueError
        If a stay has no modality.
    """
    bits = (present.long() << torch.arange(present.shape[1], device=present.device)).sum(dim=1)
    lookup = torch.full((1 << len(MODALITIES),), -1, dtype=torch.long, device=present.device)
    for index, members in enumerate(COMBINATIONS):
        lookup[sum(1 << m for m in members)] = index
    codes = lookup[bits]
    if (codes < 0).any():
        raise ValueError("a stay has no modality present; Flex-MoE needs at least one")
    return codes


def _cv_squared(x: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation ``Var(x) / (mean(x)^2 + 1e-10)`` (0 for fewer than 2 values)."""
    if x.numel() < 2:
        return x.new_zeros(())
    return x.var() / (x.mean() ** 2 + 1e-10)


def gate_loss(logits: torch.Tensor, gates: torch.Tensor, load: torch.Tensor,
              combination: torch.Tensor) -> torch.Tensor:
    """Flex-MoE's router loss for one mixture-of-experts call.

    Tokens of complete stays (combination 0): ``cv²(importance) + cv²(load)`` over all experts.
    Tokens of other stays: cross-entropy of the router logits towards expert ``combination``, plus
    the same balance terms over experts ``1..E-1``.

    Parameters
    ----------
    logits : Tensor
        ``[N, E]`` router logits (noisy in training).
    gates : Tensor
        ``[N, E]`` routing weights (zero outside each token's top-k).
    load : Tensor
        ``[N, E]`` probability (training, smooth) or indicator (evaluation) of each expert being in
        the token's top-k.
    combination : Tensor
        int64 ``[N]`` combination index of each token's stay.
    """
    full = combination == FULL
    total = logits.new_zeros(())
    if full.any():
        total = total + _cv_squared(gates[full].sum(0)) + _cv_squared(load[full].sum(0))
    partial = ~full
    if partial.any():
        total = total + nn.functional.cross_entropy(logits[partial], combination[partial])
        total = (total + _cv_squared(gates[partial][:, 1:].sum(0))
                 + _cv_squared(load[partial][:, 1:].sum(0)))
    return total


class SparseMoE(nn.Module):
    """Noisy top-k mixture of feed-forward experts ``D -> 2D -> D`` (GELU), in plain torch.

    Parameters
    ----------
    dim, n_experts, top_k : int
    routing : str
        ``paper``: for a token of an incomplete stay, expert ``combination`` takes the first slot
        and the router picks the other ``k - 1``; ``code``: plain top-k (only the loss ties
        such tokens to their expert).
    """

    def __init__(self, dim: int, n_experts: int, top_k: int, routing: str = "paper"):
        super().__init__()
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(),
                                                   nn.Linear(2 * dim, dim)) for _ in range(n_experts))
        self.router = nn.Linear(dim, n_experts, bias=False)
        self.noise = nn.Linear(dim, n_experts, bias=False)
        self.top_k, self.routing = top_k, routing
        self.last_routing: dict = {}

    def _load(self, clean, noisy, std, top) -> torch.Tensor:
        """Smooth probability of each expert being in the top-k under the gate noise (training)."""
        k = self.top_k
        if k >= clean.shape[1]:
            return torch.ones_like(clean)
        threshold_in = top[:, k:k + 1]       # the (k+1)-th noisy logit: beaten to stay in
        threshold_out = top[:, k - 1:k]      # the k-th: to be beaten to get in
        normal = torch.distributions.Normal(0.0, 1.0)
        stays_in = normal.cdf((clean - threshold_in) / std)
        gets_in = normal.cdf((clean - threshold_out) / std)
        return torch.where(noisy > threshold_in, stays_in, gets_in)

    def forward(self, x: torch.Tensor, combination: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` ``[B, P, D]``, ``combination`` ``[B]`` -> (output ``[B, P, D]``, gate loss)."""
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        combo = combination.repeat_interleave(shape[1])
        clean = self.router(tokens)
        if self.training:
            std = nn.functional.softplus(self.noise(tokens)) + 0.01
            logits = clean + torch.randn_like(clean) * std
        else:
            logits = clean
        choose = logits
        if self.routing == "paper":  # the combination's expert in the first slot
            forced = nn.functional.one_hot(combo, logits.shape[1]).bool() & (combo != FULL)[:, None]
            choose = logits.masked_fill(forced, float("inf"))
        chosen = choose.topk(self.top_k, dim=1).indices
        weights = torch.softmax(logits.gather(1, chosen), dim=1)
        gates = torch.zeros_like(logits).scatter(1, chosen, weights)
        if self.training:
            ranked = logits.topk(min(self.top_k + 1, logits.shape[1]), dim=1).values
            load = self._load(clean, logits, std, ranked)
        else:
            load = (gates > 0).to(gates.dtype)
        out = torch.zeros_like(tokens)
        for e, expert in enumerate(self.experts):
            rows = torch.nonzero(gates[:, e] > 0, as_tuple=False).squeeze(1)
            if rows.numel():
                out = out.index_add(0, rows, gates[rows, e:e + 1] * expert(tokens[rows]))
        self.last_routing = {"chosen": chosen.detach(), "combination": combo}
        return out.view(shape), gate_loss(logits, gates, load, combo)


class FlexMoELayer(nn.Module):
    """Self-attention over all tokens, then a sparse MoE feed-forward per modality's tokens.

    ``residual = "standard"``: ``x + MHA(LN(x))``; ``"compat"``: the official ``y + Dropout(y)``
    with ``y = MHA(LN(x))`` (no skip from the input).
    """

    def __init__(self, dim: int, n_heads: int, n_experts: int, top_k: int, dropout: float,
                 routing: str, residual: str):
        super().__init__()
        self.norm_attn, self.norm_moe = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, n_heads, dropout=dropout, bias=False, batch_first=True)
        self.moe = SparseMoE(dim, n_experts, top_k, routing)
        self.dropout = nn.Dropout(dropout)
        self.residual = residual

    def forward(self, x: torch.Tensor, combination: torch.Tensor, sizes: tuple):
        """``x`` ``[B, sum(sizes), D]``, the modalities' tokens in order, ``sizes`` their counts."""
        h = self.norm_attn(x)
        y = self.attn(h, h, h, need_weights=False)[0]
        x = (x if self.residual == "standard" else y) + self.dropout(y)
        out, loss = [], x.new_zeros(())
        for chunk in x.split(list(sizes), dim=1):
            moe, chunk_loss = self.moe(self.norm_moe(chunk), combination)
            out.append(chunk + self.dropout(moe))
            loss = loss + chunk_loss
        return torch.cat(out, dim=1), loss


class FlexMoENet(nn.Module):
    """Tokenisers, missing-modality bank, Flex-MoE layers and the head.

    Parameters
    ----------
    ehr_tokens : nn.Module
        batch -> ``[B, P_E, D]``.
    cxr_encoder : nn.Module
        batch -> ``[k, P_C * D]`` X-ray tokens (flattened), run on the stays with a film only.
    dim, n_outputs : int
    n_tokens : tuple of int
        ``(P_E, P_C)``: tokens per modality (the bank holds that many per modality and combination).
    n_heads, n_experts, top_k, fusion_layers : int
    gate_weight : float
    routing, residual : str
    warmup_epochs : int
        Epochs whose training rows are ordered by number of modalities, complete stays first.
    head_layers, hidden : int
    dropout : float
    """

    def __init__(self, ehr_tokens, cxr_encoder, *, dim: int, n_tokens: tuple, n_outputs: int,
                 n_heads: int = 4, n_experts: int = 16, top_k: int = 4, fusion_layers: int = 1,
                 gate_weight: float = 0.01, routing: str = "paper", residual: str = "standard",
                 warmup_epochs: int = 5, head_layers: int = 0, hidden: int = 256,
                 dropout: float = 0.2):
        super().__init__()
        m = len(MODALITIES)
        self.ehr_tokens, self.cxr_encoder = ehr_tokens, cxr_encoder
        self.n_tokens = tuple(int(p) for p in n_tokens)
        # one bank per modality (their token counts may differ): bank[m][c] = [P_m, D]
        self.bank = nn.ParameterDict({name: nn.Parameter(torch.randn(len(COMBINATIONS), p, dim))
                                      for name, p in zip(MODALITIES, self.n_tokens)})
        self.position = nn.Parameter(torch.zeros(sum(self.n_tokens), dim))
        self.layers = nn.ModuleList(
            FlexMoELayer(dim, n_heads, n_experts, top_k, dropout, routing, residual)
            for _ in range(fusion_layers))
        self.head = MLPHead(m * dim, n_outputs, hidden, head_layers, dropout)
        self.dim, self.gate_weight = dim, gate_weight
        self.warmup_epochs = warmup_epochs

    def train_batch_order(self, ctx, train):
        """Warm-up epochs: complete stays first, each group in its natural order (unshuffled)."""
        if ctx.epoch > self.warmup_epochs:
            return None
        n_modalities = 1 + np.asarray(train.part.cxr_present, dtype=np.int64)[train.rows]
        return np.argsort(-n_modalities, kind="stable")

    def forward(self, batch: dict) -> dict:
        ehr = self.ehr_tokens(batch)
        b, d = ehr.shape[0], self.dim
        p_cxr = self.n_tokens[1]
        flat, used = run_on_present(self.cxr_encoder, batch, batch["cxr_present"], p_cxr * d,
                                    min_rows=2 if self.training else 1)
        present = torch.stack([torch.ones_like(used), used], dim=1)
        combination = combination_index(present)
        cxr = torch.where(used[:, None, None], flat.view(b, p_cxr, d),
                          self.bank["cxr"][combination])
        ehr = torch.where(present[:, 0, None, None], ehr, self.bank["ehr"][combination])
        x = torch.cat([ehr, cxr], dim=1) + self.position
        loss = x.new_zeros(())
        for layer in self.layers:
            x, layer_loss = layer(x, combination, self.n_tokens)
            loss = loss + layer_loss
        pooled = torch.cat([chunk.mean(dim=1) for chunk in x.split(list(self.n_tokens), dim=1)],
                           dim=1)
        return {"logits": self.head(pooled), "aux_loss": self.gate_weight * loss,
                "gate_loss": loss, "combination": combination, "cxr_tokens": cxr}


class _FlatTokens(nn.Module):
    """X-ray tokens ``[k, P, D]`` flattened to ``[k, P * D]`` (the bank fills the other rows)."""

    def __init__(self, tokens: nn.Module):
        super().__init__()
        self.tokens = tokens

    def forward(self, batch: dict) -> torch.Tensor:
        return self.tokens(batch).flatten(1)


class _RawEHRTokens(nn.Module):
    """Hourly values and masks flattened time-major, cut into ``P`` blocks of consecutive hours."""

    def __init__(self, n_features: int, window: int, n_tokens: int, dim: int):
        super().__init__()
        self.tokens = PatchTokens(2 * n_features * window, n_tokens, dim)

    def forward(self, batch: dict) -> torch.Tensor:
        return self.tokens(torch.cat([batch["ehr"], batch["ehr_mask"]], dim=-1).flatten(1))


class _ImageVectorTokens(nn.Module):
    """Films (augmented in training) -> the backbone's pooled feature cut into ``P`` tokens."""

    def __init__(self, backbone: nn.Module, n_tokens: int, dim: int, augment: nn.Module | None):
        super().__init__()
        self.backbone, self.augment = backbone, augment
        self.tokens = PatchTokens(backbone.out_dim, n_tokens, dim)

    def forward(self, batch: dict) -> torch.Tensor:
        images = batch["cxr"] if self.augment is None else self.augment(batch["cxr"])
        return self.tokens(self.backbone(images))


@register("flexmoe")
class FlexMoE(StartsFromPretrained, TorchMethod):
    """Flex-MoE: missing-modality bank plus a combination-routed sparse mixture of experts.

    Tokens: EHR, raw values and masks flattened time-major and cut into ``n_tokens`` blocks (each a
    run of consecutive hours), cached the standardised embedding cut into ``n_tokens`` chunks,
    each chunk projected to ``hidden`` by one Linear; X-ray, raw the backbone's pooled feature of
    the film (augmented in training, :data:`AUGMENT_HYPERPARAMETERS`) cut into ``n_tokens``
    chunks, cached the cells of the stored spatial map (input ``cxr_map``: h x w tokens, each
    layer-normalised and projected, with learned 2-D positions). The bank holds, per modality,
    as many tokens as that modality has. A stay's combination index c is 0 with a film, 1
    without (EHR is always present); the X-ray tokens of a stay without a film are the bank's
    ``bank["cxr"][c]``. ``fusion_layers`` Flex-MoE layers, then the mean of each modality's tokens,
    concatenated, into the head. Loss: task + ``gate_weight`` * gate loss (:func:`gate_loss`).
    One router per mixture of experts, all of them used.

    Notes
    -----
    Paper and code (``UNITES-Lab/flex-moe`` @ 8c82735): combination index over all non-empty
    modality subsets, largest first (complete = 0); bank ``[2^M - 1, M, P, D]``; noisy top-k gate;
    gate loss = CE towards the combination's expert for incomplete stays plus cv² balance terms
    (complete stays over all experts, others over experts 1..E-1), weight 0.01, constant; Adam lr
    1e-4; warm-up epochs iterate the training set unshuffled, sorted by number of modalities,
    complete stays first (here ``warmup_epochs``, 5, through the trainer's ``train_batch_order``
    hook). The paper's Fig. 3 fixes the top-1 slot of an incomplete stay to its combination's
    expert; the code has only the CE term. Default ``routing="paper"`` (slot fixed plus the CE
    term); ``routing="code"`` is the code's. The code's layer has no skip from the input
    (``y + Dropout(y)``); default ``residual="standard"`` (``x + MHA(LN(x))``), ``"compat"`` keeps
    the code's. Experts ``D -> 2D -> D`` with GELU in plain torch (no fastmoe). In training the
    load term uses the smooth top-k probability under the gate noise (Shazeer et al. 2017)
    computed on the unforced logits; in evaluation, the hard count.

    CareBench (spec 5.10) numbered the combinations {EHR} 0, {CXR} 1, {EHR, CXR} 2 while its gate
    treats 0 as complete: complete stays got the specialist term and EHR-only stays were treated
    as complete; here one function (:func:`combination_index`) gives every index and the gate
    tests c == 0. It derived EHR presence from a *missing* indicator (here EHR is present for
    every stay), built extra routers that never route (not exposed here: one router per MoE),
    decayed the gate weight (here constant), ran the validation forward twice and reported logits.

    Cached mode keeps the whole mechanism (bank, routing, gate loss) and the image's spatial
    layout (the card's map option, with a bank per modality of its own token count); only encoder
    fine-tuning is lost.

    Absent X-ray (``absent_cxr_policy = "missing_bank"``): per stay, the learned bank tokens of
    its combination replace the X-ray tokens; the X-ray encoder never sees the stay, and its
    tokens are routed with the EHR-only expert in the first slot (``routing="paper"``).

    Reference: Yun S. et al., "Flex-MoE: Modeling Arbitrary Modality Combination via the Flexible
    Mixture-of-Experts", NeurIPS 2024, arXiv 2410.08245.
    """

    inputs = {"raw": frozenset({"ehr_ts", "cxr_img"}), "cached": frozenset({"ehr_emb", "cxr_map"})}
    modalities = frozenset({"ehr", "cxr"})
    handles_missing_cxr = True
    absent_cxr_policy = "missing_bank"
    hyperparameters = {**TORCH_HYPERPARAMETERS, "n_tokens": 16, "n_experts": 16, "top_k": 4,
                       "n_heads": 4, "fusion_layers": 1, "gate_weight": 0.01, "routing": "paper",
                       "residual": "standard", "warmup_epochs": 5, "backbone": "resnet50",
                       "cxr_weights": "imagenet", **AUGMENT_HYPERPARAMETERS}
    hyperparameter_choices = {"routing": ("paper", "code"), "residual": ("standard", "compat"),
                              "backbone": ("resnet50", "small"), "cxr_weights": CXR_WEIGHTS}
    test_hyperparameters = {**TORCH_TEST_HYPERPARAMETERS, "n_tokens": 2, "n_experts": 4,
                            "top_k": 2, "n_heads": 2, "warmup_epochs": 1, "backbone": "small",
                            "cxr_weights": "random"}
    paper = ("Yun S., Choi I., Peng J., Wu Y., Bao J., Zhang Q., Xin J., Long Q., Chen T., Flex-MoE: "
             "modeling arbitrary modality combination via the flexible mixture-of-experts, "
             "NeurIPS 2024 (arXiv 2410.08245)")

    def _check_params(self) -> None:
        super()._check_params()
        p = self.params
        self._check_heads()
        for key in ("n_tokens", "fusion_layers", "top_k"):
            if p[key] < 1:
                raise HyperparameterError(f"method {self.name!r}: {key} must be >= 1, got {p[key]}")
        if p["n_experts"] < len(COMBINATIONS):
            raise HyperparameterError(
                f"method {self.name!r}: n_experts ({p['n_experts']}) must be at least the number of "
                f"modality combinations ({len(COMBINATIONS)}): expert c serves combination c")
        if p["top_k"] > p["n_experts"]:
            raise HyperparameterError(f"method {self.name!r}: top_k ({p['top_k']}) must be <= "
                                      f"n_experts ({p['n_experts']})")
        if p["gate_weight"] < 0 or p["warmup_epochs"] < 0:
            raise HyperparameterError(f"method {self.name!r}: gate_weight and warmup_epochs must "
                                      "be >= 0")

    def build_module(self, spec: dict) -> FlexMoENet:
        self._check_params()
        p = self.params
        dim, n_tokens = p["hidden"], p["n_tokens"]
        if spec["features"] == "cached":
            ehr = nn.Sequential(EmbeddingInput("ehr_emb", spec["ehr_dim"]),
                                PatchTokens(spec["ehr_dim"], n_tokens, dim))
            map_shape = self._map_shape(spec)
            cxr, cxr_tokens = MapTokens(map_shape, dim), map_shape[1] * map_shape[2]
        else:
            ehr = _RawEHRTokens(spec["n_features"], spec["window_hours"], n_tokens, dim)
            backbone = image_backbone(p, **self.encoder_options())
            cxr = _ImageVectorTokens(backbone, n_tokens, dim, RandomAffine.from_params(p))
            cxr_tokens = n_tokens
        return FlexMoENet(ehr, _FlatTokens(cxr), dim=dim, n_tokens=(n_tokens, cxr_tokens),
                          n_outputs=spec["n_outputs"], n_heads=p["n_heads"], n_experts=p["n_experts"], top_k=p["top_k"],
                          fusion_layers=p["fusion_layers"], gate_weight=p["gate_weight"],
                          routing=p["routing"], residual=p["residual"],
                          warmup_epochs=p["warmup_epochs"], head_layers=p["head_layers"],
                          hidden=p["hidden"], dropout=p["dropout"])
