"""MMTM: the recalibrated maps flow into the later stages; one pass per batch; absent X-rays."""

import numpy as np
import pytest
import torch

from fusion.data import load_fusion_data
from fusion.methods.mmtm import MMTM, MMTMUnit
from fusion.tasks import task_loss
from fusion.trainer import PartBatches, Trainer

torch.set_num_threads(1)
SMALL = {**MMTM.test_hyperparameters, "max_epochs": 1}


@pytest.fixture(scope="module")
def raw(store80):
    return load_fusion_data(store80, "mortality", 0, features="raw", inputs=MMTM.inputs["raw"])


@pytest.fixture(scope="module")
def cached(store80):
    return load_fusion_data(store80, "mortality", 0, features="cached", inputs=MMTM.inputs["cached"])


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
    with torch.no_grad():  # 2sigmoid once the excitation is non-zero: gates in (0, 2)
        unit.excite_img.weight.normal_(0.0, 3.0)
        g_img, _ = unit.gates(torch.randn(3, 6), torch.randn(3, 4))
    assert (g_img > 0).all() and (g_img < 2).all() and (g_img > 1).any() and (g_img < 1).any()


@pytest.mark.parametrize("mode", ["raw", "cached"])
def test_ehr_input_changes_the_gated_map_and_the_next_stage(request, mode):
    data = request.getfixturevalue(mode)
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


def test_image_changes_the_gated_ehr_sequence_and_the_next_ehr_layer(raw):
    _, net = _net(raw, gate="sigmoid")
    batch = _batch(raw)
    film = batch["cxr_present"]
    seen = []
    # the second EHR layer reads the sequence gated by the first unit
    handle = net.ehr_layers[1].register_forward_hook(lambda m, i, o: seen.append((i[0], o[0])))
    other = {**batch, "cxr": batch["cxr"].flip(-1)}
    with torch.no_grad():
        a, b = net(batch)["logits_ehr"], net(other)["logits_ehr"]
    handle.remove()
    (gated_a, next_a), (gated_b, next_b) = seen
    for x, y in ((gated_a, gated_b), (next_a, next_b), (a, b)):
        assert ((x - y)[film].abs().flatten(1).amax(dim=1) > 1e-6).all()
        torch.testing.assert_close(x[~film], y[~film])


def _cxr_head_gradients(net, batch):
    """Gradients of the X-ray head's loss on every parameter (None: not reached)."""
    net.zero_grad(set_to_none=True)
    out = net(batch)
    task_loss(out["logits_cxr"], batch["y"], "mortality", weight=out["cxr_used"]).backward()
    return {name: p.grad for name, p in net.named_parameters()}


def _reached(grads, *prefixes):
    """Whether each parameter named with one of ``prefixes`` got a non-zero gradient."""
    reached = {name: g is not None and bool(g.abs().sum() > 0) for name, g in grads.items()
               if name.startswith(prefixes)}
    assert reached, f"no parameter named {prefixes}"
    return reached


def test_xray_head_loss_trains_the_units_and_the_ehr_layers_below_them(raw):
    _, net = _net(raw)  # default gate 2sigmoid, joint schedule
    batch = _batch(raw)
    grads = _cxr_head_gradients(net, batch)
    # identity start: the excitation layers are zero, so only they are reached through the units
    assert all(_reached(grads, "units.0.excite_img", "units.1.excite_img").values())
    assert not any(_reached(grads, "units.0.squeeze", "ehr_proj", "ehr_layers").values())
    with torch.no_grad():  # as after some training: non-zero excitation weights
        generator = torch.Generator().manual_seed(1)
        for unit in net.units:
            for layer in (unit.excite_img, unit.excite_ehr):
                layer.weight.copy_(0.1 * torch.randn(layer.weight.shape, generator=generator))
    grads = _cxr_head_gradients(net, batch)
    mmtm = _reached(grads, "units.0.squeeze", "units.0.excite", "units.1.squeeze",
                    "units.1.excite_img")
    below = _reached(grads, "ehr_proj", "ehr_layers.0", "ehr_layers.1")
    assert all(mmtm.values()), mmtm
    assert all(below.values()), below
    assert not any(_reached(grads, "ehr_head").values()), "the EHR head is not on the X-ray path"
    # the joint schedule steps the EHR layers with that gradient; two_step's X-ray optimiser does not
    cxr, ehr, units = net._groups()
    assert {id(p) for p in net.ehr_layers.parameters()} <= {id(p) for p in ehr}
    assert not {id(p) for p in net.ehr_layers.parameters()} & {id(p) for p in cxr + units}


@pytest.mark.parametrize("mode", ["raw", "cached"])
def test_last_stage_unit_on_maps_equals_gating_the_pooled_vectors(request, mode):
    data = request.getfixturevalue(mode)
    _, net = _net(data, mmtm_units=1, gate="sigmoid")
    batch = _batch(data)
    assert set(net.unit_after) == {len(net.stages) - 1}, "one unit, after the last stage"
    with torch.no_grad():
        out = net(batch)
        # the pooled-vector computation from the module's own layers: squeeze = global average pool
        rows = torch.nonzero(batch["cxr_present"]).squeeze(1)
        x = net.image_input(batch, rows)
        for stage in net.stages:
            x = stage(x)
        pooled = x.mean(dim=(2, 3))
        h, _ = net.ehr_layers[0](net.ehr_proj(torch.cat([batch["ehr"], batch["ehr_mask"]], -1)))
        unit = net.units[0]
        s_img = unit.absent.expand(len(h), -1).index_copy(0, rows, pooled)
        g_img, g_ehr = unit.gates(s_img, h.mean(dim=1))
        logits_cxr = net.cxr_head(pooled * g_img[rows])
        logits_ehr = net.ehr_head(h[:, -1] * g_ehr)
    torch.testing.assert_close(out["logits_cxr"][rows], logits_cxr)
    torch.testing.assert_close(out["logits_ehr"], logits_ehr)
    assert not torch.allclose(logits_cxr, net.cxr_head(pooled)), "the gates are not the identity"


@pytest.mark.parametrize("schedule,passes", [("joint", 1), ("two_step", 2)])
def test_forward_passes_per_training_batch(raw, schedule, passes):
    method, net = _net(raw, schedule=schedule)
    calls, backward = [], []
    net.register_forward_hook(lambda m, i, o: calls.append(m.training))
    # every loss of either schedule reaches the last unit
    net.units[-1].squeeze.weight.register_hook(lambda grad: backward.append(1))
    train = PartBatches(raw.part("train"), raw.inputs)
    trainer = Trainer("mortality", batch_size=16, max_epochs=1, patience=1, device="cpu")
    trainer.fit(net.train(), train, PartBatches(raw.part("val"), raw.inputs))
    n_batches = -(-len(train) // 16)
    assert sum(calls) == passes * n_batches
    if schedule == "joint":
        assert len(backward) == n_batches
    else:  # the X-ray step is left out for a batch without a usable film
        assert n_batches < len(backward) <= 2 * n_batches


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
