"""HEALNet: per-stay skip of the X-ray step, gradients, weight tying, attention, tokens."""

import math

import numpy as np
import pytest
import torch

from fusion.methods.healnet import HEALNet, fourier_positions, image_patches
from fusion.registry import HyperparameterError
from support import fit_and_hide, toy_batch, toy_module, train_on_batch

torch.set_num_threads(1)


def _module(features="raw", seed=0, **params):
    return toy_module(HEALNet, features, seed, **params)


def _key(features):
    return "cxr_map" if features == "cached" else "cxr"


@pytest.mark.parametrize("features", ["raw", "cached"])
def test_latents_of_a_stay_without_a_film_do_not_depend_on_the_image_input(features):
    module = _module(features).eval()
    batch = toy_batch(features, [True, False, True, False])
    out = module(batch)
    absent = ~batch["cxr_present"]
    key = _key(features)
    for fill in (torch.zeros_like, torch.randn_like, lambda x: 1e3 * torch.randn_like(x)):
        changed = dict(batch, **{key: batch[key].clone()})
        changed[key][absent] = fill(changed[key][absent])
        again = module(changed)
        torch.testing.assert_close(again["latents"][absent], out["latents"][absent], rtol=0, atol=0)
        torch.testing.assert_close(again["logits"][absent], out["logits"][absent], rtol=0, atol=0)
    shifted = dict(batch, **{key: batch[key].clone()})
    shifted[key][0] = shifted[key][0] + (300.0 if features == "raw" else 1.0)
    assert (module(shifted)["logits"][0] - out["logits"][0]).abs().max() > 1e-4


@pytest.mark.parametrize("cxr_first", [False, True])
def test_per_stay_skip_equals_the_ehr_only_path_and_batches_do_not_mix(cxr_first):
    module = _module(cxr_first=cxr_first).eval()
    batch = toy_batch("raw", [True, False, True, False, True])
    out = module(batch)["logits"]
    for i in range(5):  # alone, a stay without a film takes the batch-level shortcut (no X-ray step)
        one = {k: v[i:i + 1] for k, v in batch.items()}
        torch.testing.assert_close(module(one)["logits"], out[i:i + 1], rtol=1e-5, atol=1e-6)


def test_a_batch_without_films_trains_no_xray_weight():
    module = _module(self_per_cross_attn=1).train()
    out = module(toy_batch("raw", [False, False, False]))
    out["logits"].sum().backward()
    for name, parameter in module.named_parameters():
        grad = parameter.grad
        if name.startswith("cxr_steps"):
            assert grad is None or grad.abs().sum() == 0, name
    assert module.latents.grad.abs().sum() > 0
    assert module.ehr_steps[0].cross.query.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [None, torch.bfloat16, torch.float16])
def test_no_nan_for_an_all_missing_batch_also_under_autocast(dtype):
    module = _module().eval()
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        out = module(toy_batch("raw", [False, False]))
    assert torch.isfinite(out["logits"].float()).all()


def test_weight_tying_controls_how_parameters_grow_with_depth():
    def count(**params):
        return sum(p.numel() for p in _module(**params).parameters())

    assert count(weight_tie="all", depth=1) == count(weight_tie="all", depth=4)
    assert count(weight_tie="code", depth=2) == count(weight_tie="code", depth=4)
    assert count(weight_tie="code", depth=1) < count(weight_tie="code", depth=2)
    one, two, three = (count(weight_tie="none", depth=d) for d in (1, 2, 3))
    assert two - one == three - two > 0


def test_cross_attention_weights_use_temperature_one_half():
    module = _module().eval()
    cross = module.ehr_steps[0].cross
    cross.keep_attention = True
    batch = toy_batch("raw", [False, False])
    module(batch)
    attention = cross.attention  # the last layer's: compute its inputs again by hand
    latents = module.latents.expand(2, -1, -1)
    latents = module.ehr_steps[0](latents, module.ehr_tokens(batch))  # after layer 1 (depth 2)
    tokens = module.ehr_tokens(batch)
    q = cross.query(cross.norm_latent(latents)).view(2, -1, 2, 4).transpose(1, 2)
    k = cross.key_value(cross.norm_context(tokens))[..., :8].view(2, -1, 2, 4).transpose(1, 2)
    expected = torch.softmax(2 * q @ k.transpose(-1, -2) / math.sqrt(4), dim=-1)
    torch.testing.assert_close(attention, expected)


def test_a_context_with_the_wrong_width_raises():
    module = _module().eval()
    with pytest.raises(ValueError, match="channels"):
        module.cxr_steps[0].cross(module.latents[None], torch.zeros(1, 3, 5))
    with pytest.raises(HyperparameterError, match="patch_size 5 must divide"):
        _module(patch_size=5)


def test_tokens_and_positions():
    images = torch.arange(16.0).view(1, 1, 4, 4)
    patches = image_patches(images, 2)
    assert patches.shape == (1, 4, 4)
    assert patches[0, 1].tolist() == [2.0, 3.0, 6.0, 7.0]  # top-right patch
    positions = fourier_positions((3, 2), bands=2, max_freq=4.0)
    assert positions.shape == (6, 2 * 5)
    # per axis: sin at f = 1, 2; cos at f = 1, 2; the position itself
    row_two = positions[4]  # grid cell (2, 0): p = (1, -1)
    torch.testing.assert_close(row_two[:5], torch.tensor([math.sin(math.pi), math.sin(2 * math.pi),
                                                          math.cos(math.pi), math.cos(2 * math.pi),
                                                          1.0]))
    assert row_two[9] == -1.0


def _image_labelled(n, seed):
    """A cached batch, 3 in 4 stays with a film, whose label is the sign of the film's map mean
    (random for the stays without one)."""
    batch = toy_batch("cached", [i % 4 != 3 for i in range(n)], seed=seed)
    image = batch["cxr_map"].nan_to_num(0.0).mean(dim=(1, 2, 3)) > 0
    batch["y"] = torch.where(batch["cxr_present"], image.float(), batch["y"][:, 0])[:, None]
    return batch


def test_training_uses_the_image_when_the_label_depends_on_it():
    from sklearn.metrics import roc_auc_score

    train, test = _image_labelled(256, seed=1), _image_labelled(256, seed=2)
    film = test["cxr_present"]
    scores = {}
    for skip in (False, True):
        if skip:  # the same model with the X-ray step always skipped
            train, test = (dict(b, cxr_present=torch.zeros_like(b["cxr_present"])) for b in (train, test))
        module = train_on_batch(_module("cached"), train, steps=100, lr=5e-3)
        with torch.no_grad():
            logits = module(test)["logits"][:, 0]
        scores[skip] = roc_auc_score(test["y"][film, 0].numpy(), logits[film].numpy())
    assert scores[False] > 0.85 and scores[False] > scores[True] + 0.2, scores


def test_hiding_every_xray_at_test_changes_predictions_of_stays_with_one(store):
    prob, hidden, present = fit_and_hide("healnet", store)
    assert np.abs(prob[present] - hidden[present]).min() > 0
    np.testing.assert_array_equal(prob[~present], hidden[~present])
