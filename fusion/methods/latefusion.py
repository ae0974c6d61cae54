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
from fusion.modules import MLPHead, build_encoder, logit_of_mean_probability
from fusion.registry import HyperparameterError, register
from fusion.trainer import probabilities, task_loss

__all__ = ["LateFusion", "LateFusionNet"]


class LateFusionNet(nn.Module):
    """EHR and X-ray branches; ``logits`` are the logits of the mean present-modality probability.

    Parameters
    ----------
    ehr_encoder, cxr_encoder : nn.Module
        Map a batch to ``[B, out_dim]`` features.
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
        logits_ehr = self.ehr_head(self.ehr_encoder(batch))
        present = batch["cxr_present"]
        rows = torch.nonzero(present, as_tuple=False).squeeze(1)
        # Run the X-ray branch on the stays that have one. Batch norm cannot train on a single
        # image, so in training a batch with one X-ray leaves that X-ray out of the branch.
        used = present.clone()
        logits_cxr = torch.zeros_like(logits_ehr)
        if rows.numel() >= (2 if self.training else 1):
            sub = {k: batch[k][rows] for k in ("cxr", "cxr_emb", "cxr_present") if k in batch}
            logits_cxr = logits_cxr.index_copy(0, rows, self.cxr_head(self.cxr_encoder(sub)))
        else:
            used = torch.zeros_like(present)
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
class LateFusion(TorchMethod):
    """Decision-level late fusion by averaging the probabilities of the modalities present.

    EHR encoder: LSTM (``ehr_model=lstm``) or Transformer; X-ray encoder: ResNet-50 (or ``small``);
    on cached features each branch is an MLP over the cached embedding.

    Reference: decision-level (late) fusion as surveyed in Baltrušaitis et al., "Multimodal
    machine learning: a survey and taxonomy", IEEE TPAMI 2019; benchmarked as LateFusion in
    CareBench (arXiv 2602.23614).
    """

    inputs = {"raw": frozenset({"ehr_ts", "cxr_img"}), "cached": frozenset({"ehr_emb", "cxr_emb"})}
    modalities = frozenset({"ehr", "cxr"})
    handles_missing_cxr = True
    absent_cxr_policy = "ehr_only"
    hyperparameters = {**TORCH_HYPERPARAMETERS, "ehr_model": "lstm", "num_layers": 1,
                       "bidirectional": True, "n_heads": 4, "backbone": "resnet50"}
    hyperparameter_choices = {"ehr_model": ("lstm", "transformer"),
                              "backbone": ("resnet50", "small")}
    test_hyperparameters = {**TORCH_TEST_HYPERPARAMETERS, "backbone": "small"}
    paper = ("Baltrusaitis T., Ahuja C., Morency L.-P., Multimodal machine learning: a survey and "
             "taxonomy, IEEE TPAMI 41(2), 2019")

    def build_module(self, spec: dict) -> LateFusionNet:
        p = self.params
        if p["ehr_model"] == "transformer" and p["hidden"] % p["n_heads"]:
            raise HyperparameterError(f"method {self.name!r}: hidden ({p['hidden']}) must be "
                                      f"divisible by n_heads ({p['n_heads']})")
        cached = spec["features"] == "cached"
        ehr = build_encoder("ehr", "ehr_emb" if cached else "ehr_ts", spec, p)
        cxr = build_encoder("cxr", "cxr_emb" if cached else "cxr_img", spec, p)
        return LateFusionNet(ehr, cxr, spec["n_outputs"], spec["task"], head_layers=p["head_layers"],
                             hidden=p["hidden"], dropout=p["dropout"])
