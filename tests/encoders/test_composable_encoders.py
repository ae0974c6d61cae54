"""Composable encoders: pooled + per-hour outputs, staged image backbones, ImageNet weights offline,
and running the X-ray branch only on the stays that have an X-ray."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from cbstore.errors import CbstoreError
from encoders.errors import WeightsNotFoundError
from fusion.modules import (
    IMAGENET_WEIGHTS, EHRLSTMEncoder, EHRTransformerEncoder, EncoderOutput, PresentOnly,
    ResNet50Backbone, SmallCNN, build_encoder, run_on_present,
)
from fusion.registry import HyperparameterError

torch.set_num_threads(1)

IMAGENET_FILE = "resnet50-0676ba61.pth"


@pytest.fixture(scope="module")
def imagenet_dir(tmp_path_factory):
    """A stand-in for torchvision's ImageNet file: a seeded random ResNet-50 state dict (3 channels)."""
    import torchvision

    folder = tmp_path_factory.mktemp("weights")
    torch.manual_seed(11)
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), folder / IMAGENET_FILE)
    return folder


def _ehr_batch(b=3, t=5, f=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"ehr": torch.randn(b, t, f, generator=g), "ehr_mask": torch.ones(b, t, f)}


def test_lstm_returns_pooled_and_per_hour_sequence():
    torch.manual_seed(0)
    enc = EHRLSTMEncoder(4, hidden=6, bidirectional=False, dropout=0.0).eval()
    out = enc(_ehr_batch())
    assert isinstance(out, EncoderOutput)
    assert out.pooled.shape == (3, 6) and out.sequence.shape == (3, 5, 6) and out.valid.all()
    # one direction, no dropout: the last hour's vector is the pooled one
    assert torch.allclose(out.sequence[:, -1], out.pooled, atol=1e-6)
    both = EHRLSTMEncoder(4, hidden=6).eval()(_ehr_batch())
    assert both.pooled.shape == (3, 6) and both.sequence.shape == (3, 5, 6)


def test_transformer_pools_the_valid_hours_of_its_sequence():
    torch.manual_seed(0)
    enc = EHRTransformerEncoder(4, d_model=8, n_heads=2, dropout=0.0).eval()
    batch = _ehr_batch()
    batch["ehr_valid"] = torch.tensor([[True] * 5, [True, True, False, False, False], [True] * 5])
    out = enc(batch)
    assert out.sequence.shape == (3, 5, 8) and torch.equal(out.valid, batch["ehr_valid"])
    assert torch.allclose(out.pooled[1], out.sequence[1, :2].mean(dim=0), atol=1e-6)
    with pytest.raises(HyperparameterError, match="longer than the transformer's max_len 3"):
        EHRTransformerEncoder(4, d_model=8, n_heads=2, max_len=3)(batch)


@pytest.mark.parametrize("backbone", [SmallCNN(), ResNet50Backbone()], ids=["small", "resnet50"])
def test_backbones_expose_their_stages(backbone):
    backbone.eval()
    x = torch.rand(2, 1, 32, 32) * 2048 - 1024
    maps = backbone.forward_stages(x)
    assert [m.shape[1] for m in maps] == list(backbone.stage_channels)
    h = backbone.stem(backbone.prepare(x))
    for stage in backbone.stages:  # where a fusion module would sit between stages
        h = stage(h)
    assert torch.equal(h, maps[-1])
    assert torch.equal(backbone.pool(h), backbone(x)) and backbone(x).shape == (2, backbone.out_dim)


def test_backbones_keep_the_parameter_names_of_saved_models():
    import torchvision

    assert list(SmallCNN().state_dict())[:2] == ["body.0.weight", "body.1.weight"]
    reference = torchvision.models.resnet50(weights=None).state_dict()
    names = [k for k in reference if not k.startswith("fc.")]
    assert list(ResNet50Backbone().state_dict()) == names


def test_imagenet_weights_load_offline_like_cbstore_encode(imagenet_dir, no_library_cache):
    spec = {"n_features": 4}
    enc = build_encoder("cxr", "cxr_img", spec, {"cxr_weights": "imagenet", "hidden": 8},
                        weights_dir=imagenet_dir)
    state = torch.load(imagenet_dir / IMAGENET_FILE, weights_only=True)
    backbone = enc.backbone
    assert torch.equal(backbone.conv1.weight, state["conv1.weight"].sum(dim=1, keepdim=True))
    assert torch.equal(backbone.layer4[2].conv3.weight, state["layer4.2.conv3.weight"])
    assert backbone.imagenet_input
    black = backbone.prepare(torch.full((1, 1, 2, 2), -1024.0))
    from encoders.cxr import IMAGENET_GRAY_MEAN, IMAGENET_GRAY_STD
    assert torch.allclose(black, torch.full_like(black, -IMAGENET_GRAY_MEAN / IMAGENET_GRAY_STD))
    assert enc({"cxr": torch.zeros(2, 1, 32, 32)}).pooled.shape == (2, 8)
    random = build_encoder("cxr", "cxr_img", spec, {"cxr_weights": "random"})
    assert not random.backbone.imagenet_input
    assert not torch.equal(random.backbone.conv1.weight, backbone.conv1.weight)


def test_missing_imagenet_file_names_file_places_and_the_random_setting(tmp_path, no_library_cache):
    mine = tmp_path / "mine"
    mine.mkdir()
    with pytest.raises(WeightsNotFoundError) as err:
        build_encoder("cxr", "cxr_img", {}, {"cxr_weights": "imagenet"}, weights_dir=mine)
    text = str(err.value)
    assert IMAGENET_FILE in text and str(mine) in text and str(no_library_cache) in text
    assert "cxr_weights=random" in text and "download" in text.lower()
    assert isinstance(err.value, CbstoreError)
    # a saved model is rebuilt without the file: its saved state replaces every weight
    rebuilt = build_encoder("cxr", "cxr_img", {}, {"cxr_weights": "imagenet"}, pretrained=False)
    assert rebuilt.backbone.imagenet_input
    assert IMAGENET_WEIGHTS == "IMAGENET1K_V1"


def test_small_backbone_has_no_imagenet_weights():
    with pytest.raises(HyperparameterError, match="backbone=small has no ImageNet weights.*cxr_weights=random"):
        build_encoder("cxr", "cxr_img", {}, {"backbone": "small", "cxr_weights": "imagenet"})
    with pytest.raises(HyperparameterError, match="cxr_weights='imagenet21k' is not one of imagenet, random"):
        build_encoder("cxr", "cxr_img", {}, {"cxr_weights": "imagenet21k"})


def test_resnet_method_fits_from_imagenet_and_restores_without_the_file(
        tmp_path, imagenet_dir, no_library_cache):
    from fusion.data import load_fusion_data
    from fusion.registry import get_method, load_method
    from support import make_fusion_store

    store = make_fusion_store(tmp_path / "store.zarr", n_stays=40, embeddings=False)
    data = load_fusion_data(store, "mortality", 0, features="raw", inputs={"cxr_img"})
    method = get_method("resnet")(features="raw", max_epochs=1, patience=1, hidden=8,
                                  batch_size=8)
    assert method.params["cxr_weights"] == "imagenet", "the raw-mode default, as in the reference"
    with pytest.raises(WeightsNotFoundError, match="cxr_weights=random"):
        method.fit(data, device="cpu")
    method.weights_dir = imagenet_dir
    method.fit(data, device="cpu")
    assert method.module_.encoder.backbone.imagenet_input
    before = method.predict_proba(data, "test")
    method.save(tmp_path / "saved")
    again = load_method(tmp_path / "saved")  # no weights file anywhere now
    np.testing.assert_array_equal(again.predict_proba(data, "test"), before)


# ------------------------------------------------------------------------- the X-ray branch

class _Recorder(nn.Module):
    """Doubles cxr_emb and records the cxr_present it was given."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, batch):
        self.seen.append(batch["cxr_present"].clone())
        return EncoderOutput(batch["cxr_emb"] * 2)


def _cxr_batch(present):
    present = torch.tensor(present)
    return {"cxr_present": present, "cxr_emb": torch.arange(len(present) * 2.0).reshape(-1, 2),
            "ehr": torch.zeros(len(present), 3, 1)}


def test_run_on_present_never_encodes_absent_xrays():
    branch = _Recorder()
    batch = _cxr_batch([True, False, True, False])
    out, used = run_on_present(lambda sub: branch(sub).pooled, batch, batch["cxr_present"], 2)
    assert branch.seen[0].all() and len(branch.seen[0]) == 2
    assert torch.equal(used, batch["cxr_present"])
    assert torch.equal(out, torch.tensor([[0.0, 2.0], [0.0, 0.0], [8.0, 10.0], [0.0, 0.0]]))
    seen_keys = []
    run_on_present(lambda sub: seen_keys.append(set(sub)) or sub["cxr_emb"], batch,
                   batch["cxr_present"], 2)
    assert seen_keys == [{"cxr_present", "cxr_emb"}], "only the X-ray keys by default"


def test_run_on_present_with_too_few_xrays_uses_the_fill():
    batch = _cxr_batch([False, True, False])
    calls = []
    fill = torch.tensor([5.0, -5.0])
    out, used = run_on_present(lambda sub: calls.append(1) or sub["cxr_emb"], batch,
                               batch["cxr_present"], 2, fill=fill, min_rows=2)
    assert not calls and not used.any()
    assert torch.equal(out, fill.expand(3, 2))


def test_present_only_learns_the_vector_of_absent_xrays():
    gate = PresentOnly(_Recorder(), 2, absent="learned").train()
    batch = _cxr_batch([True, False, True, True])
    out, used = gate(batch)
    assert used.tolist() == [True, False, True, True]
    out.sum().backward()
    assert torch.equal(gate.absent_vector.grad, torch.ones(2)), "one absent row feeds the vector"
    with pytest.raises(HyperparameterError, match="absent='mean'"):
        PresentOnly(_Recorder(), 2, absent="mean")


def test_cli_raw_run_finds_imagenet_weights_with_weights_dir(tmp_path, imagenet_dir, no_library_cache):
    import json

    from click.testing import CliRunner

    from cli.main import cbstore
    from support import make_fusion_store

    store = tmp_path / "store.zarr"
    make_fusion_store(store, n_stays=40, embeddings=False)
    args = ["fuse", str(store), "--method", "resnet", "--features", "raw", "--n-boot", "10",
            "--no-progress", "--set", "max_epochs=1", "--set", "hidden=8", "--set", "batch_size=8"]
    missing = CliRunner().invoke(cbstore, [*args, "--out", str(tmp_path / "a")])
    assert missing.exit_code == 1 and "Traceback" not in missing.output
    (line,) = [x for x in missing.output.splitlines() if x.startswith("Error: ")]
    assert IMAGENET_FILE in line and "--set cxr_weights=random" in line
    found = CliRunner().invoke(cbstore, [*args, "--out", str(tmp_path / "b"),
                                         "--weights-dir", str(imagenet_dir)])
    assert found.exit_code == 0, found.output
    (run,) = [p for p in (tmp_path / "b").iterdir() if not p.name.startswith(".")]
    config = json.loads((run / "config.json").read_text())
    assert config["hyperparameters"]["cxr_weights"] == "imagenet"
    assert config["not_hashed"]["weights_dir"] == str(imagenet_dir), "where files live is not hashed"
