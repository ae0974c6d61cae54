"""Run the pending cells of a :class:`~fusion.bench.grid.Grid` on Dask, or one by one in-process.

* ``workers >= 1`` (default: the number of CPU cores): a ``dask.distributed.LocalCluster`` of that
  many single-threaded worker processes, one fit per worker at a time.
* ``scheduler="tcp://host:8786"``: the workers of an existing Dask cluster.
* ``workers == 0``: no cluster; the cells run one after the other in the calling process.

Each cell is :func:`run_cell`: a normal :func:`fusion.runs.run_fusion` run folder. A cell that
raises leaves ``<out>/<run-id>.failed.json`` (error, traceback, options) and the grid goes on; the
record is removed when the cell later completes. Cells already complete are not submitted, so a
rerun runs only what is missing or failed.

Raw-feature cells ask for a GPU (``resources={"GPU": 1}``) when any worker declares a ``GPU``
resource (``dask worker ADDRESS --resources GPU=1``, or ``cbstore bench --resources GPU=1`` for the
local cluster); otherwise they run wherever there is room.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import socket
import time
import traceback
from collections.abc import Callable

from cbstore.format.schema import now
from fusion.bench.grid import Cell, Grid, GridError, failed_path
from fusion.config import RunConfig

__all__ = ["GridOutcome", "Progress", "default_workers", "estimate_remaining", "record_failure",
           "connect", "run_cell", "run_grid", "status_lines", "submit_cells", "write_manifest"]

log = logging.getLogger(__name__)


def default_workers() -> int:
    """Worker processes of the local cluster when none is given: the CPU cores usable here."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _write_json_atomic(doc: dict, path: pathlib.Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(doc, indent=1, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


def record_failure(out, run_id: str, options: dict, error: str, trace: str, seconds: float) -> dict:
    """Write ``<out>/<run-id>.failed.json`` and return the cell result of a failure."""
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _write_json_atomic({"run_id": run_id, "error": error, "traceback": trace, "options": options,
                        "failed_at": now(), "seconds": round(seconds, 3),
                        "host": socket.gethostname(), "pid": os.getpid()},
                       failed_path(out, run_id))
    return {"run_id": run_id, "status": "failed", "error": error, "seconds": seconds}


def run_cell(options: dict, run_id: str) -> dict:
    """Run one cell (the task a Dask worker executes); never raises for a failing run.

    Parameters
    ----------
    options : dict
        :class:`fusion.config.RunConfig` keyword arguments.
    run_id : str
        The id the grid computed for the cell; a run that resolves to another id fails.

    Returns
    -------
    dict
        ``run_id``, ``status`` (``complete``, ``reused`` or ``failed``), ``seconds`` and, for a
        failure, ``error``.
    """
    from fusion.runs import run_fusion

    started = time.perf_counter()
    out = options["out"]
    try:
        result = run_fusion(RunConfig(**options), echo=log.debug)
        if result.run_id != run_id:
            raise GridError(f"the run resolved to id {result.run_id}, not the grid's {run_id} "
                            "(the store or the environment changed since the grid was expanded)")
    except Exception as err:  # the grid goes on; the record says what happened
        return record_failure(out, run_id, options, f"{type(err).__name__}: {err}",
                              traceback.format_exc(), time.perf_counter() - started)
    failed_path(out, run_id).unlink(missing_ok=True)
    return {"run_id": run_id, "status": "reused" if result.reused else "complete",
            "seconds": time.perf_counter() - started}


@dataclasses.dataclass
class GridOutcome:
    """After a grid run: cells complete (before or now), failed, in the grid, run now; timings.

    ``cell_seconds`` is the sum of the wall times of the cells run now (each measured in its
    worker); ``cluster_seconds`` and ``cluster_stop_seconds`` the time to start and to stop the
    local cluster (0 without one).
    """

    total: int
    complete: int = 0
    failed: int = 0
    ran: int = 0
    cell_seconds: float = 0.0
    cluster_seconds: float = 0.0
    cluster_stop_seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.complete == self.total


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


class Progress:
    """Prints one line per finished cell: done / failed / total and the ETA.

    The ETA is the elapsed time per finished cell of this session times the cells left, so it
    reflects how many cells run at once.
    """

    def __init__(self, outcome: GridOutcome, pending: int, echo: Callable[[str], None]):
        self.outcome, self.left, self.echo = outcome, pending, echo
        self.started = time.perf_counter()
        self.finished = 0

    def update(self, cell: Cell, result: dict) -> None:
        self.finished += 1
        self.left -= 1
        self.outcome.ran += 1
        self.outcome.cell_seconds += result["seconds"]
        if result["status"] == "failed":
            self.outcome.failed += 1
        else:
            self.outcome.complete += 1
        eta = (time.perf_counter() - self.started) / self.finished * self.left
        status = result["status"] if result["status"] != "failed" else f"FAILED ({result['error']})"
        self.echo(f"[done {self.outcome.complete} / failed {self.outcome.failed} / total "
                  f"{self.outcome.total}, ETA {_duration(eta)}] {cell.run_id} {cell.label()}: "
                  f"{status} in {result['seconds']:.1f} s")


def write_manifest(grid: Grid, source: str) -> pathlib.Path:
    """Write ``<out>/<name>.grid.json``: the experiment, its cells with run ids, the exclusions."""
    grid.out.mkdir(parents=True, exist_ok=True)
    path = grid.out / f"{grid.name}.grid.json"
    _write_json_atomic({
        "experiment": grid.name, "source": source, "store": grid.store, "written_at": now(),
        "settings": grid.experiment.model_dump(mode="json"),
        "cells": [cell.record() for cell in grid.cells],
        "excluded": [{**cell.record(), "reason": reason} for cell, reason in grid.excluded],
    }, path)
    return path


def _run_serial(cells: list, progress: Progress) -> None:
    for cell in cells:
        progress.update(cell, run_cell(cell.options, cell.run_id))


def _gpu_workers(client) -> bool:
    workers = client.scheduler_info().get("workers", {}).values()
    return any((w.get("resources") or {}).get("GPU", 0) > 0 for w in workers)


def submit_cells(cells: list, client) -> dict:
    """Submit :func:`run_cell` for each cell, in grid order; return ``{future: cell}``.

    Raw-feature cells ask for ``{"GPU": 1}`` when some worker of ``client`` declares a GPU.
    """
    gpu = _gpu_workers(client)
    futures = {}
    for cell in cells:
        needs_gpu = gpu and cell.features == "raw"
        future = client.submit(run_cell, cell.options, cell.run_id, key=f"cell-{cell.run_id}",
                               pure=False, resources={"GPU": 1} if needs_gpu else None)
        futures[future] = cell
    return futures


def _run_dask(cells: list, progress: Progress, client) -> None:
    from distributed import as_completed

    futures = submit_cells(cells, client)
    for future in as_completed(futures):
        cell = futures[future]
        try:
            result = future.result()
        except Exception as err:  # the worker died (KilledWorker) or the task could not run
            result = record_failure(cell.options["out"], cell.run_id, cell.options,
                                    f"{type(err).__name__}: {err}", traceback.format_exc(), 0.0)
        progress.update(cell, result)
        future.release()


def connect(scheduler: str, timeout: float = 10.0):
    """A dask ``Client`` of the scheduler at ``scheduler``.

    Raises
    ------
    GridError
        When no scheduler answers there within ``timeout`` seconds.
    """
    from distributed import Client

    try:
        return Client(scheduler, timeout=timeout)
    except (OSError, TimeoutError, ValueError) as err:
        raise GridError(f"--scheduler {scheduler}: no Dask scheduler answers ({err}); start one "
                        f"with `dask scheduler` and its workers with `dask worker {scheduler} "
                        "--nthreads 1`, or leave out --scheduler for a local cluster") from None


def run_grid(grid: Grid, *, workers: int | None = None, scheduler: str | None = None,
             resources: dict | None = None, echo: Callable[[str], None] = log.info) -> GridOutcome:
    """Run every cell of ``grid`` without a complete run folder.

    Parameters
    ----------
    grid : Grid
    workers : int, optional
        Worker processes of the local cluster (None: :func:`default_workers`); 0 runs the cells
        in this process, one after the other.
    scheduler : str, optional
        Address of an existing Dask scheduler (``workers`` and ``resources`` are then ignored).
    resources : dict, optional
        Resources each local worker declares, e.g. ``{"GPU": 1}``.
    echo : callable
        Receives the progress lines.

    Returns
    -------
    GridOutcome
    """
    pending = grid.pending()
    outcome = GridOutcome(total=len(grid.cells), complete=len(grid.cells) - len(pending))
    workers = default_workers() if workers is None else workers
    if workers < 0:
        raise GridError(f"--workers must be >= 0 (0: no cluster), got {workers}")
    if not pending:
        return outcome
    progress = Progress(outcome, len(pending), echo)
    if scheduler is None and workers == 0:
        _run_serial(pending, progress)
        return outcome
    from distributed import Client, LocalCluster

    if scheduler is not None:
        with connect(scheduler) as client:
            _run_dask(pending, progress, client)
        return outcome
    started = time.perf_counter()
    # silence_logs: the nanny warns when it kills a worker that is slow to exit after the grid
    # (interpreter teardown with torch loaded); errors are still shown
    cluster = LocalCluster(n_workers=min(workers, len(pending)), threads_per_worker=1,
                           processes=True, resources=resources or None, dashboard_address=":0",
                           silence_logs=logging.ERROR)
    try:
        with Client(cluster) as client:
            outcome.cluster_seconds = time.perf_counter() - started
            echo(f"local Dask cluster: {len(cluster.workers)} worker process(es), 1 thread each, "
                 f"started in {outcome.cluster_seconds:.1f} s")
            _run_dask(pending, progress, client)
    finally:
        stopping = time.perf_counter()
        cluster.close()
        outcome.cluster_stop_seconds = time.perf_counter() - stopping
    return outcome


def _recorded_seconds(grid: Grid, cell: Cell) -> float | None:
    try:
        doc = json.loads((grid.out / cell.run_id / "run.json").read_text())
        return float(doc["seconds"]["total"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def estimate_remaining(grid: Grid, workers: int) -> tuple[float, dict]:
    """Seconds the pending cells should take on ``workers`` workers, from finished cells.

    Each pending cell is costed at the mean ``seconds.total`` (``run.json``) of the complete cells
    of the same method; methods without a complete cell are left out of the sum.

    Returns
    -------
    (float, dict)
        The estimate, and per method: ``{"pending": n, "finished": k, "mean_seconds": s or None}``.
    """
    per_method: dict = {}
    for cell in grid.cells:
        entry = per_method.setdefault(cell.method, {"pending": 0, "finished": 0, "seconds": 0.0})
        seconds = _recorded_seconds(grid, cell) if grid.is_complete(cell) else None
        if seconds is not None:
            entry["finished"] += 1
            entry["seconds"] += seconds
        elif not grid.is_complete(cell):
            entry["pending"] += 1
    total = 0.0
    for entry in per_method.values():
        seconds = entry.pop("seconds")
        entry["mean_seconds"] = seconds / entry["finished"] if entry["finished"] else None
        if entry["mean_seconds"] is not None:
            total += entry["mean_seconds"] * entry["pending"]
    return total / max(workers, 1), per_method


def _exclusion_lines(grid: Grid) -> list[str]:
    counts: dict = {}
    for cell, reason in grid.excluded:
        counts[(cell.method, reason)] = counts.get((cell.method, reason), 0) + 1
    return [f"  excluded {n} cell(s) of {method}: {reason}"
            for (method, reason), n in sorted(counts.items())]


def status_lines(grid: Grid, workers: int) -> list[str]:
    """What ``cbstore bench --dry-run`` prints: size, exclusions, complete/failed cells, estimate."""
    complete = sum(grid.is_complete(cell) for cell in grid.cells)
    failed = [cell for cell in grid.cells if grid.is_failed(cell)]
    pending = len(grid.cells) - complete
    lines = [f"experiment {grid.name} on {grid.store}: {len(grid.cells)} cells "
             f"({len(grid.excluded)} excluded), {complete} complete, {len(failed)} failed, "
             f"{pending} to run; run folders in {grid.out}"]
    lines += _exclusion_lines(grid)
    lines += [f"  failed: {cell.run_id} {cell.label()} (see {failed_path(grid.out, cell.run_id)})"
              for cell in failed[:20]]
    if len(failed) > 20:
        lines.append(f"  ... and {len(failed) - 20} more failed cells")
    seconds, per_method = estimate_remaining(grid, workers)
    for method, entry in sorted(per_method.items()):
        if not entry["pending"]:
            continue
        mean = entry["mean_seconds"]
        cost = (f"{mean:.1f} s per cell from {entry['finished']} finished" if mean is not None
                else "no finished cell, not in the estimate")
        lines.append(f"  {method}: {entry['pending']} to run, {cost}")
    unknown = sum(e["pending"] for e in per_method.values() if e["mean_seconds"] is None)
    if pending and unknown == pending:
        lines.append("estimated remaining time: unknown until a cell of each method has finished")
    elif pending:
        left_out = f"; {unknown} cell(s) of methods without a finished cell not included" \
            if unknown else ""
        lines.append(f"estimated remaining time with {max(workers, 1)} worker(s): "
                     f"{_duration(seconds)} plus the cluster start{left_out}")
    return lines
