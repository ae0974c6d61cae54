"""Throughput of the benchmark grid (``cbstore bench``) on a local Dask cluster, 1 and 2 workers.

For each store and each worker count W, a fresh output folder and a grid of cached ``lgbm-early``
and ``latefusion`` cells (mortality, full cohort, ``--folds`` folds x ``--seeds`` seeds, method
defaults, 1000 bootstrap resamples: the settings of a real grid) run through
:func:`fusion.bench.run_grid` on a ``LocalCluster`` of W single-threaded worker processes.
Measured: the grid's wall time (cluster start and stop included), the cluster start and stop
(stopping waits for the worker processes to exit, a few seconds with torch loaded), the sum of
the cells' own wall times (each measured in its worker, imports of the first cell included), and
cells per minute. Target: wall <= 1.10 x (sum of cell times) / W + cluster start + stop, i.e. the
scheduler keeps the workers busy.

Stores: ``--store PATH`` (repeatable; any store with an ``ehr-stats`` and one X-ray embedding),
or ``--stays N ...`` (default 5,000 and 20,000) to build them with ``bench_fuse.py``'s recipe
(cached under ``--work-dir``, shared with that script)::

    python benchmarks/bench_grid.py                                   # 5,000 and 20,000 stays
    python benchmarks/bench_grid.py --store demo/store.zarr --folds 2 --seeds 1

The machine may be shared: the load average is printed with every figure. Exit status 1 when a
target is missed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

#: Target: grid wall time <= SLACK x (sum of cell times) / workers + cluster start.
SLACK = 1.10
METHODS = ("lgbm-early", "latefusion")


def grid_doc(folds: int, seeds: int) -> dict:
    """The benchmark's experiment: cached lgbm-early and latefusion on mortality."""
    return {"description": "grid throughput benchmark", "methods": list(METHODS),
            "tasks": ["mortality"], "cohorts": ["full"], "folds": list(range(folds)),
            "seeds": list(range(seeds)), "features": "cached",
            "encoders": {"ehr": "ehr-stats", "cxr": None}, "n_boot": 1000}


def time_grid(store: str, out: Path, workers: int, doc: dict) -> dict:
    """Run the grid of ``doc`` on ``store`` into an empty ``out`` with ``workers`` workers."""
    from fusion.bench import expand_grid, run_grid
    from fusion.bench.experiment import parse_experiment

    shutil.rmtree(out, ignore_errors=True)
    grid = expand_grid(parse_experiment(doc, "bench"), store=store, out=out, name="bench")
    before = os.getloadavg()[0]
    t0 = time.perf_counter()
    outcome = run_grid(grid, workers=workers, echo=lambda line: print("   ", line, flush=True))
    wall = time.perf_counter() - t0
    if not outcome.ok:
        raise SystemExit(f"{outcome.failed} cell(s) failed; see {out}/*.failed.json")
    overhead = outcome.cluster_seconds + outcome.cluster_stop_seconds
    bound = SLACK * outcome.cell_seconds / workers + overhead
    return {"workers": workers, "cells": outcome.ran, "wall_s": round(wall, 2),
            "cluster_s": round(outcome.cluster_seconds, 2),
            "cluster_stop_s": round(outcome.cluster_stop_seconds, 2),
            "cell_sum_s": round(outcome.cell_seconds, 2),
            "cells_per_min": round(60 * outcome.ran / wall, 2),
            "bound_s": round(bound, 2), "ok": wall <= bound,
            "load1": [round(before, 2), round(os.getloadavg()[0], 2)]}


def _stores(args) -> list[tuple[str, int]]:
    """(path, n_stays) of every store to measure, building the ``--stays`` ones when needed."""
    from cbstore.store.reader import open_store

    if args.store:
        return [(path, int(open_store(path).n_stays)) for path in args.store]
    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_fuse import BUILD_RETENTION, CXR_INPUT_SIZE, StoreRecipe, ensure_store

    stores = []
    for n in args.stays:
        # bench_fuse.py's recipe (its 20,000-stay store is the same cached store)
        name = f"store{n // 1000}k" if n % 1000 == 0 else f"store{n}"
        recipe = StoreRecipe(name, n, math.ceil(n / BUILD_RETENTION), 64, CXR_INPUT_SIZE, 250.0, 0)
        made = ensure_store(Path(args.work_dir), recipe, rebuild=False, keep_source=False)
        stores.append((made["path"], made["n_stays"]))
    return stores


def print_growth(results: list[dict]) -> None:
    """How the mean cell time and the throughput grow with the store, per worker count."""
    for workers in sorted({r["workers"] for r in results}):
        rows = sorted((r for r in results if r["workers"] == workers), key=lambda r: r["n_stays"])
        if len(rows) < 2:
            continue
        small, large = rows[0], rows[-1]
        cell = [r["cell_sum_s"] / r["cells"] for r in (small, large)]
        print(f"{workers} worker(s): {large['n_stays'] / small['n_stays']:.1f}x the stays -> mean "
              f"cell {cell[0]:.1f} s -> {cell[1]:.1f} s ({cell[1] / cell[0]:.2f}x), cells/min "
              f"{small['cells_per_min']:.1f} -> {large['cells_per_min']:.1f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", action="append", help="existing store (repeatable)")
    parser.add_argument("--stays", type=int, nargs="+", default=[5000, 20000],
                        help="build stores of about these many stays (default: 5000 20000)")
    parser.add_argument("--work-dir", default=str(REPO / "bench-out" / "fuse"),
                        help="cache of built stores, shared with bench_fuse.py; the grid's run "
                             "folders go to WORK_DIR/grid-runs")
    parser.add_argument("--folds", type=int, default=3, help="folds per method (default 3)")
    parser.add_argument("--seeds", type=int, default=2, help="seeds per method (default 2)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)

    doc = grid_doc(args.folds, args.seeds)
    results = []
    for path, n_stays in _stores(args):
        for workers in args.workers:
            print(f"store {path} ({n_stays:,} stays), {workers} worker(s):", flush=True)
            res = time_grid(path, Path(args.work_dir) / "grid-runs", workers, doc)
            results.append({"store": path, "n_stays": n_stays, **res})
    print(f"\n| stays | workers | cells | wall s | cluster start / stop s | sum of cells s | "
          f"cells/min | bound {SLACK:.2f} x sum/W + start + stop | target | load 1 min |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(f"| {r['n_stays']:,} | {r['workers']} | {r['cells']} | {r['wall_s']:.1f} | "
              f"{r['cluster_s']:.1f} / {r['cluster_stop_s']:.1f} | {r['cell_sum_s']:.1f} | "
              f"{r['cells_per_min']:.1f} | "
              f"{r['bound_s']:.1f} | {'met' if r['ok'] else 'MISSED'} | {r['load1']} |")
    print_growth(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
