"""Raw-image augmentation: a random affine per image from the fit's own seeded generator."""

import numpy as np
import pytest
import torch

from fusion.modules import AUGMENT_HYPERPARAMETERS, RandomAffine, build_encoder, seed_augmentations
from fusion.registry import HyperparameterError, get_method
from support import batch_of, module_for, tiny_data, tiny_store

torch.set_num_threads(1)

#: Methods with a raw X-ray branch whose augmentation these tests check end to end.
RAW_IMAGE_METHODS = ("resnet", "latefusion", "mmtm", "healnet", "flexmoe", "umse", "shaspec")


@pytest.fixture(scope="module")
def raw_data(tmp_path_factory):
    return tiny_data(tiny_store(tmp_path_factory.mktemp("aug") / "s.zarr"), "raw")


def _images(n=4, size=16):
    g = torch.Generator().manual_seed(1)
    return (torch.rand(n, 1, size, size, generator=g) * 2 - 1) * 1024


def test_identity_in_eval_mode_and_with_zero_ranges():
    x = _images()
    aug = RandomAffine()
    aug.eval()
    assert torch.equal(aug(x), x)
    still = RandomAffine(0.0, 0.0, 0.0).train()
    torch.testing.assert_close(still(x), x, atol=1e-2, rtol=0)


def test_draws_come_from_the_seeded_generator_not_the_global_one():
    x = _images()
    a, b = RandomAffine().train(), RandomAffine().train()
    a.reseed(3)
    b.reseed(3)
    before = torch.get_rng_state()
    out = a(x)
    assert torch.equal(torch.get_rng_state(), before), "the global generator must not be used"
    assert torch.equal(out, b(x)), "same seed, same transforms"
    assert not torch.allclose(out, x), "training mode transforms the images"
    b.reseed(4)
    assert not torch.equal(a(x), b(x)), "another seed, other transforms"


def test_transforms_lie_in_the_ranges():
    aug = RandomAffine(45.0, 0.15, 0.15)
    aug.reseed(0)
    theta = aug.theta(2000).double()
    det = torch.linalg.det(theta[:, :, :2])  # 1 / scale**2
    scale = det.rsqrt()
    assert scale.min() >= 0.85 - 1e-6 and scale.max() <= 1.15 + 1e-6
    assert scale.min() < 0.87 and scale.max() > 1.13
    angle = torch.rad2deg(torch.atan2(theta[:, 0, 1], theta[:, 0, 0]))
    assert angle.abs().max() <= 45 + 1e-4 and angle.abs().max() > 44
    shift = -(torch.linalg.inv(theta[:, :, :2]) @ theta[:, :, 2:]).squeeze(-1) / 2
    assert shift.abs().max() <= 0.15 + 1e-6 and shift.abs().max() > 0.14


def test_translation_moves_the_picture_and_fills_black():
    x = torch.full((1, 1, 8, 8), -1024.0)
    x[0, 0, :, 3] = 1024.0  # a bright column
    aug = RandomAffine(0.0, 0.0, 0.25).train()
    aug.reseed(0)
    twin = RandomAffine(0.0, 0.0, 0.25)
    twin.reseed(0)
    shift_px = float(-twin.theta(1)[0, 0, 2]) / 2 * 8  # normalised offset -> pixels
    assert abs(shift_px) > 0.5
    out = aug(x)
    assert out.min() >= -1024.0 - 1e-3 and out.max() <= 1024.0 + 1e-3
    column = out[0, 0].mean(dim=0)
    assert abs(int(column.argmax()) - (3 + shift_px)) <= 1.0
    assert (out[0, 0] == -1024.0).any(), "area moved in from outside is black"


def test_state_survives_a_state_dict_round_trip():
    x = _images()
    aug = RandomAffine().train()
    aug.reseed(5)
    aug(x)
    state = aug.state_dict()
    first = aug(x)
    other = RandomAffine().train()
    other.load_state_dict(state)
    assert torch.equal(other(x), first)


def test_hyperparameters_switch_it():
    spec = {"image_size": 16}
    on = build_encoder("cxr", "cxr_img", spec, {"backbone": "small", "cxr_weights": "random"})
    off = build_encoder("cxr", "cxr_img", spec, {"backbone": "small", "cxr_weights": "random",
                                                  "augment": False})
    assert isinstance(on.augment, RandomAffine) and off.augment is None
    with pytest.raises(HyperparameterError, match="augment_scale < 1"):
        RandomAffine.from_params({"augment_scale": 1.5})


@pytest.mark.parametrize("name", RAW_IMAGE_METHODS)
def test_raw_image_methods_declare_it_and_their_films_are_augmented(name, raw_data):
    cls = get_method(name)
    assert cls.resolve_hyperparameters({"augment": "false"})["augment"] is False
    assert {k: v for k, v in cls.hyperparameters.items()
            if k in AUGMENT_HYPERPARAMETERS} == AUGMENT_HYPERPARAMETERS
    films = np.flatnonzero(raw_data.part("train").cxr_present)[:4]
    batch = batch_of(raw_data, "train", name, films)

    def train_logits(module, seed):
        seed_augmentations(module, seed)
        module.train()
        with torch.random.fork_rng():  # the same dropout and gate noise for every call
            torch.manual_seed(0)
            return module(batch)["logits"]

    module = module_for(name, raw_data, dropout=0.0)
    augments = [m for m in module.modules() if isinstance(m, RandomAffine)]
    assert len(augments) == 1, "one augmentation per film, shared by every X-ray branch"
    first = train_logits(module, 1)
    assert torch.equal(train_logits(module, 1), first), "the seed alone sets the transforms"
    assert not torch.equal(train_logits(module, 2), first), "the films reach the model augmented"
    drawn = augments[0].generator.get_state()
    module.eval()
    with torch.no_grad():
        module(batch)
    assert torch.equal(augments[0].generator.get_state(), drawn), "no augmentation in eval mode"
    off = module_for(name, raw_data, dropout=0.0, augment=False)
    assert not any(isinstance(m, RandomAffine) for m in off.modules())
    torch.testing.assert_close(train_logits(off, 1), train_logits(off, 2), rtol=0, atol=0)


def test_fit_seeds_every_augmentation():
    module = torch.nn.Sequential(RandomAffine(), torch.nn.Sequential(RandomAffine()))
    seed_augmentations(module, 7)
    states = [m.generator.get_state() for m in module.modules() if isinstance(m, RandomAffine)]
    assert len(states) == 2 and torch.equal(states[0], states[1])
    reference = RandomAffine()
    reference.reseed(7)
    assert torch.equal(states[0], reference.generator.get_state())
    assert not np.array_equal(states[0].numpy(), RandomAffine().generator.get_state().numpy())
