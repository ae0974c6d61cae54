"""Simulated missing-X-ray masks: nested, deterministic, order independent, exact at 0 and 1."""

import numpy as np
import pytest

from cbstore.inputs.masks import MaskError, apply_cxr_mask, cxr_drop_mask, stay_uniforms

IDS = np.arange(30_000_000, 30_004_000, dtype=np.int64)


def test_rate_zero_and_one_are_exact():
    assert not cxr_drop_mask(IDS, 0.0, seed=1).any()
    assert cxr_drop_mask(IDS, 1.0, seed=1).all()
    assert cxr_drop_mask(IDS[:0], 0.5, seed=1).shape == (0,)


def test_nested_over_rates():
    previous = np.zeros(IDS.size, dtype=bool)
    for rate in (0.05, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0):
        mask = cxr_drop_mask(IDS, rate, seed=42)
        assert np.all(mask[previous]), f"a stay dropped below rate {rate} came back"
        assert mask.sum() >= previous.sum()
        previous = mask


def test_realised_fraction_is_close_to_the_rate():
    for rate in (0.1, 0.5, 0.9):
        fraction = cxr_drop_mask(IDS, rate, seed=3).mean()
        assert abs(fraction - rate) < 0.03, (rate, fraction)


def test_deterministic_and_seed_dependent():
    a = cxr_drop_mask(IDS, 0.4, seed=5)
    b = cxr_drop_mask(IDS.copy(), 0.4, seed=5)
    c = cxr_drop_mask(IDS, 0.4, seed=6)
    np.testing.assert_array_equal(a, b)
    assert (a != c).mean() > 0.2


def test_independent_of_order_and_of_the_other_stays():
    order = np.random.default_rng(0).permutation(IDS.size)
    full = cxr_drop_mask(IDS, 0.4, seed=5)
    np.testing.assert_array_equal(cxr_drop_mask(IDS[order], 0.4, seed=5), full[order])
    np.testing.assert_array_equal(cxr_drop_mask(IDS[::7], 0.4, seed=5), full[::7])


def test_uniforms_are_a_pure_function_of_seed_and_stay():
    u = stay_uniforms(IDS[:5], seed=9)
    assert np.all((u >= 0) & (u < 1))
    np.testing.assert_array_equal(u, [stay_uniforms(IDS[i:i + 1], seed=9)[0] for i in range(5)])


@pytest.mark.parametrize("rate", [-0.1, 1.5, float("nan"), "half", None])
def test_rate_outside_unit_interval_is_an_error(rate):
    with pytest.raises(MaskError, match="rate"):
        cxr_drop_mask(IDS, rate, seed=0)


def test_stay_ids_must_be_integers():
    with pytest.raises(MaskError, match="integer"):
        cxr_drop_mask(np.array([1.5, 2.5]), 0.5, seed=0)
    with pytest.raises(MaskError, match="1-D"):
        cxr_drop_mask(IDS.reshape(2, -1), 0.5, seed=0)


def test_apply_on_top_of_natural_missingness():
    present = np.arange(IDS.size) % 3 == 0
    after, masked = apply_cxr_mask(present, IDS, 0.5, seed=2)
    drop = cxr_drop_mask(IDS, 0.5, seed=2)
    np.testing.assert_array_equal(after, present & ~drop)
    np.testing.assert_array_equal(masked, present & drop)
    assert not np.any(after & ~present), "a mask never adds an X-ray"
    assert not np.any(masked & ~present), "only existing X-rays count as masked"
    with pytest.raises(MaskError, match="shape"):
        apply_cxr_mask(present[:-1], IDS, 0.5, seed=2)
