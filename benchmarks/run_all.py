"""Run every ``benchmarks/bench_*.py`` in turn, each in its own process, with its default settings.

``make bench`` calls this. Each benchmark's output is streamed as it runs; a summary of exit
statuses and times follows. The exit status is 1 when any benchmark failed or missed a target::

    python benchmarks/run_all.py                 # all of them
    python benchmarks/run_all.py build encode    # only bench_build.py and bench_encode.py
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def discover(names: list[str] | None = None) -> list[Path]:
    """The benchmark scripts (``bench_*.py`` beside this file), sorted by name.

    ``names`` keeps only those whose name (without ``bench_`` and ``.py``) is listed.
    """
    scripts = sorted(HERE.glob("bench_*.py"))
    if names:
        known = {p.stem.removeprefix("bench_"): p for p in scripts}
        unknown = sorted(set(names) - set(known))
        if unknown:
            raise SystemExit(f"unknown benchmark(s) {', '.join(unknown)}; available: {', '.join(sorted(known))}")
        scripts = [known[n] for n in names]
    return scripts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="benchmarks to run (e.g. build encode); default: all")
    args = parser.parse_args(argv)
    scripts = discover(args.names)
    if not scripts:
        print(f"no bench_*.py in {HERE}")
        return 1
    print(f"{len(scripts)} benchmark(s): {', '.join(p.name for p in scripts)}; {os.cpu_count()} CPUs, "
          f"load average {'/'.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    summary = []
    for script in scripts:
        print(f"\n===== {script.name} =====", flush=True)
        t0 = time.perf_counter()
        code = subprocess.call([sys.executable, str(script)], cwd=REPO)
        summary.append((script.name, code, time.perf_counter() - t0))
    print("\n===== summary =====")
    for name, code, seconds in summary:
        status = "ok" if code == 0 else f"exit {code} (failed or missed a target)"
        print(f"  {name:<24} {seconds:8.1f} s  {status}")
    return 0 if all(code == 0 for _, code, _ in summary) else 1


if __name__ == "__main__":
    sys.exit(main())
