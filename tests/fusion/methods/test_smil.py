"""SMIL: priors from training X-ray features, reconstruction at test, fast weights that act."""

import numpy as np
import pytest
import torch

from fusion.registry import MethodStateError
from support import (assert_batch_independent, batch_of, fit_and_hide, method_for, mixed_setup, module_for,
                     randomise_xray, source_of, tiny_data, with_rows)

torch.set_num_threads(1)


def _with_priors(module, data):
    module.on_fit_start(type("Ctx", (), {"device": torch.device("cpu")})(),
                        source_of(data, "train", "smil"))


def _ready(data, **params):
    module = module_for("smil", data, **params)
    _with_priors(module, data)
    return module


@pytest.fixture(scope="module", params=["raw", "cached"])
def setup(request, store):
    return mixed_setup(store, "smil", request.param, prepare=_with_priors)


def test_priors_are_kmeans_of_training_xray_features_only(setup, store):
    data, module, _, _ = setup
    assert module.priors.shape == (3, module.d)
    again = _ready(data)
    torch.testing.assert_close(again.priors, module.priors, rtol=0, atol=0)
    # hiding val/test X-rays changes nothing; the training features reproduce the centres
    masked = tiny_data(store, data.features, cxr_missing_rate=1.0, missing_at=("val", "test"))
    torch.testing.assert_close(_ready(masked).priors, module.priors, rtol=0, atol=0)
    from fusion.methods.smil import kmeans_priors
    features = module.xray_features(source_of(data, "train", "smil"), "cpu")
    assert features.shape[0] == data.part("train").cxr_present.sum()
    np.testing.assert_array_equal(kmeans_priors(features.double().numpy(), 3, 0),
                                  module.priors.numpy())


def test_reconstruction_is_a_convex_combination_that_depends_on_the_ehr(setup):
    _, module, batch, present = setup
    out = module(batch)
    weights = out["weights"]
    assert torch.all(weights >= 0)
    torch.testing.assert_close(weights.sum(1), torch.ones(len(weights)))
    absent = np.flatnonzero(~present)
    rec = out["reconstructed"][absent]
    assert not torch.allclose(rec[0], rec[1])
    module.zero_grad()
    out["logits"][absent].sum().backward()
    assert module.psi["omega"].weight.grad.abs().sum() > 0
    module.zero_grad()


def test_stays_without_xray_are_reconstructed_at_test(setup):
    _, module, batch, present = setup
    absent = np.flatnonzero(~present)
    with torch.no_grad():
        out = module(batch)
        e = module.ehr_encoder(batch).pooled[absent]
        zero = torch.cat([e, torch.zeros_like(e)], dim=1)
        zero_logits = module.head["out"](torch.relu(module.head["hidden"](zero)))
        noisy = module(randomise_xray(batch, absent))["logits"]
    torch.testing.assert_close(out["fused"][absent, module.d:] - torch.nn.functional.softplus(
        module.psi["shift_fused"](e))[:, module.d:], out["reconstructed"][absent])
    assert not torch.allclose(out["logits"][absent], zero_logits)
    torch.testing.assert_close(noisy, out["logits"], rtol=0, atol=0)
    assert not out["real"][absent].any() and out["real"][np.flatnonzero(present)].all()


def test_perturbations_are_sampled_in_training_only(setup):
    _, module, batch, present = setup
    absent = np.flatnonzero(~present)
    module.eval()
    with torch.no_grad():
        a, b = module(batch)["logits"], module(batch)["logits"]
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        module.train()
        try:
            c, d = module(batch), module(batch)
        finally:
            module.eval()
    assert not torch.allclose(c["fused"][absent], d["fused"][absent])
    shift = c["fused"][absent, module.d:] - c["reconstructed"][absent]
    assert torch.all(shift >= 0)


def test_fast_weights_change_the_outer_loss_and_carry_second_order_gradients(store):
    data = tiny_data(store, "cached")
    batch = batch_of(data, "train", "smil")

    def outer(lr_inner, detach=False):
        module = _ready(data, lr_inner=lr_inner, dropout=0.0)
        torch.manual_seed(0)
        losses = module.meta_losses(batch, "mortality", detach_inner=detach)
        grad = torch.autograd.grad(losses["outer"], module.head["hidden"].weight)[0]
        return float(losses["outer"].detach()), grad

    plain, _ = outer(0.0)
    module = _ready(data, dropout=0.0)
    used = batch["cxr_present"]
    with torch.no_grad():
        sub = with_rows(batch, np.flatnonzero(used.numpy()))
        noised = module(sub, reconstruct_all=True, sample=False)
        clean = module(sub)
        from fusion.tasks import task_loss
        mse = torch.nn.functional.mse_loss
        by_hand = (task_loss(noised["logits"], sub["y"], "mortality")
                   + 0.01 * mse(noised["fused"], clean["fused"])
                   + 0.01 * mse(noised["hidden"], clean["hidden"]))
    assert plain == pytest.approx(float(by_hand), rel=1e-5)
    fast, grad_second = outer(1.0)
    assert fast != pytest.approx(plain)
    _, grad_first = outer(1.0, detach=True)
    assert not torch.allclose(grad_second, grad_first)


def test_every_loss_setting_acts(store):
    data = tiny_data(store, "cached")
    batch = batch_of(data, "train", "smil")

    def total(**params):
        module = _ready(data, dropout=0.0, lr_inner=0.5, **params)
        torch.manual_seed(0)
        return float(module.meta_losses(batch, "mortality")["total"].detach())

    base = total()
    for params in ({"alpha": 1.0}, {"beta": 1.0}, {"inner_steps": 2}, {"clean_loss_weight": 1.0},
                   {"n_clusters": 2}, {"head_hidden": 4}):
        assert total(**params) != pytest.approx(base, rel=1e-7), params


def test_meta_stage_keeps_the_xray_branch_and_priors_fixed(store):
    data = tiny_data(store, "raw")
    method = method_for("smil", data, max_epochs=2, patience=2).fit(data, device="cpu")
    stages = [e["stage"] for e in method.history_["epochs"]]
    assert stages == ["full", "full", "meta", "meta"]
    module = method.module_
    features = module.xray_features(source_of(data, "train", "smil"), "cpu")
    from fusion.methods.smil import kmeans_priors
    np.testing.assert_array_equal(kmeans_priors(features.double().numpy(), 3, 0),
                                  module.priors.numpy())


def test_frozen_xray_branch_is_unchanged_by_meta_steps(store):
    from fusion.trainer import FitStage, Trainer

    data = tiny_data(store, "raw")
    module = module_for("smil", data)
    module.fit_stages = lambda: [FitStage("meta", trainable=("ehr_encoder", "head", "psi"),
                                          max_epochs=2)]
    # weights and batch-norm statistics; the augmentation generator's state (extra state) is not a weight
    def weights():
        return {k: v for k, v in module.cxr_encoder.state_dict().items() if torch.is_tensor(v)}

    before = {k: v.clone() for k, v in weights().items()}
    Trainer("mortality", lr=1e-2, batch_size=16, max_epochs=2, patience=2, device="cpu",
            num_threads=1).fit(module, source_of(data, "train", "smil"),
                               source_of(data, "val", "smil"))
    after = weights()
    assert after.keys() == before.keys() and after
    for key, value in after.items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0, msg=key)


def test_predictions_do_not_depend_on_the_batch(setup):
    _, module, batch, _ = setup
    assert_batch_independent(module, batch, seed=3)


def test_no_training_xray_is_a_clear_error(store):
    data = tiny_data(store, "cached", cxr_missing_rate=1.0, missing_at=("train",))
    with pytest.raises(MethodStateError, match="no training stay has one"):
        method_for("smil", data).fit(data, device="cpu")


def test_hiding_every_xray_at_test_changes_stays_that_have_one(store):
    prob, hidden, present = fit_and_hide("smil", store)
    assert not np.allclose(prob[present], hidden[present])
    np.testing.assert_array_equal(prob[~present], hidden[~present])
