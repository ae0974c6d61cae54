"""AUG: sustained boosting with classifiers added to the weaker modality during training.

Each modality has a base embedding and a list of added learners on its encoder output; every
term goes through one classifier shared by both modalities and by every learner, and the terms
are summed. At check epochs the adaptive classifier assignment (ACA) compares the modalities'
training confidence and adds a learner to the weaker one. Each batch takes one optimiser step per
modality (EHR, then X-ray) from features computed once.
"""

from __future__ import annotations

import torch
from torch import nn

from fusion.methods.base import TORCH_HYPERPARAMETERS, TORCH_TEST_HYPERPARAMETERS, TorchMethod
from fusion.methods.pretrained import StartsFromPretrained
from fusion.modules import (
    AUGMENT_HYPERPARAMETERS, CXR_WEIGHTS, EmbeddingInput, EncoderOutput, build_encoder,
    run_on_present,
)
from fusion.registry import HyperparameterError, register
from fusion.tasks import get_task, true_class_probability

__all__ = ["AUG", "AUGNet", "aca_assignment", "aug_modality_loss", "check_interval_for",
           "is_check_epoch"]

MODALITIES = ("ehr", "cxr")


def check_interval_for(setting: int, max_epochs: int) -> int:
    """Epochs between two assignment checks: ``setting``, or the authors' rule when it is 0.

    The authors' rule is ``max_epochs // 10`` when training lasts more than 10 epochs, else 1.
    """
    if setting > 0:
        return setting
    return max_epochs // 10 if max_epochs > 10 else 1


def is_check_epoch(epoch: int, interval: int) -> bool:
    """Whether ACA runs at the end of 1-based ``epoch``: the first and every ``interval``-th."""
    return epoch == 1 or epoch % interval == 0


def aca_assignment(score_ehr: float, score_cxr: float, lam: float, margin: float) -> str | None:
    """The modality that gets a new learner, or None.

    ``rho = score_ehr / score_cxr``: above ``lam + margin`` the X-ray is the weaker modality, below
    ``lam - margin`` the EHR is; inside the band (or when a score is not positive) nothing is added.
    """
    if not (score_cxr > 0 and score_ehr > 0):
        return None
    rho = score_ehr / score_cxr
    if rho > lam + margin:
        return "cxr"
    if rho < lam - margin:
        return "ehr"
    return None


def _elementwise_loss(logits: torch.Tensor, y: torch.Tensor, task) -> torch.Tensor:
    """Per-output loss: BCE per label ``[B, C]`` or cross-entropy ``[B, 1]`` (multiclass)."""
    if get_task(task).multiclass:
        return nn.functional.cross_entropy(logits, y, reduction="none").unsqueeze(1)
    return nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none")


def aug_modality_loss(logits: torch.Tensor, prev: torch.Tensor | None, new: torch.Tensor | None,
                      y: torch.Tensor, task, residual_weight: float = 0.5,
                      weight: torch.Tensor | None = None) -> torch.Tensor:
    """AUG's loss of one modality, averaged over the stays (weighted by ``weight``).

    Without added learners (``prev`` is None) it is the task loss of ``logits``. Otherwise
    ``L(logits) + L(prev) + (1 - r * q_prev) * L(new)``: ``prev`` are the logits without the newest
    learner, ``new`` that learner's logits, ``q_prev`` the (detached) probability ``prev`` gives to
    the true label and ``r`` = ``residual_weight``. For softmax this equals the authors'
    ``CE(new, y) - r * CE(new, y * softmax(prev))``; for sigmoid tasks each label is a two-class
    softmax, so the term is a positive weight on a BCE and the loss is >= 0 for any logits.

    Parameters
    ----------
    logits, prev, new : Tensor
        ``[B, C]`` (``prev`` and ``new`` None together).
    y : Tensor
        Targets (float ``[B, C]``, or int64 ``[B]`` for multiclass).
    task : str or TaskSpec
    residual_weight : float
        ``r`` in [0, 1].
    weight : Tensor, optional
        ``[B]`` stay weights (0/1: stays this modality saw); 0 for all gives 0.
    """
    loss = _elementwise_loss(logits, y, task)
    if prev is not None:
        q_prev = true_class_probability(prev.detach(), y, task)
        loss = (loss + _elementwise_loss(prev, y, task)
                + (1 - residual_weight * q_prev) * _elementwise_loss(new, y, task))
    per_stay = loss.mean(dim=1)
    if weight is None:
        return per_stay.mean()
    weight = weight.to(per_stay.dtype)
    return (per_stay * weight).sum() / weight.sum().clamp_min(1.0)


def _learner(in_dim: int, hidden: int) -> nn.Sequential:
    """``ReLU(Linear(in_dim -> hidden))``, Xavier-normal weight and zero bias (authors' init)."""
    layer = nn.Linear(in_dim, hidden)
    nn.init.xavier_normal_(layer.weight)
    nn.init.zeros_(layer.bias)
    return nn.Sequential(layer, nn.ReLU())


def _pooled(encoder: nn.Module, batch: dict) -> torch.Tensor:
    out = encoder(batch)
    return out.pooled if isinstance(out, EncoderOutput) else out


class _ConfidenceScore:
    """Sums of the true-label probability over an epoch, per cell (label x class, or class).

    ``mean`` is the mean over every stay and label the modality saw; ``balanced`` the mean of the
    per-cell means (each class of each label weighs the same, so a rare positive class counts).
    """

    def __init__(self, n_outputs: int, multiclass: bool):
        self.multiclass = multiclass
        n_cells = n_outputs if multiclass else 2 * n_outputs
        self.sums = torch.zeros(n_cells, dtype=torch.float64)
        self.counts = torch.zeros(n_cells, dtype=torch.float64)

    def add(self, q: torch.Tensor, y: torch.Tensor) -> None:
        """Add ``q`` (:func:`fusion.tasks.true_class_probability` of some stays) and their ``y``."""
        if self.multiclass:
            cells = y.long()
        else:
            cells = torch.arange(q.shape[1], device=q.device) * 2 + y.long()
        cells, q = cells.reshape(-1).cpu(), q.detach().reshape(-1).double().cpu()
        self.sums.index_add_(0, cells, q)
        self.counts.index_add_(0, cells, torch.ones_like(q))

    def value(self, kind: str) -> float:
        """The epoch's score (``mean`` or ``balanced``); NaN when the modality saw no stay."""
        if float(self.counts.sum()) == 0:
            return float("nan")
        if kind == "mean":
            return float(self.sums.sum() / self.counts.sum())
        seen = self.counts > 0
        return float((self.sums[seen] / self.counts[seen]).mean())


class AUGNet(nn.Module):
    """Encoders, per-modality base embeddings and learners, a shared classifier; ACA at epoch ends.

    Parameters
    ----------
    ehr_encoder, cxr_encoder : nn.Module
        Map a batch to an :class:`fusion.modules.EncoderOutput` or a tensor ``[B, out_dim]``.
    n_outputs : int
    task : str
    hidden : int
        Width of the base embeddings and learners (the shared classifier's input).
    alpha : float
        Weight of the EHR logits in the fused logits, in (0, 1].
    lam, margin : float
        ACA threshold and band.
    check_interval : int
        Epochs between checks (0: the authors' rule, see :func:`check_interval_for`).
    residual_weight : float
        ``r`` of :func:`aug_modality_loss`.
    aca_score : str
        ``mean`` or ``balanced`` (see :class:`_ConfidenceScore`).
    frozen_learners : bool
        Added learners are not trained (the authors' release).
    max_learners : int
        Most learners per modality (0: no limit).
    """

    def __init__(self, ehr_encoder: nn.Module, cxr_encoder: nn.Module, n_outputs: int, task: str, *,
                 hidden: int = 256, alpha: float = 0.4, lam: float = 1.0, margin: float = 0.01,
                 check_interval: int = 0, residual_weight: float = 0.5, aca_score: str = "mean",
                 frozen_learners: bool = False, max_learners: int = 0):
        super().__init__()
        self.task, self.hidden = task, hidden
        self.multiclass = get_task(task).multiclass
        self.alpha, self.lam, self.margin = alpha, lam, margin
        self.check_interval, self.residual_weight = check_interval, residual_weight
        self.aca_score, self.frozen_learners = aca_score, frozen_learners
        self.max_learners = max_learners
        self.encoders = nn.ModuleDict({"ehr": ehr_encoder, "cxr": cxr_encoder})
        self.base = nn.ModuleDict({m: _learner(self.encoders[m].out_dim, hidden)
                                   for m in MODALITIES})
        self.learners = nn.ModuleDict({m: nn.ModuleList() for m in MODALITIES})
        self.classifier = nn.Linear(hidden, n_outputs)
        nn.init.xavier_normal_(self.classifier.weight)
        nn.init.zeros_(self.classifier.bias)
        self.n_outputs = n_outputs
        self._scores = self._new_scores()

    def _new_scores(self) -> dict:
        return {m: _ConfidenceScore(self.n_outputs, self.multiclass) for m in MODALITIES}

    # ----- architecture ---------------------------------------------------------------------------
    def add_learner(self, modality: str) -> None:
        """Append a learner to ``modality`` (trained unless ``frozen_learners``)."""
        learner = _learner(self.encoders[modality].out_dim, self.hidden)
        learner.to(self.classifier.weight.device)
        if self.frozen_learners:
            learner.requires_grad_(False)
        self.learners[modality].append(learner)

    def get_extra_state(self) -> dict:
        return {m: len(self.learners[m]) for m in MODALITIES}

    def set_extra_state(self, state: dict) -> None:
        for m in MODALITIES:
            while len(self.learners[m]) > state[m]:
                del self.learners[m][len(self.learners[m]) - 1]
            while len(self.learners[m]) < state[m]:
                self.add_learner(m)

    # ----- forward --------------------------------------------------------------------------------
    def features(self, batch: dict) -> dict:
        """Encoder outputs: ``{"ehr": (x, None), "cxr": (x, used)}``; X-ray rows only where used."""
        x_ehr = _pooled(self.encoders["ehr"], batch)
        encoder = self.encoders["cxr"]
        x_cxr, used = run_on_present(lambda sub: _pooled(encoder, sub), batch, batch["cxr_present"],
                                     encoder.out_dim, min_rows=2 if self.training else 1)
        return {"ehr": (x_ehr, None), "cxr": (x_cxr, used)}

    def modality_logits(self, modality: str, x: torch.Tensor) -> tuple:
        """``(logits, prev, new)``: all terms, all but the newest learner's, the newest one's."""
        terms = [self.classifier(self.base[modality](x))]
        terms += [self.classifier(learner(x)) for learner in self.learners[modality]]
        logits = torch.stack(terms).sum(dim=0) if len(terms) > 1 else terms[0]
        if len(terms) == 1:
            return logits, None, None
        prev = torch.stack(terms[:-1]).sum(dim=0) if len(terms) > 2 else terms[0]
        return logits, prev, terms[-1]

    def fuse(self, logits_ehr: torch.Tensor, logits_cxr: torch.Tensor, used: torch.Tensor):
        """``alpha * z_EHR + (1 - alpha) * z_CXR``, renormalised over the modalities present."""
        w_cxr = ((1 - self.alpha) * used.to(logits_ehr.dtype)).unsqueeze(1)
        return (self.alpha * logits_ehr + w_cxr * logits_cxr) / (self.alpha + w_cxr)

    def forward(self, batch: dict) -> dict:
        features = self.features(batch)
        out = {}
        for m in MODALITIES:
            logits, prev, new = self.modality_logits(m, features[m][0])
            out[f"logits_{m}"] = logits
            if prev is not None:
                out[f"prev_{m}"], out[f"new_{m}"] = prev, new
        used = features["cxr"][1]
        out["cxr_used"] = used
        out["logits"] = self.fuse(out["logits_ehr"], out["logits_cxr"], used)
        return out

    def _modality_loss(self, modality: str, logits, prev, new, y, weight) -> torch.Tensor:
        return aug_modality_loss(logits, prev, new, y, self.task, self.residual_weight, weight)

    def loss(self, out: dict, batch: dict, ctx) -> torch.Tensor:
        """Sum of the two modalities' losses (the X-ray's over the stays whose X-ray was used)."""
        weights = {"ehr": None, "cxr": out["cxr_used"]}
        return sum(self._modality_loss(m, out[f"logits_{m}"], out.get(f"prev_{m}"),
                                       out.get(f"new_{m}"), batch["y"], weights[m])
                   for m in MODALITIES)

    # ----- training -------------------------------------------------------------------------------
    def modality_step(self, modality: str, x: torch.Tensor, y: torch.Tensor, weight, ctx) -> tuple:
        """One optimiser step on one modality's loss; returns ``(loss, logits)`` (detached).

        Gradients are set to None before and after, so parameters this loss does not reach (the
        other modality's) are skipped by the optimiser: no momentum or weight decay moves them.
        """
        logits, prev, new = self.modality_logits(modality, x)
        loss = self._modality_loss(modality, logits, prev, new, y, weight)
        for optimizer in ctx.optimizers:
            optimizer.zero_grad(set_to_none=True)
        ctx.backward(loss)
        for optimizer in ctx.optimizers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return loss.detach(), logits.detach()

    def training_step(self, batch: dict, ctx) -> dict:
        """Both encoders once; an EHR step, then an X-ray step on the stays with an X-ray."""
        features = self.features(batch)
        y = batch["y"]
        outputs = {"loss": torch.zeros((), device=y.device), "cxr_used": features["cxr"][1]}
        for m in MODALITIES:
            x, used = features[m]
            if used is not None and not bool(used.any()):
                continue  # no X-ray in this batch: no X-ray step
            loss, logits = self.modality_step(m, x, y, used, ctx)
            outputs["loss"] = outputs["loss"] + loss
            outputs[f"logits_{m}"] = logits
        return outputs

    def on_train_epoch_start(self, ctx) -> None:
        self._scores = self._new_scores()

    def on_train_batch_end(self, ctx, outputs: dict, batch: dict) -> None:
        """Add the batch's true-label probabilities to each modality's epoch score."""
        y = batch["y"]
        for m in MODALITIES:
            if f"logits_{m}" not in outputs:
                continue
            q = true_class_probability(outputs[f"logits_{m}"], y, self.task)
            rows = outputs["cxr_used"] if m == "cxr" else slice(None)
            self._scores[m].add(q[rows], y[rows])

    def on_train_epoch_end(self, ctx) -> None:
        """At check epochs, add a learner to the modality :func:`aca_assignment` names."""
        scores = {m: self._scores[m].value(self.aca_score) for m in MODALITIES}
        interval = check_interval_for(self.check_interval, ctx.max_epochs)
        if is_check_epoch(ctx.epoch, interval):
            target = aca_assignment(scores["ehr"], scores["cxr"], self.lam, self.margin)
            full = self.max_learners > 0 and target is not None \
                and len(self.learners[target]) >= self.max_learners
            if target is not None and not full:
                self.add_learner(target)
        for m in MODALITIES:
            ctx.log(f"aug_score_{m}", scores[m])
            ctx.log(f"aug_learners_{m}", len(self.learners[m]))


@register("aug")
class AUG(StartsFromPretrained, TorchMethod):
    """AUG: sustained boosting and adaptive classifier assignment between EHR and X-ray.

    Each modality m has a base embedding ``ReLU(Linear(x_m))`` and added learners of the same form
    on its encoder output ``x_m``; one classifier ``C`` shared by both modalities and all learners
    gives ``z_m = C(base_m(x_m)) + sum_j C(learner_m^j(x_m))``. Prediction: ``alpha * z_EHR +
    (1 - alpha) * z_CXR`` (renormalised over the modalities present). Each batch takes an EHR step
    and then an X-ray step (one optimiser, gradients set to None in between). At the end of the
    first epoch and of every ``check_interval``-th, ACA compares the modalities' mean training
    confidence: ``rho = s_EHR / s_CXR > lam + margin`` adds a learner to the X-ray, ``< lam -
    margin`` to the EHR.

    Raw features: an EHR LSTM or Transformer and an X-ray ResNet-50 (or ``backbone=small``) as
    encoders. Cached features: the standardised embeddings are the encoder outputs.

    Notes
    -----
    Paper and code: Jiang, Huang, Yang, NeurIPS 2025 (arXiv 2502.20120); authors' code
    ``njustkmg/NeurIPS25-AUG`` (CREMA-D only). The mechanism follows the code: learners on the
    encoder feature, one shared classifier, the newest-learner loss ``CE(z) + CE(z_prev) +
    CE(z_new) - 0.5 CE(z_new, y * softmax(z_prev))``, ACA on training confidence at epoch 0 and
    every ``epochs/10`` epochs, two steps per batch. Defaults are the code's: ``alpha`` 0.4 (weight
    of the first modality; EHR plays that role here), ``lam`` 1.0, ``margin`` 0.01,
    ``check_interval`` 0 (the code's ``epochs/10`` rule, 1 for 10 epochs or fewer),
    ``residual_weight`` 0.5 (a code comment says 0.2: set it to use that). The optimiser is the
    project's AdamW (lr, weight decay) rather than the code's SGD (lr 1e-2, momentum 0.9).

    Added learners: in the authors' release and in the reference toolkit (CareBench) they are
    created after the optimiser and never handed to it, so they stay at their random
    initialisation. Here every added learner is trained: the trainer adds its parameters to the
    optimiser as a new parameter group with the optimiser's learning rate and weight decay.
    ``official_frozen_learners=true`` reproduces the release (learners frozen; gradients still flow
    through them to the classifier and encoders).

    What the reference got wrong and the fixes: its sigmoid residual term ``-0.5 BCE(z_new,
    y * sigmoid(z_prev))`` is unbounded below for positives; here each label is a two-class
    softmax, giving ``(1 - 0.5 q_prev) BCE(z_new, y)`` with ``q_prev = y p + (1 - y)(1 - p)``
    (>= 0 for any logits, :func:`aug_modality_loss`). Its multiclass term was a full-distribution
    KL; here the code's true-class reweighting. It fed zero images for missing films.

    ACA score (``aca_score``): ``mean`` (default) is the mean true-label probability over the stays
    and labels each modality saw, which equals the code's sum ratio when every stay has both
    modalities; ``balanced`` averages per label and class, so that the rare positives of mortality
    count (with plain means negatives dominate and rho stays near 1). ``max_learners`` caps the
    learners per modality (0: no cap, as the code); the counts are logged per epoch
    (``aug_learners_ehr``/``_cxr`` in the training history).

    Cached features keep the boosting and the assignment, which live in the heads; lost is the
    co-adaptation of the encoders (the embeddings are frozen), so boosting only adds classifier
    capacity there.

    Absent X-ray (the authors' code has no missing modality; ``absent_cxr_policy = "ehr_only"``):
    a stay without a film is masked out of the X-ray loss, step and ACA score (scores are means over
    the stays each modality saw), and is predicted from the EHR logits alone (``alpha``
    renormalised over the modalities present). No zero image is ever encoded.
    """

    inputs = {"raw": frozenset({"ehr_ts", "cxr_img"}), "cached": frozenset({"ehr_emb", "cxr_emb"})}
    modalities = frozenset({"ehr", "cxr"})
    handles_missing_cxr = True
    absent_cxr_policy = "ehr_only"
    hyperparameters = {**{k: v for k, v in TORCH_HYPERPARAMETERS.items() if k != "head_layers"},
                       "ehr_model": "lstm", "num_layers": 1, "bidirectional": True, "n_heads": 4,
                       "backbone": "resnet50", "cxr_weights": "imagenet", "alpha": 0.4, "lam": 1.0,
                       "margin": 0.01, "check_interval": 0, "residual_weight": 0.5,
                       "aca_score": "mean", "official_frozen_learners": False, "max_learners": 0,
                       **AUGMENT_HYPERPARAMETERS}
    hyperparameter_choices = {"ehr_model": ("lstm", "transformer"),
                              "backbone": ("resnet50", "small"), "cxr_weights": CXR_WEIGHTS,
                              "aca_score": ("mean", "balanced")}
    test_hyperparameters = {**TORCH_TEST_HYPERPARAMETERS, "backbone": "small",
                            "cxr_weights": "random", "check_interval": 1}
    paper = ("Jiang J., Huang L., Yang Y., Rethinking Multimodal Learning from the Perspective of "
             "Mitigating Classification Ability Disproportion, NeurIPS 2025, arXiv 2502.20120")

    def _check_params(self) -> None:
        super()._check_params()
        p = self.params
        if not 0 < p["alpha"] <= 1:
            raise HyperparameterError(f"method {self.name!r}: alpha (weight of the EHR logits) "
                                      f"must be in (0, 1], got {p['alpha']}")
        if not 0 <= p["residual_weight"] <= 1:
            raise HyperparameterError(f"method {self.name!r}: residual_weight must be in [0, 1] "
                                      f"(the loss stays >= 0), got {p['residual_weight']}")
        for key in ("margin", "check_interval", "max_learners"):
            if p[key] < 0:
                raise HyperparameterError(f"method {self.name!r}: {key} must be >= 0, got {p[key]}")
        if p["lam"] <= 0:
            raise HyperparameterError(f"method {self.name!r}: lam must be > 0, got {p['lam']}")

    def build_module(self, spec: dict) -> AUGNet:
        p = self.params
        if spec["features"] == "cached":
            ehr = EmbeddingInput("ehr_emb", spec["ehr_dim"])
            cxr = EmbeddingInput("cxr_emb", spec["cxr_dim"])
        else:
            if p["ehr_model"] == "transformer":
                self._check_heads()
            options = self.encoder_options()
            ehr = build_encoder("ehr", "ehr_ts", spec, p, **options)
            cxr = build_encoder("cxr", "cxr_img", spec, p, **options)
        return AUGNet(ehr, cxr, spec["n_outputs"], spec["task"], hidden=p["hidden"],
                      alpha=p["alpha"], lam=p["lam"], margin=p["margin"],
                      check_interval=p["check_interval"], residual_weight=p["residual_weight"],
                      aca_score=p["aca_score"], frozen_learners=p["official_frozen_learners"],
                      max_learners=p["max_learners"])
