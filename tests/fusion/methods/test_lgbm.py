"""LightGBM methods: the trees do not depend on the thread count; thread settings are checked."""

import numpy as np
import pytest

from fusion.data import load_fusion_data
from fusion.registry import HyperparameterError, get_method
from support import EHR_ID, make_fusion_store


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    store = make_fusion_store(tmp_path_factory.mktemp("lgbm") / "s.zarr", n_stays=400)
    return load_fusion_data(store, "mortality", 0, ehr_encoder=EHR_ID)


def _trees(method) -> str:
    """The model text of the fitted booster without its parameters section (which names num_threads)."""
    (booster,) = method.sets_["early"].models
    return booster.model_to_string().split("parameters:")[0]


def test_trees_are_the_same_for_any_thread_count(data):
    settings = {"n_estimators": 40, "num_leaves": 8, "min_child_samples": 5}
    one = get_method("lgbm-early")(seed=0, num_threads=1, **settings).fit(data)
    two = get_method("lgbm-early")(seed=0, num_threads=2, **settings).fit(data)
    every = get_method("lgbm-early")(seed=0, num_threads=0, **settings).fit(data)
    assert _trees(one).count("Tree=") > 1
    assert _trees(one) == _trees(two) == _trees(every)
    np.testing.assert_array_equal(one.predict_proba(data, "test"), two.predict_proba(data, "test"))


def test_negative_thread_count_is_refused(data):
    with pytest.raises(HyperparameterError, match="num_threads must be >= 0"):
        get_method("lgbm-early")(num_threads=-1).fit(data)
