"""UTDE: time attention over the observed hours, the gate, the film's time, absent films."""

import copy

import numpy as np
import pytest
import torch

from fusion.data import load_fusion_data
from fusion.methods.utde import UTDE
from fusion.trainer import PartBatches
from support import predict_with_xrays_hidden, randomise_xray

torch.set_num_threads(1)
SMALL = {**UTDE.test_hyperparameters, "max_epochs": 2}


@pytest.fixture(scope="module")
def raw(store80):
    return load_fusion_data(store80, "mortality", 0, features="raw", inputs=UTDE.inputs["raw"])


@pytest.fixture(scope="module")
def net(raw):
    method = UTDE(seed=0, features="raw", **SMALL)
    torch.manual_seed(0)
    return method.build_module(method._spec(raw)).eval()


@pytest.fixture(scope="module")
def batch(raw):
    item = raw.part("train")
    idx = np.arange(12)
    idx = idx[np.argsort(~item.cxr_present[idx], kind="stable")]
    out = PartBatches(item, raw.inputs)[idx]
    assert out["cxr_present"][:2].all() and not out["cxr_present"].all()
    return out


def test_moving_observed_hours_changes_the_time_attention(net, batch):
    with torch.no_grad():
        e_int, e_imp = net.ehr_streams(batch)
        moved = {**batch, "ehr": batch["ehr"].roll(2, dims=1), "ehr_mask": batch["ehr_mask"].roll(2, dims=1)}
        moved_int, moved_imp = net.ehr_streams(moved)
    assert not torch.allclose(moved_int, e_int)
    assert not torch.allclose(moved_int, e_int.roll(2, dims=1)), "re-interpolated at fixed query times"
    # the imputation branch reads each hour on its own: it only moves with the hours
    torch.testing.assert_close(moved_imp, e_imp.roll(2, dims=1))


def test_values_where_nothing_was_observed_do_not_enter_the_time_attention(net, batch):
    mask = batch["ehr_mask"].clone()
    mask[0, :, 1] = 0  # channel 1 of stay 0 is never observed
    masked = {**batch, "ehr_mask": mask}
    noise = torch.randn(batch["ehr"].shape, generator=torch.Generator().manual_seed(3)) * 100
    changed = {**masked, "ehr": batch["ehr"] + noise * (1 - mask)}
    with torch.no_grad():
        e_int = net.ehr_streams(masked)[0]
        torch.testing.assert_close(net.ehr_streams(changed)[0], e_int)
        # control: the same noise on observed cells does change it
        observed = {**masked, "ehr": batch["ehr"] + noise * mask}
        assert not torch.allclose(net.ehr_streams(observed)[0], e_int)


def test_time_attention_dropout_acts_on_the_normalised_weights_in_training_only(net, batch):
    from fusion.methods.utde import EhrTimeAttention

    attention = copy.deepcopy(net.interp)
    assert isinstance(attention, EhrTimeAttention) and attention.dropout == 0.1  # the code's value
    queries, keys = net.times(batch["ehr"].device)
    args = (batch["ehr"], batch["ehr_mask"], net.time(queries), net.time(keys))
    with torch.no_grad():
        expected = attention.eval()(*args)
        attention.train()
        attention.dropout = 0.0
        torch.testing.assert_close(attention(*args), expected, msg="p = 0: the evaluation output")
        attention.dropout = 0.3
        torch.manual_seed(0)
        first = attention(*args)
        assert not torch.allclose(first, expected)
        torch.manual_seed(0)
        torch.testing.assert_close(attention(*args), first, msg="the same seed draws the same masks")
        # dropped weights, scaled, with whole normalisers: the mean over draws is the evaluation output
        draws = torch.stack([attention(*args) for _ in range(300)]).mean(0)
    spread = (first - expected).abs().mean()
    assert (draws - expected).abs().mean() < 0.2 * spread
    # a channel never observed still contributes nothing, with or without dropout
    mask = batch["ehr_mask"].clone()
    mask[0, :, 1] = 0
    noise = torch.randn(batch["ehr"].shape, generator=torch.Generator().manual_seed(3)) * 100
    with torch.no_grad():
        torch.manual_seed(1)
        clean = attention(batch["ehr"], mask, *args[2:])
        torch.manual_seed(1)
        noisy = attention(batch["ehr"] + noise * (1 - mask), mask, *args[2:])
    torch.testing.assert_close(noisy, clean)


def test_time_attention_dropout_is_checked():
    from fusion.registry import HyperparameterError

    method = UTDE(seed=0, features="raw", **{**SMALL, "time_attention_dropout": 1.0})
    with pytest.raises(HyperparameterError, match="time_attention_dropout must be in"):
        method.build_module({"features": "raw", "n_features": 3, "window_hours": 4, "n_outputs": 1})


def test_gate_extremes_give_each_branch(net, batch):
    with torch.no_grad():
        e_int, e_imp = net.ehr_streams(batch)
        torch.testing.assert_close(net.mix(e_int, e_imp, torch.ones(1)), e_int)
        torch.testing.assert_close(net.mix(e_int, e_imp, torch.zeros(1)), e_imp)
        g = torch.sigmoid(net.gate(torch.cat([e_int, e_imp], -1)))
        assert g.shape == (*e_int.shape[:2], 1), "batch_seq: one gate per stay and hour"


def test_hours_are_used_and_the_films_time_matters(net, batch):
    with torch.no_grad():
        logits = net(batch)["logits"]
        flipped = {**batch, "ehr": batch["ehr"].flip(1), "ehr_mask": batch["ehr_mask"].flip(1)}
        assert not torch.allclose(net(flipped)["logits"], logits)
        # the last two hours truncated: unobserved, the earlier values carried forward
        mask, values = batch["ehr_mask"].clone(), batch["ehr"].clone()
        mask[:, -2:] = 0
        values[:, -2:] = values[:, -3:-2]
        truncated = {**batch, "ehr": values, "ehr_mask": mask}
        assert not torch.allclose(net(truncated)["logits"], logits)
        stream, _ = net.film_stream(batch)
        later = {**batch, "cxr_hours": batch["cxr_hours"] - 3.0}
        moved, _ = net.film_stream(later)
        assert not torch.allclose(moved[:2], stream[:2]), "moving the film's time changes its stream"
        torch.testing.assert_close(moved[~batch["cxr_present"]], stream[~batch["cxr_present"]])


def _final_states(net, batch):
    """The final (layer-normalised) last-step states of the EHR and X-ray streams, ``[B, d]`` each."""
    seen = {}
    hooks = [norm.register_forward_hook(lambda m, i, o, key=key: seen.__setitem__(key, o[:, -1]))
             for key, norm in (("ehr", net.final_ehr), ("cxr", net.final_cxr))]
    try:
        with torch.no_grad():
            net(batch)
    finally:
        for hook in hooks:
            hook.remove()
    return seen["ehr"], seen["cxr"]


def test_cross_attention_carries_each_stream_into_the_other(net, batch):
    film = batch["cxr_present"]
    ehr, cxr = _final_states(net, batch)
    other_film = randomise_xray(batch, np.flatnonzero(film.numpy()))
    ehr_b, cxr_b = _final_states(net, other_film)
    assert ((ehr_b - ehr)[film].abs().amax(dim=1) > 1e-5).all(), "the film reaches the EHR stream"
    torch.testing.assert_close(ehr_b[~film], ehr[~film])
    observed = batch["ehr_mask"] > 0
    other_ehr = {**batch, "ehr": torch.where(observed, batch["ehr"] + 1.0, batch["ehr"])}
    _, cxr_c = _final_states(net, other_ehr)
    # every stay, also one without a film (its stream is the absent vector before the layers)
    assert ((cxr_c - cxr).abs().amax(dim=1) > 1e-5).all(), "the EHR reaches the X-ray stream"
    # control: with the EHR stream's cross-attention output cut, the film cannot reach it
    cut = copy.deepcopy(net)
    for layer in cut.layers:
        torch.nn.init.zeros_(layer.cross_ehr.out_proj.weight)
        torch.nn.init.zeros_(layer.cross_ehr.out_proj.bias)
    torch.testing.assert_close(_final_states(cut, other_film)[0], _final_states(cut, batch)[0])


def test_absent_film_ignores_any_placeholder_image(net, batch):
    absent = ~batch["cxr_present"]
    scrambled = {**batch, "cxr": batch["cxr"].clone()}
    scrambled["cxr"][absent] = torch.randn_like(scrambled["cxr"][absent]) * 1000
    with torch.no_grad():
        torch.testing.assert_close(net(scrambled)["logits"], net(batch)["logits"])
        stream, used = net.film_stream(batch)
    assert torch.equal(used, batch["cxr_present"])
    torch.testing.assert_close(stream[absent], net.film.absent.expand_as(stream[absent]))


def test_hiding_every_xray_at_test_changes_predictions(store80, raw):
    method = UTDE(seed=0, features="raw", **SMALL).fit(raw, device="cpu")
    a, b, with_film = predict_with_xrays_hidden(method, raw, store80, inputs=UTDE.inputs["raw"])
    assert not np.allclose(a[with_film], b[with_film])
    np.testing.assert_allclose(a[~with_film], b[~with_film], rtol=1e-6)


def test_last_only_layer_gives_the_full_layers_last_step(net, batch):
    layer = net.layers[-1]
    a, b = torch.randn(3, 48, net.d), torch.randn(3, 48, net.d)
    with torch.no_grad():
        full_a, full_b = layer(a, b)
        last_a, last_b = layer(a, b, last_only=True)
    assert last_a.shape == (3, 1, net.d)
    torch.testing.assert_close(last_a[:, 0], full_a[:, -1])
    torch.testing.assert_close(last_b[:, 0], full_b[:, -1])
