"""Throughput of the CXR encoding pass against the bare model forward.

Builds a synthetic store (``cbstore.testing.random_content``) holding at least ``--films`` films of
``--image-size`` px, then measures, with the same encoder, batch size and torch thread count:

1. forward only: ``encoder.embed`` on preprocessed float tensors already in memory;
2. the full pass: :func:`encoders.pass_.run_encoding_pass` (open store, build the model, read
   films region by region, preprocess, forward, NaN check, write, finish/consolidate);
3. the same pass with the network replaced by a constant, i.e. the pass's own overhead.

Prints films/s of both and their ratio (target: the pass reaches >= 90 % of the forward rate on
CPU). One run each, so numbers on a shared machine are noisy::

    python benchmarks/bench_encode.py --films 512 --image-size 224 --batch-size 32 --threads 2
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import tempfile
import time


def _make_store(path: pathlib.Path, films: int, image_size: int, seed: int) -> None:
    from cbstore.store.writer import write_store
    from cbstore.testing import random_content

    n_stays = films
    while True:  # random_content gives a film to ~30 % of stays; grow until there are enough
        content = random_content(n_stays=n_stays, n_folds=5, image_size=image_size, seed=seed)
        if int(content.cxr["present"].sum()) >= films:
            break
        n_stays = int(n_stays * 1.25) + 8
    write_store(path, content)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--encoder", default="densenet121-res224-chex")
    parser.add_argument("--films", type=int, default=512)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers of the pass")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--store", type=pathlib.Path, help="reuse/keep the synthetic store here")
    parser.add_argument("--json", type=pathlib.Path, help="also write the results as JSON")
    args = parser.parse_args(argv)

    import numpy as np
    import torch

    from cbstore.store.reader import open_store
    from encoders.pass_ import resolve_device, run_encoding_pass
    from encoders.registry import get_encoder

    torch.set_num_threads(args.threads)
    tmp = None
    store_path = args.store
    if store_path is None:
        tmp = pathlib.Path(tempfile.mkdtemp(prefix="bench_encode_"))
        store_path = tmp / "bench.zarr"
    if not store_path.exists():
        t0 = time.perf_counter()
        _make_store(store_path, args.films, args.image_size, seed=0)
        print(f"built {store_path} in {time.perf_counter() - t0:.1f} s")
    store = open_store(store_path)
    pos = np.flatnonzero(store.cxr_present)
    n_films = len(pos)
    device = resolve_device(args.device)

    # 1. forward only, on preprocessed tensors already in memory
    encoder = get_encoder(args.encoder).factory(store, weights="random", seed=0).to(device)
    x_all = encoder.preprocess(torch.from_numpy(store.images(pos))).to(device)
    with torch.inference_mode():
        encoder.embed(x_all[: args.batch_size])  # warm-up (allocator, oneDNN kernels)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        for start in range(0, n_films, args.batch_size):
            encoder.embed(x_all[start:start + args.batch_size])
        if device.type == "cuda":
            torch.cuda.synchronize()
        forward_s, forward_cpu = time.perf_counter() - t0, time.process_time() - c0
    del x_all

    # 2. the full pass (store read + preprocessing + forward + store write)
    c0 = time.process_time()
    summary = run_encoding_pass(store_path, args.encoder, device=args.device, batch_size=args.batch_size,
                                workers=args.workers, weights="random", overwrite=True, progress=False,
                                threads=args.threads)
    pass_cpu = time.process_time() - c0
    result = {
        "encoder": args.encoder, "films": n_films, "image_size": store.image_size,
        "batch_size": args.batch_size, "threads": args.threads, "workers": args.workers,
        "device": str(device),
        "forward_only_films_per_s": n_films / forward_s,
        "full_pass_films_per_s": summary["items"] / summary["seconds"],
        "full_pass_seconds": summary["seconds"], "forward_only_seconds": forward_s,
        # CPU seconds of this process (all threads): robust to other load on a shared machine
        # (only meaningful with --workers 0, as loader workers are other processes)
        "forward_only_cpu_s": forward_cpu, "full_pass_cpu_s": pass_cpu,
    }
    result["ratio"] = result["full_pass_films_per_s"] / result["forward_only_films_per_s"]

    # 3. the pass with the network replaced by a constant: the pass's own overhead (store read,
    #    preprocessing, NaN check, writes, finish) in seconds, which contention inflates far less
    #    than a 2-thread forward; the expected ratio is forward / (forward + overhead)
    from encoders.cxr import CxrEncoder

    real_embed = CxrEncoder.embed
    CxrEncoder.embed = lambda self, x: torch.zeros(len(x), self.dim)
    try:
        stub = run_encoding_pass(store_path, args.encoder, device=args.device, batch_size=args.batch_size,
                                 workers=args.workers, weights="random", overwrite=True, progress=False,
                                 threads=args.threads)
    finally:
        CxrEncoder.embed = real_embed
    result["overhead_seconds"] = stub["seconds"]
    result["expected_ratio"] = forward_s / (forward_s + stub["seconds"])
    result["cpu_time_ratio"] = forward_cpu / pass_cpu
    print(f"{args.encoder} on {device}, {n_films} films at {store.image_size} px, batch {args.batch_size}, "
          f"{args.threads} threads, {args.workers} loader workers")
    print(f"  forward only : {result['forward_only_films_per_s']:8.2f} films/s ({forward_s:.1f} s)")
    print(f"  full pass    : {result['full_pass_films_per_s']:8.2f} films/s ({summary['seconds']:.1f} s)")
    print(f"  ratio        : {100 * result['ratio']:.1f} % (target >= 90 %)")
    print(f"  CPU seconds  : forward {forward_cpu:.1f}, full pass {pass_cpu:.1f} -> "
          f"{100 * result['cpu_time_ratio']:.1f} % (load-independent view of the same ratio)")
    print(f"  pass overhead: {stub['seconds']:.2f} s without the network -> expected ratio "
          f"{100 * result['expected_ratio']:.1f} %")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    if tmp is not None:
        shutil.rmtree(tmp, ignore_errors=True)
    return result


if __name__ == "__main__":
    main()
