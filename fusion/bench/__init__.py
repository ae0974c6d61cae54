"""The benchmark grid (``cbstore bench``): experiment files, their cells, and running them on Dask.

* :mod:`fusion.bench.experiment`: the experiment file (YAML) and its pydantic model.
* :mod:`fusion.bench.grid`: the cells of an experiment on a store, with their run ids.
* :mod:`fusion.bench.runner`: running the pending cells (Dask or in-process), progress, dry run.

Importing this package does not import Dask, torch or LightGBM.
"""

from fusion.bench.experiment import Experiment, ExperimentError, load_experiment, shipped_experiments
from fusion.bench.grid import Cell, Grid, GridError, expand_grid
from fusion.bench.runner import GridOutcome, run_cell, run_grid, status_lines

__all__ = ["Cell", "Experiment", "ExperimentError", "Grid", "GridError", "GridOutcome",
           "expand_grid", "load_experiment", "run_cell", "run_grid", "shipped_experiments",
           "status_lines"]
