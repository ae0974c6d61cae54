"""Seconds per training epoch of fusion methods, cached and raw, at two store sizes.

For each method named on the command line, on mortality, fold 0:

* cached: embeddings of ``--ehr-dim`` / ``--cxr-dim`` columns (the widths of ``ehr-stats`` and a
  DenseNet-121 X-ray embedding), on random stores of ``--cached-sizes`` stays;
* raw: the hourly EHR tensor (``--window`` hours x ``--features`` variables) and films of
  ``--image-size`` px through the small CNN (``backbone=small``, random weights), on random stores
  of ``--raw-sizes`` stays.

Stores come from :func:`cbstore.testing.random_content` with random embeddings that carry a weak
signal of the label (timing only; their scores mean nothing) and are written once under
``--work-dir``. An epoch's time is the difference of two fits (``1`` and ``1 + --extra`` epochs
per stage, no early stopping, after a first fit that warms up) divided by the difference of their
epoch counts, so one-off costs (imports, model set-up, banks and priors built at fit start)
cancel; methods trained in stages run each stage for that many epochs. The report prints, per method and mode, the seconds per epoch at
each size (wall and CPU seconds: one torch thread, so CPU seconds are the compute and vary far less
under load), how the CPU time grows (ratio of the times over ratio of the sizes), and the raw /
cached ratio at the smaller sizes. Every figure is one measurement with the 1-minute load
average, since the machine may be shared::

    python benchmarks/bench_methods.py                   # latefusion medfuse drfuse m3care smil
    python benchmarks/bench_methods.py latefusion --cached-sizes 1000 3000 --raw-sizes 300 600
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

EHR_ID, CXR_ID = "bench-ehr", "bench-cxr"
#: Methods timed when none is named (``run_all.py`` runs the script without arguments).
DEFAULT_METHODS = ("latefusion", "medfuse", "drfuse", "m3care", "smil")


def make_store(path: Path, n_stays: int, *, window: int, n_features: int, image_size: int,
               ehr_dim: int, cxr_dim: int):
    """Write (once) and open a random store with random embeddings of the given widths."""
    from cbstore.store import open_store, write_store
    from cbstore.testing import random_content

    if not (path / "cbstore_manifest.json").exists():
        write_store(path, random_content(n_stays=n_stays, n_folds=3, window=window,
                                         n_features=n_features, image_size=image_size, seed=0))
        store = open_store(path)
        rng = np.random.default_rng(1)
        label = store.labels("mortality").astype(np.float32)[:, None]
        present = np.asarray(store.cxr_present, dtype=bool)
        for modality, dim, embedding_id, rows in (("ehr", ehr_dim, EHR_ID, np.ones_like(present)),
                                                  ("cxr", cxr_dim, CXR_ID, present)):
            values = (rng.normal(size=(store.n_stays, dim))
                      + label * rng.normal(size=(1, dim))).astype(np.float32)
            values[~rows] = np.nan
            writer = store.create_embedding(modality, embedding_id, dim,
                                            attrs={"weights": None, "preprocessing": "benchmark"})
            for region in range(writer.n_regions):
                part = writer.region(region)
                writer.write(region, values[part], rows[part])
            writer.finish()
    return open_store(path)


def epoch_seconds(name: str, data, extra: int) -> dict:
    """Seconds per epoch of ``name`` on ``data`` (difference of a short and a longer fit)."""
    from fusion.registry import get_method

    cls = get_method(name)
    settings = {"backbone": "small", "cxr_weights": "random"} if data.features == "raw" else {}
    settings = {k: v for k, v in settings.items() if k in cls.hyperparameters}
    timings = []
    for epochs in (1, 1, 1 + extra):  # the first fit warms up (lazy imports, allocator)
        method = cls(seed=0, features=data.features, max_epochs=epochs, patience=epochs, **settings)
        start, cpu = time.perf_counter(), time.process_time()
        method.fit(data, device="cpu")
        timings.append((time.perf_counter() - start, time.process_time() - cpu,
                        len(method.history_["epochs"])))
    (short, cpu_short, n_short), (long, cpu_long, n_long) = timings[1:]
    extra_epochs = max(n_long - n_short, 1)
    return {"s_per_epoch": (long - short) / extra_epochs,
            "cpu_s_per_epoch": (cpu_long - cpu_short) / extra_epochs, "epochs": [n_short, n_long]}


def measure(args) -> list:
    from fusion.data import load_fusion_data

    rows = []
    plan = [("cached", size) for size in args.cached_sizes] + [("raw", size) for size in args.raw_sizes]
    for mode, size in plan:
        store = make_store(Path(args.work_dir) / f"{mode}-{size}.zarr", size, window=args.window,
                           n_features=args.features, image_size=args.image_size,
                           ehr_dim=args.ehr_dim, cxr_dim=args.cxr_dim)
        data = load_fusion_data(store, "mortality", 0, features=mode, ehr_encoder=EHR_ID,
                                cxr_encoder=CXR_ID)
        for name in args.methods:
            load = os.getloadavg()[0]
            result = epoch_seconds(name, data, args.extra)
            rows.append({"method": name, "features": mode, "stays": store.n_stays,
                         "train_stays": len(data.part("train")), "load1": round(load, 2), **result})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def report(rows: list, methods: list) -> None:
    print("\n| method | features | stays | s / epoch | CPU s / epoch | growth (CPU time ratio / "
          "size ratio) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name in methods:
        for mode in ("cached", "raw"):
            mine = sorted((r for r in rows if r["method"] == name and r["features"] == mode),
                          key=lambda r: r["stays"])
            for i, r in enumerate(mine):
                growth = ""
                if i:
                    first = mine[0]
                    growth = (f"{r['cpu_s_per_epoch'] / first['cpu_s_per_epoch']:.2f} / "
                              f"{r['stays'] / first['stays']:.2f}")
                print(f"| {name} | {mode} | {r['stays']} | {r['s_per_epoch']:.3f} | "
                      f"{r['cpu_s_per_epoch']:.3f} | {growth} |")
    print("\n| method | raw / cached CPU s per epoch (smallest stores) |")
    print("| --- | --- |")
    for name in methods:
        by_mode = {}
        for r in sorted(rows, key=lambda r: r["stays"]):
            if r["method"] == name:
                by_mode.setdefault(r["features"], r["cpu_s_per_epoch"])
        if {"raw", "cached"} <= set(by_mode):
            print(f"| {name} | {by_mode['raw'] / by_mode['cached']:.1f} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("methods", nargs="*", default=list(DEFAULT_METHODS),
                        help=f"registered method names (default: {' '.join(DEFAULT_METHODS)})")
    parser.add_argument("--cached-sizes", type=int, nargs="+", default=[1000, 3000])
    parser.add_argument("--raw-sizes", type=int, nargs="+", default=[300, 600])
    parser.add_argument("--window", type=int, default=48)
    parser.add_argument("--features", type=int, default=12, help="EHR variables (raw)")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--ehr-dim", type=int, default=64)
    parser.add_argument("--cxr-dim", type=int, default=1024)
    parser.add_argument("--extra", type=int, default=2, help="extra epochs per stage of the longer fit")
    parser.add_argument("--work-dir", default="bench-out/methods")
    parser.add_argument("--json", help="write the measurements to this file")
    args = parser.parse_args(argv)
    Path(args.work_dir).mkdir(parents=True, exist_ok=True)
    import torch

    torch.set_num_threads(1)
    rows = measure(args)
    report(rows, args.methods)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
