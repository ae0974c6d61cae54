"""Unimodal baselines: EHR LSTM / Transformer, CXR ResNet-50, and MLP heads on cached embeddings.

On raw features each method runs its encoder end to end; on cached features the encoder is
replaced by the cached embedding of its modality (standardised with training statistics) followed
by a hidden layer, so ``lstm``, ``transformer`` and ``ehr-mlp`` coincide in cached mode, as do
``resnet`` and ``cxr-mlp``.

X-ray-only methods train and validate on the stays with an X-ray; for a stay without one they
predict the training prevalence (LoS: class frequencies) — see ``absent_cxr_policy``.

On raw features ``resnet`` starts from torchvision's ImageNet ResNet-50 weights by default
(``cxr_weights=imagenet``, as the reference does; the file is looked up offline, see
:mod:`fusion.modules`); ``cxr_weights=random`` trains it from a seeded random initialisation.
"""

from __future__ import annotations

from torch import nn

from fusion.methods.base import TORCH_HYPERPARAMETERS, TORCH_TEST_HYPERPARAMETERS, TorchMethod
from fusion.methods.pretrained import StartsFromPretrained
from fusion.modules import AUGMENT_HYPERPARAMETERS, CXR_WEIGHTS, MLPHead, build_encoder
from fusion.registry import HyperparameterError, register

__all__ = ["CXRMLP", "EHRMLP", "LSTMBaseline", "ResNetBaseline", "TransformerBaseline",
           "UnimodalNet"]


class UnimodalNet(nn.Module):
    """``head(encoder(batch))`` as a module returning ``{"logits": ...}``."""

    def __init__(self, encoder: nn.Module, head: nn.Module):
        super().__init__()
        self.encoder, self.head = encoder, head

    def forward(self, batch: dict) -> dict:
        return {"logits": self.head(self.encoder(batch).pooled)}


class _Unimodal(StartsFromPretrained, TorchMethod):
    """One encoder for one modality and a head."""

    modality = "ehr"
    ehr_model = "lstm"

    def build_module(self, spec: dict) -> UnimodalNet:
        kind = f"{self.modality}_emb" if spec["features"] == "cached" else (
            "ehr_ts" if self.modality == "ehr" else "cxr_img")
        params = {"ehr_model": self.ehr_model, **self.params}
        if self.ehr_model == "transformer" and params["hidden"] % params["n_heads"]:
            raise HyperparameterError(
                f"method {self.name!r}: hidden ({params['hidden']}) must be divisible by n_heads "
                f"({params['n_heads']})")
        encoder = build_encoder(self.modality, kind, spec, params, **self.encoder_options())
        head = MLPHead(encoder.out_dim, spec["n_outputs"], hidden=params["hidden"],
                       layers=params["head_layers"], dropout=params["dropout"])
        return UnimodalNet(encoder, head)


@register("lstm")
class LSTMBaseline(_Unimodal):
    """EHR-only (bi)LSTM over the hourly series (values and observation mask).

    Reference: the LSTM baseline of Harutyunyan et al., "Multitask learning and benchmarking with
    clinical time series data", Scientific Data 2019 (as used by MedFuse and CareBench).
    """

    inputs = {"raw": frozenset({"ehr_ts"}), "cached": frozenset({"ehr_emb"})}
    modalities = frozenset({"ehr"})
    handles_missing_cxr = True
    absent_cxr_policy = "not_used"
    hyperparameters = {**TORCH_HYPERPARAMETERS, "num_layers": 1, "bidirectional": True}
    test_hyperparameters = TORCH_TEST_HYPERPARAMETERS
    paper = ("Harutyunyan H. et al., Multitask learning and benchmarking with clinical time "
             "series data, Scientific Data 6:96, 2019")


@register("transformer")
class TransformerBaseline(_Unimodal):
    """EHR-only Transformer encoder (learned positions, mask-aware mean pooling).

    Reference: Vaswani et al., "Attention is all you need", NeurIPS 2017; EHR baseline of CareBench.
    """

    inputs = {"raw": frozenset({"ehr_ts"}), "cached": frozenset({"ehr_emb"})}
    modalities = frozenset({"ehr"})
    handles_missing_cxr = True
    absent_cxr_policy = "not_used"
    ehr_model = "transformer"
    hyperparameters = {**TORCH_HYPERPARAMETERS, "n_heads": 4, "num_layers": 1}
    test_hyperparameters = TORCH_TEST_HYPERPARAMETERS
    paper = "Vaswani A. et al., Attention is all you need, NeurIPS 2017"


@register("resnet")
class ResNetBaseline(_Unimodal):
    """CXR-only ResNet-50 (1-channel input; ImageNet or random weights); ``backbone=small`` for tiny tests.

    Reference: He et al., "Deep residual learning for image recognition", CVPR 2016.
    """

    inputs = {"raw": frozenset({"cxr_img"}), "cached": frozenset({"cxr_emb"})}
    modalities = frozenset({"cxr"})
    modality = "cxr"
    handles_missing_cxr = False
    absent_cxr_policy = "train_prevalence"
    hyperparameters = {**TORCH_HYPERPARAMETERS, "backbone": "resnet50", "cxr_weights": "imagenet",
                       **AUGMENT_HYPERPARAMETERS}
    hyperparameter_choices = {"backbone": ("resnet50", "small"), "cxr_weights": CXR_WEIGHTS}
    test_hyperparameters = {**TORCH_TEST_HYPERPARAMETERS, "backbone": "small", "cxr_weights": "random"}
    paper = "He K. et al., Deep residual learning for image recognition, CVPR 2016"


@register("ehr-mlp")
class EHRMLP(_Unimodal):
    """MLP head on a cached EHR embedding."""

    inputs = {"cached": frozenset({"ehr_emb"})}
    modalities = frozenset({"ehr"})
    handles_missing_cxr = True
    absent_cxr_policy = "not_used"
    paper = "baseline: multilayer perceptron on a cached EHR embedding"


@register("cxr-mlp")
class CXRMLP(_Unimodal):
    """MLP head on a cached X-ray embedding (training prevalence for stays without X-ray)."""

    inputs = {"cached": frozenset({"cxr_emb"})}
    modalities = frozenset({"cxr"})
    modality = "cxr"
    handles_missing_cxr = False
    absent_cxr_policy = "train_prevalence"
    paper = "baseline: multilayer perceptron on a cached chest X-ray embedding"
