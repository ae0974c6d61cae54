"""Wall time, rows per second and peak memory of ``cbstore synth`` as the source grows.

For each size (default 5,000 and 20,000 stays; ``--with-40k`` adds 40,000) the real CLI
(``python -m cli.main synth OUT --stays N --no-images --chartevents-per-stay 1100 --overwrite``)
runs in a fresh process; the measure is :func:`bench_build.run_measured`: wall and CPU seconds and
the peak RSS of that process (``cbstore synth`` starts no child process, so this is the whole
process tree). Rows are those of every written table, read from the source's ``truth.json``.
Each source is deleted after its run unless ``--keep``.

Target: peak RSS flat across the sizes. The rows are generated one chunk of stays at a time; what
stays in memory for the whole run is the latent world (patients, admissions, stays, diagnoses,
film plan) at a few KB per stay, against roughly 300 KB per stay if 1,100 rows per stay were held.
So the peak may grow by at most ``MAX_RSS_MB_PER_1000_STAYS`` MB per 1,000 stays between the
smallest and the largest size (holding every row would cost about 100 MB per 1,000 stays, as the
generator did before). Seconds per million rows are reported with their growth (no target). Exit
status 1 when the target is missed::

    python benchmarks/bench_synth.py                          # 5,000 and 20,000 stays
    python benchmarks/bench_synth.py --with-40k               # also 40,000 stays
    python benchmarks/bench_synth.py --sizes 1000 4000 --json bench-out/synth.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from bench_build import REPO, run_measured

#: Target: growth of the peak RSS from the smallest to the largest size, MB per 1,000 more stays.
MAX_RSS_MB_PER_1000_STAYS = 10.0
EVENT_TABLES = ("icu/chartevents", "hosp/labevents", "icu/outputevents")


def measure_synth(out: Path, stays: int, per_stay: float, seed: int, chunk_stays: int | None, log: Path) -> dict:
    """One ``cbstore synth --no-images`` run: seconds, CPU seconds, peak RSS and rows written."""
    cmd = [sys.executable, "-m", "cli.main", "synth", str(out), "--stays", str(stays), "--seed", str(seed),
           "--no-images", "--chartevents-per-stay", f"{per_stay:g}", "--overwrite"]
    if chunk_stays is not None:
        cmd += ["--chunk-stays", str(chunk_stays)]
    run = run_measured(cmd, log)
    if run["exit"] != 0:
        raise SystemExit(f"cbstore synth --stays {stays} failed (exit {run['exit']}); see {log}:\n"
                         f"{log.read_text()[-2000:]}")
    rows = json.loads((out / "truth.json").read_text())["summary"]["rows"]
    total = sum(rows.values())
    return {"stays": stays, "seconds": run["seconds"], "cpu_seconds": run["cpu_seconds"], "rss_mb": run["rss_mb"],
            "rows": total, "event_rows": sum(rows[t] for t in EVENT_TABLES), "rows_per_s": total / run["seconds"],
            "s_per_million_rows": run["seconds"] / total * 1e6, "rows_by_table": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[5000, 20000], help="stays per run [5000 20000]")
    parser.add_argument("--with-40k", action="store_true", help="also 40,000 stays (about 56 M rows)")
    parser.add_argument("--chartevents-per-stay", type=float, default=1100.0)
    parser.add_argument("--chunk-stays", type=int, default=None, help="passed to cbstore synth [its default]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", type=Path, default=REPO / "bench-out" / "synth",
                        help="where the sources are written [bench-out/synth/]")
    parser.add_argument("--keep", action="store_true", help="keep the written sources")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    sizes = sorted(set(args.sizes + ([40000] if args.with_40k else [])))
    if len(sizes) < 2 or sizes[0] < 1:
        parser.error("give at least two positive sizes")

    work = args.work_dir.absolute()
    work.mkdir(parents=True, exist_ok=True)
    runs = []
    for stays in sizes:
        out = work / f"source-{stays}"
        load = "/".join(f"{x:.2f}" for x in os.getloadavg())
        try:
            runs.append(measure_synth(out, stays, args.chartevents_per_stay, args.seed, args.chunk_stays,
                                      work / f"synth-{stays}.log"))
        finally:
            if not args.keep:
                shutil.rmtree(out, ignore_errors=True)
        r = runs[-1]
        print(f"{stays:>7,} stays: {r['rows']:>12,} rows in {r['seconds']:7.1f} s ({r['rows_per_s']:>9,.0f} rows/s, "
              f"CPU {r['cpu_seconds']:6.1f} s), peak RSS {r['rss_mb']:6.0f} MB; load before {load}", flush=True)

    small, large = runs[0], runs[-1]
    growth = large["rss_mb"] / small["rss_mb"]
    slope = (large["rss_mb"] - small["rss_mb"]) / (large["stays"] - small["stays"]) * 1000
    time_growth = large["s_per_million_rows"] / small["s_per_million_rows"]
    ok = slope <= MAX_RSS_MB_PER_1000_STAYS
    print(f"\ncbstore synth benchmark (--no-images, {args.chartevents_per_stay:g} chartevents rows per stay, "
          f"chunk {'default' if args.chunk_stays is None else args.chunk_stays}) on {os.cpu_count()} CPUs")
    print(f"  {'stays':>7} {'rows':>12} {'event rows':>12} {'wall s':>8} {'rows/s':>10} {'s/M rows':>9} "
          f"{'peak RSS MB':>12}")
    for r in runs:
        print(f"  {r['stays']:>7,} {r['rows']:>12,} {r['event_rows']:>12,} {r['seconds']:>8.1f} "
              f"{r['rows_per_s']:>10,.0f} {r['s_per_million_rows']:>9.2f} {r['rss_mb']:>12.0f}")
    print(f"  seconds per million rows, {large['stays']:,} vs {small['stays']:,} stays: x{time_growth:.2f} (no target)")
    print(f"  peak RSS, {large['stays']:,} vs {small['stays']:,} stays: x{growth:.2f}, {slope:+.1f} MB per 1,000 "
          f"stays (target <= {MAX_RSS_MB_PER_1000_STAYS:g}, flat): {'PASS' if ok else 'FAIL'}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"chartevents_per_stay": args.chartevents_per_stay,
                                         "chunk_stays": args.chunk_stays, "cpu_count": os.cpu_count(),
                                         "runs": runs, "rss_growth": growth, "rss_mb_per_1000_stays": slope,
                                         "time_growth": time_growth,
                                         "pass_rss": ok}, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
