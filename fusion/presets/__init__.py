"""Named hyperparameter presets: ``fusion/presets/<method>.yaml`` (package data).

A method's hyperparameters are data with the defaults of its card (the registry's declaration).
Values tuned elsewhere, e.g. the reference benchmark's, ship as named presets, one YAML file per
method whose top-level keys are the preset names::

    carebench:
      description: "CareBench's tuned values (configs/<file>)"
      tuned_on_test: true          # the values were selected on the reference's test split
      all: {lr: 1.0e-4}            # every task and cohort
      tasks:                       # optional: per task, then per cohort (all, full, matched)
        mortality: {all: {...}, full: {...}, matched: {...}}

A run asks for one with ``cbstore fuse --preset NAME`` (run option ``preset``). Precedence when a
run resolves its hyperparameters, lowest first: the registry defaults, the cached-mode defaults,
the preset (``all`` < ``tasks.<task>.all`` < ``tasks.<task>.<cohort>``), the ``--config`` file,
``--set``. A cross cohort (``matched_to_full``, ``full_to_matched``) takes the entry of the
cohort it trains on. The run's ``config.json`` records the preset's name and ``tuned_on_test``.
"""

from __future__ import annotations

import pathlib

import yaml

from cbstore.inputs.reader import cohort_of_part
from fusion.registry import TASKS, HyperparameterError, get_method

__all__ = ["COHORT_KEYS", "PRESET_DIR", "PresetError", "check_preset_file", "list_presets",
           "preset_hyperparameters"]

#: Folder of the shipped preset files.
PRESET_DIR = pathlib.Path(__file__).parent
#: Keys of a task's entry: every cohort, or the cohort trained on.
COHORT_KEYS = ("all", "full", "matched")
#: Keys of one preset.
PRESET_KEYS = ("description", "tuned_on_test", "all", "tasks")


class PresetError(HyperparameterError):
    """A preset is unknown, or a preset file is malformed (the message names file and key)."""


def _read(path: pathlib.Path) -> dict:
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise PresetError(f"{path}: cannot parse preset file: {exc}") from exc
    if not isinstance(doc, dict) or not doc:
        raise PresetError(f"{path}: a preset file maps preset names to presets; got "
                          f"{type(doc).__name__}")
    return doc


def _presets_of(method: str, directory: pathlib.Path | None) -> tuple[pathlib.Path, dict]:
    path = pathlib.Path(directory or PRESET_DIR) / f"{method}.yaml"
    if not path.is_file():
        raise PresetError(f"method {method!r} ships no presets (no {path.name} in "
                          f"{path.parent}); run it without --preset")
    return path, _read(path)


def list_presets(method: str, directory=None) -> list[str]:
    """Names of the presets shipped for ``method`` (empty if it ships none)."""
    path = pathlib.Path(directory or PRESET_DIR) / f"{method}.yaml"
    return sorted(_read(path)) if path.is_file() else []


def _mapping(value, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise PresetError(f"{where}: must be a mapping of hyperparameter to value, got {value!r}")
    return dict(value)


def _layers(preset: dict, where: str, task: str | None, cohort: str | None) -> list[tuple[str, dict]]:
    """The preset's value mappings in precedence order (lowest first) for a task and cohort."""
    layers = [(f"{where}.all", _mapping(preset.get("all"), f"{where}.all"))]
    tasks = _mapping(preset.get("tasks"), f"{where}.tasks")
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        raise PresetError(f"{where}.tasks: unknown task(s) {unknown}; valid tasks: {', '.join(TASKS)}")
    for name, entry in tasks.items():
        entry = _mapping(entry, f"{where}.tasks.{name}")
        bad = sorted(set(entry) - set(COHORT_KEYS))
        if bad:
            raise PresetError(f"{where}.tasks.{name}: unknown key(s) {bad}; valid: {', '.join(COHORT_KEYS)}")
        if task is None or name == task:
            for key in COHORT_KEYS:
                if key in entry and (task is None or key in ("all", cohort)):
                    layers.append((f"{where}.tasks.{name}.{key}",
                                   _mapping(entry[key], f"{where}.tasks.{name}.{key}")))
    return layers


def _check_preset(method: str, name: str, preset, where: str) -> dict:
    if not isinstance(preset, dict):
        raise PresetError(f"{where}: a preset is a mapping with {', '.join(PRESET_KEYS)}")
    unknown = sorted(set(preset) - set(PRESET_KEYS))
    if unknown:
        raise PresetError(f"{where}: unknown key(s) {unknown}; valid keys: {', '.join(PRESET_KEYS)}")
    if not isinstance(preset.get("description"), str) or not preset["description"]:
        raise PresetError(f"{where}.description: a non-empty string is required")
    if not isinstance(preset.get("tuned_on_test"), bool):
        raise PresetError(f"{where}.tuned_on_test: true or false is required (were the values "
                          "selected on the reference's test split?)")
    return preset


def _coerce(method: str, values: dict, where: str, features: str | None = None) -> dict:
    """Check names and values against the method's declaration (its own coercion)."""
    cls = get_method(method)
    try:
        resolved = cls.resolve_hyperparameters(values, features=features)
    except HyperparameterError as exc:
        raise PresetError(f"{where}: {exc}") from None
    return {key: resolved[key] for key in values}


def check_preset_file(path) -> list[str]:
    """Validate one preset file: the method exists, every preset is well formed, every key is a
    real hyperparameter of the method and every value passes its coercion.

    Returns
    -------
    list of str
        The names of the presets in the file.

    Raises
    ------
    PresetError
        Naming the file, the key and the problem.
    """
    path = pathlib.Path(path)
    method = path.stem
    get_method(method)  # an unknown method raises, listing the valid ones
    doc = _read(path)
    for name, preset in doc.items():
        where = f"{path}: {name}"
        _check_preset(method, name, preset, where)
        for place, values in _layers(preset, where, None, None):
            _coerce(method, values, place)
    return sorted(doc)


def preset_hyperparameters(method: str, name: str, task: str, cohort: str = "full",
                           directory=None) -> tuple[dict, dict]:
    """The hyperparameters preset ``name`` of ``method`` sets for ``task`` and ``cohort``.

    Parameters
    ----------
    method : str
    name : str
        Preset name (a top-level key of ``fusion/presets/<method>.yaml``).
    task : str
    cohort : str
        Run cohort; a cross cohort uses the entry of the cohort it trains on.
    directory : path-like, optional
        Folder of preset files (default: the shipped ones).

    Returns
    -------
    values : dict
        Hyperparameter -> value, coerced to the method's types.
    record : dict
        ``{"name", "description", "tuned_on_test"}`` for the run's configuration.

    Raises
    ------
    PresetError
        No preset file for the method, an unknown preset (the message lists the shipped ones),
        or a malformed preset.
    """
    path, doc = _presets_of(method, directory)
    if name not in doc:
        raise PresetError(f"method {method!r} has no preset {name!r}; presets in {path}: "
                          f"{', '.join(sorted(doc))}")
    where = f"{path}: {name}"
    preset = _check_preset(method, name, doc[name], where)
    values: dict = {}
    for place, layer in _layers(preset, where, task, cohort_of_part(cohort, "train")):
        values.update(_coerce(method, layer, place))
    record = {"name": name, "description": preset["description"],
              "tuned_on_test": preset["tuned_on_test"]}
    return values, record
