"""One contract suite over every registered method x task x declared feature mode.

Written only from the class declarations (``inputs``, ``modalities``, ``absent_cxr_policy``,
``test_hyperparameters``), so a new method passes it unchanged or fails it for a reason. Each case
checks: fit; probabilities of shape [n, C] in [0, 1] (LoS rows sum to 1) for every stay, with and
without an X-ray; per-modality probabilities; bitwise reproducibility for a seed; save -> load ->
identical predictions; X-ray-only methods predict the training prevalence where the X-ray is
absent; a fully masked test part still gets valid predictions.
"""

import numpy as np
import pytest
import torch

from fusion.data import load_fusion_data
from fusion.methods.base import label_prior
from fusion.registry import get_method, list_methods, load_method
from support import EHR_ID, make_fusion_store

torch.set_num_threads(1)

TASKS = ("mortality", "phenotype", "los")
CASES = [(name, task, mode) for name in list_methods() for task in TASKS
         for mode in sorted(get_method(name).inputs)]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_fusion_store(tmp_path_factory.mktemp("contract") / "store.zarr", n_stays=80)


@pytest.fixture(scope="module")
def datasets(store):
    cache = {}

    def get(task, mode, **kwargs):
        key = (task, mode, tuple(sorted(kwargs.items())))
        if key not in cache:
            cache[key] = load_fusion_data(store, task, 0, features=mode, ehr_encoder=EHR_ID, **kwargs)
        return cache[key]
    return get


def _fit(name, data, seed=0):
    cls = get_method(name)
    return cls(seed=seed, **cls.test_hyperparameters).fit(data, device="cpu")


def _check_probabilities(prob, data, part):
    n = len(data.part(part))
    assert prob.shape == (n, data.n_outputs)
    assert prob.dtype == np.float64
    assert np.all(np.isfinite(prob)), "probabilities must be finite"
    assert np.all((prob >= 0) & (prob <= 1)), "probabilities must lie in [0, 1] (not logits)"
    if data.task == "los":
        np.testing.assert_allclose(prob.sum(axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("name,task,mode", CASES, ids=["-".join(c) for c in CASES])
def test_method_contract(name, task, mode, datasets, tmp_path):
    data = datasets(task, mode)
    test = data.part("test")
    assert test.cxr_present.any() and not test.cxr_present.all(), "fixture needs both kinds of stays"
    cls = get_method(name)

    method = _fit(name, data)
    assert method.get_params()["seed"] == 0
    for part in ("val", "test"):
        _check_probabilities(method.predict_proba(data, part), data, part)
    prob = method.predict_proba(data, "test")

    by_modality = method.predict_modality_proba(data, "test")
    assert set(by_modality) <= set(cls.modalities)
    for modality, values in by_modality.items():
        assert values.shape == prob.shape
        observed = ~np.isnan(values)
        assert np.all(observed[test.cxr_present] if modality == "cxr" else observed), \
            f"{modality} probabilities may be NaN only where the X-ray is absent"
        assert np.all((values[observed] >= 0) & (values[observed] <= 1))

    if cls.absent_cxr_policy == "train_prevalence":
        prior = label_prior(data.part("train"), data.n_outputs, data.multiclass)
        np.testing.assert_allclose(prob[~test.cxr_present], np.tile(prior, ((~test.cxr_present).sum(), 1)))

    again = _fit(name, data).predict_proba(data, "test")
    np.testing.assert_array_equal(prob, again, err_msg="same seed must give identical predictions")

    method.save(tmp_path / "saved")
    loaded = load_method(tmp_path / "saved")
    assert type(loaded) is cls and loaded.get_params() == method.get_params()
    np.testing.assert_array_equal(loaded.predict_proba(data, "test"), prob,
                                  err_msg="save -> load must give identical predictions")

    masked = datasets(task, mode, cxr_missing_rate=1.0, missing_at=("test",))
    assert not masked.part("test").cxr_present.any()
    assert masked.part("test").cxr_masked.sum() == test.cxr_present.sum()
    masked_prob = method.predict_proba(masked, "test")
    _check_probabilities(masked_prob, masked, "test")
    if cls.modalities == {"ehr"}:
        np.testing.assert_array_equal(masked_prob, prob, err_msg="EHR-only methods ignore X-ray masks")
    absent = ~test.cxr_present
    np.testing.assert_allclose(masked_prob[absent], prob[absent],
                               err_msg="masking changes only the stays that had an X-ray")


@pytest.mark.parametrize("name", list_methods())
def test_unknown_hyperparameter_and_unsupported_mode(name):
    cls = get_method(name)
    with pytest.raises(ValueError, match="valid hyperparameters"):
        cls(no_such_setting=1)
    for mode in {"raw", "cached"} - set(cls.inputs):
        with pytest.raises(ValueError, match=f"does not support --features {mode}"):
            cls.inputs_for(mode)
        with pytest.raises(ValueError, match=f"does not support --features {mode}"):
            cls(features=mode)


@pytest.mark.parametrize("name", list_methods())
def test_constructor_mode_picks_that_modes_defaults_and_fit_refuses_another_mode(name, datasets):
    cls = get_method(name)
    for mode in cls.inputs:
        assert cls(features=mode).params == cls.resolve_hyperparameters(features=mode)
    if {"raw", "cached"} <= set(cls.inputs):
        with pytest.raises(ValueError, match="set up for --features raw"):
            cls(features="raw", **cls.test_hyperparameters).fit(datasets("mortality", "cached"))


@pytest.mark.parametrize("name", [n for n in list_methods() if get_method(n).modalities == {"cxr"}])
def test_xray_only_methods_need_training_xrays(name, datasets):
    data = datasets("mortality", "cached", cxr_missing_rate=1.0, missing_at=("train",))
    with pytest.raises(ValueError, match="no training stay has an X-ray"):
        _fit(name, data)
