"""Seconds per training epoch of fusion methods, cached and raw, at two store sizes each.

For every method named on the command line (default: ``mmtm daft utde latefusion``) and each
feature mode it supports, an epoch is timed on two synthetic stores of different sizes, so that
the growth of the cost with the number of stays shows (``ratio`` = time at the larger size /
time at the smaller one, next to the ratio of training stays)::

    python benchmarks/bench_methods.py                       # default methods and sizes
    python benchmarks/bench_methods.py mmtm --cached-stays 1000 3000 --raw-stays 300 600
    python benchmarks/bench_methods.py mmtm daft --score     # also test AUROC / AUPRC

An epoch's time is the difference of two fits in one process (1 epoch and 1 + ``--extra``
epochs, no early stop) divided by ``--extra``, so model set-up and lazy imports cancel; it
includes the validation pass. Settings: cached mode with each method's cached defaults (the
spatial-map methods run the DenseNet ``denseblock4`` live on ``densenet121-res224-all-block3``
maps); raw mode with ``backbone=small`` (a 3-stage CNN) and random weights on the stored 64 px
films, hidden 64.

The stores (under ``--work-dir``, reused while present): ``cbstore synth`` (64 px films) ->
``cbstore build`` -> ``cbstore encode`` with ``ehr-stats``, ``densenet121-res224-all`` and
``densenet121-res224-all-block3``, both with random weights at a 64 px input (timing only: no
diagnostic content). The build keeps about 61 % of the synthetic stays.

``--score`` (or ``--score-only``) fits each method once more on the larger cached store
(mortality) with early stopping (patience 5, at most ``--score-epochs``), and prints test AUROC /
AUPRC (the synthetic labels depend on the
films for some phenotypes, not for mortality; see ``cbstore synth``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

KEEP = 0.61
ENCODERS = (("ehr-stats", ()), ("densenet121-res224-all", ("--weights", "random", "--input-size", "64")),
            ("densenet121-res224-all-block3", ("--weights", "random", "--input-size", "64")))
RAW_SETTINGS = {"backbone": "small", "cxr_weights": "random", "hidden": 64}


def _cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "cli.main", *args], cwd=REPO, check=True,
                   stdout=subprocess.DEVNULL)


def ensure_store(work: Path, stays: int) -> Path:
    """A store of about ``stays`` ICU stays with the three embeddings (built once)."""
    folder = work / f"store-{stays}"
    store = folder / "store.zarr"
    done = folder / "ready"
    if done.is_file():
        return store
    synth = max(int(stays / KEEP), 50)
    print(f"building a store of ~{stays} stays ({synth} synthetic) in {folder} ...", flush=True)
    _cli("synth", str(folder / "source"), "--stays", str(synth), "--image-size", "64",
         "--chartevents-per-stay", "250", "--overwrite")
    _cli("build", "--mimic-iv", str(folder / "source" / "mimic-iv"), "--mimic-cxr",
         str(folder / "source" / "mimic-cxr-jpg"), "--out", str(store), "--image-size", "64",
         "--overwrite", "--quiet")
    for name, extra in ENCODERS:
        _cli("encode", str(store), "--encoder", name, *extra, "--quiet", "--threads", "1")
    done.write_text("ok\n")
    return store


def _data(store, method, features, task="mortality"):
    from fusion.data import load_fusion_data
    from fusion.registry import get_method

    cls = get_method(method)
    return load_fusion_data(store, task, 0, features=features, inputs=cls.inputs_for(features),
                            ehr_encoder="ehr-stats", cxr_encoder="densenet121-res224-all-random",
                            cxr_map_encoder="densenet121-res224-all-block3-random")


def _fit(method, features, data, epochs, **extra):
    from fusion.registry import get_method

    cls = get_method(method)
    settings = dict(RAW_SETTINGS) if features == "raw" else {}
    settings.update(max_epochs=epochs, patience=epochs + 1)
    settings.update(extra)
    settings = {k: v for k, v in settings.items() if k in cls.hyperparameters}
    model = cls(seed=0, features=features, **settings)
    started = time.perf_counter()
    model.fit(data, device="cpu")
    return time.perf_counter() - started, model


def seconds_per_epoch(store, method, features, extra: int) -> tuple[float, int]:
    data = _data(store, method, features)
    one, _ = _fit(method, features, data, 1)
    more, _ = _fit(method, features, data, 1 + extra)
    return (more - one) / extra, len(data.part("train"))


def score(store, method, epochs: int) -> dict:
    from sklearn.metrics import average_precision_score, roc_auc_score

    data = _data(store, method, "cached")
    seconds, model = _fit(method, "cached", data, epochs, patience=5)
    prob = model.predict_proba(data, "test")[:, 0]
    y = data.part("test").y[:, 0]
    return {"auroc": roc_auc_score(y, prob), "auprc": average_precision_score(y, prob),
            "fit_s": seconds, "best_epoch": (getattr(model, "history_", None) or {}).get("best_epoch")}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("methods", nargs="*", default=["mmtm", "daft", "utde", "latefusion"])
    parser.add_argument("--cached-stays", type=int, nargs=2, default=[1000, 3000])
    parser.add_argument("--raw-stays", type=int, nargs=2, default=[300, 600])
    parser.add_argument("--extra", type=int, default=1, help="epochs beyond the first [1]")
    parser.add_argument("--work-dir", type=Path, default=REPO / "bench-out" / "methods")
    parser.add_argument("--score", action="store_true", help="test AUROC/AUPRC on the larger cached store")
    parser.add_argument("--score-only", action="store_true", help="--score without the epoch timings")
    parser.add_argument("--score-epochs", type=int, default=20,
                        help="epoch limit of the scored fits (early stopping, patience 5) [20]")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    import torch

    from cbstore.store import open_store
    from fusion.registry import get_method

    torch.set_num_threads(1)
    print(f"load average {os.getloadavg()[0]:.1f}; torch threads 1", flush=True)
    sizes = {"cached": args.cached_stays, "raw": args.raw_stays}
    stores = {n: open_store(ensure_store(args.work_dir, n)) for n in sorted({*args.cached_stays, *args.raw_stays})}
    rows = []
    for method in [] if args.score_only else args.methods:
        cls = get_method(method)
        for features in ("cached", "raw"):
            if not cls.supports(features):
                continue
            (t1, n1), (t2, n2) = (seconds_per_epoch(stores[n], method, features, args.extra)
                                  for n in sizes[features])
            rows.append({"method": method, "features": features, "train_stays": [n1, n2],
                         "s_per_epoch": [round(t1, 2), round(t2, 2)],
                         "ratio": round(t2 / t1, 2) if t1 > 0 else None,
                         "stays_ratio": round(n2 / n1, 2)})
            print(f"{method:>10} {features:>6}: {t1:6.2f} s/epoch ({n1} train stays), {t2:6.2f} s/epoch "
                  f"({n2}); ratio {rows[-1]['ratio']} for {rows[-1]['stays_ratio']}x the stays; "
                  f"load {os.getloadavg()[0]:.1f}", flush=True)
    scores = {}
    if args.score or args.score_only:
        big = stores[max(args.cached_stays)]
        for method in args.methods:
            if get_method(method).supports("cached"):
                scores[method] = score(big, method, args.score_epochs)
                s = scores[method]
                print(f"{method:>10} cached mortality: test AUROC {s['auroc']:.3f} AUPRC {s['auprc']:.3f} "
                      f"(best epoch {s['best_epoch']}, fit {s['fit_s']:.0f} s)", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"epochs": rows, "scores": scores}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
