"""The encoding pass: run one encoder over a store and write its embedding back into it.

``run_encoding_pass`` works region by region. A region is a run of consecutive stays aligned to
the chunks of the embedding arrays (``region_stays``, default 1024); the store's
:class:`~cbstore.store.embeddings.EmbeddingWriter` keeps one ``done`` flag per region (per fold and region
for per-fold encoders), set only after the region's data is written. Hence

- a pass killed halfway resumes where it stopped: finished regions are skipped, never recomputed;
- re-running a finished pass is a no-op ("already complete") unless ``overwrite``;
- the embedding becomes visible to readers only when :meth:`EmbeddingWriter.finish` has checked
  every region and set ``complete``; a crashed pass leaves nothing that looks complete;
- separate processes can write disjoint regions at once, which is how the Dask path works.

Chest X-rays: only stays with ``cxr/present`` are run through the model (absent films get no
vector: NaN values, ``present`` false). Films are read by a torch ``DataLoader`` (``workers``
worker processes, each opening the store itself) in batches that never cross a region. On CUDA
the forward pass runs under autocast (bf16 where supported, else fp16) with pinned memory and
non-blocking copies; on CPU it runs in float32 and is bit-identical for the same seed, batch size
and torch thread count.

EHR: ``ehr-stats`` computes region by region; ``ehr-lstm`` trains one model per fold on that
fold's training stays, then embeds every stay with it, writing ``values [fold, stay, dim]`` and
``sequence [fold, stay, time, dim]``. A fold whose regions are all written is skipped on resume;
a fold interrupted while embedding is retrained (deterministically) and only its missing regions
are written.

Dask (``dask_workers`` starts a ``LocalCluster(n_workers, threads_per_worker=1,
processes=True)``; ``dask_scheduler`` connects to a running scheduler): fold-independent
encoders split their pending regions across workers; ``ehr-lstm`` runs one task per pending fold.
Every worker opens the store and builds the encoder itself (weights files must be readable at
the same path on every worker). Each task sets torch to ``threads`` threads (default 1, one per
Dask worker thread); results are bit-identical to a single-process pass run with the same
``threads``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import time
from typing import Any

import numpy as np

from cbstore.errors import StoreError, StoreReadOnlyError
from cbstore.inputs.reader import EhrPreprocessor
from cbstore.store.embeddings import EmbeddingWriter
from cbstore.store.reader import Store, open_store
from encoders.errors import EncoderError, EncodingInputError, NonFiniteEmbeddingError
from encoders.registry import EncoderSpec, get_encoder
from encoders.weights import RANDOM

logger = logging.getLogger(__name__)

#: ``status`` of the summary when the embedding was already complete and nothing ran.
ALREADY_COMPLETE = "already complete"

#: Default region length (stays): the chunk length of ``embeddings/*/values``.
DEFAULT_REGION_STAYS = 1024


# ----------------------------------------------------------------------------------------- helpers

def resolve_device(device: str) -> "torch.device":  # noqa: F821
    """``"auto"`` -> CUDA when available, else CPU; ``"cuda"`` without a GPU is an error."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EncoderError("--device cuda was asked for, but torch sees no CUDA device; use --device cpu")
    return dev


@contextlib.contextmanager
def _torch_threads(threads: int | None):
    """Run with ``threads`` torch threads (unchanged when None), restoring the previous count."""
    import torch

    if threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def library_versions() -> dict[str, str]:
    """Versions of the libraries an embedding depends on."""
    from importlib import metadata

    out = {}
    for pkg in ("torch", "torchvision", "torchxrayvision", "numpy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def _check_finite(values: np.ndarray, stay_ids: np.ndarray, what: str) -> None:
    """Stop the pass when an encoder emitted NaN/inf, naming the stays."""
    bad = ~np.isfinite(values.reshape(len(values), -1)).all(axis=1)
    if bad.any():
        ids = stay_ids[bad].tolist()
        shown = ", ".join(str(i) for i in ids[:20]) + (", ..." if len(ids) > 20 else "")
        raise NonFiniteEmbeddingError(
            f"{what}: the encoder produced NaN/inf for {len(ids)} stay(s): stay_id {shown}. "
            "Check these stays' inputs (a corrupt film, extreme values) or the weights file.")


def _check_inputs(store: Store, spec: EncoderSpec) -> None:
    """Clear errors when the store lacks what the encoder reads."""
    try:
        if spec.modality == "cxr":
            present = store.cxr_present
            store.image_size  # noqa: B018  (reads cxr/images metadata; StoreError names the array)
            if not present.any():
                raise EncodingInputError(
                    f"store {store.path} has no stay with an X-ray (cxr/present is all false); "
                    f"nothing for {spec.name} to encode")
        else:
            store.window_hours  # noqa: B018  (StoreError names the missing array)
            store.ehr_values(np.arange(min(1, store.n_stays)))
    except StoreError as exc:
        if isinstance(exc, EncodingInputError):
            raise
        raise EncodingInputError(f"encoder {spec.name} cannot run on {store.path}: {exc}") from exc


# ------------------------------------------------------------------------------------- CXR regions

class FilmBatches:
    """Map-style dataset: item ``i`` is batch ``i`` of films, read from the store.

    Each batch lies within one region. The store is opened lazily in the process that reads, so
    every ``DataLoader`` worker has its own handle.
    """

    def __init__(self, store_path: str, batches: list[np.ndarray]):
        self.store_path = str(store_path)
        self.batches = batches
        self._store: Store | None = None

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int):
        import torch

        if self._store is None:
            self._store = open_store(self.store_path)
        return torch.from_numpy(np.ascontiguousarray(self._store.images(self.batches[i])))


def _region_batches(writer: EmbeddingWriter, present: np.ndarray, regions: list[int],
                    batch_size: int) -> list[tuple[int, list[np.ndarray]]]:
    """Per region, the positions of its present films split into batches."""
    plan = []
    for r in regions:
        sl = writer.region(r)
        pos = np.flatnonzero(present[sl]).astype(np.int64) + sl.start
        plan.append((r, [pos[i:i + batch_size] for i in range(0, len(pos), batch_size)]))
    return plan


def encode_cxr_regions(store: Store, writer: EmbeddingWriter, encoder, regions: list[int], *,
                       device, batch_size: int, workers: int, progress: bool) -> int:
    """Embed the films of ``regions`` and write each region as soon as it is complete.

    Returns
    -------
    int
        Number of films run through the model.
    """
    import torch
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    present = store.cxr_present
    stay_ids = store.stay_ids
    plan = _region_batches(writer, present, regions, batch_size)
    flat = [b for _, batches in plan for b in batches]
    cuda = device.type == "cuda"
    loader = DataLoader(FilmBatches(str(store.path), flat), batch_size=None, shuffle=False,
                        num_workers=workers, pin_memory=cuda,
                        persistent_workers=False, prefetch_factor=4 if workers else None)
    if cuda:
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        autocast = functools.partial(torch.autocast, "cuda", dtype=dtype)
    else:
        autocast = contextlib.nullcontext
    encoder.to(device)
    n_films = 0
    bar = tqdm(total=len(np.concatenate(flat)) if flat else 0, unit="img", desc=encoder.name,
               disable=not progress, dynamic_ncols=True)
    batches_iter = iter(loader)
    try:
        for r, batches in plan:
            sl = writer.region(r)
            values = np.full((sl.stop - sl.start, encoder.dim), np.nan, dtype=np.float32)
            maps = (None if encoder.map_shape is None else
                    np.full((sl.stop - sl.start, *encoder.map_shape), np.nan, dtype=np.float16))
            for pos in batches:
                images = next(batches_iter).to(device, non_blocking=cuda)
                with torch.inference_mode():
                    x = encoder.preprocess(images)
                    with autocast():
                        spatial = None if maps is None else encoder.embed_map(x)
                        out = encoder.embed(x) if maps is None else spatial.float().mean(dim=(2, 3))
                out = out.float().cpu().numpy()
                _check_finite(out, stay_ids[pos], f"{encoder.name} region {r}")
                values[pos - sl.start] = out
                if maps is not None:
                    spatial = spatial.to(torch.float16).cpu().numpy()
                    _check_finite(spatial, stay_ids[pos], f"{encoder.name} region {r} map")
                    maps[pos - sl.start] = spatial
                n_films += len(pos)
                bar.update(len(pos))
            writer.write(r, values, present[sl].copy(), spatial=maps)
    finally:
        bar.close()
        del batches_iter
    return n_films


# ------------------------------------------------------------------------------------- EHR regions

def encode_ehr_regions(store: Store, writer: EmbeddingWriter, encoder, regions: list[int], *,
                       progress: bool) -> int:
    """Embed the stays of ``regions`` with a fold-independent EHR encoder; returns stays done."""
    from tqdm.auto import tqdm

    n = 0
    stay_ids = store.stay_ids
    for r in tqdm(regions, unit="region", desc=encoder.name, disable=not progress):
        sl = writer.region(r)
        values = encoder(store.ehr_values(np.arange(sl.start, sl.stop)))
        if not encoder.allows_nan:
            _check_finite(values, stay_ids[sl], f"{encoder.name} region {r}")
        writer.write(r, values, np.ones(sl.stop - sl.start, dtype=bool))
        n += sl.stop - sl.start
    return n


def fit_fold(store: Store, encoder, fold: int):
    """Train a per-fold EHR encoder on the training stays of ``fold`` (validation: early stopping).

    Only ``store.indices(fold, "train")`` and ``store.indices(fold, "val")`` are read; test stays
    are never seen before the model is frozen.
    """
    train = store.indices(fold, "train")
    val = store.indices(fold, "val")
    # the read path's preprocessing of this fold: the encoder sees what a fusion method sees
    preprocessor = EhrPreprocessor.from_store(store, fold)
    return encoder.fit(store.ehr_values(train), store.ehr_values(val), preprocessor)


def encode_fold(store: Store, writer: EmbeddingWriter, encoder, fold: int, regions: list[int], *,
                progress: bool) -> dict:
    """Train ``encoder`` on ``fold`` and write its embeddings of ``regions``; returns the history."""
    from tqdm.auto import tqdm

    fit_fold(store, encoder, fold)
    stay_ids = store.stay_ids
    for r in tqdm(regions, unit="region", desc=f"{encoder.name} fold {fold}", disable=not progress):
        sl = writer.region(r)
        pooled, sequence = encoder.transform(store.ehr_values(np.arange(sl.start, sl.stop)))
        _check_finite(pooled, stay_ids[sl], f"{encoder.name} fold {fold} region {r}")
        _check_finite(sequence, stay_ids[sl], f"{encoder.name} fold {fold} region {r} sequence")
        writer.write(r, pooled, np.ones(sl.stop - sl.start, dtype=bool), fold=fold,
                     sequence=sequence if writer.sequence_dim is not None else None)
    return dict(encoder.history_)


# ------------------------------------------------------------------------------------ dask tasks

@functools.lru_cache(maxsize=4)
def _cached_encoder(name: str, weights, weights_dir, input_size, seed):
    spec = get_encoder(name)
    return spec.factory(None, weights=weights, weights_dir=weights_dir, input_size=input_size, seed=seed)


def _task_regions(store_path: str, spec_name: str, encoder_id: str, regions: list[int],
                  options: dict) -> int:
    """Dask task: encode ``regions`` of a fold-independent encoder in this worker."""
    import torch

    torch.set_num_threads(int(options["threads"] or 1))
    spec = get_encoder(spec_name)
    store = open_store(store_path)
    writer = EmbeddingWriter.open(store_path, spec.modality, encoder_id)
    if spec.modality == "cxr":
        encoder = _cached_encoder(spec_name, options["weights"], options["weights_dir"],
                                  options["input_size"], options["seed"])
        return encode_cxr_regions(store, writer, encoder, regions, device=resolve_device(options["device"]),
                                  batch_size=options["batch_size"], workers=0, progress=False)
    return encode_ehr_regions(store, writer, spec.factory(store), regions, progress=False)


def _task_fold(store_path: str, spec_name: str, encoder_id: str, fold: int, regions: list[int],
               options: dict) -> tuple[int, dict]:
    """Dask task: train one fold of a per-fold encoder and write its regions."""
    import torch

    torch.set_num_threads(int(options["threads"] or 1))
    spec = get_encoder(spec_name)
    store = open_store(store_path)
    writer = EmbeddingWriter.open(store_path, spec.modality, encoder_id)
    encoder = spec.factory(store, device=str(resolve_device(options["device"])), config=options["config"])
    return fold, encode_fold(store, writer, encoder, fold, regions, progress=False)


@contextlib.contextmanager
def _dask_client(scheduler: str | None, n_workers: int | None):
    from distributed import Client, LocalCluster

    if scheduler:
        client = Client(scheduler)
        try:
            yield client
        finally:
            client.close()
        return
    cluster = LocalCluster(n_workers=int(n_workers), threads_per_worker=1, processes=True,
                           dashboard_address=":0")
    client = Client(cluster)
    try:
        yield client
    finally:
        client.close()
        cluster.close()


def _split(items: list[int], parts: int) -> list[list[int]]:
    """Split ``items`` into at most ``parts`` contiguous, nearly equal groups."""
    parts = max(1, min(parts, len(items)))
    return [list(chunk) for chunk in np.array_split(np.asarray(items, dtype=int), parts) if len(chunk)]


# --------------------------------------------------------------------------------------- the pass

def _provenance(spec: EncoderSpec, encoder, store: Store, batch_size: int) -> dict:
    attrs = dict(encoder.provenance())
    attrs["encoder_name"] = spec.name
    attrs["library_versions"] = library_versions()
    # Random weights were trained on nothing, so the MIMIC-CXR overlap caveat does not apply.
    attrs["leakage_note"] = "" if attrs.get("weights") == RANDOM else spec.leakage_note
    attrs["nan_allowed"] = bool(spec.nan_allowed)
    if spec.modality == "cxr":
        attrs["image_size"] = int(store.image_size)
        attrs["batch_size"] = int(batch_size)
    return attrs


#: Attrs that must match to resume an incomplete embedding (batch_size: CPU bit-identity).
_RESUME_KEYS = ("weights", "weights_sha256", "seed", "input_resolution", "hyperparameters", "preprocessing",
                "batch_size")


def _check_resume(writer: EmbeddingWriter, attrs: dict) -> None:
    """Refuse to resume an embedding started with other weights or settings."""
    old = writer.attrs
    diff = [k for k in _RESUME_KEYS if k in attrs and old.get(k) != _json_roundtrip(attrs[k])]
    if diff:
        raise EncoderError(
            f"embedding {writer.modality}/{writer.encoder_id} was started with other settings "
            f"({', '.join(diff)} differ); pass --overwrite to start it again")


def _check_same_request(existing: dict, spec: EncoderSpec, weights, seed, input_size, lstm_config) -> None:
    """A complete embedding made with other (cheaply known) settings is not silently reused."""
    want: dict[str, Any] = {}
    if spec.modality == "cxr":
        want["weights"] = weights
        want["seed"] = seed if weights == "random" else None
        if input_size is not None:
            want["input_resolution"] = int(input_size)
    elif spec.per_fold:
        from dataclasses import asdict

        from encoders.ehr_seq import LstmConfig

        want["hyperparameters"] = asdict(lstm_config or LstmConfig(seed=seed))
    diff = [k for k, v in want.items() if existing.get(k) != _json_roundtrip(v)]
    if diff:
        raise EncoderError(
            f"embedding {spec.modality}/{existing['encoder_id']} is complete but was made with other "
            f"settings ({', '.join(f'{k}: stored {existing.get(k)!r}' for k in diff)}); "
            "pass --overwrite to recompute it")


def _json_roundtrip(value: Any) -> Any:
    import json

    return json.loads(json.dumps(value))


def run_encoding_pass(
    store_path: str | os.PathLike,
    encoder_name: str,
    *,
    device: str = "auto",
    batch_size: int = 32,
    workers: int = 0,
    overwrite: bool = False,
    weights: str | None = None,
    weights_dir: str | os.PathLike | None = None,
    dask_scheduler: str | None = None,
    dask_workers: int | None = None,
    progress: bool = True,
    region_stays: int = DEFAULT_REGION_STAYS,
    input_size: int | None = None,
    seed: int = 0,
    threads: int | None = None,
    lstm_config=None,
    store_sequence: bool = True,
) -> dict:
    """Encode one modality of a store with one encoder and write the embedding into the store.

    Parameters
    ----------
    store_path : path-like
        A complete cbstore store (opened with :func:`cbstore.store.reader.open_store`).
    encoder_name : str
        A name of :data:`encoders.registry.ENCODERS`.
    device : {"auto", "cpu", "cuda"} or str
        Where the model runs.
    batch_size : int
        Films per forward call (CXR).
    workers : int
        ``DataLoader`` worker processes reading films (CXR, single-process path).
    overwrite : bool
        Recompute a complete embedding, or restart an incomplete one.
    weights : str, optional
        Weights name (default: the encoder's) or ``"random"``; non-default weights change the
        ``encoder_id`` (see :mod:`encoders.registry`).
    weights_dir : path-like, optional
        Directory searched first for weights files (see :mod:`encoders.weights`).
    dask_scheduler : str, optional
        Address of a running Dask scheduler to distribute the pass over.
    dask_workers : int, optional
        Start a local Dask cluster with this many single-threaded worker processes.
    progress : bool
        Show a tqdm progress bar (films/s for CXR).
    region_stays : int
        Stays per region (resume unit, chunk length); only used when the embedding is created.
    input_size : int, optional
        CXR input resolution override (tests only; recorded in the provenance).
    seed : int
        Seed for random weights and for learned EHR encoders (``lstm_config.seed`` wins for
        ``ehr-lstm`` when a config is given).
    threads : int, optional
        torch threads (in-process: unchanged when None; Dask tasks: 1 when None).
    lstm_config : encoders.ehr_seq.LstmConfig, optional
        Hyperparameters of ``ehr-lstm``.
    store_sequence : bool
        Whether ``ehr-lstm`` also writes the per-hour ``sequence`` array.

    Returns
    -------
    dict
        ``status`` ("complete" or :data:`ALREADY_COMPLETE`), ``encoder_id``, ``modality``,
        ``per_fold``, ``dim``, ``regions_total``, ``regions_computed`` (region-folds for per-fold
        encoders), ``items`` (films or stays embedded), ``seconds``, ``items_per_s``,
        ``device``, ``dask``.

    Raises
    ------
    UnknownEncoderError
        ``encoder_name`` is not registered (the message lists the valid names).
    StoreError
        The store is missing, incomplete or of another format version.
    StoreReadOnlyError
        The store cannot be written.
    EncodingInputError
        The store lacks what the encoder reads (e.g. no X-ray at all).
    WeightsError, WeightsNotFoundError
        Unknown weights, or the weights file is not found (the message names the file and URL).
    NonFiniteEmbeddingError
        The encoder produced NaN/inf; the message names the stays.
    EncoderError
        An incomplete embedding was started with other settings; or a bad argument.
    """
    started = time.perf_counter()
    spec = get_encoder(encoder_name)
    weights = spec.check_weights(weights)
    if batch_size < 1 or workers < 0:
        raise EncoderError(f"batch_size must be >= 1 and workers >= 0, got {batch_size}, {workers}")
    if dask_scheduler and dask_workers:
        raise EncoderError("give either --dask-scheduler or --dask-workers, not both")
    if dask_workers is not None and dask_workers < 1:
        raise EncoderError(f"--dask-workers must be >= 1, got {dask_workers}")
    store = open_store(store_path)
    encoder_id = spec.encoder_id(weights)
    summary = {"encoder_id": encoder_id, "modality": spec.modality, "per_fold": spec.per_fold,
               "store": str(store.path), "dask": bool(dask_scheduler or dask_workers)}
    complete = {(e["modality"], e["encoder_id"]): e for e in store.embeddings()}
    existing = complete.get((spec.modality, encoder_id))
    if existing is not None and not overwrite:
        _check_same_request(existing, spec, weights, seed, input_size, lstm_config)
        logger.info("embedding %s/%s is already complete", spec.modality, encoder_id)
        return {**summary, "status": ALREADY_COMPLETE, "regions_computed": 0, "items": 0}
    if not store.is_writable():
        raise StoreReadOnlyError(f"store {store.path} is read-only; cannot write embeddings/"
                                 f"{spec.modality}/{encoder_id} (copy the store or fix permissions)")
    _check_inputs(store, spec)
    dev = resolve_device(device)

    with _torch_threads(threads):
        if spec.modality == "cxr":
            encoder = spec.factory(store, weights=weights, weights_dir=weights_dir,
                                   input_size=input_size, seed=seed)
        elif spec.per_fold:
            from encoders.ehr_seq import LstmConfig

            lstm_config = lstm_config or LstmConfig(seed=seed)
            encoder = spec.factory(store, device=str(dev), config=lstm_config)
        else:
            encoder = spec.factory(store)
        attrs = _provenance(spec, encoder, store, batch_size)
        sequence_dim = encoder.dim if (spec.per_fold and store_sequence) else None
        map_shape = getattr(encoder, "map_shape", None)
        writer = store.create_embedding(spec.modality, encoder_id, int(encoder.dim), per_fold=spec.per_fold,
                                        sequence_dim=sequence_dim, attrs=attrs, overwrite=overwrite,
                                        region_stays=region_stays, map_shape=map_shape)
        _check_resume(writer, attrs)
        done = writer.done_matrix()
        summary.update(dim=int(encoder.dim), regions_total=int(done.size), device=str(dev))
        options = {"weights": weights, "weights_dir": None if weights_dir is None else str(weights_dir),
                   "input_size": input_size, "seed": seed, "device": str(dev), "batch_size": batch_size,
                   "threads": threads, "config": lstm_config}
        if spec.per_fold:
            items, computed = _run_per_fold(store, writer, spec, encoder, encoder_id, done, options,
                                            dask_scheduler, dask_workers, progress)
        else:
            items, computed = _run_regions(store, writer, spec, encoder, encoder_id, done[0], options,
                                           workers, dask_scheduler, dask_workers, progress, dev)
        writer.finish()
    seconds = time.perf_counter() - started
    summary.update(status="complete", regions_computed=computed, items=items, seconds=seconds,
                   items_per_s=items / seconds if seconds > 0 else float("nan"))
    logger.info("embedding %s/%s complete: %d items in %.1f s", spec.modality, encoder_id, items, seconds)
    return summary


def _run_regions(store, writer, spec, encoder, encoder_id, done, options, workers,
                 dask_scheduler, dask_workers, progress, dev) -> tuple[int, int]:
    pending = [int(r) for r in np.flatnonzero(~done)]
    if not pending:
        return 0, 0
    if not (dask_scheduler or dask_workers):
        if spec.modality == "cxr":
            items = encode_cxr_regions(store, writer, encoder, pending, device=dev,
                                       batch_size=options["batch_size"], workers=workers, progress=progress)
        else:
            items = encode_ehr_regions(store, writer, encoder, pending, progress=progress)
        return items, len(pending)
    from distributed import as_completed
    from tqdm.auto import tqdm

    with _dask_client(dask_scheduler, dask_workers) as client:
        n_workers = max(1, len(client.scheduler_info().get("workers", {})) or (dask_workers or 1))
        groups = _split(pending, 4 * n_workers)
        futures = [client.submit(_task_regions, str(store.path), spec.name, encoder_id, g, options,
                                 pure=False) for g in groups]
        sizes = {f.key: len(g) for f, g in zip(futures, groups)}
        items = 0
        with tqdm(total=len(pending), unit="region", desc=f"{encoder_id} (dask)",
                  disable=not progress) as bar:
            for future in as_completed(futures):
                items += int(future.result())
                bar.update(sizes[future.key])
    return items, len(pending)


def _run_per_fold(store, writer, spec, encoder, encoder_id, done, options,
                  dask_scheduler, dask_workers, progress) -> tuple[int, int]:
    todo = {f: [int(r) for r in np.flatnonzero(~done[f])] for f in range(done.shape[0])}
    todo = {f: regions for f, regions in todo.items() if regions}
    if not todo:
        return 0, 0
    histories = dict(writer.attrs.get("training", {}))
    if not (dask_scheduler or dask_workers):
        for fold, regions in todo.items():
            histories[str(fold)] = encode_fold(store, writer, encoder, fold, regions, progress=progress)
            writer.update_attrs({"training": histories})
    else:
        with _dask_client(dask_scheduler, dask_workers) as client:
            futures = [client.submit(_task_fold, str(store.path), spec.name, encoder_id, f, regions,
                                     options, pure=False) for f, regions in todo.items()]
            for future in futures:
                fold, history = future.result()
                histories[str(fold)] = history
        writer.update_attrs({"training": histories})
    items = sum(writer.region(r).stop - writer.region(r).start for regions in todo.values() for r in regions)
    return items, sum(len(r) for r in todo.values())
