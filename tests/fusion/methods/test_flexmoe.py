"""Flex-MoE: combination index, missing-modality bank, routing, gate loss and the warm-up order."""

import math

import numpy as np
import pytest
import torch

from fusion.methods.flexmoe import FlexMoE, combination_index, gate_loss
from fusion.modules import PatchTokens
from fusion.registry import HyperparameterError
from support import MAP_SHAPE, fit_and_hide, toy_batch, toy_module

torch.set_num_threads(1)


def _module(features="cached", seed=0, **params):
    return toy_module(FlexMoE, features, seed, **params)


def test_combination_index_follows_the_present_modalities_complete_first():
    present = torch.tensor([[True, True], [True, False], [False, True]])
    assert combination_index(present).tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="no modality present"):
        combination_index(torch.tensor([[False, False]]))
    module = _module().eval()
    batch = toy_batch("cached", [True, False, False, True])
    assert module(batch)["combination"].tolist() == [0, 1, 1, 0]


@pytest.mark.parametrize("features", ["cached", "raw"])
def test_bank_fills_the_absent_xray_and_learns_only_from_stays_without_one(features):
    module = _module(features).eval()
    batch = toy_batch(features, [True, False, True, False])
    out = module(batch)
    cells = MAP_SHAPE[1] * MAP_SHAPE[2]  # cached: one X-ray token per cell of the stored map
    assert out["cxr_tokens"].shape[1] == (cells if features == "cached" else 2)
    for i in (1, 3):
        assert torch.equal(out["cxr_tokens"][i], module.bank["cxr"][1])
    key = "cxr_map" if features == "cached" else "cxr"
    noisy = dict(batch, **{key: batch[key].clone()})
    noisy[key][[1, 3]] = 1e3 * torch.randn_like(noisy[key][[1, 3]])
    torch.testing.assert_close(module(noisy)["logits"][[1, 3]], out["logits"][[1, 3]], rtol=0, atol=0)

    module.train()
    module.zero_grad(set_to_none=True)
    module(toy_batch(features, [True, True, True]))["logits"].sum().backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in module.bank.values())
    module.zero_grad(set_to_none=True)
    out = module(batch)
    (out["logits"].sum() + out["aux_loss"]).backward()
    assert module.bank["ehr"].grad is None or module.bank["ehr"].grad.abs().sum() == 0
    grad = module.bank["cxr"].grad.abs().sum(dim=(1, 2))
    assert grad[1] > 0
    grad[1] = 0
    assert grad.sum() == 0, "only the bank slot of {EHR} x CXR is used"
    module.zero_grad(set_to_none=True)
    out = module(toy_batch(features, [False, False, False]))
    (out["logits"].sum() + out["aux_loss"]).backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in module.cxr_encoder.parameters())


def test_paper_routing_puts_the_combination_expert_first_for_ehr_only_stays():
    module = _module().train()
    moe = module.layers[0].moe
    calls = []
    moe.register_forward_hook(lambda mod, args, out: calls.append(dict(mod.last_routing)))
    module(toy_batch("cached", [True, False, True, False]))
    assert len(calls) == 2  # one call per modality chunk (EHR tokens, then X-ray or bank tokens)
    for routing, tokens in zip(calls, (2, MAP_SHAPE[1] * MAP_SHAPE[2])):
        partial = routing["combination"] == 1
        assert partial.sum() == 2 * tokens  # two stays without a film: 2 EHR, 4 map-cell tokens
        assert (routing["chosen"][partial, 0] == 1).all()
        assert (routing["chosen"][partial, 1] != 1).all()


def test_every_router_receives_gradient():
    module = _module(fusion_layers=2).train()
    out = module(toy_batch("cached", [True, False, True, False]))
    (out["logits"].sum() + out["aux_loss"]).backward()
    for layer in module.layers:
        for router in (layer.moe.router, layer.moe.noise):
            assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0


def test_gate_loss_matches_hand_computed_values():
    logits = torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]])
    full_gates = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.5, 0.5]])
    full_load = (full_gates > 0).float()
    full = gate_loss(logits, full_gates, full_load, torch.tensor([0, 0]))
    assert full.item() == pytest.approx(0.1875 + 0.1875)
    partial_gates = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.5, 0.5]])
    partial_load = (partial_gates > 0).float()
    partial = gate_loss(logits, partial_gates, partial_load, torch.tensor([1, 1]))
    expected = math.log((2 + math.e) / math.e) + 0.5 + 2 / 9
    assert partial.item() == pytest.approx(expected, rel=1e-6)
    mixed = gate_loss(torch.cat([logits, logits]), torch.cat([full_gates, partial_gates]),
                      torch.cat([full_load, partial_load]), torch.tensor([0, 0, 1, 1]))
    assert mixed.item() == pytest.approx(0.375 + expected, rel=1e-6)


def test_evaluation_is_deterministic_and_independent_of_batch_mates():
    module = _module().eval()
    batch = toy_batch("cached", [True, False, True, False, True])
    out = module(batch)["logits"]
    torch.testing.assert_close(module(batch)["logits"], out, rtol=0, atol=0)
    for i in range(5):
        one = {k: v[i:i + 1] for k, v in batch.items()}
        torch.testing.assert_close(module(one)["logits"], out[i:i + 1], rtol=1e-5, atol=1e-6)


def test_warm_up_epochs_put_complete_stays_first_then_shuffle():
    module = _module(warmup_epochs=2)

    class Ctx:
        epoch = 1

    class Train:
        part = type("Part", (), {"cxr_present": np.array([False, True, False, True, True, False])})
        rows = np.array([0, 1, 2, 3, 5])

    order = module.train_batch_order(Ctx(), Train())
    assert order.tolist() == [1, 3, 0, 2, 4]  # rows 1, 3 (film) then 0, 2, 5 (positions 0, 2, 4)
    Ctx.epoch = 3
    assert module.train_batch_order(Ctx(), Train()) is None


def test_patch_tokens_pad_the_vector_and_share_one_projection():
    tokens = PatchTokens(5, 2, 4)
    torch.nn.init.eye_(tokens.proj.weight[:3])
    out = tokens(torch.arange(1.0, 6.0).unsqueeze(0))
    assert out.shape == (1, 2, 4) and tokens.chunk == 3
    torch.testing.assert_close(out[0, 1, :3] - tokens.proj.bias[:3], torch.tensor([4.0, 5.0, 0.0]))


def test_invalid_settings_are_refused():
    with pytest.raises(HyperparameterError, match="at least the number of modality combinations"):
        _module(n_experts=2, top_k=1)
    with pytest.raises(HyperparameterError, match="top_k"):
        _module(n_experts=4, top_k=5)


def test_hiding_every_xray_at_test_changes_predictions_of_stays_with_one(store):
    prob, hidden, present = fit_and_hide("flexmoe", store)
    assert np.abs(prob[present] - hidden[present]).min() > 0
    np.testing.assert_array_equal(prob[~present], hidden[~present])
