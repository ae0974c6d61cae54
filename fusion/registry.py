"""The one registry of fusion methods, and the contract every method declares.

A method is a class registered with :func:`register`. It declares, as class attributes, what it
needs and what it can do (see :class:`FusionMethod`); the contract test suite
(``tests/fusion/test_method_contract.py``) reads these declarations to test every registered method the
same way.

Importing this module is light (no torch, no LightGBM). A method's module, which may import
torch, is imported when :func:`get_method` first looks up its name (only that module, from
:data:`fusion.methods.METHOD_MODULES`); :func:`list_methods` and an unknown name import them
all, so that every method has registered itself.

Examples
--------
>>> from fusion.registry import get_method, list_methods
>>> "lgbm-early" in list_methods()
True
>>> get_method("lgbm-early").modalities == frozenset({"ehr", "cxr"})
True
"""

from __future__ import annotations

import json
import math
import pathlib
from collections.abc import Mapping

from cbstore.errors import CbstoreError
from cbstore.format.tasks import TASKS as STORE_TASKS
from cbstore.inputs.reader import INPUT_KINDS as STORE_INPUT_KINDS

__all__ = [
    "FEATURE_MODES", "FUSION_METHODS", "INPUT_KINDS", "TASKS", "DuplicateMethodError",
    "FusionError", "FusionMethod", "HyperparameterError", "MethodDeclarationError", "MethodStateError",
    "UnknownMethodError", "UnsupportedFeaturesError", "get_method", "list_methods", "load_method",
    "register",
]

#: Feature modes: end-to-end from raw tensors, or heads on cached embeddings.
FEATURE_MODES = ("raw", "cached")
#: Input kinds a method may declare (raw EHR time series, raw image, cached embeddings):
#: :data:`cbstore.inputs.reader.INPUT_KINDS`.
INPUT_KINDS = STORE_INPUT_KINDS
#: Tasks known to the fusion package: the store's tasks (:data:`cbstore.format.tasks.TASKS`).
TASKS = STORE_TASKS
#: Name -> class of every registered method.
FUSION_METHODS: dict[str, type] = {}

#: File in a saved-method folder holding the method name, parameters and fitted state.
STATE_FILE = "method.json"


#: Values of the ``precision`` of a torch fit (:class:`fusion.trainer.Trainer`): float32 throughout,
#: or bfloat16 autocast of the forward passes with float32 weights, gradients, optimiser and backward.
PRECISIONS = ("32", "bf16-mixed")


class FusionError(CbstoreError):
    """Base class of the errors raised by the fusion package (a :class:`CbstoreError`)."""


class UnknownMethodError(FusionError, KeyError):
    """A method name is not registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class DuplicateMethodError(FusionError, ValueError):
    """Two classes were registered under one name."""


class HyperparameterError(FusionError, ValueError):
    """A hyperparameter is unknown to the method or has a value of the wrong kind."""


class UnsupportedFeaturesError(FusionError, ValueError):
    """A method does not support the requested feature mode or task."""


class MethodStateError(FusionError, ValueError):
    """A method was used before fitting, or a saved method folder is unusable."""


class MethodDeclarationError(FusionError, TypeError):
    """A method class declares an invalid contract (inputs, modalities, tasks)."""


class FusionMethod:
    """Base of every fusion method: declarations plus the sklearn-style estimator contract.

    Subclasses set the class attributes below and implement :meth:`fit`, :meth:`predict_proba`,
    :meth:`_state` and :meth:`_restore` (and, for more than JSON state, :meth:`save` /
    :meth:`load`).

    Attributes
    ----------
    name : str
        Registry name (set by :func:`register`).
    inputs : dict of str to frozenset
        Feature mode (``"raw"``/``"cached"``) -> input kinds used in that mode (subset of
        :data:`INPUT_KINDS`). A mode absent from the dict is not supported.
    modalities : frozenset
        Modalities the method predicts from (``{"ehr"}``, ``{"cxr"}`` or ``{"ehr", "cxr"}``).
    handles_missing_cxr : bool
        True if the method copes with an absent X-ray natively (without falling back).
    absent_cxr_policy : str
        What the method does for a stay without X-ray: ``"not_used"`` (EHR only method),
        ``"train_prevalence"`` (CXR-only method: predicts the training label prevalence),
        ``"ehr_only"`` (fusion falls back to the EHR prediction), ``"native"``, or a missing-modality
        mechanism of the method's own: ``"mean_cxr_contribution"`` (InfoReg: the X-ray feature of
        the stay is the training mean of the X-ray features), ``"shorter_sequence"`` (MedFuse: the
        fusion sequence ends after the EHR step), ``"masked_attention"`` (DrFuse: EHR-only shared
        representation and the X-ray token masked out of the attention), ``"neighbour_imputation"``
        (M3Care: the X-ray representation imputed from similar training stays) or
        ``"prior_reconstruction"`` (SMIL: the X-ray feature reconstructed from k-means priors of
        training X-ray features), ``"absent_token"`` (the X-ray stream of a stay without a film
        is a learned absent token, map or key: ``mmtm``, ``daft``, ``utde``; no image is encoded),
        ``"generated_from_shared"`` (ShaSpec: the X-ray feature is the EHR's shared feature),
        ``"missing_bank"`` (Flex-MoE: learned tokens of the stay's modality combination),
        ``"bottleneck_skip"`` (UMSE: the X-ray stream is left out of the bottleneck exchange) or
        ``"skipped_update"`` (HEALNet: the X-ray cross-attention step does not update the stay's
        latents).
    hyperparameters : dict
        Hyperparameter name -> default value. The default's type is the accepted type.
    cached_hyperparameters : dict
        Defaults that replace those of ``hyperparameters`` when the method runs on cached
        features (a subset of its names; see :meth:`resolve_hyperparameters`).
    hyperparameter_choices : dict
        Hyperparameter name -> allowed values, for the categorical ones. A base class's choices
        hold for its subclasses too (:meth:`choices`), so a subclass lists only its own.
    test_hyperparameters : dict
        Small settings that keep the contract test suite fast (used by tests only).
    paper : str
        Citation of the method.
    tasks : tuple of str
        Tasks the method supports.
    resumable : bool
        True if :meth:`fit` accepts ``checkpoint=<file>`` and resumes an interrupted fit from it
        (the run writer then keeps an epoch checkpoint in the run's work folder).
    """

    name: str = ""
    inputs: dict = {}
    modalities: frozenset = frozenset()
    handles_missing_cxr: bool = False
    absent_cxr_policy: str = "not_used"
    hyperparameters: dict = {}
    cached_hyperparameters: dict = {}
    hyperparameter_choices: dict = {}
    test_hyperparameters: dict = {}
    paper: str = ""
    tasks: tuple = TASKS
    resumable: bool = False

    def __init__(self, seed: int = 0, features: str | None = None, **hyperparameters):
        """Set the seed and the hyperparameters (unknown names and wrong types raise).

        Parameters
        ----------
        seed : int
        features : str, optional
            Feature mode the method will be fitted in (``"raw"`` or ``"cached"``); it picks that
            mode's defaults (:attr:`cached_hyperparameters`) and :meth:`fit` refuses data of
            another mode. None: the plain defaults, any mode.
        **hyperparameters
            Overrides of the defaults.
        """
        if features is not None:
            self.inputs_for(features)  # an unknown or unsupported mode raises here
        self.seed = seed
        self.features = features
        self.params = self.resolve_hyperparameters(hyperparameters, features=features)

    # ----- declarations -------------------------------------------------------------------------
    @classmethod
    def resolve_hyperparameters(cls, given: Mapping | None = None, features: str | None = None) -> dict:
        """Return the defaults updated with ``given``, after checking names and types.

        Parameters
        ----------
        given : mapping, optional
            Hyperparameter values (strings from a command line are converted to the default's type).
        features : str, optional
            Feature mode of the run; ``"cached"`` starts from the defaults updated with
            :attr:`cached_hyperparameters`. ``given`` always wins.

        Returns
        -------
        dict
            Every hyperparameter of the method, with its value.

        Raises
        ------
        HyperparameterError
            For an unknown name (the message lists the valid ones) or a value of the wrong kind.
        """
        given = dict(given or {})
        unknown = sorted(set(given) - set(cls.hyperparameters))
        if unknown:
            valid = ", ".join(sorted(cls.hyperparameters)) or "(none)"
            raise HyperparameterError(
                f"method {cls.name!r} has no hyperparameter(s) {', '.join(unknown)}; "
                f"valid hyperparameters: {valid}")
        resolved = dict(cls.hyperparameters)
        if features == "cached":
            resolved.update(cls.cached_hyperparameters)
        for key, value in given.items():
            resolved[key] = _coerce(cls.name, key, value, cls.hyperparameters[key])
            choices = cls.choices().get(key)
            if choices is not None and resolved[key] not in choices:
                raise HyperparameterError(
                    f"method {cls.name!r}: hyperparameter {key}={resolved[key]!r} is not one of "
                    f"{', '.join(map(str, choices))}")
        return resolved

    @classmethod
    def choices(cls) -> dict:
        """Allowed values of the categorical hyperparameters: the ``hyperparameter_choices`` of the
        class and of every base class (the class's own win)."""
        merged: dict = {}
        for klass in reversed(cls.__mro__):
            merged.update(vars(klass).get("hyperparameter_choices", {}))
        return merged

    @classmethod
    def supports(cls, features: str) -> bool:
        """Whether the method runs in feature mode ``features``."""
        return features in cls.inputs

    @classmethod
    def inputs_for(cls, features: str) -> frozenset:
        """Input kinds used in feature mode ``features``.

        Raises
        ------
        UnsupportedFeaturesError
            If the method does not support the mode; the message names the supported modes.
        """
        if features not in cls.inputs:
            supported = ", ".join(sorted(cls.inputs)) or "(none)"
            raise UnsupportedFeaturesError(
                f"method {cls.name!r} does not support --features {features}; "
                f"it supports: {supported}")
        return cls.inputs[features]

    @classmethod
    def check_task(cls, task: str) -> None:
        """Raise :class:`UnsupportedFeaturesError` if ``task`` is not among :attr:`tasks`."""
        if task not in cls.tasks:
            raise UnsupportedFeaturesError(
                f"method {cls.name!r} does not support task {task!r}; it supports: "
                f"{', '.join(cls.tasks)}")

    # ----- estimator contract -------------------------------------------------------------------
    def get_params(self) -> dict:
        """All hyperparameters plus ``seed`` and ``features`` (JSON-serialisable)."""
        return {"seed": self.seed, "features": self.features, **self.params}

    def fit(self, data, *, device=None, progress: bool = False) -> "FusionMethod":
        """Fit on ``data.part("train")``, selecting on ``data.part("val")``; return ``self``."""
        raise NotImplementedError

    def predict_proba(self, data, part: str):
        """Probabilities ``[n, C]`` for every stay of ``part`` (LoS rows sum to 1)."""
        raise NotImplementedError

    def predict_modality_proba(self, data, part: str) -> dict:
        """Per-modality probabilities ``{"ehr": [n, C], "cxr": [n, C]}``; empty if not available."""
        return {}

    def _check_features(self, data) -> None:
        """Refuse data of another feature mode than the one given to the constructor."""
        if self.features is not None and data.features != self.features:
            raise MethodStateError(
                f"method {self.name!r} was set up for --features {self.features} (and that mode's "
                f"defaults) but the data has features {data.features!r}")

    def _check_fitted(self) -> None:
        if not getattr(self, "fitted_", False):
            raise MethodStateError(f"method {self.name!r} is not fitted; call fit() or load() first")

    def _state(self) -> dict:
        """JSON-serialisable fitted state (besides the hyperparameters)."""
        return {}

    def _restore(self, state: dict, folder: pathlib.Path) -> None:
        """Restore the fitted state written by :meth:`save` from ``state`` and ``folder``."""

    def save(self, folder) -> pathlib.Path:
        """Write the fitted method to ``folder`` (JSON state; subclasses add weight files)."""
        self._check_fitted()
        folder = pathlib.Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        doc = {"method": self.name, "params": self.get_params(), "state": self._state()}
        (folder / STATE_FILE).write_text(json.dumps(doc, indent=1, sort_keys=True, allow_nan=False))
        return folder

    @classmethod
    def load(cls, folder) -> "FusionMethod":
        """Rebuild a method written by :meth:`save`.

        Raises
        ------
        MethodStateError
            If the folder holds no state file or the state belongs to another method.
        """
        folder = pathlib.Path(folder)
        path = folder / STATE_FILE
        if not path.is_file():
            raise MethodStateError(f"{folder}: no {STATE_FILE}; not a saved fusion method")
        doc = json.loads(path.read_text())
        if doc.get("method") != cls.name:
            raise MethodStateError(
                f"{path}: holds method {doc.get('method')!r}, not {cls.name!r}; "
                "use fusion.registry.load_method")
        params = dict(doc["params"])
        method = cls(seed=params.pop("seed", 0), features=params.pop("features", None), **params)
        method._restore(doc["state"], folder)
        method.fitted_ = True
        return method


def _coerce(method: str, key: str, value, default):
    """Convert ``value`` to the type of ``default`` or raise :class:`HyperparameterError`."""
    def bad(kind: str) -> HyperparameterError:
        return HyperparameterError(
            f"method {method!r}: hyperparameter {key} must be {kind}, got {value!r}")

    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
            return value.lower() in ("true", "yes", "1")
        raise bad("true or false")
    if isinstance(default, int):
        if isinstance(value, bool):
            raise bad("an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise bad("an integer")
    if isinstance(default, float):
        if isinstance(value, bool):
            raise bad("a number")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise bad("a number") from None
        if not math.isfinite(number):
            raise bad("a finite number")
        return number
    if isinstance(default, str):
        if isinstance(value, str):
            return value
        raise bad("a string")
    if default is None or isinstance(value, type(default)):
        return value
    raise bad(type(default).__name__)


def register(name: str):
    """Class decorator registering a :class:`FusionMethod` subclass under ``name``.

    Raises
    ------
    DuplicateMethodError
        If ``name`` is already registered.
    MethodDeclarationError
        If the class does not declare a valid contract (inputs, modalities, tasks); a
        ``TypeError``.
    """
    def decorate(cls):
        if name in FUSION_METHODS:
            raise DuplicateMethodError(
                f"fusion method {name!r} is registered twice ({FUSION_METHODS[name].__module__}."
                f"{FUSION_METHODS[name].__qualname__} and {cls.__module__}.{cls.__qualname__})")
        _check_declarations(name, cls)
        cls.name = name
        FUSION_METHODS[name] = cls
        return cls
    return decorate


def _check_declarations(name: str, cls) -> None:
    if not (isinstance(cls, type) and issubclass(cls, FusionMethod)):
        raise MethodDeclarationError(f"fusion method {name!r}: {cls!r} is not a FusionMethod subclass")
    if not cls.inputs or set(cls.inputs) - set(FEATURE_MODES):
        raise MethodDeclarationError(f"fusion method {name!r}: inputs must map some of {FEATURE_MODES} to "
                        f"input kinds, got {cls.inputs!r}")
    for mode, kinds in cls.inputs.items():
        if not kinds or set(kinds) - INPUT_KINDS:
            raise MethodDeclarationError(f"fusion method {name!r}: inputs[{mode!r}] must be a non-empty subset "
                            f"of {sorted(INPUT_KINDS)}, got {kinds!r}")
    if not cls.modalities or set(cls.modalities) - {"ehr", "cxr"}:
        raise MethodDeclarationError(f"fusion method {name!r}: modalities must be a non-empty subset of "
                        f"{{'ehr', 'cxr'}}, got {cls.modalities!r}")
    if set(cls.tasks) - set(TASKS):
        raise MethodDeclarationError(f"fusion method {name!r}: unknown tasks in {cls.tasks!r}")


def list_methods() -> list[str]:
    """Sorted names of all registered methods."""
    from fusion.methods import import_all

    import_all()
    return sorted(FUSION_METHODS)


def get_method(name: str) -> type:
    """The method class registered under ``name``.

    Raises
    ------
    UnknownMethodError
        If no method has that name; the message lists the valid names.
    """
    from fusion.methods import import_module_of

    import_module_of(name)
    if name not in FUSION_METHODS:
        valid = list_methods()  # imports every method module
        if name not in FUSION_METHODS:
            raise UnknownMethodError(f"unknown fusion method {name!r}; valid methods: {', '.join(valid)}")
    return FUSION_METHODS[name]


def load_method(folder) -> FusionMethod:
    """Load a saved method of any registered kind from ``folder`` (see :meth:`FusionMethod.save`)."""
    path = pathlib.Path(folder) / STATE_FILE
    if not path.is_file():
        raise MethodStateError(f"{folder}: no {STATE_FILE}; not a saved fusion method")
    name = json.loads(path.read_text()).get("method")
    return get_method(name).load(folder)
