"""Seconds per training epoch of fusion methods, cached and raw, at two store sizes.

For each method named on the command line, each feature mode and each of two store sizes, the
time of one training epoch (training plus the validation pass) is the difference of two fits in
one child process (1 epoch and 1 + ``--extra-epochs`` epochs, early stopping off, after a warm-up
fit of one epoch) divided by the extra epochs, so that one-off costs (imports, model set-up,
embedding statistics) cancel. The table
gives both sizes, how the time grows (ratio of the two) against how the training part grows, and
the cached / raw ratio at the smaller size.

Stores are made as the Makefile's demo target does (``cbstore synth`` -> ``build`` -> ``encode
ehr-stats`` -> ``encode densenet121-res224-all --weights random --input-size 64``), plus the
spatial maps ``densenet121-res224-all-block3`` (same weights and input) that the cached mode of
``mmtm`` and ``daft`` reads (DenseNet ``denseblock4`` runs live on them), once per size, and
reused under ``--work-dir``. Raw fits use the small CNN (``backbone=small``, random weights) on
the stored films. ``--set METHOD.KEY=VALUE`` overrides one method's hyperparameter (e.g. a
narrower UMSE where its defaults are too slow for the CPU). Only small sizes are meant for a
shared 2-core machine::

    python benchmarks/bench_methods.py            # latefusion mmtm daft utde (make bench)
    python benchmarks/bench_methods.py aug inforeg latefusion
    python benchmarks/bench_methods.py aug --raw-stays 500 1000 --json out.json
    python benchmarks/bench_methods.py umse --set umse.n_layers=2 --set umse.hidden=64

Sizes are *synthetic* ICU stays; the build keeps about 61 % of them (adults with at least 48 h in
the ICU), so the defaults give stores of about 1,000 and 3,000 stays (cached) and 300 and 600
stays (raw). Each figure is printed with the load average (1 min) and the CPU seconds used: on a
shared machine wall times are inflated, CPU seconds much less so.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
IMAGE_SIZE = 64
CXR_ENCODER = "densenet121-res224-all"
#: Spatial maps for the methods that fuse between CNN stages (``cxr_map``).
MAP_ENCODER = "densenet121-res224-all-block3"
#: Methods timed when none is named (``make bench``).
DEFAULT_METHODS = ("latefusion", "mmtm", "daft", "utde")

# Child process: fits of one method in one mode, as JSON lines (see the module docstring).
_EPOCH_CHILD = """
import json, os, sys, time
from cbstore.store.reader import open_store
from fusion.data import load_fusion_data
from fusion.registry import get_method
store, method, task, features, device = sys.argv[1:6]
plan, overrides = json.loads(sys.argv[6]), json.loads(sys.argv[7])
cls = get_method(method)
data = load_fusion_data(open_store(store), task, 0, features=features,
                        inputs=cls.inputs_for(features))
settings = {}
if features == "raw":
    settings = {k: v for k, v in {"backbone": "small", "cxr_weights": "random"}.items()
                if k in cls.hyperparameters}
resolved = cls.resolve_hyperparameters(overrides, features=features)  # checks and converts
settings.update({k: resolved[k] for k in overrides})
def fit(epochs):
    model = cls(seed=0, features=features, max_epochs=epochs, patience=epochs, **settings)
    load = os.getloadavg()[0]
    t0, c0 = time.perf_counter(), time.process_time()
    model.fit(data, device=device)
    return {"epochs": len(model.history_["epochs"]), "fit_s": time.perf_counter() - t0,
            "cpu_s": time.process_time() - c0, "load1": round(load, 2),
            "n_train": len(data.part("train"))}
fit(1)  # warm-up: lazy imports and first-call kernel set-up
for epochs in plan:
    print(json.dumps(fit(epochs)), flush=True)
"""


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "cli.main", *args]


def _run(cmd: list[str], log: Path) -> str:
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    log.write_text(proc.stdout + proc.stderr)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed (exit {proc.returncode}); see {log}")
    return proc.stdout


def ensure_store(work: Path, synth_stays: int) -> Path:
    """A demo-like store made from ``synth_stays`` synthetic stays (reused when complete)."""
    folder = work / f"stays-{synth_stays}"
    store, done = folder / "store.zarr", folder / "READY"
    if done.is_file():
        _ensure_maps(store, folder)
        return store
    source, logs = folder / "source", folder / "logs"
    print(f"store of {synth_stays} synthetic stays: synth, build, encode ...", flush=True)
    _run(_cli("synth", str(source), "--stays", str(synth_stays), "--seed", "0", "--image-size",
              str(IMAGE_SIZE), "--overwrite"), logs / "synth.log")
    _run(_cli("build", "--mimic-iv", str(source / "mimic-iv"), "--mimic-cxr",
              str(source / "mimic-cxr-jpg"), "--out", str(store), "--image-size", str(IMAGE_SIZE),
              "--overwrite"), logs / "build.log")
    _run(_cli("encode", str(store), "--encoder", "ehr-stats"), logs / "encode_ehr.log")
    _run(_cli("encode", str(store), "--encoder", CXR_ENCODER, "--weights", "random",
              "--input-size", str(IMAGE_SIZE)), logs / "encode_cxr.log")
    done.write_text("ready\n")
    _ensure_maps(store, folder)
    return store


def _ensure_maps(store: Path, folder: Path) -> None:
    """Add the spatial maps to a store made before they were part of the recipe."""
    done = folder / "MAPS"
    if not done.is_file():
        _run(_cli("encode", str(store), "--encoder", MAP_ENCODER, "--weights", "random",
                  "--input-size", str(IMAGE_SIZE)), folder / "logs" / "encode_map.log")
        done.write_text("ready\n")


def parse_overrides(items: list[str]) -> dict:
    """``["umse.hidden=64", ...]`` -> ``{"umse": {"hidden": "64"}}`` (values as text; the method
    parses them as ``cbstore fuse --set`` does)."""
    out: dict = {}
    for item in items:
        key, sep, value = item.partition("=")
        method, dot, name = key.partition(".")
        if not (sep and dot and method and name):
            raise SystemExit(f"--set {item!r}: expected METHOD.KEY=VALUE")
        out.setdefault(method, {})[name] = value
    return out


def time_epoch(store: Path, method: str, features: str, task: str, device: str, extra: int,
               logs: Path, overrides: dict | None = None) -> dict:
    """Seconds (wall and CPU) of one epoch of ``method`` in ``features`` mode on ``store``."""
    cmd = [sys.executable, "-c", _EPOCH_CHILD, str(store), method, task, features, device,
           json.dumps([1, 1 + extra]), json.dumps(overrides or {})]
    text = _run(cmd, logs / f"{method}-{features}-{store.parent.name}.log")
    short, long = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    if long["epochs"] - short["epochs"] != extra:
        raise SystemExit(f"{method} {features}: fits ran {short['epochs']} and {long['epochs']} "
                         f"epochs, expected a difference of {extra}")
    result = {"per_epoch_s": (long["fit_s"] - short["fit_s"]) / extra,
              "per_epoch_cpu_s": (long["cpu_s"] - short["cpu_s"]) / extra,
              "n_train": short["n_train"], "load1": [short["load1"], long["load1"]]}
    print(f"  {method:12s} {features:6s} {short['n_train']:5d} training stays: "
          f"{result['per_epoch_s']:.3f} s per epoch ({result['per_epoch_cpu_s']:.3f} CPU s); "
          f"load avg {short['load1']} -> {long['load1']}", flush=True)
    return result


def print_table(results: dict) -> None:
    print("\n| method | features | train stays | s / epoch | CPU s / epoch "
          "| growth (time / stays) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for method, modes in results.items():
        for features, sizes in modes.items():
            small, large = sizes
            growth = (f"{large['per_epoch_s'] / small['per_epoch_s']:.2f}x / "
                      f"{large['n_train'] / small['n_train']:.2f}x")
            print(f"| {method} | {features} | {small['n_train']} -> {large['n_train']} | "
                  f"{small['per_epoch_s']:.3f} -> {large['per_epoch_s']:.3f} | "
                  f"{small['per_epoch_cpu_s']:.3f} -> {large['per_epoch_cpu_s']:.3f} | {growth} |")
    for method, modes in results.items():
        if {"cached", "raw"} <= set(modes):
            ratio = modes["cached"][0]["per_epoch_s"] / modes["raw"][0]["per_epoch_s"]
            print(f"{method}: cached / raw seconds per epoch at the smaller sizes: {ratio:.4f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("methods", nargs="*", default=list(DEFAULT_METHODS),
                        help=f"registered method names [{' '.join(DEFAULT_METHODS)}]")
    parser.add_argument("--features", nargs="+", default=["cached", "raw"],
                        choices=["cached", "raw"])
    parser.add_argument("--cached-stays", nargs=2, type=int, default=[1640, 4920],
                        help="synthetic stays of the two cached-mode stores")
    parser.add_argument("--raw-stays", nargs=2, type=int, default=[500, 1000],
                        help="synthetic stays of the two raw-mode stores")
    parser.add_argument("--task", default="mortality")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cached-extra-epochs", type=int, default=5)
    parser.add_argument("--raw-extra-epochs", type=int, default=1)
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/cbstore-bench-methods"))
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--set", action="append", default=[], metavar="METHOD.KEY=VALUE",
                        help="a hyperparameter of one method (repeatable)")
    args = parser.parse_args(argv)
    logs = args.work_dir / "logs"
    sizes = {"cached": args.cached_stays, "raw": args.raw_stays}
    extra = {"cached": args.cached_extra_epochs, "raw": args.raw_extra_epochs}
    overrides = parse_overrides(args.set)
    started = time.perf_counter()
    results: dict = {}
    for features in args.features:
        stores = [ensure_store(args.work_dir, n) for n in sizes[features]]
        for method in args.methods:
            results.setdefault(method, {})[features] = [
                time_epoch(store, method, features, args.task, args.device, extra[features], logs,
                           overrides.get(method))
                for store in stores]
    print_table(results)
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
