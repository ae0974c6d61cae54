"""The fusion registry: registration, look-up errors, declarations, hyperparameter validation."""

import subprocess
import sys

import pytest

from fusion.registry import (
    FEATURE_MODES, FUSION_METHODS, INPUT_KINDS, TASKS, DuplicateMethodError, FusionMethod,
    HyperparameterError, MethodStateError, UnknownMethodError, UnsupportedFeaturesError,
    get_method, list_methods, load_method, register)

BASELINES = {"lstm", "transformer", "resnet", "ehr-mlp", "cxr-mlp", "lgbm-ehr", "lgbm-cxr",
             "lgbm-early", "lgbm-late", "latefusion"}


def test_every_baseline_is_registered():
    assert BASELINES <= set(list_methods())
    assert list_methods() == sorted(list_methods())


def test_method_module_map_matches_the_registrations():
    from fusion.methods import METHOD_MODULES

    names = list_methods()
    assert set(METHOD_MODULES) == set(names) - {n for n in names if n.startswith("test-")}
    for name, module in METHOD_MODULES.items():
        assert get_method(name).__module__ == f"fusion.methods.{module}", name


def test_looking_up_a_lightgbm_method_does_not_import_torch():
    code = ("import sys; from fusion.registry import get_method; get_method('lgbm-early'); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_unknown_method_lists_the_valid_names():
    with pytest.raises(UnknownMethodError) as err:
        get_method("late-fusion")
    message = str(err.value)
    assert "'late-fusion'" in message
    for name in ("latefusion", "lgbm-early", "lstm"):
        assert name in message


@pytest.fixture
def scratch_name():
    name = "test-scratch-method"
    yield name
    FUSION_METHODS.pop(name, None)


def _scratch_class():
    class Scratch(FusionMethod):
        inputs = {"cached": frozenset({"ehr_emb"})}
        modalities = frozenset({"ehr"})
        hyperparameters = {"alpha": 1.0, "depth": 3, "flag": True, "kind": "a"}
        hyperparameter_choices = {"kind": ("a", "b")}
    return Scratch


def test_duplicate_registration_raises(scratch_name):
    register(scratch_name)(_scratch_class())
    with pytest.raises(DuplicateMethodError, match=scratch_name):
        register(scratch_name)(_scratch_class())
    with pytest.raises(DuplicateMethodError, match="registered twice"):
        register("lstm")(_scratch_class())


def test_registration_checks_declarations(scratch_name):
    bad_inputs = type("Bad", (_scratch_class(),), {"inputs": {"cached": frozenset({"pixels"})}})
    with pytest.raises(TypeError, match="inputs"):
        register(scratch_name)(bad_inputs)
    bad_mode = type("Bad", (_scratch_class(),), {"inputs": {"fast": frozenset({"ehr_emb"})}})
    with pytest.raises(TypeError, match="inputs"):
        register(scratch_name)(bad_mode)
    bad_modalities = type("Bad", (_scratch_class(),), {"modalities": frozenset({"ecg"})})
    with pytest.raises(TypeError, match="modalities"):
        register(scratch_name)(bad_modalities)
    with pytest.raises(TypeError, match="FusionMethod"):
        register(scratch_name)(object)
    assert scratch_name not in FUSION_METHODS


def test_hyperparameters_are_validated_and_converted(scratch_name):
    cls = register(scratch_name)(_scratch_class())
    assert cls.name == scratch_name
    params = cls.resolve_hyperparameters({"alpha": "1e-3", "depth": "5", "flag": "false"})
    assert params == {"alpha": 1e-3, "depth": 5, "flag": False, "kind": "a"}
    with pytest.raises(HyperparameterError) as err:
        cls.resolve_hyperparameters({"alhpa": 2.0})
    assert "alhpa" in str(err.value) and "valid hyperparameters: alpha, depth, flag, kind" in str(err.value)
    with pytest.raises(HyperparameterError, match="depth must be an integer"):
        cls.resolve_hyperparameters({"depth": 2.5})
    with pytest.raises(HyperparameterError, match="alpha must be a number"):
        cls.resolve_hyperparameters({"alpha": "fast"})
    with pytest.raises(HyperparameterError, match="alpha must be a finite number"):
        cls.resolve_hyperparameters({"alpha": float("nan")})
    with pytest.raises(HyperparameterError, match="flag must be true or false"):
        cls.resolve_hyperparameters({"flag": 2})
    with pytest.raises(HyperparameterError, match="not one of a, b"):
        cls.resolve_hyperparameters({"kind": "c"})
    with pytest.raises(HyperparameterError, match="alhpa"):
        cls(alhpa=1.0)
    method = cls(seed=7, depth=4)
    assert method.get_params() == {"seed": 7, "features": None, "alpha": 1.0, "depth": 4, "flag": True,
                                   "kind": "a"}


def test_cached_defaults_apply_only_to_cached_features_and_given_values_win(scratch_name):
    cls = register(scratch_name)(type("Cached", (_scratch_class(),), {"cached_hyperparameters": {"depth": 8}}))
    assert cls.resolve_hyperparameters()["depth"] == 3
    assert cls.resolve_hyperparameters(features="raw")["depth"] == 3
    assert cls.resolve_hyperparameters(features="cached")["depth"] == 8
    assert cls.resolve_hyperparameters({"depth": "5"}, features="cached")["depth"] == 5
    # the estimator built for a mode gets that mode's defaults, as a run does
    assert cls(features="cached").params["depth"] == 8 and cls().params["depth"] == 3
    assert cls(features="cached").get_params()["features"] == "cached"


def test_choices_of_a_base_class_hold_for_its_subclasses(scratch_name):
    base = _scratch_class()
    child = register(scratch_name)(type("Child", (base,), {
        "hyperparameters": {**base.hyperparameters, "mode": "x"},
        "hyperparameter_choices": {"mode": ("x", "y")}}))
    assert child.choices() == {"kind": ("a", "b"), "mode": ("x", "y")}
    with pytest.raises(HyperparameterError, match="kind='c' is not one of a, b"):
        child.resolve_hyperparameters({"kind": "c"})
    with pytest.raises(HyperparameterError, match="mode='z' is not one of x, y"):
        child.resolve_hyperparameters({"mode": "z"})


def test_torch_methods_with_choices_of_their_own_still_check_the_precision():
    for name in ("utde", "mmtm"):
        cls = get_method(name)
        assert cls.resolve_hyperparameters({"precision": "bf16-mixed"})["precision"] == "bf16-mixed"
        with pytest.raises(HyperparameterError, match="precision='bf16' is not one of 32, bf16-mixed"):
            cls.resolve_hyperparameters({"precision": "bf16"})


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_declarations_of_every_method(name):
    cls = get_method(name)
    assert cls.name == name
    assert cls.inputs and set(cls.inputs) <= set(FEATURE_MODES)
    assert all(kinds and set(kinds) <= INPUT_KINDS for kinds in cls.inputs.values())
    assert cls.modalities and set(cls.modalities) <= {"ehr", "cxr"}
    assert set(cls.tasks) <= set(TASKS)
    assert cls.paper, "every method cites its source"
    assert cls.absent_cxr_policy in ("not_used", "train_prevalence", "ehr_only", "native")
    # the modalities read in each mode match the declared modalities
    for kinds in cls.inputs.values():
        assert {k.split("_")[0] for k in kinds} == set(cls.modalities)
    # the test settings and the cached-feature defaults are valid hyperparameters
    cls.resolve_hyperparameters(cls.test_hyperparameters)
    cls.resolve_hyperparameters(cls.cached_hyperparameters)
    for mode in set(FEATURE_MODES) - set(cls.inputs):
        with pytest.raises(UnsupportedFeaturesError, match=f"--features {mode}"):
            cls.inputs_for(mode)


def test_methods_refuse_prediction_before_fit():
    method = get_method("lgbm-early")()
    with pytest.raises(MethodStateError, match="not fitted"):
        method.predict_proba(None, "test")


def test_load_method_needs_a_saved_folder(tmp_path):
    with pytest.raises(MethodStateError, match="not a saved fusion method"):
        load_method(tmp_path)


def test_importing_the_registry_stays_light():
    code = ("import sys, fusion, fusion.registry, fusion.config; "
            "assert 'torch' not in sys.modules, 'torch imported'; "
            "assert 'lightgbm' not in sys.modules, 'lightgbm imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
