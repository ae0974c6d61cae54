"""M3Care: the X-ray representation of a stay imputed from similar training stays.

Similarity between a stay and the stays of a fixed bank of training stays with an X-ray is a
learned mix of Gaussian kernels over the modalities the stay has (EHR, plus the X-ray when
present), cut by a learned threshold. Two graph-convolution layers aggregate the bank's X-ray
representations over the surviving edges: a stay without an X-ray gets the aggregate of its
neighbours (its imputed representation), a stay with one mixes the aggregate with its own. A
Transformer over the EHR and X-ray tokens predicts. The bank is built at fit start from the
fold's training stays, refreshed each epoch, frozen with the final weights and saved with them, so
a stay's prediction never depends on which stays share its batch.
"""

from __future__ import annotations

import torch
from torch import nn

from fusion.methods.base import OWN_HEAD_HYPERPARAMETERS, TORCH_TEST_HYPERPARAMETERS, TorchMethod
from fusion.methods.pretrained import StartsFromPretrained
from fusion.modules import AUGMENT_HYPERPARAMETERS, CXR_WEIGHTS, build_encoder, run_on_present
from fusion.registry import HyperparameterError, register
from fusion.tasks import task_loss

__all__ = ["M3Care", "M3CareNet", "bandwidth", "multi_kernel"]


def bandwidth(x: torch.Tensor) -> torch.Tensor:
    """Mean squared distance over the distinct pairs of rows of ``x`` (1 when below 1e-3), detached.

    Closed form: ``(2 n sum |x_i|^2 - 2 |sum x_i|^2) / (n (n - 1))``.
    """
    x = x.detach().double()
    n = x.shape[0]
    if n < 2:
        return torch.ones((), dtype=torch.float32, device=x.device)
    value = (2 * n * (x * x).sum() - 2 * (x.sum(0) ** 2).sum()) / (n * (n - 1))
    return torch.where(value < 1e-3, torch.ones_like(value), value).float()


def multi_kernel(query: torch.Tensor, bank: torch.Tensor, width: torch.Tensor) -> torch.Tensor:
    """Mean of Gaussian kernels ``exp(-|q - b|^2 / w)`` for ``w`` in ``width * (1/2, 1, 2)``."""
    d2 = torch.cdist(query, bank).pow(2)
    return sum(torch.exp(-d2 / (width * f)) for f in (0.5, 1.0, 2.0)) / 3.0


def _mlp(d: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, d), nn.ReLU(), nn.Linear(d, d))


class M3CareNet(nn.Module):
    """Encoders, task-guided similarity to the bank, graph imputation, Transformer fusion, head.

    Parameters
    ----------
    ehr_encoder, cxr_encoder : nn.Module
        Map a batch to an :class:`fusion.modules.EncoderOutput` (``pooled`` ``[B, d]``).
    n_outputs : int
    d : int
    n_heads : int
        Heads of the fusion Transformer.
    dropout : float
    kernel : str
        ``additive`` (``(1 - s) K_proj + s K_raw``) or ``multiplicative`` (``((1 - s) K_proj + s)
        K_raw``), ``s = sigmoid(epsilon)``.
    epsilon_init, theta_init : float
        Initial kernel mix and threshold logits.
    top_k : int
        Neighbours kept per stay (0: every bank stay above the threshold).
    lambda_stability : float
        Weight of the norm-stability term.
    bank_size : int
        Most training stays in the bank.
    """

    def __init__(self, ehr_encoder: nn.Module, cxr_encoder: nn.Module, n_outputs: int, d: int,
                 n_heads: int = 4, dropout: float = 0.2, kernel: str = "additive",
                 epsilon_init: float = -0.3, theta_init: float = 0.0, top_k: int = 31,
                 lambda_stability: float = 1e-3, bank_size: int = 2000):
        super().__init__()
        self.ehr_encoder, self.cxr_encoder = ehr_encoder, cxr_encoder
        self.d, self.kernel, self.top_k = d, kernel, top_k
        self.lambda_stability, self.bank_size = lambda_stability, bank_size
        self.phi_ehr, self.phi_cxr = _mlp(d), _mlp(d)
        self.epsilon = nn.Parameter(torch.full((2,), float(epsilon_init)))
        self.theta = nn.Parameter(torch.tensor(float(theta_init)))
        self.gcn1, self.gcn2 = nn.Linear(d, d), nn.Linear(d, d)
        self.gate_graph, self.gate_own = nn.Linear(d, 1), nn.Linear(d, 1)
        self.type_embedding = nn.Parameter(torch.zeros(2, d))
        layer = nn.TransformerEncoderLayer(d, n_heads, dim_feedforward=4 * d, dropout=dropout,
                                           batch_first=True)
        self.interaction = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Sequential(nn.Linear(2 * d, 2 * d), nn.ReLU(), nn.Dropout(dropout),
                                  nn.Linear(2 * d, n_outputs))
        # The bank: encoder features of training stays with an X-ray, and the first graph
        # layer's aggregate over the bank-only graph. Saved through the extra state.
        for name in ("bank_ehr", "bank_cxr", "bank_aggregate"):
            self.register_buffer(name, torch.zeros(0, d), persistent=False)
        self.register_buffer("bank_stay_id", torch.zeros(0, dtype=torch.long), persistent=False)
        self._source, self._bank_rows = None, None

    # ----- similarity -----------------------------------------------------------------------------
    def _kernel(self, query: torch.Tensor, bank: torch.Tensor, phi: nn.Module,
                epsilon: torch.Tensor) -> torch.Tensor:
        """Mixed kernel between query rows and bank rows of one modality (bank statistics both sides)."""
        kernels = []
        for q, b in ((phi(query), phi(bank)), (query, bank)):
            mean, std = b.detach().mean(0), b.detach().std(0, unbiased=False).clamp_min(1e-5)
            q, b = (q - mean) / std, (b - mean) / std
            kernels.append(multi_kernel(q, b, bandwidth(b)))
        share = torch.sigmoid(epsilon)
        if self.kernel == "multiplicative":
            return ((1 - share) * kernels[0] + share) * kernels[1]
        return (1 - share) * kernels[0] + share * kernels[1]

    def adjacency(self, e: torch.Tensor, c: torch.Tensor, has_cxr: torch.Tensor,
                  bank_e: torch.Tensor, bank_c: torch.Tensor, exclude_self: bool = False) -> tuple:
        """Normalised aggregation weights of query rows over the bank, and their self weights.

        The similarity of a pair is the mean of its EHR kernel and, when the query has an X-ray,
        its X-ray kernel; edges below ``sigmoid(theta)`` are cut (``relu(S - t) + t [S > t]``,
        so ``theta`` learns through the edges that survive); the ``top_k`` strongest remain, and a
        query without an X-ray whose edges are all cut keeps its most similar bank stay. Each
        row is divided by its sum plus the self weight (1 for a query with an X-ray, 0
        otherwise), so weights sum to 1 whatever the bank size.

        Returns
        -------
        weights : Tensor
            ``[B, n_bank]``.
        self_weight : Tensor
            ``[B]``.
        """
        r = has_cxr.to(e.dtype)
        if bank_e.shape[0] == 0:  # no training stay had an X-ray: nothing to aggregate
            return e.new_zeros((e.shape[0], 0)), r
        similarity = self._kernel(e, bank_e, self.phi_ehr, self.epsilon[0])
        if bool(r.any()):
            similarity = (similarity + r.unsqueeze(1) * self._kernel(
                c, bank_c, self.phi_cxr, self.epsilon[1])) / (1 + r.unsqueeze(1))
        cut = torch.sigmoid(self.theta)
        edges = torch.relu(similarity - cut) + cut.detach() * (similarity > cut).to(e.dtype)
        if exclude_self:
            edges = edges * (1 - torch.eye(edges.shape[0], device=e.device, dtype=e.dtype))
        if edges.shape[1]:  # a stay with no X-ray and no edge keeps its most similar bank stay
            lonely = ((edges.sum(1) == 0) & (r == 0)).to(e.dtype).unsqueeze(1)
            nearest = torch.zeros_like(edges).scatter_(1, similarity.argmax(1, keepdim=True), 1.0)
            edges = edges + lonely * nearest * similarity
        k = edges.shape[1] if self.top_k == 0 else min(self.top_k, edges.shape[1])
        if k < edges.shape[1]:
            top = edges.topk(k, dim=1).indices
            edges = edges * torch.zeros_like(edges).scatter_(1, top, 1.0)
        total = (edges.sum(1) + r).clamp_min(1e-12)
        return edges / total.unsqueeze(1), r / total

    # ----- the bank ---------------------------------------------------------------------------------
    def build_bank(self, source, seed: int, device) -> None:
        """Choose the bank among the training stays of ``source`` that have an X-ray, then fill it.

        At most ``bank_size`` stays, drawn with a generator seeded by ``seed``; their features are
        computed by :meth:`refresh_bank`.
        """
        present = torch.as_tensor(source.part.cxr_present[source.rows])
        rows = torch.nonzero(present, as_tuple=False).squeeze(1)
        if rows.numel() > self.bank_size:
            generator = torch.Generator().manual_seed(int(seed))
            rows = rows[torch.randperm(rows.numel(), generator=generator)[:self.bank_size]]
        rows = rows.sort().values
        self._source, self._bank_rows = source, rows.numpy()
        stay_ids = source.part.stay_id[source.rows[self._bank_rows]]
        self.bank_stay_id = torch.as_tensor(stay_ids, dtype=torch.long, device=device)
        self.refresh_bank(device)

    @torch.no_grad()
    def refresh_bank(self, device, chunk: int = 256) -> None:
        """Recompute the bank's features with the current weights (eval mode, no gradient)."""
        if self._source is None:
            raise RuntimeError("M3CareNet.refresh_bank: no bank source; call build_bank first")
        was_training = self.training
        self.eval()
        try:
            ehr, cxr = [], []
            for start in range(0, len(self._bank_rows), chunk):
                batch = self._source[self._bank_rows[start:start + chunk]]
                batch = {k: v.to(device) for k, v in batch.items()}
                ehr.append(self.ehr_encoder(batch).pooled)
                cxr.append(self.cxr_encoder(batch).pooled)
            empty = torch.zeros(0, self.d, device=device)
            self.bank_ehr = torch.cat(ehr) if ehr else empty
            self.bank_cxr = torch.cat(cxr) if cxr else empty
            self.aggregate_bank()
        finally:
            self.train(was_training)

    @torch.no_grad()
    def aggregate_bank(self) -> None:
        """The first graph layer's input aggregate of every bank stay, over the bank-only graph."""
        has_cxr = torch.ones(len(self.bank_ehr), dtype=torch.bool, device=self.bank_ehr.device)
        weights, own = self.adjacency(self.bank_ehr, self.bank_cxr, has_cxr, self.bank_ehr,
                                      self.bank_cxr, exclude_self=True)
        self.bank_aggregate = weights @ self.bank_cxr + own.unsqueeze(1) * self.bank_cxr

    def on_fit_start(self, ctx, train) -> None:
        self.build_bank(train, ctx.seed, ctx.device)

    def on_train_epoch_start(self, ctx) -> None:
        self.refresh_bank(ctx.device)

    def on_fit_end(self, ctx) -> None:
        self.refresh_bank(ctx.device)  # the bank of the final (best) weights
        self._source = None            # the fitted module keeps no reference to the data

    def get_extra_state(self) -> dict:
        return {"ehr": self.bank_ehr, "cxr": self.bank_cxr, "aggregate": self.bank_aggregate,
                "stay_id": self.bank_stay_id}

    def set_extra_state(self, state: dict) -> None:
        self.bank_ehr, self.bank_cxr = state["ehr"], state["cxr"]
        self.bank_aggregate, self.bank_stay_id = state["aggregate"], state["stay_id"]

    # ----- forward ------------------------------------------------------------------------------------
    def impute(self, e: torch.Tensor, c: torch.Tensor, has_cxr: torch.Tensor) -> dict:
        """Graph representation of the X-ray from the bank, mixed with the stay's own when present."""
        weights, own = self.adjacency(e, c, has_cxr, self.bank_ehr, self.bank_cxr)
        act = torch.relu
        first = act(self.gcn1(weights @ self.bank_cxr + own.unsqueeze(1) * c))
        bank_first = act(self.gcn1(self.bank_aggregate))
        graph = act(self.gcn2(weights @ bank_first + own.unsqueeze(1) * first))
        gate_graph = torch.sigmoid(self.gate_graph(graph))
        share = gate_graph / (gate_graph + torch.sigmoid(self.gate_own(c)))
        mixed = share * graph + (1 - share) * c
        rep = torch.where(has_cxr.unsqueeze(1), mixed, graph)
        return {"cxr_repr": rep, "neighbour_weights": weights, "self_weight": own}

    def forward(self, batch: dict) -> dict:
        e = self.ehr_encoder(batch).pooled
        c, used = run_on_present(lambda sub: self.cxr_encoder(sub).pooled, batch,
                                 batch["cxr_present"], self.d, min_rows=2 if self.training else 1)
        imputed = self.impute(e, c, used)
        tokens = torch.stack([e, imputed["cxr_repr"]], dim=1) + self.type_embedding
        fused = self.interaction(tokens).flatten(1)
        stability = (self.phi_ehr(e).norm() - e.norm()).abs()
        rows = torch.nonzero(used, as_tuple=False).squeeze(1)
        if rows.numel():
            stability = stability + (self.phi_cxr(c[rows]).norm() - c[rows].norm()).abs()
        return {"logits": self.head(fused), "stability": stability, "cxr_used": used,
                "ehr_feature": e, "cxr_feature": c, **imputed}

    def loss(self, out: dict, batch: dict, ctx) -> torch.Tensor:
        """Task loss plus ``lambda_stability`` times the norm-stability term."""
        return task_loss(out["logits"], batch["y"], ctx.task) + self.lambda_stability * out["stability"]


@register("m3care")
class M3Care(StartsFromPretrained, TorchMethod):
    """M3Care: the absent X-ray's representation imputed from similar training stays.

    EHR encoder: a Transformer (``ehr_model``) or LSTM over the hourly values and mask; X-ray: an
    image encoder (``backbone``, ImageNet weights by default) or, on cached features, the
    standardised embedding through ``Linear -> ReLU``. Similarity to a fixed bank of training
    stays with an X-ray (at most ``bank_size``), two graph-convolution layers over the bank,
    an adaptive gate, a 2-layer Transformer over ``[EHR, X-ray]`` tokens with type embeddings,
    and an MLP head on both output tokens.

    Notes
    -----
    Paper and code (Zhang et al., KDD 2022; two notebooks in choczhang/M3Care): similarity is a
    learned mix of multi-bandwidth Gaussian kernels on raw and MLP-projected features, averaged
    over the modalities both stays have, thresholded by a learned ``sigmoid(theta)``; GCN layers
    impute the missing modality; a norm-stability term keeps the projections in scale. Kernel form
    unverified: ``kernel="additive"`` (the OV notebook, default, with its ``epsilon_init=-0.3``,
    ``theta_init=0``) or ``"multiplicative"`` (the ODIR notebook and the reference; its
    initialisation is ``epsilon_init=2, theta_init=2``).

    What the notebooks and the reference (CareBench) got wrong, and the fixes here: both notebooks
    zero the adjacency *row* of a stay lacking the modality, so it receives nothing (its
    "imputation" is a constant shared by every such stay); here neighbours must have an X-ray
    (column mask) and a stay's own placeholder is dropped (no self term without an X-ray). The
    reference's denominator capped similarities below its initial threshold (no edge ever
    survived), used the raw feature for stays with an X-ray and a gated bias for those without,
    applied the graph to the always-present EHR and had no interaction Transformer. The notebooks
    build the graph inside each batch, so test predictions depend on the batch: here neighbours
    come only from the fixed bank (in training too, the batch's stays are queries against the
    bank), and the bank's kernel statistics and bandwidths are those of the bank on both sides.
    Aggregation weights are normalised over (neighbours + self) and the ``top_k`` strongest edges
    kept (k = 31, the notebooks' batch size), so they do not grow with the bank (a deviation from
    the unnormalised notebook sum). A stay without an X-ray whose edges all fall below the
    threshold keeps its single most similar bank stay (weight = its similarity), so no stay is
    left with a constant imputation. The bank holds training stays with an X-ray only (stays
    without one never serve as neighbours under the column mask); a training stay in the bank is
    its own neighbour when it is a query; bank features are computed in eval mode at each epoch
    start and again with the final weights, and the bank's first-layer aggregate is computed on
    the bank-only graph at each refresh.

    Cached path: the mechanism is unchanged; the X-ray encoder is a projection of the frozen
    embedding, so X-ray fine-tuning is lost.

    Absent X-ray (``absent_cxr_policy = "neighbour_imputation"``): per stay, the X-ray token is
    the graph aggregate of the X-ray representations of its most similar bank stays, similarity
    measured on its EHR alone; its placeholder image is never encoded.
    """

    inputs = {"raw": frozenset({"ehr_ts", "cxr_img"}), "cached": frozenset({"ehr_emb", "cxr_emb"})}
    modalities = frozenset({"ehr", "cxr"})
    handles_missing_cxr = True
    absent_cxr_policy = "neighbour_imputation"
    hyperparameters = {**OWN_HEAD_HYPERPARAMETERS, "ehr_model": "transformer", "n_heads": 4,
                       "num_layers": 1, "bidirectional": True, "kernel": "additive",
                       "epsilon_init": -0.3, "theta_init": 0.0, "top_k": 31, "bank_size": 2000,
                       "lambda_stability": 1e-3, "backbone": "resnet50", "cxr_weights": "imagenet",
                       **AUGMENT_HYPERPARAMETERS}
    hyperparameter_choices = {"ehr_model": ("lstm", "transformer"),
                              "kernel": ("additive", "multiplicative"),
                              "backbone": ("resnet50", "small"), "cxr_weights": CXR_WEIGHTS}
    test_hyperparameters = {**TORCH_TEST_HYPERPARAMETERS, "n_heads": 2, "top_k": 5,
                            "backbone": "small", "cxr_weights": "random"}
    paper = ("Zhang C., Chu X., Ma L., Zhu Y., Wang Y., Wang J., Zhao J., M3Care: Learning with "
             "missing modalities in multimodal healthcare data, KDD 2022 (arXiv 2210.17292)")

    def build_module(self, spec: dict) -> M3CareNet:
        p = self.params
        self._check_heads()
        for key in ("top_k", "bank_size"):
            if p[key] < (0 if key == "top_k" else 1):
                raise HyperparameterError(f"method {self.name!r}: {key} must be "
                                          f"{'>= 0' if key == 'top_k' else '>= 1'}, got {p[key]}")
        if p["lambda_stability"] < 0:
            raise HyperparameterError(f"method {self.name!r}: lambda_stability must be >= 0")
        cached = spec["features"] == "cached"
        options = self.encoder_options()
        ehr = build_encoder("ehr", "ehr_emb" if cached else "ehr_ts", spec, p, **options)
        cxr = build_encoder("cxr", "cxr_emb" if cached else "cxr_img", spec, p, **options)
        return M3CareNet(ehr, cxr, spec["n_outputs"], p["hidden"], n_heads=p["n_heads"],
                         dropout=p["dropout"], kernel=p["kernel"], epsilon_init=p["epsilon_init"],
                         theta_init=p["theta_init"], top_k=p["top_k"],
                         lambda_stability=p["lambda_stability"], bank_size=p["bank_size"])
