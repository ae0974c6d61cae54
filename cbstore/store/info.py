"""Human-readable summary of a store (``cbstore info STORE``)."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np

from cbstore.format.content import PART_CODES
from cbstore.format.schema import LOS_CLASS_NAMES
from cbstore.store.reader import Store


def _pct(k: int, n: int) -> str:
    return f"{k}/{n} ({100.0 * k / n:.1f}%)" if n else f"{k}/0"


def disk_size(path: str | os.PathLike) -> int:
    """Bytes of all files under ``path``."""
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(folder, name))
            except OSError:
                pass
    return total


def store_summary(store: Store) -> str:
    """Summary text: cohort, splits, labels, CXR coverage, embeddings and size on disk.

    Parameters
    ----------
    store : Store
        An open store.

    Returns
    -------
    str
        Multi-line text, one section per topic.
    """
    a = store.attrs
    n = store.n_stays
    lines = [
        f"cbstore store {store.path}",
        f"  format {a.get('format_version')}, created {a.get('created_at')} by {a.get('created_by')}",
    ]
    for name, src in sorted((a.get("sources") or {}).items()):
        synth = ", synthetic" if src.get("synthetic") else ""
        lines.append(f"  source {name}: {src.get('path')} (version {src.get('version')}{synth})")
    patients = int(np.unique(store.stays["subject_id"]).size)
    lines += [
        "",
        f"Stays: {n}    Patients: {patients}    Window: {store.window_hours} h    Folds: {store.n_folds}",
        f"EHR features: {len(store.features)} ({int((store.features['kind'] == 'binary').sum())} binary)"
        f"    Image size: {store.image_size}",
    ]

    flow = a.get("cohort_flow") or []
    if flow:
        lines += ["", "Cohort flow:"]
        width = max(len(str(s.get("step", ""))) for s in flow)
        for step in flow:
            lines.append(f"  {str(step.get('step', '')):<{width}}  {step.get('n', ''):>8}  {step.get('note', '')}")

    lines += ["", "Splits (stays per part):"]
    for k in range(store.n_folds):
        part = store.part(k)
        counts = "  ".join(f"{name} {int((part == code).sum())}" for name, code in PART_CODES.items())
        lines.append(f"  fold {k}: {counts}")

    lines += ["", "Labels:"]
    for task in ("mortality", "mortality_hosp"):
        lines.append(f"  {task:<15} {_pct(int(store.labels(task).sum()), n)}")
    pheno = store.labels("phenotype")
    lines.append("  phenotypes:")
    width = max(len(p) for p in store.phenotype_names)
    for j, name in enumerate(store.phenotype_names):
        lines.append(f"    {name:<{width}}  {_pct(int(pheno[:, j].sum()), n)}")
    los = store.labels("los")
    counts = "  ".join(f"{c} {int((los == i).sum())}" for i, c in enumerate(LOS_CLASS_NAMES))
    lines.append(f"  LoS classes: {counts}  (<2d, not used: {int((los < 0).sum())})")

    present = store.cxr_present
    lines += ["", f"CXR: {_pct(int(present.sum()), n)} stays with a film"]
    reasons = Counter(r.split(":", 1)[0] for r in store.cxr["absent_reason"] if r)
    if reasons:
        lines.append("  absent by reason: " + ", ".join(f"{r} {c}" for r, c in sorted(reasons.items())))
    skips = a.get("cxr_skips") or {}
    if skips:
        lines.append("  films skipped during build: " + ", ".join(f"{r} {c}" for r, c in sorted(skips.items())))

    lines += ["", "Embeddings:"]
    embeddings = store.embeddings()
    if not embeddings:
        lines.append("  (none; run `cbstore encode`)")
    for e in embeddings:
        lines.append(
            f"  {e['modality']}/{e['encoder_id']}: dim {e['dim']}, "
            f"{'per fold' if e['per_fold'] else 'fold-independent'}, weights {e.get('weights')}, "
            f"created {e.get('created_at')}"
        )

    lines += ["", f"Size on disk: {disk_size(Path(store.path)) / 1e6:.1f} MB"]
    return "\n".join(lines)


def tree_listing(path: str | os.PathLike) -> str:
    """One line per group and array of a store: name, dims, shape, dtype, chunks (shards).

    Used for the worked example in ``store_layout.md``; reads metadata only.
    """
    import zarr

    from cbstore.store.zarr_io import quiet_zarr_warnings

    with quiet_zarr_warnings():
        root = zarr.open_group(str(path), mode="r", use_consolidated=True)
        members = sorted(root.members(max_depth=None), key=lambda m: m[0])
    lines = [f"{Path(path).name}/  (zarr v3 group; attrs: {', '.join(sorted(root.attrs))})"]
    for name, node in members:
        depth = name.count("/")
        indent = "  " * (depth + 1)
        leaf = name.rsplit("/", 1)[-1]
        if isinstance(node, zarr.Group):
            etype = node.attrs.get("encoding-type", "")
            lines.append(f"{indent}{leaf}/  ({etype} {node.attrs.get('encoding-version', '')})".rstrip())
            continue
        dims = ", ".join(node.metadata.dimension_names or ())
        dtype = "str" if node.dtype.kind in "OTU" else str(node.dtype)
        shard = f" shards {tuple(node.shards)}" if node.shards else ""
        lines.append(f"{indent}{leaf:<24} {dtype:<8} [{dims}] {tuple(node.shape)} chunks {tuple(node.chunks)}{shard}")
    return "\n".join(lines)
