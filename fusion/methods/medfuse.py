"""MedFuse: the EHR vector and the X-ray vector read as a sequence by a fusion LSTM.

A stay with an X-ray is the sequence ``[e, P(c)]``, a stay without one the sequence ``[e]``: the
fusion LSTM's state after the EHR step is the prediction state of a stay without an X-ray, so
absence is a shorter sequence, never a zero image. Training follows the paper's stages through the
trainer's staged fits: the EHR encoder with its own head first, then everything end to end.
"""

from __future__ import annotations

import torch
from torch import nn

from fusion.methods.base import OWN_HEAD_HYPERPARAMETERS, TORCH_TEST_HYPERPARAMETERS, TorchMethod
from fusion.methods.pretrained import StartsFromPretrained
from fusion.modules import AUGMENT_HYPERPARAMETERS, CXR_WEIGHTS, build_encoder, run_on_present
from fusion.registry import HyperparameterError, register
from fusion.tasks import task_loss
from fusion.trainer import FitStage

__all__ = ["MedFuse", "MedFuseNet"]

#: Output of the EHR head trained in the first stage (not a per-modality prediction afterwards).
EHR_STAGE_OUTPUT = "logits_ehr_stage"


class MedFuseNet(nn.Module):
    """EHR encoder, X-ray encoder, projection ``P``, fusion LSTM and head.

    Parameters
    ----------
    ehr_encoder, cxr_encoder : nn.Module
        Map a batch to an :class:`fusion.modules.EncoderOutput`.
    n_outputs : int
        C, from the task.
    fusion_hidden : int
        Hidden size of the fusion LSTM.
    staged : bool
        Train the EHR encoder alone first (:meth:`fit_stages`), then everything.
    """

    def __init__(self, ehr_encoder: nn.Module, cxr_encoder: nn.Module, n_outputs: int,
                 fusion_hidden: int = 512, staged: bool = True):
        super().__init__()
        self.staged = staged
        self.ehr_encoder, self.cxr_encoder = ehr_encoder, cxr_encoder
        dim = ehr_encoder.out_dim
        self.ehr_head = nn.Linear(dim, n_outputs)
        self.projection = nn.Linear(cxr_encoder.out_dim, dim)
        self.fusion = nn.LSTM(dim, fusion_hidden, batch_first=True)
        self.head = nn.Linear(fusion_hidden, n_outputs)

    def fuse(self, e: torch.Tensor, projected: torch.Tensor, used: torch.Tensor) -> torch.Tensor:
        """Final fusion state ``[B, fusion_hidden]``: after ``[e, P(c)]`` where ``used``, else ``[e]``.

        The second step runs only for the rows with an X-ray, continuing from their first state.
        """
        _, (h, c) = self.fusion(e.unsqueeze(1))
        h, c = h[0], c[0]
        rows = torch.nonzero(used, as_tuple=False).squeeze(1)
        if rows.numel() == 0:
            return h
        _, (h2, _) = self.fusion(projected[rows].unsqueeze(1),
                                 (h[rows].unsqueeze(0).contiguous(), c[rows].unsqueeze(0).contiguous()))
        return h.index_copy(0, rows, h2[0])

    def forward(self, batch: dict) -> dict:
        e = self.ehr_encoder(batch).pooled
        # Only present films are encoded; in training a lone film is left out (batch norm).
        c, used = run_on_present(lambda sub: self.cxr_encoder(sub).pooled, batch,
                                 batch["cxr_present"], self.cxr_encoder.out_dim,
                                 min_rows=2 if self.training else 1)
        projected = self.projection(c)
        return {"logits": self.head(self.fuse(e, projected, used)),
                EHR_STAGE_OUTPUT: self.ehr_head(e), "cxr_used": used}

    def fit_stages(self) -> list:
        """``ehr`` (EHR encoder and head, monitored on the EHR head) then ``fusion`` (all)."""
        fusion = FitStage("fusion")
        if not self.staged:
            return [fusion]
        return [FitStage("ehr", trainable=("ehr_encoder", "ehr_head"),
                         monitor_output=EHR_STAGE_OUTPUT), fusion]

    def loss(self, out: dict, batch: dict, ctx) -> torch.Tensor:
        """Task loss of the EHR head in the ``ehr`` stage, of the fused head otherwise."""
        key = EHR_STAGE_OUTPUT if ctx.stage.name == "ehr" else "logits"
        return task_loss(out[key], batch["y"], ctx.task)


@register("medfuse")
class MedFuse(StartsFromPretrained, TorchMethod):
    """MedFuse: a fusion LSTM over ``[EHR, X-ray]``, one step shorter when the X-ray is absent.

    EHR: an LSTM over the hourly values and observation mask (2 unidirectional layers, dropout
    0.3 on the feature); X-ray: a ResNet-50 (``backbone``; ImageNet weights by default) or, on
    cached features, the standardised embedding through ``Linear -> ReLU``. The X-ray vector is
    projected to the EHR size by ``P``; a 1-layer LSTM (``fusion_hidden``) reads ``[e, P(c)]``
    and a linear head maps its final state to the task's outputs (C from the task).

    Notes
    -----
    Paper and code (Hayat, Geras, Shamout, MLHC 2022; nyuad-cai/MedFuse): stage 1 pretrains the
    X-ray encoder on 14 radiology labels and the EHR LSTM on the task, stage 2 loads both and
    trains the fusion end to end on paired and EHR-only stays; fusion LSTM hidden 512 (tied to the
    ResNet-34 feature size in the code; whether the paper states it is unverified).

    This implementation: ``schedule="staged"`` (default) trains the EHR encoder with its own
    head on the fold's training stays (stage ``ehr``, early stopping on that head), then
    everything end to end (stage ``fusion``), through the trainer's staged fits;
    ``schedule="end_to_end"`` trains everything from the start (the reference's "MedFuse-RI").
    The X-ray stage on radiology labels is not run (the store holds no radiology labels): the
    raw-mode X-ray branch starts from ImageNet weights (``cxr_weights``); a ResNet-50 replaces
    the paper's ResNet-34, and the project's LSTM encoder (an input projection before the
    stacked LSTM, a ``Linear -> ReLU`` after it) the paper's plain stacked LSTM.

    What the reference (CareBench) got wrong and how this differs: it skipped stage 1, used a
    1-layer EHR LSTM and fusion hidden 256, took the output size from a setting instead of the
    task, and reported logits as predictions. Here the output size comes from the task, the EHR
    LSTM has 2 layers, ``fusion_hidden`` defaults to 512, and probabilities are probabilities.

    Cached path: the frozen embedding replaces the fine-tuned X-ray encoder; the variable-length
    fusion (the whole missing-modality mechanism) and the EHR stage are kept.

    Absent X-ray (``absent_cxr_policy = "shorter_sequence"``): per stay, the fusion LSTM stops
    after the EHR step; the X-ray branch and ``P`` never see the stay, so its image input cannot
    change its prediction and it gives them no gradient. The LoS task (not in the paper) uses C=7
    logits with softmax cross-entropy.
    """

    inputs = {"raw": frozenset({"ehr_ts", "cxr_img"}), "cached": frozenset({"ehr_emb", "cxr_emb"})}
    modalities = frozenset({"ehr", "cxr"})
    handles_missing_cxr = True
    absent_cxr_policy = "shorter_sequence"
    hyperparameters = {**OWN_HEAD_HYPERPARAMETERS, "weight_decay": 0.0, "dropout": 0.3, "num_layers": 2,
                       "bidirectional": False, "fusion_hidden": 512, "schedule": "staged",
                       "backbone": "resnet50", "cxr_weights": "imagenet",
                       **AUGMENT_HYPERPARAMETERS}
    hyperparameter_choices = {"schedule": ("staged", "end_to_end"),
                              "backbone": ("resnet50", "small"), "cxr_weights": CXR_WEIGHTS}
    test_hyperparameters = {**TORCH_TEST_HYPERPARAMETERS, "fusion_hidden": 8, "backbone": "small",
                            "cxr_weights": "random"}
    paper = ("Hayat N., Geras K. J., Shamout F. E., MedFuse: Multi-modal fusion with clinical "
             "time-series data and chest X-ray images, MLHC 2022 (arXiv 2207.07027)")

    def build_module(self, spec: dict) -> MedFuseNet:
        p = self.params
        if p["fusion_hidden"] < 1:
            raise HyperparameterError(f"method {self.name!r}: fusion_hidden must be >= 1, "
                                      f"got {p['fusion_hidden']}")
        cached = spec["features"] == "cached"
        options = self.encoder_options()
        params = {**p, "ehr_model": "lstm"}
        ehr = build_encoder("ehr", "ehr_emb" if cached else "ehr_ts", spec, params, **options)
        cxr = build_encoder("cxr", "cxr_emb" if cached else "cxr_img", spec, params, **options)
        return MedFuseNet(ehr, cxr, spec["n_outputs"], fusion_hidden=p["fusion_hidden"],
                          staged=p["schedule"] == "staged")
