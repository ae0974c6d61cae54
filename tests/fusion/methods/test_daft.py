"""DAFT: the EHR vector changes the conditioned block's feature maps; identity start; absent films."""

import numpy as np
import pytest
import torch
from torchvision.models.resnet import Bottleneck

from fusion.data import load_fusion_data
from fusion.methods.daft import DAFT, DaftBottleneck, DaftInput
from fusion.tasks import task_loss
from fusion.trainer import PartBatches
from support import EHR_ID, predict_with_xrays_hidden, randomise_xray

torch.set_num_threads(1)
SMALL = {**DAFT.test_hyperparameters, "max_epochs": 2}


@pytest.fixture(scope="module")
def raw(store80):
    return load_fusion_data(store80, "mortality", 0, features="raw", inputs=DAFT.inputs["raw"])


@pytest.fixture(scope="module")
def cached(store80):
    return load_fusion_data(store80, "mortality", 0, features="cached", ehr_encoder=EHR_ID,
                            inputs=DAFT.inputs["cached"])


def _net(data, **params):
    method = DAFT(seed=0, features=data.features, **{**SMALL, **params})
    torch.manual_seed(0)
    return method.build_module(method._spec(data)).eval()


def _batch(data):
    item = data.part("train")
    idx = np.arange(12)
    idx = idx[np.argsort(~item.cxr_present[idx], kind="stable")]
    return PartBatches(item, data.inputs)[idx]


@pytest.mark.parametrize("mode", ["raw", "cached"])
def test_ehr_input_changes_the_conditioned_maps_and_logits(request, mode):
    data = request.getfixturevalue(mode)
    net = _net(data, daft_identity_init=False)
    batch = _batch(data)
    key = "ehr" if mode == "raw" else "ehr_emb"
    other = {**batch, key: batch[key] + 1.0 + torch.randn_like(batch[key])}
    with torch.no_grad():
        x, _ = net.block_input(batch)
        e_a, e_b = net.ehr(batch), net.ehr(other)
        e_a, e_b = getattr(e_a, "pooled", e_a), getattr(e_b, "pooled", e_b)
        assert not torch.allclose(net.daft.conditioned(x, e_a), net.daft.conditioned(x, e_b))
        assert not torch.allclose(net(batch)["logits"], net(other)["logits"])


def _alpha_beta(net, batch):
    """The aux net's ``(alpha, beta)`` in a forward pass of ``net`` on ``batch``."""
    seen = []
    hook = net.daft.affine.register_forward_hook(lambda m, i, o: seen.append(o))
    with torch.no_grad():
        net(batch)
    hook.remove()
    (out,) = seen
    return out


@pytest.mark.parametrize("mode", ["raw", "cached"])
def test_a_different_image_gives_a_different_scale_and_shift_for_the_same_ehr(request, mode):
    data = request.getfixturevalue(mode)
    # a wider aux net: at factor 7 the cached one has a single ReLU unit, off for some stays
    net = _net(data, daft_identity_init=False, daft_bottleneck_factor=1.0)
    batch = _batch(data)
    film = batch["cxr_present"]
    alpha, beta = _alpha_beta(net, batch)
    other_alpha, other_beta = _alpha_beta(net, randomise_xray(batch, np.flatnonzero(film.numpy())))
    for a, b in ((alpha, other_alpha), (beta, other_beta)):
        assert ((a[film] - b[film]).abs().amax(dim=1) > 1e-6).all()
        torch.testing.assert_close(a[~film], b[~film])


def test_bottleneck_block_image_statistics_enter_the_aux_net():
    daft = DaftBottleneck(_bottleneck(), 6, 7.0, "linear", True, True, identity=False).eval()
    seen = []
    daft.affine.register_forward_hook(lambda m, i, o: seen.append(o))
    e = torch.randn(3, 6)
    with torch.no_grad():
        daft(torch.randn(3, 16, 5, 5), e)
        daft(torch.randn(3, 16, 5, 5), e)
    (alpha, beta), (other_alpha, other_beta) = seen
    assert not torch.allclose(alpha, other_alpha) and not torch.allclose(beta, other_beta)


def _bottleneck():
    torch.manual_seed(1)
    block = Bottleneck(16, 4).eval()
    for bn in (block.bn1, block.bn2, block.bn3):
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.2, 0.2)
        bn.running_mean.uniform_(-0.1, 0.1)
        bn.running_var.uniform_(0.5, 1.5)
    return block


def test_identity_start_reproduces_the_unconditioned_block():
    block = _bottleneck()
    x, e = torch.randn(3, 16, 5, 5), torch.randn(3, 6)
    daft = DaftBottleneck(block, 6, 7.0, "linear", True, True, identity=True).eval()
    torch.testing.assert_close(daft(x, e), block(x))
    assert daft.affine.net[0].out_features == int((16 + 6) / 7), "code's rule: the block's input width"
    tail = torch.nn.Conv2d(16, 4, 1)
    torch.testing.assert_close(DaftInput(tail, 16, 6, 7.0, "linear", True, True, True)(x, e), tail(x))


def test_scale_only_and_shift_only():
    torch.manual_seed(2)
    f, e = torch.randn(4, 8, 3, 3), torch.randn(4, 5)
    scale_only = DaftInput(torch.nn.Identity(), 8, 5, 2.0, "linear", True, False, identity=False)
    shift_only = DaftInput(torch.nn.Identity(), 8, 5, 2.0, "linear", False, True, identity=False)
    alpha, beta = scale_only.affine(f, e)
    assert torch.equal(beta, torch.zeros_like(beta)) and not torch.allclose(alpha, torch.ones_like(alpha))
    alpha, beta = shift_only.affine(f, e)
    assert torch.equal(alpha, torch.ones_like(alpha)) and not torch.allclose(beta, torch.zeros_like(beta))
    sig = DaftInput(torch.nn.Identity(), 8, 5, 2.0, "sigmoid", True, True, identity=False)
    alpha, _ = sig.affine(f, e)
    assert (alpha > 0).all() and (alpha < 1).all()


def test_paper_mode_bn_has_no_affine_and_identity_mode_folds_it():
    block = _bottleneck()
    x, e = torch.randn(2, 16, 4, 4), torch.randn(2, 3)
    paper = DaftBottleneck(block, 3, 7.0, "linear", True, True, identity=False).eval()
    normalised = (block.conv1(x) - block.bn1.running_mean[None, :, None, None]) / torch.sqrt(
        block.bn1.running_var[None, :, None, None] + block.bn1.eps)
    alpha, beta = paper.affine(normalised, e)
    torch.testing.assert_close(paper.conditioned(x, e),
                               alpha[:, :, None, None] * normalised + beta[:, :, None, None])
    # identity mode, once the aux net's last layer has left zero: alpha = gamma (1 + da),
    # beta = beta_bn1 + db, applied to the same affine-free normalisation
    identity = DaftBottleneck(block, 3, 7.0, "linear", True, True, identity=True).eval()
    with torch.no_grad():
        identity.affine.net[2].weight.normal_()
        da, db = identity.affine.net(torch.cat([normalised.mean(dim=(2, 3)), e], 1)).chunk(2, 1)
        gamma, beta0 = block.bn1.weight, block.bn1.bias
        expected = (gamma * (1 + da))[:, :, None, None] * normalised + (beta0 + db)[:, :, None, None]
        torch.testing.assert_close(identity.conditioned(x, e), expected)


def test_loss_reaches_the_ehr_encoder_through_the_aux_net(raw):
    net = _net(raw, daft_identity_init=False).train()
    batch = _batch(raw)
    out = net(batch)
    task_loss(out["logits"], batch["y"], "mortality").backward()
    grads = [p.grad for p in net.ehr.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    names = {n.split(".")[0] for n, _ in net.named_parameters()}
    assert names <= {"image_input", "pre", "daft", "ehr", "absent", "head"}, "no EHR head"
    # the EHR vector enters only through the aux net: cut it and no gradient reaches the encoder
    net.zero_grad()
    with torch.no_grad():
        net.daft.affine.net[2].weight.zero_()
    out = net(batch)
    task_loss(out["logits"], batch["y"], "mortality").backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in net.ehr.parameters())


def test_hiding_every_xray_at_test_changes_predictions(store80, raw):
    method = DAFT(seed=0, features="raw", **SMALL).fit(raw, device="cpu")
    a, b, with_film = predict_with_xrays_hidden(method, raw, store80, inputs=DAFT.inputs["raw"])
    assert not np.allclose(a[with_film], b[with_film])
    np.testing.assert_allclose(a[~with_film], b[~with_film], rtol=1e-6)


def test_cached_tail_runs_channels_last_with_the_same_values():
    import copy

    from fusion.modules import map_tail

    torch.manual_seed(0)
    tail = map_tail({"cxr_map_shape": [6, 3, 3]}, {"cached_tail": "conv", "hidden": 5}).eval()
    plain = copy.deepcopy(tail).to(memory_format=torch.contiguous_format)
    plain._forward_pre_hooks.clear()  # the same weights, default layout, no layout hook
    x = torch.randn(4, 6, 3, 3)
    with torch.no_grad():
        out, expected = tail(x), plain(x)
    assert out.is_contiguous(memory_format=torch.channels_last) and expected.is_contiguous()
    torch.testing.assert_close(out, expected)
