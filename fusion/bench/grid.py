"""Expand an :class:`~fusion.bench.experiment.Experiment` into the cells of its grid.

A cell is one fusion run: method x task x cohort x fold x seed x (X-ray missing rate, masked
parts). The grid is the product of the experiment's lists minus the cells a method cannot run,
which are listed with the reason:

* the method does not support the feature mode or the task (its registry declarations);
* an X-ray-only method under a mask that hides every X-ray of the training or validation part
  (rate 1 at train or val): it would have nothing to learn or select on.

At rate 0 the masked parts change nothing, so the settings ``rate 0 at train`` and ``rate 0 at
train,val,test`` are the same cell. Each cell's run id is :func:`fusion.runs.run_id_of` of its
resolved configuration, the id ``cbstore fuse`` gives the same settings; a cell is complete when
``<out>/<run-id>/COMPLETE`` exists and failed when ``<out>/<run-id>.failed.json`` does.

A cell's options are exactly those ``cbstore fuse`` would get for the same settings (method
defaults, then the named preset, then the config file's and the entry's hyperparameters), so a
cell and the equivalent
``cbstore fuse`` run share one run folder. Thread counts are method hyperparameters and so part
of the run id: torch methods default to ``num_threads=1`` (CPU results are bit-identical only for
a fixed count); LightGBM's trees do not depend on the thread count (``num_threads=0``: OpenMP's
default, which is one thread in a Dask worker process, started with ``OMP_NUM_THREADS=1``).
"""

from __future__ import annotations

import dataclasses
import itertools
import pathlib

from fusion.bench.experiment import (
    ALL_METHODS, Experiment, ExperimentError, MethodSpec, config_hyperparameters)
from fusion.config import PARTS, RunConfig
from fusion.registry import FusionError, HyperparameterError, get_method, list_methods
from fusion.runs import COMPLETE_MARKER, resolve, run_id_of

__all__ = ["Cell", "Grid", "GridError", "expand_grid", "failed_path"]


class GridError(FusionError, ValueError):
    """A grid cannot be expanded or run (a cell that cannot be resolved, a bad option)."""


@dataclasses.dataclass
class Cell:
    """One run of the grid.

    Attributes
    ----------
    method, task, cohort : str
    fold, seed : int
    rate : float
        X-ray missing rate.
    at : tuple of str
        Parts the mask applies to (empty at rate 0).
    options : dict
        Keyword arguments of :class:`fusion.config.RunConfig` for this cell (plain JSON).
    run_id : str
        Id of the run folder (set by :func:`expand_grid`; empty for an excluded cell).
    """

    method: str
    task: str
    cohort: str
    fold: int
    seed: int
    rate: float
    at: tuple
    options: dict = dataclasses.field(default_factory=dict, repr=False)
    run_id: str = ""

    @property
    def features(self) -> str:
        return self.options.get("features", "cached")

    def label(self) -> str:
        """Short human-readable description (``lgbm-early mortality full f0 s42 x0.5@train,val``)."""
        mask = f" x{self.rate:g}@{','.join(self.at)}" if self.rate > 0 else ""
        return f"{self.method} {self.task} {self.cohort} f{self.fold} s{self.seed}{mask}"

    def record(self) -> dict:
        """The cell as JSON (the grid manifest)."""
        return {"run_id": self.run_id, "method": self.method, "task": self.task,
                "cohort": self.cohort, "fold": self.fold, "seed": self.seed,
                "cxr_missing_rate": self.rate, "missing_at": list(self.at)}


@dataclasses.dataclass
class Grid:
    """The cells of an experiment on one store, and where their run folders go.

    Attributes
    ----------
    name : str
        Name of the experiment (its file's stem).
    experiment : Experiment
    store : str
    out : pathlib.Path
    cells : list of Cell
        The cells to run, in product order.
    excluded : list of (Cell, str)
        Cells the method cannot run, with the reason.
    """

    name: str
    experiment: Experiment
    store: str
    out: pathlib.Path
    cells: list
    excluded: list

    def is_complete(self, cell: Cell) -> bool:
        """Whether the run folder of ``cell`` is complete."""
        return (self.out / cell.run_id / COMPLETE_MARKER).is_file()

    def is_failed(self, cell: Cell) -> bool:
        """Whether ``cell`` has a failure record (and no complete run folder)."""
        return failed_path(self.out, cell.run_id).is_file() and not self.is_complete(cell)

    def pending(self) -> list:
        """Cells without a complete run folder (failed ones included), in grid order."""
        return [cell for cell in self.cells if not self.is_complete(cell)]


def failed_path(out, run_id: str) -> pathlib.Path:
    """``<out>/<run-id>.failed.json``: the record a failed cell leaves."""
    return pathlib.Path(out) / f"{run_id}.failed.json"


class _MemoStore:
    """A store whose embedding list is read once (every cell resolves its encoders from it)."""

    def __init__(self, store):
        self._store = store
        self._embeddings = None

    def embeddings(self) -> list:
        if self._embeddings is None:
            self._embeddings = self._store.embeddings()
        return self._embeddings

    def __getattr__(self, name):
        return getattr(self._store, name)


def _method_specs(experiment: Experiment, source: str) -> list[tuple[int, MethodSpec]]:
    """(index in ``methods``, spec) of every method of the grid; ``all`` expanded."""
    named = {spec.name for spec in experiment.methods}
    specs = []
    for i, spec in enumerate(experiment.methods):
        if spec.name == ALL_METHODS:
            specs += [(i, MethodSpec(name=name)) for name in list_methods() if name not in named]
            continue
        try:
            get_method(spec.name)
        except FusionError:
            raise ExperimentError(source, f"methods[{i}].name", spec.name,
                                  f"a registered method: {', '.join(list_methods())}") from None
        specs.append((i, spec))
    return sorted(specs, key=lambda item: item[1].name)


def _hyperparameters(experiment: Experiment, i: int, spec: MethodSpec, base: pathlib.Path,
                     source: str) -> dict:
    """Overrides of one method (its config file's, updated with the entry's), checked; a named
    preset is checked for every task and cohort of the grid (each cell resolves it itself)."""
    cls = get_method(spec.name)
    hyper = config_hyperparameters(spec, base, source, key=f"methods[{i}]")
    if spec.preset is not None:
        from fusion.presets import preset_hyperparameters

        for task, cohort in itertools.product(experiment.tasks, experiment.cohorts):
            try:
                preset_hyperparameters(spec.name, spec.preset, task, cohort)
            except HyperparameterError as err:
                raise ExperimentError(source, f"methods[{i}].preset", spec.preset,
                                      f"a preset shipped for {spec.name!r} ({err})") from None
    if cls.supports(experiment.features):
        try:
            cls.resolve_hyperparameters(hyper, features=experiment.features)
        except HyperparameterError as err:
            raise ExperimentError(source, f"methods[{i}].hyperparameters", hyper, str(err)) from None
    return hyper


def _mask_settings(experiment: Experiment, cohort: str) -> list[tuple[float, tuple]]:
    """Distinct (rate, masked parts) of ``cohort``; rate 0 has no parts."""
    settings = []
    for spec in experiment.missing:
        if spec.cohorts is not None and cohort not in spec.cohorts:
            continue
        at = tuple(p for p in PARTS if p in spec.at)
        for rate in spec.rates:
            setting = (float(rate), at if rate > 0 else ())
            if setting not in settings:
                settings.append(setting)
    return settings


def _exclusion(cls, experiment: Experiment, task: str, rate: float, at: tuple) -> str | None:
    """Why method ``cls`` cannot run this cell, or None."""
    if not cls.supports(experiment.features):
        return (f"does not support {experiment.features} features "
                f"(supports: {', '.join(sorted(cls.inputs))})")
    if task not in cls.tasks:
        return f"does not support task {task} (supports: {', '.join(cls.tasks)})"
    if set(cls.modalities) == {"cxr"} and rate >= 1.0 and {"train", "val"} & set(at):
        return "X-ray-only method under a mask hiding every training/validation X-ray"
    return None


def _check_folds(experiment: Experiment, store, source: str) -> None:
    for i, fold in enumerate(experiment.folds):
        if fold >= store.n_folds:
            raise ExperimentError(source, f"folds[{i}]", fold,
                                  f"folds of store {store.path}: 0..{store.n_folds - 1}")


def expand_grid(experiment: Experiment, *, store: str, out, name: str,
                source: pathlib.Path | None = None) -> Grid:
    """The cells of ``experiment`` on ``store``, with their run ids.

    Parameters
    ----------
    experiment : Experiment
    store : str
        Store path.
    out : path
        Folder of the run folders.
    name : str
        Name of the experiment.
    source : pathlib.Path, optional
        The experiment file (relative config paths are read from its folder; named in errors).

    Returns
    -------
    Grid

    Raises
    ------
    ExperimentError
        Unknown method, bad hyperparameters, or a fold the store does not have.
    GridError
        A cell cannot be resolved against the store (e.g. a missing embedding).
    """
    from cbstore.store.reader import open_store

    src = str(source or name)
    base = source.parent if source is not None else pathlib.Path.cwd()
    opened = open_store(store)
    _check_folds(experiment, opened, src)
    memo = _MemoStore(opened)
    cells, excluded, seen = [], [], set()
    for i, spec in _method_specs(experiment, src):
        cls = get_method(spec.name)
        hyper = _hyperparameters(experiment, i, spec, base, src)
        for task, cohort, fold, seed in itertools.product(
                experiment.tasks, experiment.cohorts, experiment.folds, experiment.seeds):
            for rate, at in _mask_settings(experiment, cohort):
                cell = Cell(spec.name, task, cohort, fold, seed, rate, at)
                reason = _exclusion(cls, experiment, task, rate, at)
                if reason is not None:
                    excluded.append((cell, reason))
                    continue
                cell.options = _options(experiment, cell, hyper, store, out, spec.preset)
                cell.run_id = _run_id(cell, memo)
                if cell.run_id not in seen:
                    seen.add(cell.run_id)
                    cells.append(cell)
    return Grid(name, experiment, store, pathlib.Path(out), cells, excluded)


def _options(experiment: Experiment, cell: Cell, hyper: dict, store: str, out,
             preset: str | None = None) -> dict:
    return {"store": str(store), "method": cell.method, "task": cell.task, "fold": cell.fold,
            "preset": preset,
            "seed": cell.seed, "features": experiment.features,
            "ehr_encoder": experiment.encoders.ehr, "cxr_encoder": experiment.encoders.cxr,
            "cxr_map_encoder": experiment.encoders.cxr_map,
            "cohort": cell.cohort, "cxr_missing_rate": cell.rate,
            "missing_at": list(cell.at or PARTS), "hyperparameters": dict(hyper),
            "n_boot": experiment.n_boot, "out": str(out), "progress": False}


def _run_id(cell: Cell, store) -> str:
    try:
        return run_id_of(resolve(RunConfig(**cell.options), store))
    except FusionError as err:
        raise GridError(f"cell {cell.label()}: {err}") from None
