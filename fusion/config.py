"""Run configuration: the :class:`RunConfig` dataclass, and loading it from YAML/TOML plus overrides.

Precedence (lowest first): the dataclass defaults, the config file, the command line
(options given explicitly, then ``--set key=value`` pairs). Hyperparameters: the method's
defaults, its named preset (``preset``, :mod:`fusion.presets`), the file, ``--set``. A config file holds run options at the
top level and method hyperparameters under ``hyperparameters``::

    method: latefusion
    task: phenotype
    features: cached
    hyperparameters:
      lr: 3.0e-4
      max_epochs: 20

Unknown keys are errors that list the valid keys. Hyperparameter names are checked against the
method later, when the method is known (:mod:`fusion.runs`).
"""

from __future__ import annotations

import pathlib
import tomllib
from collections.abc import Iterable, Mapping
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictStr, ValidationError

from cbstore.errors import ConfigError, first_invalid_field
from cbstore.inputs.reader import COHORTS, PARTS
from fusion.registry import FEATURE_MODES, TASKS

__all__ = ["COHORTS", "PARTS", "ConfigError", "RunConfig", "load_config_file", "make_config",
           "parse_missing_at", "parse_set_pairs"]



def _parts(value) -> tuple:
    """Part names of ``missing_at`` in :data:`PARTS` order; ValueError saying what is wrong."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, Iterable):
        raise ValueError(f"part names, got {value!r}")
    parts = set()
    for item in value:
        if not isinstance(item, str):
            raise ValueError(f"part names, got {item!r}")
        for name in item.split(","):
            name = name.strip()
            if name and name not in PARTS:
                raise ValueError(f"unknown part {name!r}; valid parts: {', '.join(PARTS)}")
            parts.add(name)
    parts.discard("")
    if not parts:
        raise ValueError(f"name at least one of {', '.join(PARTS)}")
    return tuple(p for p in PARTS if p in parts)


def _text(value):
    return str(value) if isinstance(value, pathlib.Path) else value


def _no_bool(value):
    if isinstance(value, bool):
        raise ValueError("an integer, not true or false")
    return value


_Count = Annotated[int, BeforeValidator(_no_bool), Field(ge=0, description="an integer >= 0")]
_OptionalCount = Annotated[_Count | None, Field(description="an integer >= 0 or null")]
_OptionalName = Annotated[Annotated[StrictStr, Field(min_length=1)] | None,
                          Field(description="a non-empty string or null")]


class RunConfig(BaseModel):
    """Everything that defines one fusion run.

    The fields that change results (all but ``out``, ``overwrite``, ``device``, ``progress`` and
    ``weights_dir``) enter the run id (:func:`fusion.runs.resolve`).

    Attributes
    ----------
    store : str
        Path of the cbstore Zarr store.
    method : str
        Registered method name (:func:`fusion.registry.list_methods`).
    task : str
        ``mortality``, ``mortality_hosp``, ``phenotype`` or ``los``.
    fold : int
        Fold of the store's splits.
    seed : int
        Seed of the method (initialisation, shuffling) and, unless ``mask_seed`` is set, of the mask.
    features : str
        ``cached`` (heads on stored embeddings) or ``raw`` (end-to-end from the raw tensors).
    ehr_encoder, cxr_encoder : str or None
        Embedding ids used in cached mode; None picks the only one the store holds.
    cxr_map_encoder : str or None
        Spatial-map embedding id (methods that read ``cxr_map``, e.g. ``mmtm``, ``daft``); None
        picks the only one the store holds.
    cohort : str
        One of :data:`COHORTS`.
    cxr_missing_rate : float
        Fraction of X-rays hidden on the parts in ``missing_at`` (see :mod:`cbstore.inputs.masks`).
    missing_at : tuple of str
        Parts the mask applies to.
    mask_seed : int or None
        Seed of the mask; None uses ``seed``.
    hyperparameters : dict
        Method hyperparameters (overrides of the method defaults and of the preset).
    preset : str or None
        Named preset of the method's hyperparameters (:mod:`fusion.presets`, e.g. ``carebench``);
        the config file's and ``--set`` hyperparameters override it.
    n_boot : int
        Bootstrap resamples of the evaluator.
    out : str
        Folder that holds the run folders.
    overwrite : bool
        Recompute a complete run instead of reusing it.
    weights_dir : str or None
        Folder searched first for pretrained weight files (then ``$CBSTORE_WEIGHTS_DIR``, then the
        library caches), e.g. the ImageNet ResNet-50 of raw runs.
    device : str or None
        ``cpu``, ``cuda``, ``cuda:1`` ...; None picks CUDA when available.
    progress : bool
        Show a progress bar per epoch.
    """

    model_config = ConfigDict(extra="forbid")

    store: Annotated[StrictStr, BeforeValidator(_text)] = Field(min_length=1, description="a store path")
    method: StrictStr = Field(min_length=1, description="a method name (see `cbstore fuse --help`)")
    task: Literal[TASKS] = "mortality"
    fold: _Count = 0
    seed: _Count = 0
    features: Literal[FEATURE_MODES] = "cached"
    ehr_encoder: _OptionalName = None
    cxr_encoder: _OptionalName = None
    cxr_map_encoder: _OptionalName = None
    cohort: Literal[COHORTS] = "full"
    cxr_missing_rate: float = Field(0.0, ge=0, le=1, allow_inf_nan=False, description="a number in [0, 1]")
    missing_at: Annotated[tuple[str, ...], BeforeValidator(_parts)] = PARTS
    mask_seed: _OptionalCount = None
    hyperparameters: dict[str, Any] = Field(default_factory=dict, description="a mapping of name to value")
    preset: _OptionalName = None
    n_boot: _Count = 1000
    out: Annotated[StrictStr, BeforeValidator(_text)] = "runs"
    overwrite: StrictBool = Field(False, description="true or false")
    weights_dir: _OptionalName = None
    device: _OptionalName = None
    progress: StrictBool = Field(True, description="true or false")

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as err:
            bad = first_invalid_field(RunConfig, err.errors(include_url=False))
            raise ConfigError(f"{bad.key}: got {bad.value!r}; allowed: {bad.allowed}") from None

    @classmethod
    def field_names(cls) -> list[str]:
        """Names of the configurable fields."""
        return list(cls.model_fields)


def parse_missing_at(value) -> tuple:
    """Normalise ``missing_at`` (``"train,val"``, a list, or several of them) to sorted part names.

    Raises
    ------
    ConfigError
        For a name that is not a part.
    """
    try:
        return _parts(value)
    except ValueError as err:
        raise ConfigError(f"missing_at: {err}") from None


def load_config_file(path) -> dict:
    """Read a YAML (``.yaml``/``.yml``) or TOML (``.toml``) run configuration.

    Returns
    -------
    dict
        The file's mapping (run options and an optional ``hyperparameters`` mapping).

    Raises
    ------
    ConfigError
        File missing, unparsable, of an unknown suffix, not a mapping, or with unknown keys.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    suffix = path.suffix.lower()
    try:
        if suffix in (".yaml", ".yml"):
            doc = yaml.safe_load(path.read_text())
        elif suffix == ".toml":
            doc = tomllib.loads(path.read_text())
        else:
            raise ConfigError(f"{path}: unknown config format {suffix!r}; use .yaml, .yml or .toml")
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: cannot parse config file: {exc}") from exc
    doc = {} if doc is None else doc
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: the config must be a mapping of option to value, "
                          f"got {type(doc).__name__}")
    valid = set(RunConfig.field_names())
    unknown = sorted(set(doc) - valid)
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(unknown)}; valid keys: "
                          f"{', '.join(sorted(valid))}")
    if "hyperparameters" in doc and not isinstance(doc["hyperparameters"], dict):
        raise ConfigError(f"{path}: 'hyperparameters' must be a mapping of name to value")
    return doc


def parse_set_pairs(pairs: Iterable[str]) -> dict:
    """Parse ``key=value`` strings; values are read as YAML scalars (``1e-3``, ``true``, ``abc``).

    Raises
    ------
    ConfigError
        For an item without ``=`` or with an empty key.
    """
    out = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set {pair!r}: expected key=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        if isinstance(value, (dict, list)):
            value = raw
        out[key] = value
    return out


def make_config(*, config_file=None, options: Mapping | None = None,
                set_pairs: Iterable[str] = ()) -> RunConfig:
    """Build a :class:`RunConfig` from a file, explicit options and ``--set`` overrides.

    Parameters
    ----------
    config_file : path, optional
        YAML or TOML file (see :func:`load_config_file`).
    options : mapping, optional
        Run options given explicitly (None values are ignored); override the file.
    set_pairs : iterable of str
        ``key=value`` items. A key that is a run option sets the option; any other key is a
        method hyperparameter (checked against the method when the run is resolved).

    Returns
    -------
    RunConfig
    """
    merged: dict = {}
    hyper: dict = {}
    if config_file is not None:
        doc = load_config_file(config_file)
        hyper.update(doc.pop("hyperparameters", None) or {})
        merged.update(doc)
    for key, value in (options or {}).items():
        if value is None:
            continue
        if key == "hyperparameters":
            hyper.update(value)
        elif key not in RunConfig.field_names():
            raise ConfigError(f"unknown run option {key!r}; valid options: "
                              f"{', '.join(RunConfig.field_names())}")
        else:
            merged[key] = value
    run_fields = set(RunConfig.field_names()) - {"hyperparameters"}
    for key, value in parse_set_pairs(set_pairs).items():
        if key in run_fields:
            merged[key] = value
        else:
            hyper[key] = value
    for required in ("store", "method"):
        if required not in merged:
            raise ConfigError(f"{required}: not given (pass it on the command line or in the "
                              "config file)")
    return RunConfig(**merged, hyperparameters=hyper)
