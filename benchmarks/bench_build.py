"""Wall time and peak memory of ``cbstore build`` against a DuckDB parse floor.

Generates (once, cached under ``--work-dir``) a synthetic MIMIC-shaped source of at least
``--stays`` ICU stays and ``--min-chartevents`` chartevents rows, with JPEG films of
``--synth-image-size`` px, then measures, each in its own process so that peak RSS is per process:

1. the floor: DuckDB decompresses and parses ``icu/chartevents.csv.gz`` once, through the very
   view the build reads (:class:`cbstore.extract.Extractor`: same column types, reader options,
   ``threads`` and ``memory_limit``), touching every column the build uses (``stay_id``,
   ``itemid``, ``charttime``, ``valuenum``, ``value``); the time is that of the query alone. The
   same process then parses labevents and outputevents the same way: the parse of every event
   table the build reads is printed too (no target), as the part of the build no code can avoid;
2. the build: the real CLI (``python -m cli.main build --overwrite --quiet``) with the same
   ``--threads`` and ``--memory-limit`` and the store's default image size (224) unless
   ``--image-size`` is given; the time is the whole process (interpreter start included). The
   previous benchmark store is removed before each run, outside the timing.
3. optionally (``--compare-tree DIR``) the same build from another checkout of the repository
   (e.g. ``git worktree add /tmp/before <commit>``), for before/after numbers on equal terms.

Each is repeated ``--repeats`` times, interleaved; the medians are reported together with the
load average, because the numbers are only comparable on an otherwise idle machine. CPU seconds
(user + system) of each process are printed too: they move less than wall time when other work
shares the machine. Targets: build time
<= 2 x floor, build peak RSS < 4 GiB. Exit status 1 when a target is missed::

    python benchmarks/bench_build.py                      # defaults: 5,000 stays, >= 5 M rows
    python benchmarks/bench_build.py --repeats 1 --json bench-out/build.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
#: Targets of the issue: build within 2 x the parse floor, peak RSS under 4 GiB.
MAX_RATIO = 2.0
MAX_RSS_MB = 4096.0

# Child mode: the floor query, run in a fresh process; prints one JSON line.
_FLOOR_CHILD = """
import json, sys, time
from pathlib import Path
from cbstore.extract import Extractor
from cbstore.sources import locate_mimic_iv
mimic_iv, work, memory_limit, threads = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
queries = {
    "chartevents": "SELECT count(*), count(stay_id), sum(itemid), max(charttime), sum(valuenum), "
                   "sum(length(value)) FROM mimiciv_icu.chartevents",
    "labevents": "SELECT count(*), count(subject_id), sum(itemid), max(charttime), sum(valuenum) "
                 "FROM mimiciv_hosp.labevents",
    "outputevents": "SELECT count(*), count(stay_id), sum(itemid), max(charttime), sum(value) "
                    "FROM mimiciv_icu.outputevents",
}
seconds, rows = {}, {}
with Extractor(locate_mimic_iv(mimic_iv), work, memory_limit=memory_limit, threads=threads) as ex:
    for table, sql in queries.items():
        t0 = time.perf_counter()
        rows[table] = int(ex.con.execute(sql).fetchone()[0])
        seconds[table] = time.perf_counter() - t0
print(json.dumps({"seconds": seconds["chartevents"], "rows": rows["chartevents"],
                  "all_tables_seconds": sum(seconds.values()), "table_seconds": seconds}))
"""


def _synth_fingerprint() -> str:
    """SHA-256 of the synthetic generator's code and the definition files it reads."""
    digest = hashlib.sha256()
    files = sorted((REPO / "cbstore" / "synth").glob("*.py"))
    files += [REPO / "cbstore" / "resources" / "variables.yaml", REPO / "cbstore" / "resources" / "phenotypes.yaml"]
    for path in files:
        if path.is_file():
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def ensure_source(work: Path, stays: int, per_stay: float, min_rows: int, image_size: int, seed: int) -> dict:
    """The cached synthetic source under ``work/source``, (re)generated when absent or different.

    Returns the parameters file's content (parameters plus rows per table).
    """
    from cbstore.synth import write_synthetic_source

    source = work / "source"
    params_file = work / "source.json"
    wanted = {"stays": stays, "chartevents_per_stay": per_stay, "image_size": image_size, "seed": seed,
              "generator_sha256": _synth_fingerprint()}
    if params_file.is_file() and (source / "mimic-iv").is_dir():
        cached = json.loads(params_file.read_text())
        if cached.get("params") == wanted:
            print(f"source: cached in {source}")
            return cached
    print(f"source: generating {stays} stays, ~{per_stay:g} chartevents rows per stay, {image_size} px films "
          f"in {source} ...", flush=True)
    params_file.unlink(missing_ok=True)
    t0 = time.perf_counter()
    summary = write_synthetic_source(source, n_stays=stays, seed=seed, image_size=image_size, images=True,
                                     chartevents_per_stay=per_stay, overwrite=True)
    rows = summary.rows["icu/chartevents"]
    print(f"source: written in {time.perf_counter() - t0:.0f} s, {rows:,} chartevents rows")
    if rows < min_rows:
        raise SystemExit(f"the synthetic source has {rows:,} chartevents rows, fewer than --min-chartevents "
                         f"{min_rows:,}; raise --chartevents-per-stay")
    cached = {"params": wanted, "rows": summary.rows, "n_images": summary.n_images}
    params_file.write_text(json.dumps(cached, indent=2) + "\n")
    return cached


def run_measured(cmd: list[str], log: Path, tree: Path = REPO) -> dict:
    """Run ``cmd`` in a new process in ``tree``; return its wall and CPU seconds, peak RSS, status.

    The peak RSS is that process's own ``ru_maxrss`` (``os.wait4``), not the maximum over all
    children of this process as ``RUSAGE_CHILDREN`` would give. With a ``tree`` other than this
    checkout, its packages come first on ``PYTHONPATH``.
    """
    env = dict(os.environ)
    if tree != REPO:
        env["PYTHONPATH"] = os.pathsep.join([str(tree), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    with open(log, "wb") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=tree, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"seconds": wall, "cpu_seconds": usage.ru_utime + usage.ru_stime, "rss_mb": usage.ru_maxrss / 1024.0,
            "exit": proc.returncode}


def measure_floor(mimic_iv: Path, scratch: Path, memory_limit: str, threads: int) -> dict:
    """One floor run: seconds of the query (not the process), rows, CPU seconds and peak RSS of its process."""
    log = scratch / "floor.log"
    cmd = [sys.executable, "-c", _FLOOR_CHILD, str(mimic_iv), str(scratch), memory_limit, str(threads)]
    run = run_measured(cmd, log)
    if run["exit"] != 0:
        raise SystemExit(f"the floor query failed (exit {run['exit']}); see {log}:\n{log.read_text()[-2000:]}")
    result = json.loads(log.read_text().strip().splitlines()[-1])
    return {"seconds": result["seconds"], "rows": result["rows"], "cpu_seconds": run["cpu_seconds"],
            "rss_mb": run["rss_mb"], "all_tables_seconds": result["all_tables_seconds"],
            "table_seconds": result["table_seconds"]}


def measure_build(source: Path, store: Path, scratch: Path, memory_limit: str, threads: int, workers: int,
                  image_size: int | None, tree: Path = REPO) -> dict:
    """One build run through the CLI of ``tree``: wall and CPU seconds and peak RSS of its process."""
    shutil.rmtree(store, ignore_errors=True)  # a fresh build, not the removal of the last one
    log = scratch / "build.log"
    cmd = [sys.executable, "-m", "cli.main", "build", "--mimic-iv", str(source / "mimic-iv"),
           "--mimic-cxr", str(source / "mimic-cxr-jpg"), "--out", str(store), "--overwrite", "--quiet",
           "--threads", str(threads), "--workers", str(workers), "--memory-limit", memory_limit,
           "--work-dir", str(scratch)]
    if image_size is not None:
        cmd += ["--image-size", str(image_size)]
    run = run_measured(cmd, log, tree)
    if run["exit"] != 0:
        raise SystemExit(f"cbstore build in {tree} failed (exit {run['exit']}); see {log}:\n"
                         f"{log.read_text()[-2000:]}")
    return {k: run[k] for k in ("seconds", "cpu_seconds", "rss_mb")}


def _load() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def _median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", type=Path, default=REPO / "bench-out",
                        help="cache of the synthetic source, the store and scratch files [bench-out/]")
    parser.add_argument("--stays", type=int, default=5000)
    parser.add_argument("--chartevents-per-stay", type=float, default=1100.0)
    parser.add_argument("--min-chartevents", type=int, default=5_000_000)
    parser.add_argument("--synth-image-size", type=int, default=64, help="film size of the source [64]")
    parser.add_argument("--image-size", type=int, default=None, help="store image size [build default, 224]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2,
                        help="DuckDB threads of floor and build [CPU count]")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2, help="JPEG decoding threads [CPU count]")
    parser.add_argument("--memory-limit", default="2GB", help="DuckDB memory_limit of floor and build [2GB]")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compare-tree", type=Path,
                        help="also time the build of this checkout (e.g. a git worktree of an older commit)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")

    work = args.work_dir.absolute()
    work.mkdir(parents=True, exist_ok=True)
    cached = ensure_source(work, args.stays, args.chartevents_per_stay, args.min_chartevents,
                           args.synth_image_size, args.seed)
    source = work / "source"
    store = work / "store.zarr"
    scratch = Path(tempfile.mkdtemp(prefix="scratch-", dir=work))
    from cbstore.config import BuildConfig
    image_size = args.image_size if args.image_size is not None else BuildConfig().image_size

    floors, builds, others, loads = [], [], [], [_load()]
    try:
        for k in range(args.repeats):
            floors.append(measure_floor(source / "mimic-iv", scratch, args.memory_limit, args.threads))
            builds.append(measure_build(source, store, scratch, args.memory_limit, args.threads, args.workers,
                                        args.image_size))
            line = (f"run {k + 1}/{args.repeats}: floor {floors[-1]['seconds']:.2f} s, build "
                    f"{builds[-1]['seconds']:.2f} s ({builds[-1]['rss_mb']:.0f} MB)")
            if args.compare_tree:
                others.append(measure_build(source, work / "compare.zarr", scratch, args.memory_limit,
                                            args.threads, args.workers, args.image_size,
                                            args.compare_tree.absolute()))
                line += f", compare-tree build {others[-1]['seconds']:.2f} s ({others[-1]['rss_mb']:.0f} MB)"
            loads.append(_load())
            print(f"{line}, load {loads[-1]}", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.rmtree(work / "compare.zarr", ignore_errors=True)

    rows = floors[0]["rows"]
    floor_s, build_s = _median(floors, "seconds"), _median(builds, "seconds")
    build_rss = _median(builds, "rss_mb")
    ratio = build_s / floor_s
    ok_ratio, ok_rss = ratio <= MAX_RATIO, build_rss < MAX_RSS_MB
    results = {
        "stays": args.stays, "chartevents_rows": rows, "n_images": cached["n_images"], "image_size": image_size,
        "threads": args.threads, "workers": args.workers, "memory_limit": args.memory_limit,
        "repeats": args.repeats, "cpu_count": os.cpu_count(), "load_average": loads,
        # CPU and RSS of the floor's process, which parses all three event tables
        "floor_seconds": floor_s, "floor_process_cpu_seconds": _median(floors, "cpu_seconds"),
        "floor_process_rss_mb": _median(floors, "rss_mb"),
        "all_tables_floor_seconds": _median(floors, "all_tables_seconds"),
        "build_seconds": build_s,
        "build_cpu_seconds": _median(builds, "cpu_seconds"), "build_rows_per_s": rows / build_s,
        "build_rss_mb": build_rss, "ratio": ratio, "pass_ratio": ok_ratio, "pass_rss": ok_rss,
        "runs": {"floor": floors, "build": builds},
    }
    verdict = lambda ok: "PASS" if ok else "FAIL"  # noqa: E731
    print(f"\ncbstore build benchmark: {args.stays:,} stays, {rows:,} chartevents rows, {cached['n_images']:,} "
          f"films ({args.synth_image_size} px -> {image_size} px), threads {args.threads}, workers "
          f"{args.workers}, memory_limit {args.memory_limit}; median of {args.repeats}")
    print(f"  load average (1/5/15 min) before and after each run: {', '.join(loads)} on {os.cpu_count()} CPUs")
    table = [("floor (DuckDB parse of chartevents)", floors), ("build (cbstore build, whole CLI)", builds)]
    print("  (the floor's CPU and RSS are those of its process, which then also parses the other two tables)")
    if others:
        table.append((f"build of {args.compare_tree}", others))
    for name, runs in table:
        wall = _median(runs, "seconds")
        print(f"  {name:<40} {wall:8.2f} s  {rows / wall:10,.0f} rows/s  CPU {_median(runs, 'cpu_seconds'):6.1f} s"
              f"  peak RSS {_median(runs, 'rss_mb'):6.0f} MB")
    if others:
        other_s = _median(others, "seconds")
        results.update({"compare_tree": str(args.compare_tree), "compare_seconds": other_s,
                        "compare_cpu_seconds": _median(others, "cpu_seconds"),
                        "compare_rss_mb": _median(others, "rss_mb"), "compare_ratio": other_s / floor_s})
        results["runs"]["compare"] = others
        print(f"  compare-tree build / floor = {other_s / floor_s:.2f}")
    all_tables = _median(floors, "all_tables_seconds")
    print(f"  parse of every event table the build reads (chartevents + labevents + outputevents): {all_tables:.2f} s"
          f" = {all_tables / floor_s:.2f} x the floor; build / that = {build_s / all_tables:.2f} (no target)")
    print(f"  build / floor = {ratio:.2f} (target <= {MAX_RATIO:g}): {verdict(ok_ratio)}")
    print(f"  build peak RSS {build_rss:.0f} MB (target < {MAX_RSS_MB:.0f} MB): {verdict(ok_rss)}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0 if ok_ratio and ok_rss else 1


if __name__ == "__main__":
    sys.exit(main())
