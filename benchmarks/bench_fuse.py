"""Wall time of cached fusion runs and of the evaluator on a 20,000-stay store; raw vs cached epochs.

Measures, on a synthetic store of about ``--stays`` ICU stays (built once and cached under
``--work-dir``):

1. one cached run of ``cbstore fuse`` (whole process: interpreter start, imports, data loading,
   fit, prediction, evaluator with 1000 bootstrap resamples and fairness, run folder) for
   LightGBM early fusion (``lgbm-early``) and neural late fusion (``latefusion``) on mortality,
   with default hyperparameters and ``--overwrite`` (recomputed every time); target < 30 s each.
   ``lgbm-early`` on phenotype (25 boosters) is reported without a target;
2. the evaluator (:func:`fusion.evaluation.evaluate_predictions`, in-process) with 1000 bootstrap
   resamples over the 25 phenotype labels of that phenotype run's predictions (the test part of
   the 20,000-stay store), with fairness on (as in a run) and off; target < 10 s with fairness;
3. seconds per training epoch (training plus the validation pass) of ``latefusion`` on cached
   embeddings and on raw inputs (hourly EHR tensor + 224 px images: LSTM + ResNet-50) on a second
   store of about ``--small-stays`` stays, and their ratio cached / raw (expected far below 1).
   An epoch's time is the difference of two fits in one process (1 epoch and 1 + k epochs, no
   early stop) divided by k, so that one-off costs (lazy imports, model set-up) cancel.

Each figure is the median of ``--repeats`` runs (one with ``--quick``; the phenotype run and the
raw epoch timing once unless ``--phenotype-repeats`` / ``--raw-repeats``). Every figure is printed
with the load average (1 min) before and after it and the CPU seconds used, because the machine
may be shared: on a busy machine wall times are inflated, CPU seconds much less so.

The stores: ``cbstore synth`` (films of ``--synth-image-size`` px, ``--chartevents-per-stay``
rows per stay to keep generation short) -> ``cbstore build`` (images stored at 32 px for the
large store, 224 px for the small one, which raw training reads) -> ``cbstore encode --encoder
ehr-stats`` -> an X-ray embedding made by the real encoding pass with DenseNet-121
(``densenet121-res224-chex``) with **random weights at a 32 px input**. That X-ray embedding has
the width of the pretrained one (1024) but no diagnostic content; it exists only to time the
methods (encoding about 6,000 films at 224 px on CPU would take hours). The build keeps about
62 % of the synthetic stays (adults with at least 48 h in the ICU), so ``--synth-stays`` defaults
to ``--stays`` / 0.61; the stores are reused while their recipe is unchanged (``--rebuild``
forces a rebuild, e.g. after changing the build code)::

    python benchmarks/bench_fuse.py                      # first run builds the stores (~11 min)
    python benchmarks/bench_fuse.py --quick --json bench-out/fuse.json

Exit status 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
#: Targets of the issue (seconds): one cached run on 2 cores, and the evaluator.
CACHED_RUN_TARGET_S = 30.0
EVALUATOR_TARGET_S = 10.0
#: Share of synthetic stays the build keeps (adult, >= 48 h in the ICU), measured on the generator.
BUILD_RETENTION = 0.61
EHR_ENCODER = "ehr-stats"
CXR_ENCODER = "densenet121-res224-chex"
CXR_ENCODER_ID = f"{CXR_ENCODER}-random"
#: Input size of the timing-only X-ray encoder (random weights), in pixels.
CXR_INPUT_SIZE = 32
N_BOOT = 1000

# Child process: the X-ray encoding pass with random weights at a small input (no CLI option for
# the input size, which is meant for tests and timing only). Prints its summary as JSON.
_ENCODE_CXR_CHILD = """
import json, sys
from encoders.pass_ import run_encoding_pass
summary = run_encoding_pass(sys.argv[1], sys.argv[2], device="cpu", weights="random",
                            input_size=int(sys.argv[3]), progress=False, batch_size=64, seed=0)
print(json.dumps(summary))
"""


# Child process: seconds per training epoch of one method in one feature mode, as the difference
# of two fits (1 epoch and 1 + extra epochs, no early stop) divided by the extra epochs, so that
# one-off costs (lazy imports, model construction, embedding statistics) cancel. A first cached
# fit of one epoch warms up the imports. Prints one JSON line per timed fit.
_EPOCH_CHILD = """
import json, os, sys, time
from cbstore.store.reader import open_store
from fusion.data import load_fusion_data
from fusion.registry import get_method
store_path, method, task, device, plan = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], json.loads(sys.argv[5])
store = open_store(store_path)
cls = get_method(method)
data = {}
def fit(features, epochs):
    if features not in data:
        data[features] = load_fusion_data(store, task, 0, features=features, inputs=cls.inputs_for(features))
    # seeded random X-ray weights: no weights file on the benchmark machine, same cost per epoch
    weights = {"cxr_weights": "random"} if "cxr_weights" in cls.hyperparameters else {}
    model = cls(seed=0, features=features, max_epochs=epochs, patience=epochs, **weights)
    before = os.getloadavg()[0]
    t0, c0 = time.perf_counter(), time.process_time()
    model.fit(data[features], device=device)
    return {"features": features, "epochs": len(model.history_["epochs"]), "fit_s": time.perf_counter() - t0,
            "cpu_s": time.process_time() - c0, "load1": [round(before, 2), round(os.getloadavg()[0], 2)],
            "n_train": len(data[features].part("train")), "n_val": len(data[features].part("val"))}
fit("cached", 1)
for features, epochs in plan:
    print(json.dumps(fit(features, epochs)), flush=True)
"""


@dataclasses.dataclass(frozen=True)
class StoreRecipe:
    """How one benchmark store is made (its JSON form is the cache key)."""

    name: str
    min_stays: int
    synth_stays: int
    synth_image_size: int
    store_image_size: int
    chartevents_per_stay: float
    seed: int


def _load1() -> float:
    return round(os.getloadavg()[0], 2)


def _run_logged(cmd: list[str], log: Path) -> tuple[float, float, str]:
    """Run ``cmd`` from the repository root; return (wall s, CPU s of the child, its output).

    Raises SystemExit with the end of the log when the command fails.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    text = log.read_text(errors="replace")
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"command failed (exit {code}): {' '.join(cmd)}\nlog {log}:\n{text[-3000:]}")
    return wall, usage.ru_utime + usage.ru_stime, text


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "cli.main", *args]


def _store_ready(store: Path) -> tuple[bool, int]:
    """Whether ``store`` opens and holds both complete embeddings; its number of stays."""
    from cbstore.errors import CbstoreError
    from cbstore.store.reader import open_store

    try:
        s = open_store(store)
        have = {(e["modality"], e["encoder_id"]) for e in s.embeddings()}
    except (CbstoreError, OSError, KeyError, ValueError):
        return False, 0
    return {("ehr", EHR_ENCODER), ("cxr", CXR_ENCODER_ID)} <= have, int(s.n_stays)


def ensure_store(work: Path, recipe: StoreRecipe, *, rebuild: bool, keep_source: bool) -> dict:
    """The cached store of ``recipe`` under ``work/<name>``, made when absent or different.

    Returns the recipe file's content: the recipe, ``n_stays``, ``path`` and preparation timings.
    """
    folder = work / recipe.name
    store = folder / "store.zarr"
    recipe_file = folder / "recipe.json"
    wanted = dataclasses.asdict(recipe)
    if not rebuild and recipe_file.is_file():
        cached = json.loads(recipe_file.read_text())
        ready, n = _store_ready(store)
        if cached.get("recipe") == wanted and ready:
            print(f"store {recipe.name}: cached, {n:,} stays ({store})", flush=True)
            return cached
    recipe_file.unlink(missing_ok=True)
    source, logs = folder / "source", folder / "logs"
    prep = {}
    print(f"store {recipe.name}: synth {recipe.synth_stays:,} stays ({recipe.synth_image_size} px films, "
          f"~{recipe.chartevents_per_stay:g} chartevents rows per stay) ...", flush=True)
    prep["synth_s"], _, _ = _run_logged(
        _cli("synth", str(source), "--stays", str(recipe.synth_stays), "--seed", str(recipe.seed),
             "--image-size", str(recipe.synth_image_size),
             "--chartevents-per-stay", str(recipe.chartevents_per_stay), "--overwrite"), logs / "synth.log")
    print(f"store {recipe.name}: build ({recipe.store_image_size} px images) ...", flush=True)
    prep["build_s"], _, _ = _run_logged(
        _cli("build", "--mimic-iv", str(source / "mimic-iv"), "--mimic-cxr", str(source / "mimic-cxr-jpg"),
             "--out", str(store), "--image-size", str(recipe.store_image_size), "--overwrite", "--quiet"),
        logs / "build.log")
    if not keep_source:
        shutil.rmtree(source, ignore_errors=True)
    print(f"store {recipe.name}: encode {EHR_ENCODER} ...", flush=True)
    prep["encode_ehr_s"], _, _ = _run_logged(
        _cli("encode", str(store), "--encoder", EHR_ENCODER, "--overwrite", "--quiet"), logs / "encode_ehr.log")
    print(f"store {recipe.name}: encode {CXR_ENCODER} with random weights at {CXR_INPUT_SIZE} px "
          "(timing-only X-ray embedding) ...", flush=True)
    prep["encode_cxr_s"], _, _ = _run_logged(
        [sys.executable, "-c", _ENCODE_CXR_CHILD, str(store), CXR_ENCODER, str(CXR_INPUT_SIZE)],
        logs / "encode_cxr.log")
    ready, n = _store_ready(store)
    if not ready:
        raise SystemExit(f"store {store} lacks the {EHR_ENCODER} or {CXR_ENCODER_ID} embedding after "
                         f"preparation; see the logs in {logs}")
    if n < recipe.min_stays:
        raise SystemExit(f"store {store} has {n:,} stays, fewer than the {recipe.min_stays:,} wanted; "
                         "raise the number of synthetic stays (--synth-stays / --small-synth-stays)")
    cached = {"recipe": wanted, "n_stays": n, "path": str(store),
              "prepare_seconds": {k: round(v, 1) for k, v in prep.items()}}
    recipe_file.write_text(json.dumps(cached, indent=2) + "\n")
    print(f"store {recipe.name}: ready, {n:,} stays; preparation "
          + ", ".join(f"{k} {v:.0f} s" for k, v in prep.items()), flush=True)
    return cached


_RUN_DONE = re.compile(r"^run ([0-9a-f]{12}) complete: (.+)$", re.MULTILINE)


def time_fuse(store: Path, method: str, task: str, features: str, out: Path, logs: Path, *,
              device: str, sets: tuple[str, ...] = (), tag: str = "") -> dict:
    """One ``cbstore fuse --overwrite`` process: wall and CPU seconds plus its ``run.json`` timings."""
    cmd = _cli("fuse", str(store), "--method", method, "--task", task, "--features", features,
               "--out", str(out), "--device", device, "--overwrite", "--no-progress")
    for pair in sets:
        cmd += ["--set", pair]
    before = _load1()
    wall, cpu, text = _run_logged(cmd, logs / f"fuse-{method}-{task}-{features}{tag}.log")
    after = _load1()
    match = _RUN_DONE.search(text)
    if match is None:
        raise SystemExit(f"could not find the run folder in the output of {' '.join(cmd)}:\n{text[-2000:]}")
    run = json.loads((Path(match.group(2).strip()) / "run.json").read_text())
    seconds = run["seconds"]
    epochs = len(run.get("history", {}).get("epochs", []))
    return {"wall_s": wall, "cpu_s": cpu, "seconds": seconds,
            "startup_s": wall - seconds["total"],  # interpreter, imports, store open, resolve, folder
            "epochs": epochs, "best_epoch": run.get("history", {}).get("best_epoch"),
            "fit_per_epoch_s": seconds["fit"] / epochs if epochs else None,
            "n_train": run["parts"]["train"]["n_stays"], "n_test": run["parts"]["test"]["n_stays"],
            "run_id": match.group(1), "run_dir": match.group(2).strip(), "load1": [before, after]}


def median_run(runs: list[dict], key: str = "wall_s") -> dict:
    """The run with the median ``key`` (lower middle for an even count), plus every value of ``key``."""
    ordered = sorted(runs, key=lambda r: r[key])
    chosen = dict(ordered[(len(ordered) - 1) // 2])
    chosen["all_" + key] = [round(r[key], 2) for r in runs]
    chosen["load1_all"] = [r["load1"] for r in runs]
    return chosen


def repeat_fuse(n: int, label: str, *args, key: str = "wall_s", **kwargs) -> dict:
    """:func:`time_fuse` ``n`` times, printing each; the run with the median ``key``."""
    runs = []
    for k in range(n):
        runs.append(time_fuse(*args, tag=f"-{k}", **kwargs))
        r = runs[-1]
        s = r["seconds"]
        epochs = f", {r['epochs']} epochs" if r["epochs"] else ""
        print(f"  {label} [{k + 1}/{n}]: {r['wall_s']:.1f} s wall, {r['cpu_s']:.1f} s CPU (startup "
              f"{r['startup_s']:.1f}, load {s['load']:.1f}, fit {s['fit']:.1f}, predict {s['predict']:.1f}, "
              f"evaluate {s['evaluate']:.1f}{epochs}); load avg {r['load1'][0]} -> {r['load1'][1]}",
              flush=True)
    return median_run(runs, key)


def time_epochs(store: Path, logs: Path, *, device: str, repeats: int, raw_repeats: int,
                cached_extra: int, raw_extra: int) -> dict:
    """Seconds per epoch of ``latefusion`` on mortality, cached and raw, and their ratio (see the child)."""
    plan = []
    for features, n, extra in (("cached", repeats, cached_extra), ("raw", raw_repeats, raw_extra)):
        plan += [(features, 1), (features, 1 + extra)] * n
    cmd = [sys.executable, "-c", _EPOCH_CHILD, str(store), "latefusion", "mortality", device, json.dumps(plan)]
    _, _, text = _run_logged(cmd, logs / "epochs-latefusion.log")
    fits = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    if len(fits) != len(plan):
        raise SystemExit(f"expected {len(plan)} timed fits, got {len(fits)}; see {logs / 'epochs-latefusion.log'}")
    out = {}
    for features, extra in (("cached", cached_extra), ("raw", raw_extra)):
        mine = [f for f in fits if f["features"] == features]
        pairs = [(mine[i], mine[i + 1]) for i in range(0, len(mine), 2)]
        per_epoch, per_epoch_cpu = [], []
        for short, long in pairs:
            if long["epochs"] - short["epochs"] != extra:
                raise SystemExit(f"{features}: fits ran {short['epochs']} and {long['epochs']} epochs, expected "
                                 f"a difference of {extra}")
            per_epoch.append((long["fit_s"] - short["fit_s"]) / extra)
            per_epoch_cpu.append((long["cpu_s"] - short["cpu_s"]) / extra)
            print(f"  latefusion {features}: fit {short['epochs']} epoch(s) {short['fit_s']:.2f} s, "
                  f"{long['epochs']} epochs {long['fit_s']:.2f} s -> {per_epoch[-1]:.3f} s per epoch "
                  f"({per_epoch_cpu[-1]:.3f} CPU s); load avg {short['load1'][0]} -> {long['load1'][1]}", flush=True)
        out[features] = {"per_epoch_s": statistics.median(per_epoch), "all_per_epoch_s": per_epoch,
                         "per_epoch_cpu_s": statistics.median(per_epoch_cpu), "extra_epochs": extra,
                         "fits": mine, "load1": [mine[0]["load1"][0], mine[-1]["load1"][1]]}
    out["n_train"], out["n_val"] = fits[0]["n_train"], fits[0]["n_val"]
    out["ratio"] = out["cached"]["per_epoch_s"] / out["raw"]["per_epoch_s"]
    out["ratio_cpu"] = out["cached"]["per_epoch_cpu_s"] / out["raw"]["per_epoch_cpu_s"]
    return out


def time_evaluator(predictions: Path, repeats: int, fairness: bool) -> dict:
    """Median wall seconds of ``evaluate_predictions`` (n_boot 1000) on a phenotype predictions file."""
    from fusion.evaluation import evaluate_predictions, load_predictions

    df, meta = load_predictions(predictions)
    if meta["task"] != "phenotype":
        raise SystemExit(f"{predictions}: expected phenotype predictions, got task {meta['task']!r}")
    runs = []
    for k in range(repeats):
        before = _load1()
        t0, c0 = time.perf_counter(), time.process_time()
        evaluate_predictions(df, meta, n_boot=N_BOOT, seed=0, fairness=fairness)
        runs.append({"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0,
                     "load1": [before, _load1()]})
        print(f"  evaluator fairness {'on' if fairness else 'off'} [{k + 1}/{repeats}]: "
              f"{runs[-1]['wall_s']:.2f} s wall, {runs[-1]['cpu_s']:.2f} s CPU; load avg "
              f"{runs[-1]['load1'][0]} -> {runs[-1]['load1'][1]}", flush=True)
    out = median_run(runs)
    out.update(n_labels=len(meta["labels"]), n_test=int((df["part"] == "test").sum()),
               n_val=int((df["part"] == "val").sum()), fairness=fairness)
    return out


def _verdict(ok: bool | None) -> str:
    return "-" if ok is None else ("PASS" if ok else "FAIL")


def print_table(res: dict) -> None:
    """The summary: one row per figure, with its target and verdict."""
    rows = []
    for key, label in (("lgbm_early_mortality", "cached run: lgbm-early, mortality"),
                       ("latefusion_mortality", "cached run: latefusion, mortality"),
                       ("lgbm_early_phenotype", "cached run: lgbm-early, phenotype (25)")):
        r = res["cached_runs"].get(key)
        if r is None:
            continue
        target = CACHED_RUN_TARGET_S if key != "lgbm_early_phenotype" else None
        rows.append((label, f"{r['wall_s']:.1f} s", f"{r['cpu_s']:.1f} s",
                     f"< {target:g} s" if target else "none",
                     _verdict(None if target is None else r["wall_s"] < target),
                     f"{r['load1'][0]}/{r['load1'][1]}"))
    for key, label, target in (("fairness_on", "evaluator, 25 labels, 1000 boot, fairness", EVALUATOR_TARGET_S),
                               ("fairness_off", "evaluator, 25 labels, 1000 boot, no fairness", None)):
        r = res["evaluator"].get(key)
        if r is None:
            continue
        rows.append((label, f"{r['wall_s']:.2f} s", f"{r['cpu_s']:.2f} s",
                     f"< {target:g} s" if target else "none",
                     _verdict(None if target is None else r["wall_s"] < target),
                     f"{r['load1'][0]}/{r['load1'][1]}"))
    rc = res.get("raw_vs_cached")
    if rc:
        for mode in ("cached", "raw"):
            r = rc[mode]
            rows.append((f"latefusion {mode}, s per epoch ({rc['n_train']:,} train stays)",
                         f"{r['per_epoch_s']:.3f} s", f"{r['per_epoch_cpu_s']:.3f} s", "", "",
                         f"{r['load1'][0]}/{r['load1'][1]}"))
        rows.append(("per-epoch ratio cached / raw", f"{rc['ratio']:.4f}", f"{rc['ratio_cpu']:.4f}", "<< 1",
                     _verdict(rc["ratio"] < 1.0), ""))
    head = ("figure", "wall (median)", "CPU", "target", "verdict", "load 1m before/after")
    widths = [max(len(str(row[i])) for row in rows + [head]) for i in range(len(head))]
    line = lambda row: "  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip()  # noqa: E731
    print(line(head))
    print(line(["-" * w for w in widths]))
    for row in rows:
        print(line(row))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", type=Path, default=REPO / "bench-out" / "fuse",
                        help="cache of the stores, run folders and logs [bench-out/fuse]")
    parser.add_argument("--quick", action="store_true", help="one run per figure instead of --repeats")
    parser.add_argument("--repeats", type=int, default=3, help="runs per figure (median) [3]")
    parser.add_argument("--phenotype-repeats", type=int, default=1,
                        help="runs of lgbm-early on phenotype (25 boosters, slow) [1]")
    parser.add_argument("--stays", type=int, default=20_000, help="minimum stays of the large store [20000]")
    parser.add_argument("--synth-stays", type=int, help="synthetic stays for it [--stays / 0.61]")
    parser.add_argument("--small-stays", type=int, default=1_000,
                        help="minimum stays of the raw-vs-cached store [1000]")
    parser.add_argument("--small-synth-stays", type=int, help="synthetic stays for it [--small-stays / 0.61]")
    parser.add_argument("--chartevents-per-stay", type=float, default=250.0,
                        help="mean chartevents rows per synthetic stay (synth default ~650) [250]")
    parser.add_argument("--synth-image-size", type=int, default=64, help="film size of the sources [64]")
    parser.add_argument("--raw-image-size", type=int, default=224,
                        help="stored image size of the raw-vs-cached store (what raw training reads) [224]")
    parser.add_argument("--raw-repeats", type=int, default=1,
                        help="raw epoch timings (each 1 + --raw-extra-epochs raw epochs, slow) [1]")
    parser.add_argument("--raw-extra-epochs", type=int, default=1,
                        help="extra epochs of the longer raw fit [1]")
    parser.add_argument("--cached-extra-epochs", type=int, default=10,
                        help="extra epochs of the longer cached fit on the small store [10]")
    parser.add_argument("--device", default="cpu", help="device of the fusion runs [cpu]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip", action="append", default=[], choices=("cached", "phenotype", "evaluator", "raw"),
                        help="leave out a part of the benchmark (repeatable)")
    parser.add_argument("--prepare-only", action="store_true", help="only make the stores")
    parser.add_argument("--rebuild", action="store_true", help="remake the stores even when cached")
    parser.add_argument("--keep-source", action="store_true", help="keep the synthetic sources after building")
    parser.add_argument("--json", type=Path, help="also write the results here [WORK_DIR/results.json]")
    args = parser.parse_args(argv)
    repeats = 1 if args.quick else args.repeats
    if min(repeats, args.phenotype_repeats, args.raw_repeats, args.raw_extra_epochs, args.cached_extra_epochs) < 1:
        parser.error("--repeats, --phenotype-repeats, --raw-repeats and the extra epochs must be >= 1")
    skip = set(args.skip)
    if "phenotype" in skip:
        skip.add("evaluator")  # the evaluator scores the phenotype run's predictions

    work = args.work_dir.absolute()
    work.mkdir(parents=True, exist_ok=True)
    big = StoreRecipe("store20k", args.stays, args.synth_stays or math.ceil(args.stays / BUILD_RETENTION),
                      args.synth_image_size, CXR_INPUT_SIZE, args.chartevents_per_stay, args.seed)
    small = StoreRecipe("store1k", args.small_stays,
                        args.small_synth_stays or math.ceil(args.small_stays / BUILD_RETENTION),
                        args.synth_image_size, args.raw_image_size, args.chartevents_per_stay, args.seed)
    need_big = not {"cached", "phenotype", "evaluator"} <= skip
    big_info = ensure_store(work, big, rebuild=args.rebuild, keep_source=args.keep_source) if need_big else None
    small_info = (ensure_store(work, small, rebuild=args.rebuild, keep_source=args.keep_source)
                  if "raw" not in skip else None)
    if args.prepare_only:
        return 0

    runs_dir, logs = work / "runs", work / "logs"
    res = {"cpu_count": os.cpu_count(), "device": args.device, "repeats": repeats, "n_boot": N_BOOT,
           "load_average_start": list(os.getloadavg()), "cxr_embedding": {
               "encoder_id": CXR_ENCODER_ID, "input_size": CXR_INPUT_SIZE,
               "note": "DenseNet-121 with random weights at 32 px: real encoding pass and width (1024), "
                       "no diagnostic content; for timing only"},
           "stores": {"large": big_info, "small": small_info}, "cached_runs": {}, "evaluator": {}}
    started = time.perf_counter()
    if big_info is not None:
        store = Path(big_info["path"])
        print(f"\ncached runs on {big_info['n_stays']:,} stays ({repeats} run(s) each, {args.device}):")
        if "cached" not in skip:
            for method in ("lgbm-early", "latefusion"):
                res["cached_runs"][f"{method.replace('-', '_')}_mortality"] = repeat_fuse(
                    repeats, f"{method} mortality", store, method, "mortality", "cached", runs_dir, logs,
                    device=args.device)
        if "phenotype" not in skip:
            pheno = repeat_fuse(args.phenotype_repeats, "lgbm-early phenotype", store, "lgbm-early",
                                "phenotype", "cached", runs_dir, logs, device=args.device)
            res["cached_runs"]["lgbm_early_phenotype"] = pheno
            if "evaluator" not in skip:
                predictions = Path(pheno["run_dir"]) / "predictions.parquet"
                print(f"\nevaluator on {predictions} ({repeats} run(s) each):")
                for fairness in (True, False):
                    res["evaluator"]["fairness_on" if fairness else "fairness_off"] = time_evaluator(
                        predictions, repeats, fairness)
    if small_info is not None:
        print(f"\nlatefusion seconds per epoch on {small_info['n_stays']:,} stays (mortality, fold 0), cached "
              f"and raw (images {args.raw_image_size} px), in one process:")
        res["raw_vs_cached"] = time_epochs(
            Path(small_info["path"]), logs, device=args.device, repeats=repeats, raw_repeats=args.raw_repeats,
            cached_extra=args.cached_extra_epochs, raw_extra=args.raw_extra_epochs)
        res["raw_vs_cached"]["image_size"] = args.raw_image_size
    res["load_average_end"] = list(os.getloadavg())
    res["benchmark_seconds"] = round(time.perf_counter() - started, 1)

    print(f"\ncbstore fuse benchmark: {os.cpu_count()} CPUs, device {args.device}, median of {repeats} "
          f"(phenotype run: {args.phenotype_repeats}); n_boot {N_BOOT}; load average (1/5/15 min) at start "
          + "/".join(f"{x:.2f}" for x in res["load_average_start"]) + ", at end "
          + "/".join(f"{x:.2f}" for x in res["load_average_end"]))
    if big_info:
        print(f"large store: {big_info['n_stays']:,} stays (synthetic, {big.synth_stays:,} generated, seed "
              f"{args.seed}); EHR embedding {EHR_ENCODER}; X-ray embedding {CXR_ENCODER_ID} at "
              f"{CXR_INPUT_SIZE} px = a fixed random network, used only for timing")
    print_table(res)
    for key, r in res["cached_runs"].items():
        s = r["seconds"]
        print(f"  {key}: startup {r['startup_s']:.1f} s + load {s['load']:.1f} + fit {s['fit']:.1f} + predict "
              f"{s['predict']:.1f} + evaluate {s['evaluate']:.1f} (metrics + fairness) s; "
              f"{r['n_train']:,} train / {r['n_test']:,} test stays"
              + (f"; {r['epochs']} epochs (best {r['best_epoch']})" if r["epochs"] else ""))
    if "raw_vs_cached" in res:
        rc = res["raw_vs_cached"]
        print(f"  per epoch = (fit of {1 + rc['cached']['extra_epochs']} epochs - fit of 1) / "
              f"{rc['cached']['extra_epochs']} (cached), (fit of {1 + rc['raw']['extra_epochs']} - fit of 1) / "
              f"{rc['raw']['extra_epochs']} (raw): training plus the validation pass ({rc['n_val']:,} stays), "
              "one-off costs cancelled; median over repeats")
    ok = [r["wall_s"] < CACHED_RUN_TARGET_S for k, r in res["cached_runs"].items() if k != "lgbm_early_phenotype"]
    if "fairness_on" in res["evaluator"]:
        ok.append(res["evaluator"]["fairness_on"]["wall_s"] < EVALUATOR_TARGET_S)
    if "raw_vs_cached" in res:
        ok.append(res["raw_vs_cached"]["ratio"] < 1.0)
    target = args.json or work / "results.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(res, indent=2, default=str) + "\n")
    print(f"results: {target}")
    return 0 if all(ok) else 1


if __name__ == "__main__":
    sys.exit(main())
