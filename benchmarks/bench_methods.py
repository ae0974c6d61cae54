"""Seconds per training epoch of fusion methods, cached and raw, at two store sizes each.

For each method named on the command line (default: ``latefusion`` and the missing-modality
methods of part 2), each feature mode and each of its two stores, a child process fits the method
on mortality, fold 0, three times: 1 epoch (warm-up, not used), 1 epoch and ``1 + --extra-epochs``
epochs (no early stop), and reports
``(t_long - t_short) / extra`` so that one-off costs (imports, data loading, model set-up) cancel.
An epoch is the training pass plus the validation pass. Hyperparameters are the method's defaults
for the mode, except seeded random X-ray weights (no weights file is read), in raw mode the small
CNN (``backbone=small``) for the methods that have one, and ``--set KEY=VALUE`` overrides.

Reported per method and mode: seconds per epoch at both sizes, how the cost grows (time ratio
against stay ratio: linear growth gives equal ratios), and the cost per training stay cached / raw.

Stores: ``--cached-store`` / ``--raw-store`` (two paths each), or made once under ``--work-dir``
(``cbstore synth`` -> ``build`` at 64 px -> ``encode ehr-stats`` -> ``densenet121-res224-all`` and
``densenet121-res224-all-block3`` with random weights at 64 px: a pooled X-ray embedding and a
spatial map, without diagnostic content, for timing only). The build keeps about 60 % of the
synthetic stays::

    python benchmarks/bench_methods.py                             # default methods and stores
    python benchmarks/bench_methods.py healnet umse --json bench-out/methods.json

The machine may be shared: the load average is printed with every figure.
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
METHODS = ("latefusion", "healnet", "flexmoe", "umse", "shaspec")
#: Synthetic stays per store (about 60 % survive the build): ~300 and ~600 raw, ~1,000 and ~3,000 cached.
RAW_SYNTH, CACHED_SYNTH = (500, 1000), (1700, 5000)
IMAGE_SIZE = 64
ENCODERS = (("ehr-stats", ()), ("densenet121-res224-all", ("--weights", "random", "--input-size", "64")),
            ("densenet121-res224-all-block3", ("--weights", "random", "--input-size", "64")))

# Child process: fit one method in one mode with the given epoch counts; one JSON line per fit.
_CHILD = """
import json, os, sys, time
from cbstore.store import open_store
from fusion.data import load_fusion_data
from fusion.registry import get_method
store_path, method, task, features = sys.argv[1:5]
plan, settings = json.loads(sys.argv[5]), json.loads(sys.argv[6])
cls = get_method(method)
data = load_fusion_data(open_store(store_path), task, 0, features=features,
                        inputs=cls.inputs_for(features))
params = {"cxr_weights": "random"} if "cxr_weights" in cls.hyperparameters else {}
if features == "raw" and "backbone" in cls.hyperparameters:
    params["backbone"] = "small"
params.update({k: v for k, v in settings.items() if k in cls.hyperparameters})
for epochs in plan:
    model = cls(seed=0, features=features, max_epochs=epochs, patience=epochs, **params)
    before = os.getloadavg()[0]
    t0, c0 = time.perf_counter(), time.process_time()
    model.fit(data, device="cpu")
    print(json.dumps({"epochs": len(model.history_["epochs"]), "fit_s": time.perf_counter() - t0,
                      "cpu_s": time.process_time() - c0, "n_train": len(data.part("train")),
                      "load1": [round(before, 2), round(os.getloadavg()[0], 2)]}), flush=True)
"""


def _run(cmd: list[str], log: Path) -> str:
    """Run ``cmd`` in the repository root; its output (SystemExit with the log's end on failure)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    with open(log, "wb") as out:
        code = subprocess.call(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    text = log.read_text(errors="replace")
    if code != 0:
        raise SystemExit(f"command failed (exit {code}): {' '.join(cmd)}\nlog {log}:\n{text[-3000:]}")
    return text


def make_store(work: Path, synth_stays: int) -> Path:
    """The timing store made from ``synth_stays`` synthetic stays (reused when complete)."""
    folder = work / f"synth{synth_stays}"
    store, done = folder / "store.zarr", folder / "COMPLETE"
    if done.is_file():
        return store
    cli = [sys.executable, "-m", "cli.main"]
    print(f"store {folder}: synth {synth_stays} stays, build, encode ...", flush=True)
    _run([*cli, "synth", str(folder / "source"), "--stays", str(synth_stays), "--seed", "0",
          "--image-size", str(IMAGE_SIZE), "--overwrite"], folder / "synth.log")
    _run([*cli, "build", "--mimic-iv", str(folder / "source" / "mimic-iv"), "--mimic-cxr",
          str(folder / "source" / "mimic-cxr-jpg"), "--out", str(store), "--image-size",
          str(IMAGE_SIZE), "--overwrite", "--quiet"], folder / "build.log")
    for encoder, options in ENCODERS:
        _run([*cli, "encode", str(store), "--encoder", encoder, *options, "--quiet"],
             folder / f"encode-{encoder}.log")
    done.write_text("")
    return store


def time_epochs(store: Path, method: str, features: str, extra: int, task: str, logs: Path,
                settings: dict) -> dict:
    """Seconds per epoch of ``method`` in mode ``features`` on ``store`` (see the module docstring)."""
    log = logs / f"{method}-{features}-{store.parent.name}.log"
    # a first fit of one epoch pays the one-off costs (lazy imports); it is not used
    text = _run([sys.executable, "-c", _CHILD, str(store), method, task, features,
                 json.dumps([1, 1, 1 + extra]), json.dumps(settings)], log)
    _, short, long = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    if long["epochs"] - short["epochs"] != extra:
        raise SystemExit(f"{method} {features}: fits ran {short['epochs']} and {long['epochs']} epochs")
    return {"per_epoch_s": (long["fit_s"] - short["fit_s"]) / extra,
            "per_epoch_cpu_s": (long["cpu_s"] - short["cpu_s"]) / extra,
            "n_train": short["n_train"], "load1": [short["load1"][0], long["load1"][1]]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("methods", nargs="*", default=list(METHODS))
    parser.add_argument("--cached-store", nargs=2, type=Path, metavar=("SMALL", "LARGE"))
    parser.add_argument("--raw-store", nargs=2, type=Path, metavar=("SMALL", "LARGE"))
    parser.add_argument("--work-dir", type=Path, default=REPO / "bench-out" / "methods")
    parser.add_argument("--task", default="mortality")
    parser.add_argument("--extra-epochs", type=int, default=2)
    parser.add_argument("--modes", nargs="+", default=["cached", "raw"], choices=["cached", "raw"])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="hyperparameter for every method that has it (repeatable)")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    args = parser.parse_args(argv)
    settings = dict(pair.split("=", 1) for pair in args.set)
    given = {"cached": args.cached_store, "raw": args.raw_store}
    synth = {"cached": CACHED_SYNTH, "raw": RAW_SYNTH}
    stores = {mode: given[mode] or [make_store(args.work_dir, n) for n in synth[mode]]
              for mode in args.modes}
    results = []
    for method in args.methods:
        for features in args.modes:
            sizes = [time_epochs(s, method, features, args.extra_epochs, args.task,
                                 args.work_dir / "logs", settings) for s in stores[features]]
            small, large = sizes
            row = {"method": method, "features": features, "sizes": sizes,
                   "stay_ratio": large["n_train"] / small["n_train"],
                   "time_ratio": large["per_epoch_s"] / small["per_epoch_s"]}
            results.append(row)
            print(f"{method:10s} {features:6s} " + "  ".join(
                f"{s['n_train']:5d} train stays {s['per_epoch_s']:7.2f} s/epoch "
                f"({s['per_epoch_cpu_s']:.2f} CPU s, load {s['load1'][0]}->{s['load1'][1]})"
                for s in sizes) + f"  growth x{row['time_ratio']:.2f} for x{row['stay_ratio']:.2f} stays",
                flush=True)
    by_key = {(r["method"], r["features"]): r for r in results}
    for method in args.methods:
        cached, raw = by_key.get((method, "cached")), by_key.get((method, "raw"))
        if cached and raw:
            per_stay = [r["sizes"][1]["per_epoch_s"] / r["sizes"][1]["n_train"] for r in (cached, raw)]
            print(f"{method:10s} cached / raw seconds per training stay (larger stores): "
                  f"{per_stay[0] / per_stay[1]:.3f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                         "results": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
