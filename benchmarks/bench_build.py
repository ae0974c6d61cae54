"""Wall time and peak memory of ``cbstore build`` against the DuckDB parse of the tables it reads.

By default (``make bench`` runs this) it measures the **build scale series**: for each size, a
synthetic MIMIC-shaped source (generated once, cached under ``--work-dir``) of ``--sizes``
stays (default 5,000, 20,000 and 40,000) at ``--chartevents-per-stay`` (default 1,100) rows per
stay with 64 px films, plus, with ``--mimic-size``, a MIMIC-sized source of 75,000 stays x 4,300
rows. Each size gets ``--series-repeats`` (default 3) runs of two processes, back to back, so that
peak RSS is per process:

1. the **parse**: a process that imports DuckDB and nothing else, sets up its connection with
   the very statements of the build's :class:`cbstore.build.extract.Extractor` (column types,
   reader options, ``threads``, ``memory_limit``), and parses every event table the build reads
   (chartevents, labevents, outputevents), touching every column the build uses. Its time is the
   whole process, interpreter start included, as the build's is; the three queries alone are
   printed too;
2. the **build**: the real CLI (``python -m cli.main build --overwrite --quiet``) with the same
   ``--threads`` and ``--memory-limit``, store images of ``--image-size`` px (64 unless given);
   the whole process. The previous benchmark store is removed first, outside the timing.

For each size (medians over the runs): wall time, seconds per million event rows read
(chartevents + labevents + outputevents), peak RSS of the build's whole process tree (sampled
every 20 ms from /proc; the largest of the runs), and the ratio build / parse (the median of the
ratios of the back-to-back pairs, so that a drift of the machine's speed cancels out). Targets:
peak RSS flat (the largest within 1.25 x the smallest) and under the promised bound
(``--memory-limit`` + 1 GiB); seconds per million rows at the largest size within 1.25 x that at
the smallest; the build within 2 x the parse at every size. Exit status 1 when a target is
missed::

    python benchmarks/bench_build.py --sizes 5000,20000 --json bench-out/series.json
    python benchmarks/bench_build.py --sizes '' --mimic-size --series-repeats 1   # the MIMIC-sized point

With ``--single`` it instead compares one source (``--stays``, default 5,000, at least
``--min-chartevents`` rows) ``--repeats`` times, interleaved: the floor (the chartevents query
alone, in the process above), the build with the store's default image size (224) unless
``--image-size`` is given, and optionally (``--compare-tree DIR``) the same build from another
checkout of the repository (e.g. ``git worktree add /tmp/before <commit>``), for before/after
numbers on equal terms. Medians are reported with the load average, because the numbers are only
comparable on an otherwise idle machine; CPU seconds (user + system) move less than wall time
when other work shares the machine. Targets: build time <= 2 x floor, build peak RSS < 4 GiB::

    python benchmarks/bench_build.py --single --repeats 1 --json bench-out/build.json
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
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
#: Targets of the issue: build within 2 x the parse floor, peak RSS under 4 GiB.
MAX_RATIO = 2.0
MAX_RSS_MB = 4096.0

# Child mode: the floor, run in a fresh process that imports DuckDB and nothing else, with the
# connection set up by the very statements of the build's Extractor (settings, views); prints one
# JSON line with the seconds of each query.
_FLOOR_CHILD = """
import json, sys, time
import duckdb
spec = json.loads(sys.argv[1])
con = duckdb.connect(":memory:")
for statement in spec["setup"]:
    con.execute(statement)
seconds, rows = {}, {}
for table, sql in spec["queries"].items():
    t0 = time.perf_counter()
    rows[table] = int(con.execute(sql).fetchone()[0])
    seconds[table] = time.perf_counter() - t0
print(json.dumps({"seconds": seconds["chartevents"], "rows": rows["chartevents"],
                  "all_tables_seconds": sum(seconds.values()), "table_seconds": seconds, "table_rows": rows}))
"""
#: The floor's queries: every column the build uses of each event table.
_FLOOR_QUERIES = {
    "chartevents": "SELECT count(*), count(stay_id), sum(itemid), max(charttime), sum(valuenum), "
                   "sum(length(value)) FROM mimiciv_icu.chartevents",
    "labevents": "SELECT count(*), count(subject_id), sum(itemid), max(charttime), sum(valuenum) "
                 "FROM mimiciv_hosp.labevents",
    "outputevents": "SELECT count(*), count(stay_id), sum(itemid), max(charttime), sum(value) "
                    "FROM mimiciv_icu.outputevents",
}
_FLOOR_TABLES = {"chartevents": "icu/chartevents", "labevents": "hosp/labevents", "outputevents": "icu/outputevents"}


def _synth_fingerprint() -> str:
    """SHA-256 of the synthetic generator's code and the definition files it reads."""
    digest = hashlib.sha256()
    files = sorted((REPO / "cbstore" / "synth").glob("*.py"))
    files += [REPO / "cbstore" / "build" / "resources" / "variables.yaml",
              REPO / "cbstore" / "build" / "resources" / "phenotypes.yaml"]
    for path in files:
        if path.is_file():
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def ensure_source(work: Path, stays: int, per_stay: float, min_rows: int, image_size: int, seed: int,
                  name: str = "source") -> dict:
    """The cached synthetic source under ``work/<name>``, (re)generated when absent or different.

    Returns the parameters file's content (parameters plus rows per table).
    """
    from cbstore.synth import write_synthetic_source

    source = work / name
    params_file = work / f"{name}.json"
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
        sampler = _TreeRss(proc.pid)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        sampler.stop.set()
        sampler.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    # ru_maxrss may include the pages the child shared with this process before exec (a source
    # generated in this process makes it gigabytes), so the tree's peak is the sampled one.
    return {"seconds": wall, "cpu_seconds": usage.ru_utime + usage.ru_stime, "rss_mb": usage.ru_maxrss / 1024.0,
            "tree_rss_mb": sampler.peak_mb, "exit": proc.returncode}


def _tree_rss_kb(pid: int) -> int:
    """Resident set size (kB) of ``pid`` and all its descendants, from /proc (0 where unreadable)."""
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        try:
            status = Path(f"/proc/{p}/status").read_text()
            total += next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), 0)
            for task in Path(f"/proc/{p}/task").iterdir():
                stack.extend(int(c) for c in (task / "children").read_text().split())
        except (OSError, ValueError):
            continue
    return total


class _TreeRss(threading.Thread):
    """Samples the RSS of a process tree every 20 ms; ``peak_mb`` is the largest sum seen."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak_mb, self.stop = pid, 0.0, threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.peak_mb = max(self.peak_mb, _tree_rss_kb(self.pid) / 1024.0)
            self.stop.wait(0.02)


def measure_floor(mimic_iv: Path, scratch: Path, memory_limit: str, threads: int) -> dict:
    """One floor run: the parse of every event table, in a process of its own.

    Returns the seconds of the chartevents query (``seconds``) and of the three queries
    (``all_tables_seconds``), queries alone; the wall seconds of the whole process, interpreter
    start and ``import duckdb`` included (``process_seconds``); rows, CPU seconds and peak RSS.
    """
    from cbstore.build.extract import setup_statements
    from cbstore.build.sources import locate_mimic_iv

    source = locate_mimic_iv(mimic_iv)
    spill = scratch / "duckdb_tmp"
    spill.mkdir(parents=True, exist_ok=True)
    spec = {"setup": setup_statements([source.table(t) for t in _FLOOR_TABLES.values()],
                                      memory_limit=memory_limit, threads=threads, spill=spill),
            "queries": _FLOOR_QUERIES}
    log = scratch / "floor.log"
    run = run_measured([sys.executable, "-c", _FLOOR_CHILD, json.dumps(spec)], log)
    if run["exit"] != 0:
        raise SystemExit(f"the floor query failed (exit {run['exit']}); see {log}:\n{log.read_text()[-2000:]}")
    result = json.loads(log.read_text().strip().splitlines()[-1])
    return {"seconds": result["seconds"], "rows": result["rows"], "cpu_seconds": run["cpu_seconds"],
            "rss_mb": run["rss_mb"], "all_tables_seconds": result["all_tables_seconds"],
            "process_seconds": run["seconds"], "table_seconds": result["table_seconds"],
            "table_rows": result["table_rows"]}


def measure_build(source: Path, store: Path, scratch: Path, memory_limit: str, threads: int, workers: int,
                  image_size: int | None, tree: Path = REPO, partitions: int | None = None) -> dict:
    """One build run through the CLI of ``tree``: wall and CPU seconds and peak RSS of its process."""
    shutil.rmtree(store, ignore_errors=True)  # a fresh build, not the removal of the last one
    log = scratch / "build.log"
    cmd = [sys.executable, "-m", "cli.main", "build", "--mimic-iv", str(source / "mimic-iv"),
           "--mimic-cxr", str(source / "mimic-cxr-jpg"), "--out", str(store), "--overwrite", "--quiet",
           "--threads", str(threads), "--workers", str(workers), "--memory-limit", memory_limit,
           "--work-dir", str(scratch)]
    if image_size is not None:
        cmd += ["--image-size", str(image_size)]
    if partitions is not None:
        cmd += ["--partitions", str(partitions)]
    run = run_measured(cmd, log, tree)
    if run["exit"] != 0:
        raise SystemExit(f"cbstore build in {tree} failed (exit {run['exit']}); see {log}:\n"
                         f"{log.read_text()[-2000:]}")
    return {k: run[k] for k in ("seconds", "cpu_seconds", "rss_mb", "tree_rss_mb")}


def _load() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def _median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


#: The MIMIC-sized point of the series: MIMIC-IV v2.2 has about 73,000 ICU stays and 4,300
#: chartevents rows per stay.
MIMIC_SIZE = (75_000, 4300.0)
#: Series targets: RSS of the largest size within this factor of the smallest, seconds per
#: million rows likewise, and the build within MAX_RATIO x the parse of all event tables.
MAX_GROWTH = 1.25


def _bytes(size: str) -> float:
    """A DuckDB size such as "2GB" or "500MiB" in bytes."""
    units = {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30,
             "TIB": 2**40}
    text = size.strip().upper().replace(" ", "")
    unit = next(u for u in sorted(units, key=len, reverse=True) if text.endswith(u))
    return float(text[: -len(unit)]) * units[unit]


def run_series(args: argparse.Namespace) -> int:
    """The build scale series: per size, ``--series-repeats`` parse and build pairs (medians); the table and the verdicts."""
    work = args.work_dir.absolute()
    work.mkdir(parents=True, exist_ok=True)
    sizes = [(int(x), args.chartevents_per_stay) for x in args.sizes.split(",") if x.strip()]
    if args.mimic_size:
        sizes.append(MIMIC_SIZE)
    image_size = args.image_size if args.image_size is not None else 64
    bound_mb = (_bytes(args.memory_limit) + 2**30) / 2**20
    points = []
    for stays, per_stay in sizes:
        name = f"series-{stays}x{per_stay:g}"
        cached = ensure_source(work, stays, per_stay, 0, args.synth_image_size, args.seed, name=name)
        scratch = Path(tempfile.mkdtemp(prefix="scratch-", dir=work))
        floors, builds, loads = [], [], [_load()]
        try:
            for _ in range(args.series_repeats):
                floors.append(measure_floor(work / name / "mimic-iv", scratch, args.memory_limit, args.threads))
                builds.append(measure_build(work / name, work / f"{name}.zarr", scratch, args.memory_limit,
                                            args.threads, args.workers, image_size, partitions=args.partitions))
                loads.append(_load())
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
            shutil.rmtree(work / f"{name}.zarr", ignore_errors=True)
        rows = sum(floors[0]["table_rows"].values())
        build_s, parse_s = _median(builds, "seconds"), _median(floors, "process_seconds")
        # the ratio of each back-to-back pair, then their median: drift of the machine's speed cancels
        ratios = [b["seconds"] / f["process_seconds"] for f, b in zip(floors, builds)]
        query_ratios = [b["seconds"] / f["all_tables_seconds"] for f, b in zip(floors, builds)]
        point = {"stays": stays, "chartevents_per_stay": per_stay, "event_rows": rows,
                 "table_rows": floors[0]["table_rows"], "n_images": cached["n_images"], "runs": len(builds),
                 "build_seconds": build_s, "build_cpu_seconds": _median(builds, "cpu_seconds"),
                 "s_per_million_rows": build_s / (rows / 1e6),
                 "tree_rss_mb": max(b["tree_rss_mb"] for b in builds),
                 "main_rss_mb": max(b["rss_mb"] for b in builds), "parse_seconds": parse_s,
                 "ratio_to_parse": statistics.median(ratios), "ratio_range": [min(ratios), max(ratios)],
                 "parse_query_seconds": _median(floors, "all_tables_seconds"),
                 "ratio_to_parse_queries": statistics.median(query_ratios),
                 "load_average": loads, "build_runs_seconds": [b["seconds"] for b in builds],
                 "parse_runs_seconds": [f["process_seconds"] for f in floors]}
        points.append(point)
        print(f"{stays:>7,} stays: {rows:>12,} event rows, build {point['build_seconds']:7.1f} s "
              f"({point['s_per_million_rows']:.2f} s/M rows), peak RSS {point['tree_rss_mb']:6.0f} MB, parse "
              f"{point['parse_seconds']:6.1f} s (queries {point['parse_query_seconds']:.1f} s), build/parse "
              f"{point['ratio_to_parse']:.2f} ({point['ratio_to_parse_queries']:.2f}; pairs "
              f"{point['ratio_range'][0]:.2f}-{point['ratio_range'][1]:.2f}), load {' '.join(point['load_average'])}",
              flush=True)

    rss = [p["tree_rss_mb"] for p in points]
    speed = [p["s_per_million_rows"] for p in points]
    checks = {
        "rss_flat": max(rss) <= MAX_GROWTH * min(rss),
        "rss_within_bound": max(rss) <= bound_mb,
        "s_per_million_rows_flat": speed[-1] <= MAX_GROWTH * speed[0],
        "build_within_2x_parse": all(p["ratio_to_parse"] <= MAX_RATIO for p in points),
    }
    verdict = lambda ok: "PASS" if ok else "FAIL"  # noqa: E731
    print(f"\ncbstore build scale series: {args.synth_image_size} px films -> {image_size} px, threads "
          f"{args.threads}, workers {args.workers}, memory_limit {args.memory_limit}, partitions "
          f"{args.partitions or 'default'}; medians of {args.series_repeats} back-to-back parse and build pairs "
          f"per size (build/parse: the median of the pairs' ratios; peak RSS: the largest) on {os.cpu_count()} CPUs")
    print("  (parse: the process that parses every event table the build reads, interpreter start included, as the"
          " build's; in brackets the three queries alone)")
    print(f"  {'stays':>7} {'event rows':>12} {'build s':>8} {'s/M rows':>9} {'peak RSS MB':>12} "
          f"{'parse s':>14} {'build/parse':>13}")
    for p in points:
        print(f"  {p['stays']:>7,} {p['event_rows']:>12,} {p['build_seconds']:>8.1f} {p['s_per_million_rows']:>9.2f} "
              f"{p['tree_rss_mb']:>12.0f} {p['parse_seconds']:>6.1f} ({p['parse_query_seconds']:>5.1f}) "
              f"{p['ratio_to_parse']:>5.2f} ({p['ratio_to_parse_queries']:.2f})")
    print(f"  peak RSS flat (largest <= {MAX_GROWTH} x smallest): {max(rss):.0f} / {min(rss):.0f} MB: "
          f"{verdict(checks['rss_flat'])}")
    print(f"  peak RSS within the bound (memory_limit + 1 GiB = {bound_mb:.0f} MB): "
          f"{verdict(checks['rss_within_bound'])}")
    print(f"  s/M rows at {points[-1]['stays']:,} within {MAX_GROWTH} x that at {points[0]['stays']:,}: "
          f"{speed[-1]:.2f} / {speed[0]:.2f}: {verdict(checks['s_per_million_rows_flat'])}")
    print(f"  build within {MAX_RATIO:g} x the parse of every event table it reads, at every size: "
          f"{verdict(checks['build_within_2x_parse'])}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"points": points, "checks": checks, "bound_mb": bound_mb,
                                         "threads": args.threads, "workers": args.workers,
                                         "memory_limit": args.memory_limit, "image_size": image_size}, indent=2)
                             + "\n")
    return 0 if all(checks.values()) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", type=Path, default=REPO / "bench-out",
                        help="cache of the synthetic source, the store and scratch files [bench-out/]")
    parser.add_argument("--stays", type=int, default=5000, help="--single: stays of the source [5000]")
    parser.add_argument("--chartevents-per-stay", type=float, default=1100.0)
    parser.add_argument("--min-chartevents", type=int, default=5_000_000,
                        help="--single: fewest chartevents rows of the source [5,000,000]")
    parser.add_argument("--synth-image-size", type=int, default=64, help="film size of the source [64]")
    parser.add_argument("--image-size", type=int, default=None, help="store image size [series: 64; --single: the build's default, 224]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2,
                        help="DuckDB threads of floor and build [CPU count]")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2, help="JPEG decoding threads [CPU count]")
    parser.add_argument("--memory-limit", default="2GB", help="DuckDB memory_limit of floor and build [2GB]")
    parser.add_argument("--repeats", type=int, default=3, help="--single: runs of each measurement [3]")
    parser.add_argument("--compare-tree", type=Path,
                        help="--single: also time the build of this checkout (e.g. a git worktree of an older commit)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--single", action="store_true",
                        help="compare one source against the chartevents floor instead of the series (see above)")
    parser.add_argument("--sizes", default="5000,20000,40000", help="stays of the series' sources [5000,20000,40000]")
    parser.add_argument("--mimic-size", action="store_true",
                        help="add a MIMIC-sized source to the series: 75,000 stays x 4,300 chartevents rows")
    parser.add_argument("--partitions", type=int, help="build --partitions [the build's default]")
    parser.add_argument("--series-repeats", type=int, default=3,
                        help="series: parse and build pairs per size, back to back; medians are reported [3]")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.series_repeats < 1:
        parser.error("--repeats and --series-repeats must be >= 1")
    if not args.single:
        return run_series(args)

    work = args.work_dir.absolute()
    work.mkdir(parents=True, exist_ok=True)
    cached = ensure_source(work, args.stays, args.chartevents_per_stay, args.min_chartevents,
                           args.synth_image_size, args.seed)
    source = work / "source"
    store = work / "store.zarr"
    scratch = Path(tempfile.mkdtemp(prefix="scratch-", dir=work))
    from cbstore.build.config import BuildConfig
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
