"""MedFuse: the fusion sequence is one step shorter for a stay without an X-ray."""

import numpy as np
import pytest
import torch

from support import (assert_batch_independent, fit_and_hide, method_for, mixed_setup, module_for,
                     randomise_xray, source_of, tiny_data, with_rows)

torch.set_num_threads(1)


@pytest.fixture(scope="module", params=["raw", "cached"])
def setup(request, store):
    return mixed_setup(store, "medfuse", request.param)


def test_absent_stay_runs_one_fusion_step_and_ignores_its_image(setup):
    _, module, batch, present = setup
    absent = np.flatnonzero(~present)
    with torch.no_grad():
        out = module(batch)["logits"]
        noisy = module(randomise_xray(batch, absent))["logits"]
        e = module.ehr_encoder(batch).pooled[absent]
        _, (h, _) = module.fusion(e.unsqueeze(1))       # the one-step sequence [e]
        by_hand = module.head(h[0])
        zero_token = torch.stack([e, module.projection(torch.zeros_like(e))], dim=1)
        _, (h2, _) = module.fusion(zero_token)           # [e, P(0)]: a consumed zero token
        two_steps = module.head(h2[0])
    torch.testing.assert_close(noisy, out, rtol=0, atol=0)
    torch.testing.assert_close(out[absent], by_hand)
    assert not torch.allclose(out[absent], two_steps), "an absent X-ray must not be a zero token"


def test_a_present_xray_changes_the_prediction(setup):
    _, module, batch, present = setup
    rows = np.flatnonzero(present)
    with torch.no_grad():
        out = module(batch)["logits"]
        noisy = module(randomise_xray(batch, rows))["logits"]
    assert not torch.allclose(out[rows], noisy[rows])


def test_predictions_do_not_depend_on_the_batch(setup):
    _, module, batch, _ = setup
    assert_batch_independent(module, batch, seed=0)


def test_stays_without_xray_give_no_gradient_to_the_xray_branch(setup):
    _, module, batch, present = setup
    module.train()
    try:
        absent = with_rows(batch, np.flatnonzero(~present))
        module.zero_grad()
        module(absent)["logits"].sum().backward()
        for name, parameter in module.named_parameters():
            if name.startswith(("cxr_encoder", "projection")):
                assert parameter.grad is None or not parameter.grad.any(), name
        assert any(p.grad is not None and p.grad.any() for p in module.ehr_encoder.parameters())
    finally:
        module.zero_grad()
        module.eval()


def test_staged_schedule_trains_the_ehr_encoder_first(store):
    data = tiny_data(store, "cached")
    staged = method_for("medfuse", data).fit(data, device="cpu")
    assert [s["name"] for s in staged.history_["stages"]] == ["ehr", "fusion"]
    assert {e["stage"] for e in staged.history_["epochs"]} == {"ehr", "fusion"}
    plain = method_for("medfuse", data, schedule="end_to_end").fit(data, device="cpu")
    assert [s["name"] for s in plain.history_["stages"]] == ["fusion"]
    assert not np.array_equal(staged.predict_proba(data, "test"), plain.predict_proba(data, "test"))


def test_ehr_stage_leaves_the_fusion_untouched(store):
    from fusion.trainer import Trainer
    data = tiny_data(store, "cached")
    module = module_for("medfuse", data)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    module.fit_stages = lambda: type(module).fit_stages(module)[:1]  # stop after the EHR stage
    Trainer("mortality", lr=1e-2, batch_size=16, max_epochs=2, patience=2, device="cpu",
            num_threads=1).fit(module, source_of(data, "train", "medfuse"),
                               source_of(data, "val", "medfuse"))
    after = module.state_dict()
    for key, value in before.items():
        changed = not torch.equal(value, after[key])
        if key.startswith(("fusion", "head", "projection", "cxr_encoder")):
            assert not changed, f"{key} trained in the EHR stage"
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("ehr_head"))


def test_unknown_schedule_is_refused():
    from fusion.registry import get_method

    with pytest.raises(ValueError, match="schedule"):
        get_method("medfuse")(schedule="sometimes")


def test_hiding_every_xray_at_test_changes_stays_that_have_one(store):
    prob, hidden, present = fit_and_hide("medfuse", store)
    assert not np.allclose(prob[present], hidden[present])
    np.testing.assert_array_equal(prob[~present], hidden[~present])
