"""DrFuse: pooling, masked attention, paired-only losses, ranking, batch independence."""

import numpy as np
import pytest
import torch

from fusion.methods.drfuse import jsd_paired, pool_shared, ranking_loss
from support import (assert_batch_independent, batch_of, fit_and_hide, mixed_setup, module_for,
                     randomise_xray, tiny_data, with_rows)

torch.set_num_threads(1)


class Ctx:
    def __init__(self, task="mortality"):
        self.task = task


@pytest.fixture(scope="module", params=["raw", "cached"])
def setup(request, store):
    return mixed_setup(store, "drfuse", request.param)


def test_pooling_is_the_logit_of_the_mean_probability():
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 5, generator=generator) * 3, torch.randn(4, 5, generator=generator) * 3
    paired = torch.tensor([True, False, True, False])
    s = pool_shared(a, b, paired)
    torch.testing.assert_close(torch.sigmoid(s[paired]),
                               (torch.sigmoid(a[paired]) + torch.sigmoid(b[paired])) / 2)
    torch.testing.assert_close(s[~paired], a[~paired], rtol=0, atol=0)


def test_attention_sums_to_one_and_ignores_an_absent_xray(setup):
    _, module, batch, present = setup
    with torch.no_grad():
        attention = module(batch)["attention"]
    torch.testing.assert_close(attention.sum(-1), torch.ones(attention.shape[:2]))
    assert torch.all(attention[~torch.as_tensor(present), :, 2] == 0)
    assert torch.all(attention[torch.as_tensor(present), :, 2] > 0)


def test_absent_stays_images_change_no_output_loss_or_gradient(setup):
    _, module, batch, present = setup
    noisy = randomise_xray(batch, np.flatnonzero(~present))

    def run(b):
        module.zero_grad()
        out = module(b)
        terms = module.loss_terms(out, b, "mortality")
        module.loss(out, b, Ctx()).backward()
        grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
        return out["logits"].detach(), {k: v.detach() for k, v in terms.items()}, grads

    logits, terms, grads = run(batch)
    logits2, terms2, grads2 = run(noisy)
    module.zero_grad()
    torch.testing.assert_close(logits2, logits, rtol=0, atol=0)
    for key in terms:
        torch.testing.assert_close(terms2[key], terms[key], rtol=0, atol=0, msg=key)
    assert grads.keys() == grads2.keys()
    for key in grads:
        torch.testing.assert_close(grads2[key], grads[key], rtol=0, atol=0, msg=key)


def test_a_batch_without_xrays_gives_zero_masked_terms_and_no_xray_gradient(setup):
    _, module, batch, present = setup
    absent = with_rows(batch, np.flatnonzero(~present))
    module.zero_grad()
    out = module(absent)
    terms = module.loss_terms(out, absent, "mortality")
    for key in ("lambda_pred_cxr", "lambda_dis_shared", "lambda_dis_cxr", "lambda_attn"):
        assert torch.isfinite(terms[key]) and float(terms[key].detach()) == 0.0, key
    module.loss(out, absent, Ctx()).backward()
    for name, parameter in module.cxr.named_parameters():
        assert parameter.grad is None or not parameter.grad.any(), name
    module.zero_grad()


def test_jsd_masks_numerator_and_denominator():
    z_e = torch.tensor([[2.0, -1.0], [0.5, 0.5], [3.0, 3.0]])
    z_c = torch.tensor([[-2.0, 1.0], [0.5, 0.5], [-3.0, -3.0]])
    paired = torch.tensor([True, True, False])
    p, q = torch.sigmoid(z_e[0]), torch.sigmoid(z_c[0])
    r = (p + q) / 2
    first = 0.5 * (p * torch.log(p / r) + q * torch.log(q / r)).sum()
    torch.testing.assert_close(jsd_paired(z_e, z_c, paired), first / 2)  # row 2: identical -> 0


def test_ranking_term_is_positive_when_the_better_head_has_less_attention():
    # one stay, one output; the X-ray head predicts better than the EHR head
    losses = {"ehr": torch.tensor([[1.0]]), "cxr": torch.tensor([[0.2]]),
              "shared": torch.tensor([[0.6]])}
    logits = torch.tensor([[[2.0, 0.0, -1.0]]], requires_grad=True)   # a_cxr < a_ehr
    attention = torch.softmax(logits, dim=-1)
    loss = ranking_loss(attention, losses, torch.tensor([True]))
    assert float(loss.detach()) > 0
    loss.backward()
    assert logits.grad[0, 0, 2] < 0, "descending the loss raises the X-ray weight"
    assert float(ranking_loss(attention, losses, torch.tensor([False])).detach()) == 0.0
    swapped = torch.softmax(torch.tensor([[[-1.0, 0.0, 2.0]]]), dim=-1)  # a_cxr > a_ehr
    cxr_vs_ehr = ranking_loss(swapped, {**losses, "shared": torch.tensor([[5.0]])},
                              torch.tensor([True]))
    shared_only = torch.relu(swapped[0, 0, 1] - swapped[0, 0, 0]) + torch.relu(
        swapped[0, 0, 1] - swapped[0, 0, 2])
    torch.testing.assert_close(cxr_vs_ehr, shared_only / 3)


def test_predictions_do_not_depend_on_the_batch(setup):
    _, module, batch, _ = setup
    assert_batch_independent(module, batch, seed=1)


def test_los_uses_softmax_cross_entropy_on_logits(store):
    data = tiny_data(store, "cached", task="los")
    module = module_for("drfuse", data).eval()
    batch = batch_of(data, "train", "drfuse")
    with torch.no_grad():
        out = module(batch)
        terms = module.loss_terms(out, batch, "los")
    torch.testing.assert_close(terms["final"],
                               torch.nn.functional.cross_entropy(out["logits"], batch["y"]))
    assert all(torch.isfinite(v) for v in terms.values())


def test_disentanglement_weight_lowers_the_cosine(store):
    data = tiny_data(store, "cached")
    batch = batch_of(data, "train", "drfuse")

    def cosine_after(weight):
        module = module_for("drfuse", data, lambda_dis_ehr=weight)
        optimizer = torch.optim.Adam(module.parameters(), lr=1e-2)
        for _ in range(15):
            optimizer.zero_grad()
            module.loss(module(batch), batch, Ctx()).backward()
            optimizer.step()
        with torch.no_grad():
            return float(module.loss_terms(module.eval()(batch), batch, "mortality")["lambda_dis_ehr"])

    assert cosine_after(5.0) < cosine_after(0.0)


def test_hiding_every_xray_at_test_changes_stays_that_have_one(store):
    prob, hidden, present = fit_and_hide("drfuse", store)
    assert not np.allclose(prob[present], hidden[present])
    np.testing.assert_array_equal(prob[~present], hidden[~present])
