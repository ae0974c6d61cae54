"""Neural late fusion: one encoder and head per modality, predictions averaged over the present ones.

The EHR branch predicts for every stay; the X-ray branch only for stays with an X-ray. The fused
probability is the mean of the probabilities of the modalities present, so a stay without an
X-ray gets the EHR prediction (no zero image is ever classified). Each branch is trained with its
own task loss (the X-ray loss over the stays with an X-ray), and early stopping monitors the fused
prediction.
"""

from __future__ import annotations

import torch
from torch import nn

from fusion.methods.base import TORCH_HYPERPARAMETERS, TORCH_TEST_HYPERPARAMETERS, TorchMethod
from fusion.methods.pretrained import StartsFromPretrained
from fusion.modules import (
    AUGMENT_HYPERPARAMETERS, CXR_WEIGHTS, MLPHead, build_encoder, run_on_present,
)
from fusion.registry import register
from fusion.tasks import logit_of_mean_probability, probabilities, task_loss

__all__ = ["LateFusion", "LateFusionNet"]


class LateFusionNet(nn.Module):
    """EHR and X-ray branches; ``logits`` are the logits of the mean present-modality probability.

    Parameters
    ----------
    ehr_encoder, cxr_encoder : nn.Module
        Map a batch to an :class:`fusion.modules.EncoderOutput` (``pooled`` ``[B, out_dim]``).
    n_outputs : int
    task : str
    head_layers, hidden : int
    dropout : float
    """

    def __init__(self, ehr_encoder: nn.Module, cxr_encoder: nn.Module, n_outputs: int, task: str,
                 head_layers: int = 0, hidden: int = 256, dropout: float = 0.2):
        super().__init__()
        self.task = task
        self.ehr_encoder, self.cxr_encoder = ehr_encoder, cxr_encoder
        self.ehr_head = MLPHead(ehr_encoder.out_dim, n_outputs, hidden, head_layers, dropout)
        self.cxr_head = MLPHead(cxr_encoder.out_dim, n_outputs, hidden, head_layers, dropout)

    def forward(self, batch: dict) -> dict:
        logits_ehr = self.ehr_head(self.ehr_encoder(batch).pooled)
        # The X-ray branch sees only the stays that have an X-ray. Batch norm cannot train on a
        # single image, so in training a batch with one X-ray leaves that X-ray out of the branch.
        logits_cxr, used = run_on_present(
            lambda sub: self.cxr_head(self.cxr_encoder(sub).pooled), batch, batch["cxr_present"],
            logits_ehr.shape[1], min_rows=2 if self.training else 1)
        weight_cxr = used.to(logits_ehr.dtype)
        logits = logit_of_mean_probability(
            [probabilities(logits_ehr, self.task), probabilities(logits_cxr, self.task)],
            [torch.ones_like(weight_cxr), weight_cxr], self.task)
        return {"logits": logits, "logits_ehr": logits_ehr, "logits_cxr": logits_cxr,
                "cxr_used": used}

    def loss(self, out: dict, batch: dict, ctx) -> torch.Tensor:
        """EHR loss over all stays plus X-ray loss over the stays whose X-ray was used."""
        task = ctx.task
        return (task_loss(out["logits_ehr"], batch["y"], task)
                + task_loss(out["logits_cxr"], batch["y"], task, weight=out["cxr_used"]))


@register("latefusion")
class LateFusion(StartsFromPretrained, TorchMethod):
    """Decision-level late fusion by averaging the probabilities of the modalities present.

    EHR encoder: LSTM (``ehr_model=lstm``) or Transformer; X-ray encoder: ResNet-50 from ImageNet
    weights (``cxr_weights=imagenet``, the default) or random ones, or ``backbone=small``; on
    cached features each branch is an MLP over the cached embedding.

    Reference: decision-level (late) fusion as surveyed in Baltrušaitis et al., "Multimodal
    machine learning: a survey and taxonomy", IEEE TPAMI 2019; benchmarked as LateFusion in
    CareBench (arXiv 2602.23614).
    """

    inputs = {"raw": frozenset({"ehr_ts", "cxr_img"}), "cached": frozenset({"ehr_emb", "cxr_emb"})}
    modalities = frozenset({"ehr", "cxr"})
    handles_missing_cxr = True
    absent_cxr_policy = "ehr_only"
    hyperparameters = {**TORCH_HYPERPARAMETERS, "ehr_model": "lstm", "num_layers": 1,
                       "bidirectional": True, "n_heads": 4, "backbone": "resnet50",
                       "cxr_weights": "imagenet", **AUGMENT_HYPERPARAMETERS}
    hyperparameter_choices = {"ehr_model": ("lstm", "transformer"),
                              "backbone": ("resnet50", "small"), "cxr_weights": CXR_WEIGHTS}
    test_hyperparameters = {**TORCH_TEST_HYPERPARAMETERS, "backbone": "small", "cxr_weights": "random"}
    paper = ("Baltrusaitis T., Ahuja C., Morency L.-P., Multimodal machine learning: a survey and "
             "taxonomy, IEEE TPAMI 41(2), 2019")

    def build_module(self, spec: dict) -> LateFusionNet:
        p = self.params
        if p["ehr_model"] == "transformer":
            self._check_heads()
        cached = spec["features"] == "cached"
        options = self.encoder_options()
        ehr = build_encoder("ehr", "ehr_emb" if cached else "ehr_ts", spec, p, **options)
        cxr = build_encoder("cxr", "cxr_emb" if cached else "cxr_img", spec, p, **options)
        return LateFusionNet(ehr, cxr, spec["n_outputs"], spec["task"], head_layers=p["head_layers"],
                             hidden=p["hidden"], dropout=p["dropout"])
