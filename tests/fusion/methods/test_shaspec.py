"""ShaSpec: generation of the absent feature, gradient routing of the two losses, per-stay handling."""

import numpy as np
import pytest
import torch

from fusion.methods.shaspec import ShaSpec
from fusion.registry import HyperparameterError
from support import fit_and_hide, toy_batch, toy_module, train_on_batch

torch.set_num_threads(1)


def _module(features, seed=0, **params):
    return toy_module(ShaSpec, features, seed, **params)


SHARED = ("shared_ehr", "shared_cxr", "trunk")
SPECIFIC = ("specific_ehr", "specific_cxr")


def _grads(module, loss, prefixes):
    module.zero_grad(set_to_none=True)
    loss.backward(retain_graph=True)
    return {n: p.grad for n, p in module.named_parameters() if n.startswith(prefixes)}


def _nonzero(grads):
    return any(g is not None and g.abs().sum() > 0 for g in grads.values())


@pytest.mark.parametrize("features", ["cached", "raw"])
def test_domain_loss_reaches_specific_encoders_only_and_alignment_shared_only(features):
    module = _module(features)
    module.train()
    out = module(toy_batch(features, [True, True, False, True]))
    assert out["cxr_used"].tolist() == [True, True, False, True]
    domain_shared = _grads(module, out["loss_domain"], SHARED)
    domain_specific = _grads(module, out["loss_domain"], SPECIFIC)
    assert not _nonzero(domain_shared), "the domain loss must not reach the shared branch"
    for prefix in SPECIFIC:
        assert _nonzero({n: g for n, g in domain_specific.items() if n.startswith(prefix)}), prefix
    align_specific = _grads(module, out["loss_align"], SPECIFIC)
    align_shared = _grads(module, out["loss_align"], SHARED)
    assert not _nonzero(align_specific), "the alignment loss must not reach the specific branch"
    for prefix in SHARED:
        assert _nonzero({n: g for n, g in align_shared.items() if n.startswith(prefix)}), prefix


@pytest.mark.parametrize("features", ["cached", "raw"])
def test_absent_film_feature_is_the_ehr_shared_feature_and_ignores_the_image(features):
    module = _module(features).eval()
    batch = toy_batch(features, [True, False, True, False])
    out = module(batch)
    absent = ~batch["cxr_present"]
    torch.testing.assert_close(out["f_cxr"][absent], out["r_ehr"][absent], rtol=0, atol=0)
    noisy = dict(batch)
    key = "cxr_map" if features == "cached" else "cxr"
    noisy[key] = batch[key].clone()
    noisy[key][absent] = 1e3 * torch.randn_like(noisy[key][absent])
    changed = module(noisy)["logits"]
    torch.testing.assert_close(changed[absent], out["logits"][absent], rtol=0, atol=0)
    # a stay with a film depends on it (not a constant shift: map cells are layer-normalised)
    shifted = dict(batch)
    shifted[key] = batch[key].clone()
    shifted[key][0] = shifted[key][0] + 3.0 * torch.randn_like(shifted[key][0]) * (
        1000 if features == "raw" else 1)
    assert (module(shifted)["logits"][0] - out["logits"][0]).abs().max() > 1e-5


def test_mixed_batch_equals_single_stay_runs():
    module = _module("cached").eval()
    batch = toy_batch("cached", [True, False, True, False, True])
    out = module(batch)["logits"]
    for i in range(5):
        one = {k: v[i:i + 1] for k, v in batch.items()}
        torch.testing.assert_close(module(one)["logits"], out[i:i + 1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("features", ["cached", "raw"])
def test_batch_without_films_has_no_alignment_and_no_xray_gradient(features):
    module = _module(features)
    module.train()
    out = module(toy_batch(features, [False, False, False]))
    assert out["loss_align"].item() == 0.0
    assert torch.isfinite(out["loss_domain"]) and torch.isfinite(out["logits"]).all()
    loss = out["logits"].sum() + out["aux_loss"]
    grads = _grads(module, loss, ("shared_cxr", "specific_cxr"))
    assert not _nonzero(grads)


def test_domain_loss_of_a_batch_without_films_is_the_ehr_term_alone():
    module = _module("cached").eval()
    batch = toy_batch("cached", [False, False, False])
    out = module(batch)
    s_e = module.specific_ehr(batch).pooled
    expected = torch.nn.functional.cross_entropy(module.domain(s_e), torch.zeros(3, dtype=torch.long))
    torch.testing.assert_close(out["loss_domain"], expected)


def _fused_and_shared(module, batch):
    """The head's input split into ``(f_E, f_C)`` and the shared trunk's outputs ``(r_E, r_C)``."""
    trunk, head = [], []
    hooks = [module.trunk.register_forward_hook(lambda m, i, o: trunk.append(o)),
             module.head.register_forward_pre_hook(lambda m, i: head.append(i[0]))]
    with torch.no_grad():
        module(batch)
    for hook in hooks:
        hook.remove()
    (r_e, r_c), (fused,) = trunk, head
    return fused.chunk(2, dim=1), (r_e, r_c)


@pytest.mark.parametrize("features", ["cached", "raw"])
def test_zero_fusion_weights_make_the_fused_features_the_shared_ones(features):
    module = _module(features).eval()
    batch = toy_batch(features, [True, False, True])
    film = batch["cxr_present"]
    (f_e, f_c), (r_e, r_c) = _fused_and_shared(module, batch)
    assert not torch.allclose(f_e, r_e), "control: the residual adds g([r; s])"
    torch.nn.init.zeros_(module.fuse.weight)
    (f_e, f_c), (r_e, r_c) = _fused_and_shared(module, batch)
    torch.testing.assert_close(f_e, r_e, rtol=0, atol=0)
    torch.testing.assert_close(f_c[film], r_c, rtol=0, atol=0)
    torch.testing.assert_close(f_c[~film], r_e[~film], rtol=0, atol=0)


def _domain_accuracy_and_alignment(module, batch):
    """Share of specific features the domain classifier assigns to their modality, and
    ``mean |r_E - r_C|``, in one forward pass (every stay has a film)."""
    predicted = []
    hook = module.domain.register_forward_hook(lambda m, i, o: predicted.append(o.argmax(dim=1)))
    with torch.no_grad():
        out = module(batch)
    hook.remove()
    ehr, cxr = predicted  # the classifier reads s_E, then s_C
    return torch.cat([ehr == 0, cxr == 1]).float().mean().item(), out["loss_align"].item()


def test_training_separates_the_specific_features_and_aligns_the_shared_ones():
    def offset(seed):  # modality-specific offsets in the inputs
        batch = toy_batch("cached", [True] * 128, seed=seed)
        return dict(batch, ehr_emb=batch["ehr_emb"] + 2.0, cxr_map=batch["cxr_map"] - 2.0)
    train, test = offset(1), offset(2)
    untrained = _domain_accuracy_and_alignment(_module("cached").eval(), test)
    trained = _domain_accuracy_and_alignment(
        train_on_batch(_module("cached"), train, steps=50, lr=1e-2), test)
    unaligned = _domain_accuracy_and_alignment(
        train_on_batch(_module("cached", alpha=0.0), train, steps=50, lr=1e-2), test)
    assert untrained[0] < 0.9 and trained[0] > 0.95, (untrained, trained)
    assert trained[1] < 0.5 * unaligned[1], (trained, unaligned)


def test_film_dropout_one_is_the_no_film_path():
    module = _module("cached", film_dropout=1.0, dropout=0.0)  # no dropout noise to compare

    class Ctx:
        epoch = 1
    module.on_train_epoch_start(Ctx())
    module.train()
    batch = toy_batch("cached", [True, True, False])
    dropped = module(batch)
    assert not dropped["cxr_used"].any()
    no_films = dict(batch, cxr_present=torch.zeros(3, dtype=torch.bool))
    torch.testing.assert_close(dropped["logits"], module(no_films)["logits"], rtol=0, atol=0)


def test_invalid_settings_are_refused():
    with pytest.raises(HyperparameterError, match="divisible by n_heads"):
        _module("cached", hidden=6, n_heads=4)
    with pytest.raises(HyperparameterError, match="film_dropout"):
        _module("cached", film_dropout=1.5)


def test_hiding_every_xray_at_test_changes_predictions_of_stays_with_one(store):
    prob, hidden, present = fit_and_hide("shaspec", store)
    assert np.abs(prob[present] - hidden[present]).min() > 0
    np.testing.assert_array_equal(prob[~present], hidden[~present])


def test_hours_since_observed_counts_back_to_the_last_observation():
    from fusion.modules import hourly_tokens, hours_since_observed

    mask = torch.tensor([[[0.0], [1.0], [0.0], [0.0], [1.0]]])  # one stay, 5 hours, 1 variable
    assert hours_since_observed(mask)[0, :, 0].tolist() == [1.0, 0.0, 1.0, 2.0, 0.0]
    tokens = hourly_tokens({"ehr": torch.ones(1, 5, 1), "ehr_mask": mask})
    assert tokens.shape == (1, 5, 3)
    torch.testing.assert_close(tokens[0, :, 2], torch.tensor([0.2, 0.0, 0.2, 0.4, 0.0]))
