"""The experiment file of a benchmark grid: a YAML mapping validated by a pydantic model.

Every key (see README.md, "Benchmark grid")::

    description: free text
    store: demo/store.zarr           # optional; `cbstore bench --store` overrides it
    methods: all                     # or a list: names and/or {name, preset, config, hyperparameters}
    tasks: [mortality, phenotype]
    cohorts: [full, matched]
    folds: [0, 1]
    seeds: [42, 123]
    features: cached                 # or raw
    encoders: {ehr: ehr-stats, cxr: null, cxr_map: null}   # null: the store's only embedding
    n_boot: 1000
    missing:                         # missing-modality settings; default: one entry, rate 0
      - rates: [0.0]
      - rates: [0.1, 0.5]
        at: [train, val]             # parts the X-ray mask applies to
        cohorts: [matched]           # optional: only these cohorts of the grid

``methods: all`` is shorthand for ``methods: [all]``: every registered method not listed by name.
A list may mix ``all`` with entries that give a listed method its own hyperparameters.

A file that does not fit the model raises :class:`ExperimentError`, which names the key, the
value found and what is allowed.
"""

from __future__ import annotations

import pathlib
from importlib import resources
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, field_validator

from cbstore.errors import invalid_values
from fusion.config import COHORTS, PARTS, ConfigError, load_config_file
from fusion.registry import FEATURE_MODES, TASKS

__all__ = ["ALL_METHODS", "EncoderSpec", "Experiment", "ExperimentError", "MethodSpec",
           "MissingSpec", "experiment_path", "load_experiment", "parse_experiment",
           "config_hyperparameters", "shipped_experiments"]

#: Entry of ``methods`` that stands for every registered method not listed by name.
ALL_METHODS = "all"
#: Package folder of the shipped experiment files.
EXPERIMENTS_PACKAGE, EXPERIMENTS_FOLDER = "fusion", "experiments"


class ExperimentError(ConfigError):
    """An experiment file is missing, unparsable or does not fit :class:`Experiment`.

    Attributes
    ----------
    key : str
        Dotted path of the bad key (``methods[1].name``), or ``""`` for the whole file.
    value : object
        The value found.
    allowed : str
        What the key accepts.
    """

    def __init__(self, source: str, key: str, value: Any, allowed: str):
        self.source, self.key, self.value, self.allowed = source, key, value, allowed
        where = f"{source}: " if source else ""
        super().__init__(f"{where}key {key or '(file)'!s}: got {value!r}; allowed: {allowed}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MethodSpec(_Strict):
    """One entry of ``methods``: a registered name, an optional preset, config file and overrides.

    ``preset`` names a shipped hyperparameter preset of the method (:mod:`fusion.presets`, e.g.
    ``carebench``), resolved per task and cohort as ``cbstore fuse --preset`` does. ``config`` is
    a YAML or TOML run-configuration file (the format of ``cbstore fuse --config``) whose
    ``hyperparameters`` are used, read relative to the experiment file. Precedence: preset <
    config file < ``hyperparameters`` given here.
    """

    name: str = Field(min_length=1)
    preset: str | None = None
    config: str | None = None
    hyperparameters: dict[str, Any] = Field(default_factory=dict)


class MissingSpec(_Strict):
    """One missing-modality setting: X-ray missing rates, the parts masked, optional cohorts."""

    rates: list[float] = Field(min_length=1)
    at: list[Literal[PARTS]] = Field(default=list(PARTS), min_length=1)
    cohorts: list[Literal[COHORTS]] | None = Field(default=None, min_length=1)

    @field_validator("rates")
    @classmethod
    def _rates_in_unit_interval(cls, rates: list[float]) -> list[float]:
        for rate in rates:
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"a missing rate must be in [0, 1], got {rate}")
        return rates


class EncoderSpec(_Strict):
    """Embedding ids used in cached mode (None: the store's only embedding of the modality)."""

    ehr: str | None = None
    cxr: str | None = None
    cxr_map: str | None = None


def _unique(values: list, what: str) -> list:
    seen = set()
    for value in values:
        key = value.name if isinstance(value, MethodSpec) else value
        if key in seen:
            raise ValueError(f"{what} {key!r} is listed twice")
        seen.add(key)
    return values


class Experiment(_Strict):
    """A benchmark grid: the product of methods, tasks, cohorts, folds, seeds and missing settings."""

    description: str = ""
    store: str | None = None
    methods: list[MethodSpec] = Field(min_length=1)
    tasks: list[Literal[TASKS]] = Field(min_length=1)
    cohorts: list[Literal[COHORTS]] = Field(default=["full"], min_length=1)
    folds: list[StrictInt] = Field(default=[0], min_length=1)
    seeds: list[StrictInt] = Field(default=[0], min_length=1)
    features: Literal[FEATURE_MODES] = "cached"
    encoders: EncoderSpec = Field(default_factory=EncoderSpec)
    n_boot: StrictInt = Field(default=1000, ge=0)
    missing: list[MissingSpec] = Field(default_factory=lambda: [MissingSpec(rates=[0.0])],
                                       min_length=1)

    @field_validator("methods", mode="before")
    @classmethod
    def _names_to_entries(cls, value):
        if value == ALL_METHODS:
            value = [ALL_METHODS]
        if isinstance(value, list):
            return [{"name": item} if isinstance(item, str) else item for item in value]
        return value

    @field_validator("methods")
    @classmethod
    def _methods_unique(cls, value: list[MethodSpec]) -> list[MethodSpec]:
        for spec in value:
            if spec.name == ALL_METHODS and (spec.preset or spec.config or spec.hyperparameters):
                raise ValueError("the 'all' entry takes no preset, config or hyperparameters; list "
                                 "a method by name to give it its own")
        return _unique(value, "method")

    @field_validator("tasks", "cohorts", "folds", "seeds")
    @classmethod
    def _values_unique(cls, value: list, info) -> list:
        return _unique(value, info.field_name.rstrip("s"))

    @field_validator("folds", "seeds")
    @classmethod
    def _non_negative(cls, value: list[StrictInt]) -> list[StrictInt]:
        for number in value:
            if number < 0:
                raise ValueError(f"must be >= 0, got {number}")
        return value

    def all_methods(self) -> bool:
        """Whether ``methods`` holds the ``all`` entry."""
        return any(spec.name == ALL_METHODS for spec in self.methods)


#: Sub-models by the top-level key that holds them (for listing the allowed keys).
_SUB_MODELS = {"methods": MethodSpec, "missing": MissingSpec, "encoders": EncoderSpec}
#: What a top-level key holds, in words (prefixed to pydantic's own message).
_KEY_WORDS = {
    "methods": f"'{ALL_METHODS}' or a list of method names and {{name, preset, config, "
               "hyperparameters}} mappings",
    "tasks": f"a list of tasks ({', '.join(TASKS)})",
    "cohorts": f"a list of cohorts ({', '.join(COHORTS)})",
    "folds": "a list of distinct fold numbers >= 0",
    "seeds": "a list of distinct integer seeds >= 0",
    "features": f"one of {', '.join(FEATURE_MODES)}",
    "encoders": "a mapping {ehr: ID or null, cxr: ID or null}",
    "n_boot": "an integer >= 0",
    "missing": "a list of {rates, at, cohorts} mappings (rates in [0, 1], at: parts "
               f"{', '.join(PARTS)})",
    "store": "a store path", "description": "text",
}


def _keys_of(loc: tuple) -> list[str]:
    """The keys valid at a location of the experiment mapping."""
    model = _SUB_MODELS.get(loc[0], Experiment) if len(loc) > 1 else Experiment
    return list(model.model_fields)


def _wrap(source: str, err: ValidationError) -> ExperimentError:
    """The first error of ``err`` as an :class:`ExperimentError` (the rest are summarised)."""
    first, *others = invalid_values(err.errors(include_url=False), _KEY_WORDS, _keys_of)
    wrapped = ExperimentError(source, first.key, first.value, first.allowed)
    if others:
        also = "; ".join(f"{p.key}: {p.allowed}" for p in others[:3])
        wrapped.args = (f"{wrapped.args[0]} (also: {also})",)
    return wrapped


def parse_experiment(doc: Any, source: str = "") -> Experiment:
    """Validate a parsed experiment mapping.

    Raises
    ------
    ExperimentError
        Naming the first bad key, its value and what is allowed.
    """
    if not isinstance(doc, dict):
        raise ExperimentError(source, "", doc, "a mapping of keys (methods, tasks, ...) to values")
    try:
        return Experiment.model_validate(doc)
    except ValidationError as err:
        raise _wrap(source, err) from None


def shipped_experiments() -> list[str]:
    """Names of the experiment files shipped with the package (``cbstore bench NAME``)."""
    folder = resources.files(EXPERIMENTS_PACKAGE) / EXPERIMENTS_FOLDER
    return sorted(p.name[:-len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def experiment_path(name_or_path: str) -> pathlib.Path:
    """The file of a shipped experiment name, or ``name_or_path`` itself when it is a file.

    Raises
    ------
    ExperimentError
        Neither a file nor a shipped name (the message lists the shipped names).
    """
    path = pathlib.Path(name_or_path)
    if path.is_file():
        return path
    shipped = shipped_experiments()
    if name_or_path in shipped:
        folder = resources.files(EXPERIMENTS_PACKAGE) / EXPERIMENTS_FOLDER
        return pathlib.Path(str(folder / f"{name_or_path}.yaml"))
    raise ExperimentError("", "experiment", name_or_path,
                          f"an existing YAML file or a shipped experiment: {', '.join(shipped)}")


def load_experiment(name_or_path: str) -> tuple[Experiment, pathlib.Path]:
    """Read and validate an experiment file given by path or shipped name.

    Returns
    -------
    (Experiment, pathlib.Path)
        The validated experiment and the file it came from.

    Raises
    ------
    ExperimentError
        Unknown name, unreadable YAML or a file that does not fit :class:`Experiment`.
    """
    path = experiment_path(name_or_path)
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ExperimentError(str(path), "", "(unparsable)", f"valid YAML ({exc})") from None
    return parse_experiment(doc, str(path)), path


def config_hyperparameters(spec: MethodSpec, base: pathlib.Path, source: str, key: str) -> dict:
    """The hyperparameters of ``spec``: its config file's, updated with its own.

    ``key`` (``methods[2]``) is where ``spec`` sits in the file, for the error messages. The
    named ``preset`` is not read here: each cell resolves it for its task and cohort.

    Raises
    ------
    ExperimentError
        The config file cannot be read, or it names another method.
    """
    hyper: dict = {}
    if spec.config is not None:
        path = pathlib.Path(spec.config)
        path = path if path.is_absolute() else base / path
        try:
            doc = load_config_file(path)
        except ConfigError as err:
            raise ExperimentError(source, f"{key}.config", spec.config,
                                  f"a YAML/TOML run configuration ({err})") from None
        if doc.get("method", spec.name) != spec.name:
            raise ExperimentError(source, f"{key}.config", spec.config,
                                  f"a configuration for method {spec.name!r}, not {doc['method']!r}")
        hyper.update(doc.get("hyperparameters") or {})
    hyper.update(spec.hyperparameters)
    return hyper
