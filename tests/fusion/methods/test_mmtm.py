"""MMTM: the recalibrated maps flow into the later stages; one pass per batch; absent X-rays."""

import numpy as np
import pytest
import torch

from fusion.data import load_fusion_data
from fusion.methods.mmtm import MMTM, MMTMUnit
from fusion.trainer import PartBatches, Trainer

torch.set_num_threads(1)
SMALL = {**MMTM.test_hyperparameters, "max_epochs": 1}


@pytest.fixture(scope="module")
def raw(store80):
    return load_fusion_data(store80, "mortality", 0, features="raw", inputs=MMTM.inputs["raw"])


def _net(data, **params):
    method = MMTM(seed=0, features=data.features, **{**SMALL, **params})
    torch.manual_seed(0)
    return method, method.build_module(method._spec(data)).eval()


def _batch(data, part="train", rows=slice(0, 8)):
    item = data.part(part)
    idx = np.arange(len(item))[rows]
    idx = idx[np.argsort(~item.cxr_present[idx], kind="stable")]  # films first
    return PartBatches(item, data.inputs)[idx]


def test_unit_gates_and_identity_start():
    unit = MMTMUnit(6, 4, ratio=4, gate="2sigmoid")
    g_img, g_ehr = unit.gates(torch.randn(3, 6), torch.randn(3, 4))
    assert g_img.shape == (3, 6) and g_ehr.shape == (3, 4)
    assert torch.equal(g_img, torch.ones(3, 6)) and torch.equal(g_ehr, torch.ones(3, 4))
    assert unit.squeeze.out_features == int(2 * 10 / 4)
    sig = MMTMUnit(6, 4, gate="sigmoid")
    g_img, _ = sig.gates(torch.randn(3, 6), torch.randn(3, 4))
    assert (g_img > 0).all() and (g_img < 1).all()


@pytest.mark.parametrize("mode", ["raw", "cached"])
def test_ehr_input_changes_the_gated_map_and_the_next_stage(store80, raw, mode):
    data = raw if mode == "raw" else load_fusion_data(store80, "mortality", 0, features="cached",
                                                     inputs=MMTM.inputs["cached"])
    _, net = _net(data, gate="sigmoid")
    batch = _batch(data)
    assert batch["cxr_present"][:2].all()
    seen = []
    last = net.stages[-1]
    handle = last.register_forward_hook(lambda m, i, o: seen.append((i[0].clone(), o.clone())))
    other = {**batch, "ehr": batch["ehr"] + torch.randn_like(batch["ehr"])}
    with torch.no_grad():
        net(batch)
        net(other)
    handle.remove()
    (in_a, out_a), (in_b, out_b) = seen
    assert not torch.allclose(in_a, in_b), "the gated map entering the last stage depends on the EHR"
    assert not torch.allclose(out_a, out_b), "the recalibrated map changes the later stage's output"
    # control: with identity gates (2sigmoid, zero excitation) the EHR cannot reach the image stream
    _, plain = _net(data, gate="2sigmoid")
    outs = []
    handle = plain.stages[-1].register_forward_hook(lambda m, i, o: outs.append(o.clone()))
    with torch.no_grad():
        plain(batch)
        plain(other)
    handle.remove()
    torch.testing.assert_close(outs[0], outs[1])


def test_image_changes_the_ehr_stream(raw):
    _, net = _net(raw, gate="sigmoid")
    batch = _batch(raw)
    other = {**batch, "cxr": batch["cxr"].flip(-1)}
    with torch.no_grad():
        a, b = net(batch)["logits_ehr"], net(other)["logits_ehr"]
    assert not torch.allclose(a[:2], b[:2])


@pytest.mark.parametrize("schedule,passes", [("joint", 1), ("two_step", 2)])
def test_forward_passes_per_training_batch(raw, schedule, passes):
    method, net = _net(raw, schedule=schedule)
    calls = []
    net.register_forward_hook(lambda m, i, o: calls.append(m.training))
    train = PartBatches(raw.part("train"), raw.inputs)
    trainer = Trainer("mortality", batch_size=16, max_epochs=1, patience=1, device="cpu")
    trainer.fit(net.train(), train, PartBatches(raw.part("val"), raw.inputs))
    n_batches = -(-len(train) // 16)
    assert sum(calls) == passes * n_batches


def test_hiding_every_xray_at_test_changes_predictions(store80, raw):
    method = MMTM(seed=0, features="raw", **{**SMALL, "max_epochs": 2}).fit(raw, device="cpu")
    hidden = load_fusion_data(store80, "mortality", 0, features="raw", inputs=MMTM.inputs["raw"],
                              cxr_missing_rate=1.0, missing_at=("test",))
    with_film = raw.part("test").cxr_present
    assert with_film.any() and not hidden.part("test").cxr_present.any()
    a, b = method.predict_proba(raw, "test"), method.predict_proba(hidden, "test")
    assert not np.allclose(a[with_film], b[with_film])
    np.testing.assert_allclose(a[~with_film], b[~with_film], rtol=1e-6)


def test_cached_run_records_the_map_embedding(store80, tmp_path):
    import json

    from click.testing import CliRunner

    from cli.fuse_cmd import fuse
    from support import CXR_MAP_ID

    args = [str(store80.path), "--method", "mmtm", "--features", "cached", "--out", str(tmp_path),
            "--n-boot", "10", "--no-progress", "--set", "max_epochs=1", "--set", "hidden=8",
            "--set", "cached_tail=conv"]
    result = CliRunner().invoke(fuse, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    (folder,) = [p for p in tmp_path.iterdir() if not p.name.startswith(".")]
    config = json.loads((folder / "config.json").read_text())
    assert config["embeddings"]["cxr_map"]["encoder_id"] == CXR_MAP_ID
    assert "cxr" not in config["embeddings"] and "ehr" not in config["embeddings"]
    result = CliRunner().invoke(fuse, [*args, "--cxr-map-encoder", "cxr-test"])
    assert result.exit_code == 1 and "stores no spatial map" in result.output
    result = CliRunner().invoke(fuse, [*args[:-2], "--set", "cached_tail=backbone", "--overwrite"])
    assert result.exit_code == 1 and "use --set cached_tail=conv" in result.output
