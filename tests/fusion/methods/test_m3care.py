"""M3Care: neighbours from a fixed bank of training stays, never from the batch."""

import numpy as np
import pytest
import torch

from support import fit_and_hide, method_for, mixed_setup, randomise_xray, source_of, tiny_data, with_rows

torch.set_num_threads(1)


def _with_bank(module, data):
    module.build_bank(source_of(data, "train", "m3care"), seed=0, device="cpu")


@pytest.fixture(scope="module", params=["raw", "cached"])
def setup(request, store):
    return mixed_setup(store, "m3care", request.param, prepare=_with_bank)


def test_bank_holds_training_stays_with_an_xray(setup):
    data, module, _, _ = setup
    train = data.part("train")
    assert len(module.bank_stay_id) == train.cxr_present.sum() > 0
    assert set(module.bank_stay_id.tolist()) == set(train.stay_id[train.cxr_present].tolist())
    assert module.bank_cxr.shape == module.bank_ehr.shape == (len(module.bank_stay_id), module.d)


def test_edges_are_alive_and_weights_sum_to_one(setup):
    _, module, batch, present = setup
    out = module(batch)
    weights, own = out["neighbour_weights"], out["self_weight"]
    absent = ~torch.as_tensor(present)
    assert (weights[absent] > 0).any(dim=1).all(), "every stay without an X-ray has a neighbour"
    assert (weights > 0).sum(1).float().mean() > 1, "edges above the threshold survive at init"
    torch.testing.assert_close(weights.sum(1) + own, torch.ones(len(own)))
    assert torch.all(own[~torch.as_tensor(present)] == 0), "no self term without an X-ray"
    assert torch.all((weights > 0).sum(1) <= module.top_k)
    module.zero_grad()
    out["logits"].sum().backward()
    assert module.theta.grad is not None and module.theta.grad != 0
    assert module.epsilon.grad is not None and module.epsilon.grad.abs().sum() > 0
    module.zero_grad()


def test_imputation_changes_with_the_neighbours(setup):
    _, module, batch, present = setup
    absent = np.flatnonzero(~present)
    with torch.no_grad():
        out = module(batch)
        rep = out["cxr_repr"][absent]
        assert not torch.allclose(rep[0], rep[1]), "different EHR, different imputation"
        neighbour = int(out["neighbour_weights"][absent[0]].argmax())
        saved = module.bank_cxr.clone(), module.bank_aggregate.clone()
        module.bank_cxr[neighbour] += 5.0
        module.aggregate_bank()
        try:
            changed = module(batch)["cxr_repr"][absent[0]]
        finally:
            module.bank_cxr, module.bank_aggregate = saved
    assert not torch.allclose(changed, rep[0])


def test_an_absent_stays_image_is_ignored(setup):
    _, module, batch, present = setup
    with torch.no_grad():
        out = module(batch)["logits"]
        noisy = module(randomise_xray(batch, np.flatnonzero(~present)))["logits"]
    torch.testing.assert_close(noisy, out, rtol=0, atol=0)


def test_a_test_stays_prediction_is_the_same_in_any_batch(setup):
    _, module, batch, _ = setup
    n = batch["y"].shape[0]
    order = np.random.default_rng(2).permutation(n)
    with torch.no_grad():
        whole = module(batch)["logits"]
        again = module(batch)["logits"]
        shuffled = module(with_rows(batch, order))["logits"]
        halves = torch.cat([module(with_rows(batch, order[:n // 2]))["logits"],
                            module(with_rows(batch, order[n // 2:]))["logits"]])
        alone = torch.cat([module(with_rows(batch, [i]))["logits"] for i in range(n)])
    torch.testing.assert_close(again, whole, rtol=0, atol=0)
    torch.testing.assert_close(shuffled, whole[order])
    torch.testing.assert_close(halves, whole[order])
    torch.testing.assert_close(alone, whole)


def test_stability_term_is_the_norm_difference(setup):
    _, module, batch, _ = setup
    out = module(batch)
    e, c, used = out["ehr_feature"], out["cxr_feature"], out["cxr_used"]
    expected = ((module.phi_ehr(e).norm() - e.norm()).abs()
                + (module.phi_cxr(c[used]).norm() - c[used].norm()).abs())
    torch.testing.assert_close(out["stability"], expected)
    module.zero_grad()
    out["stability"].backward()
    assert module.phi_ehr[0].weight.grad.abs().sum() > 0
    module.zero_grad()


def test_fitted_bank_is_saved_and_ignores_val_and_test(store, tmp_path):
    from fusion.registry import load_method

    data = tiny_data(store, "cached")
    method = method_for("m3care", data).fit(data, device="cpu")
    bank = method.module_.bank_cxr.clone()
    assert bank.shape[0] == data.part("train").cxr_present.sum()
    masked = tiny_data(store, "cached", cxr_missing_rate=1.0, missing_at=("val", "test"))
    other = method_for("m3care", masked).fit(masked, device="cpu")
    torch.testing.assert_close(other.module_.bank_stay_id, method.module_.bank_stay_id)
    method.save(tmp_path / "saved")
    loaded = load_method(tmp_path / "saved")
    torch.testing.assert_close(loaded.module_.bank_cxr, bank, rtol=0, atol=0)
    torch.testing.assert_close(loaded.module_.bank_aggregate, method.module_.bank_aggregate,
                               rtol=0, atol=0)


def test_no_training_xray_gives_an_empty_bank_and_still_predicts(store):
    data = tiny_data(store, "cached", cxr_missing_rate=1.0, missing_at=("train",))
    method = method_for("m3care", data).fit(data, device="cpu")
    assert method.module_.bank_cxr.shape[0] == 0
    assert np.all(np.isfinite(method.predict_proba(data, "test")))


def test_bad_settings_are_refused(store):
    data = tiny_data(store, "cached")
    with pytest.raises(ValueError, match="top_k must be >= 0"):
        method_for("m3care", data, top_k=-1).build_module(method_for("m3care", data)._spec(data))
    with pytest.raises(ValueError, match="kernel"):
        method_for("m3care", data, kernel="cosine")


def test_hiding_every_xray_at_test_changes_stays_that_have_one(store):
    prob, hidden, present = fit_and_hide("m3care", store)
    assert not np.allclose(prob[present], hidden[present])
    np.testing.assert_array_equal(prob[~present], hidden[~present])
