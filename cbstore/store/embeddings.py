"""Cached embeddings: creating an embedding group and writing it region by region.

:func:`create_embedding` (called through :meth:`cbstore.store.reader.Store.create_embedding`) creates
``embeddings/<modality>/<encoder-id>/`` and returns an :class:`EmbeddingWriter`, which writes
chunk-aligned regions, keeps one ``done`` flag per region and marks the group complete at the end
(``store_layout.md``, "Embeddings").
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import zarr

from cbstore.errors import EmbeddingError, StoreReadOnlyError
from cbstore.format.schema import (
    ARRAYS,
    EMBEDDING_CALLER_ATTRS,
    EMBEDDINGS_GROUP,
    GROUP_ENCODING,
    MODALITIES,
    MAP_SPEC,
    ArraySpec,
    check_packaged,
    now,
)
from cbstore.store.zarr_io import MAX_1D_CHUNK, consolidate, create_array, jsonable, package_version

if TYPE_CHECKING:  # pragma: no cover
    from cbstore.store.reader import Store

__all__ = ["EmbeddingWriter", "create_embedding"]


def create_embedding(
    store: "Store",
    modality: str,
    encoder_id: str,
    dim: int,
    *,
    per_fold: bool,
    sequence_dim: int | None,
    attrs: dict,
    overwrite: bool,
    region_stays: int,
    map_shape: tuple | None = None,
) -> "EmbeddingWriter":
    """Create (or resume) an embedding group of ``store``; see :meth:`cbstore.store.reader.Store.create_embedding`."""
    if modality not in MODALITIES:
        raise EmbeddingError(f"unknown modality {modality!r}; choose one of {list(MODALITIES)}")
    if not isinstance(dim, (int, np.integer)) or dim < 1:
        raise EmbeddingError(f"dim must be a positive integer, got {dim!r}")
    if sequence_dim is not None and (not isinstance(sequence_dim, (int, np.integer)) or sequence_dim < 1):
        raise EmbeddingError(f"sequence_dim must be a positive integer or None, got {sequence_dim!r}")
    if region_stays < 1:
        raise EmbeddingError(f"region_stays must be >= 1, got {region_stays}")
    if map_shape is not None:
        map_shape = tuple(map_shape)
        if (modality != "cxr" or per_fold or len(map_shape) != 3
                or not all(isinstance(v, (int, np.integer)) and v >= 1 for v in map_shape)):
            raise EmbeddingError(f"map_shape must be three positive integers (C, h, w) of a "
                                 f"fold-independent cxr embedding, got {map_shape!r} for "
                                 f"{modality}/{encoder_id} (per_fold={per_fold})")
    missing = [k for k in EMBEDDING_CALLER_ATTRS if k not in attrs]
    if missing:
        raise EmbeddingError(f"attrs for {modality}/{encoder_id} lack {missing} (provenance is required)")
    if not store.is_writable():
        raise StoreReadOnlyError(
            f"store {store.path} is read-only (no write permission); copy it somewhere writable "
            "or fix its permissions before encoding"
        )
    full = {
        **jsonable(dict(attrs), f"attrs of {modality}/{encoder_id}"),
        "encoding-type": GROUP_ENCODING["embedding"][0],
        "encoding-version": GROUP_ENCODING["embedding"][1],
        "encoder_id": encoder_id, "modality": modality, "per_fold": bool(per_fold), "dim": int(dim),
        "sequence_dim": None if sequence_dim is None else int(sequence_dim),
        "region_stays": int(region_stays), "created_at": now(), "complete": False,
    }
    full["map_shape"] = None if map_shape is None else [int(v) for v in map_shape]
    full.setdefault("weights_sha256", None)
    full["library_versions"] = {**_library_versions(), **full.get("library_versions", {})}
    problems = check_packaged(full, "embedding_attrs", f"embedding {modality}/{encoder_id} attrs")
    if problems:
        raise EmbeddingError("\n".join(problems))

    root = zarr.open_group(str(store.path), mode="r+", use_consolidated=False)
    gpath = f"{EMBEDDINGS_GROUP}/{modality}/{encoder_id}"
    if gpath in root:
        old = dict(root[gpath].attrs)
        if not overwrite:
            if old.get("complete") is True:
                raise EmbeddingError(
                    f"embedding {modality}/{encoder_id} in {store.path} is already complete; "
                    "pass --overwrite (overwrite=True) to recompute it"
                )
            shape = {k: old.get(k) for k in ("dim", "per_fold", "sequence_dim", "region_stays",
                                              "map_shape")}
            want = {k: full[k] for k in shape}
            if shape != want:
                raise EmbeddingError(
                    f"incomplete embedding {modality}/{encoder_id} in {store.path} was started with "
                    f"{shape}, not {want}; pass --overwrite to start again"
                )
            return EmbeddingWriter(store, modality, encoder_id)
        del root[gpath]
    for sub, etype in ((EMBEDDINGS_GROUP, "embeddings"), (f"{EMBEDDINGS_GROUP}/{modality}", "embeddings")):
        if sub not in root:
            root.create_group(sub, attributes={"encoding-type": GROUP_ENCODING[etype][0],
                                               "encoding-version": GROUP_ENCODING[etype][1]})
    _create_embedding_arrays(root.create_group(gpath, attributes=full), store, full)
    # the new group is visible as incomplete at once, so a stale complete entry of an
    # overwritten group can never be read
    consolidate(store.path)
    store.refresh()
    return EmbeddingWriter(store, modality, encoder_id)


def _library_versions() -> dict[str, str]:
    import sys
    from importlib import metadata

    out = {"python": sys.version.split()[0], "cbstore": package_version()}
    for pkg in ("numpy", "zarr", "torch", "torchxrayvision"):
        if pkg in ("numpy", "zarr") or pkg in sys.modules:
            try:
                out[pkg] = metadata.version(pkg)
            except metadata.PackageNotFoundError:
                pass
    return out


def _create_embedding_arrays(grp: zarr.Group, store: Store, attrs: dict) -> None:
    n, rs = store.n_stays, min(attrs["region_stays"], store.n_stays)
    dim, per_fold, seq = attrs["dim"], attrs["per_fold"], attrs["sequence_dim"]
    n_regions = -(-n // attrs["region_stays"])
    folds = store.n_folds
    stay = create_array(grp, "stay", ARRAYS["stays/stay"], (n,), (min(n, MAX_1D_CHUNK),))
    stay[:] = store.stay_ids
    fspec = ArraySpec("float32", ("fold", "stay", "dim") if per_fold else ("stay", "dim"), float("nan"))
    if per_fold:
        fold = create_array(grp, "fold", ARRAYS["splits/fold"], (folds,), (folds,))
        fold[:] = np.arange(folds, dtype=np.int8)
        create_array(grp, "values", fspec, (folds, n, dim), (1, rs, dim))
        create_array(grp, "done", ArraySpec("bool", ("fold", "region"), False), (folds, n_regions), (1, 1))
    else:
        create_array(grp, "values", fspec, (n, dim), (rs, dim))
        create_array(grp, "done", ArraySpec("bool", ("region",), False), (n_regions,), (1,))
    create_array(grp, "present", ArraySpec("bool", ("stay",), False), (n,), (rs,))
    if seq is not None:
        window = store.window_hours
        time = create_array(grp, "time", ARRAYS["ehr/time"], (window,), (window,))
        time[:] = np.arange(window, dtype=np.int16)
        if per_fold:
            sspec = ArraySpec("float32", ("fold", "stay", "time", "seq_dim"), float("nan"))
            create_array(grp, "sequence", sspec, (folds, n, window, seq), (1, rs, window, seq))
        else:
            sspec = ArraySpec("float32", ("stay", "time", "seq_dim"), float("nan"))
            create_array(grp, "sequence", sspec, (n, window, seq), (rs, window, seq))
    if attrs.get("map_shape") is not None:
        # one chunk per stay (a method reads single stays' maps), sharded by region: a region
        # write is whole shards, and the chunks of stays without a film are never written
        c, h, w = attrs["map_shape"]
        create_array(grp, "map", MAP_SPEC, (n, c, h, w), (1, c, h, w), shards=(rs, c, h, w))


class EmbeddingWriter:
    """Region-wise writer of one embedding group (see :meth:`Store.create_embedding`).

    A region is ``region_stays`` consecutive stays, chunk aligned, so separate processes may write
    disjoint regions at once. Each region's ``done`` flag is its own chunk and is set only after
    the region's data; :meth:`write` is idempotent, so an interrupted pass resumes from
    :meth:`done_regions`. The writer holds only plain values (picklable for dask workers).

    Attributes
    ----------
    n_regions : int
    n_stays : int
    region_stays : int
    per_fold : bool
    dim : int
    sequence_dim : int or None
    map_shape : tuple of int or None
        ``(C, h, w)`` of the spatial ``map`` array (spatial-map encoders), else None.
    """

    def __init__(self, store: Store | str | os.PathLike, modality: str, encoder_id: str) -> None:
        self.store_path = str(Path(store).absolute() if isinstance(store, (str, os.PathLike)) else store.path)
        self.modality, self.encoder_id = modality, encoder_id
        self.group_path = f"{EMBEDDINGS_GROUP}/{modality}/{encoder_id}"
        grp = self._group("r")
        attrs = dict(grp.attrs)
        self.dim = int(attrs["dim"])
        self.per_fold = bool(attrs["per_fold"])
        self.sequence_dim = attrs.get("sequence_dim")
        self.map_shape = None if attrs.get("map_shape") is None else tuple(attrs["map_shape"])
        self.region_stays = int(attrs["region_stays"])
        self.n_stays = int(grp["present"].shape[0])
        self.n_folds = int(grp["values"].shape[0]) if self.per_fold else 1
        self.n_regions = -(-self.n_stays // self.region_stays)
        # encoders whose features are NaN by design (e.g. ehr-stats: nothing observed) set this attr
        self.nan_allowed = bool(attrs.get("nan_allowed", False))

    @classmethod
    def open(cls, store_path: str | os.PathLike, modality: str, encoder_id: str) -> "EmbeddingWriter":
        """Open an existing incomplete embedding for writing (e.g. in a dask worker)."""
        return cls(store_path, modality, encoder_id)

    def _group(self, mode: str = "r+") -> zarr.Group:
        try:
            return zarr.open_group(self.store_path, path=self.group_path, mode=mode, use_consolidated=False)
        except FileNotFoundError:
            raise EmbeddingError(f"no embedding group {self.group_path} in {self.store_path}") from None

    def __repr__(self) -> str:
        return (f"EmbeddingWriter({self.store_path!r}, {self.modality}/{self.encoder_id}, "
                f"{int(self.done_regions().sum())}/{self.n_regions} regions done)")

    def region(self, r: int) -> slice:
        """Stay positions of region ``r``."""
        if not 0 <= r < self.n_regions:
            raise EmbeddingError(f"region {r} out of range 0..{self.n_regions - 1}")
        return slice(r * self.region_stays, min((r + 1) * self.region_stays, self.n_stays))

    def done_matrix(self) -> np.ndarray:
        """bool [fold, region] (per-fold encoders) or [1, region]: which parts are written."""
        done = np.asarray(self._group("r")["done"][...], dtype=bool)
        return done.reshape(self.n_folds, self.n_regions)

    @property
    def attrs(self) -> dict:
        """Current attributes of the embedding group (provenance, ``complete``)."""
        return dict(self._group("r").attrs)

    def update_attrs(self, values: dict) -> None:
        """Add or replace provenance attributes (e.g. per-fold training history) before :meth:`finish`.

        Call from one process only (attrs live in one file). ``complete`` cannot be set here.
        """
        if "complete" in values:
            raise EmbeddingError("attrs['complete'] is set by finish(), not update_attrs()")
        self._group("r+").update_attributes(jsonable(dict(values), f"attrs of {self.group_path}"))

    def done_regions(self) -> np.ndarray:
        """bool [n_regions]: regions written completely (for per-fold encoders: in every fold)."""
        return self.done_matrix().all(axis=0)

    def write(
        self,
        r: int,
        values: np.ndarray,
        present: np.ndarray,
        fold: int | None = None,
        sequence: np.ndarray | None = None,
        spatial: np.ndarray | None = None,
    ) -> None:
        """Write region ``r`` (for per-fold encoders: one fold of it) and mark it done.

        Parameters
        ----------
        r : int
            Region index.
        values : numpy.ndarray
            float [k, dim] for the k stays of the region; rows of absent stays are stored as NaN.
        present : numpy.ndarray
            bool [k].
        fold : int, optional
            Required for per-fold encoders, must be None otherwise.
        sequence : numpy.ndarray, optional
            float [k, T, sequence_dim], required when the group has a sequence array.
        spatial : numpy.ndarray, optional
            float [k, C, h, w] spatial maps, required when the group has a ``map`` array; stored
            as float16, NaN for absent stays.

        Raises
        ------
        EmbeddingError
            Wrong shapes, fold, or NaN/inf values for present stays (the message names the stay ids).
        """
        sl = self.region(r)
        k = sl.stop - sl.start
        what = f"{self.modality}/{self.encoder_id} region {r}"
        if self.per_fold:
            if fold is None or not 0 <= int(fold) < self.n_folds:
                raise EmbeddingError(f"{what}: per-fold encoder needs fold=0..{self.n_folds - 1}, got {fold!r}")
        elif fold is not None:
            raise EmbeddingError(f"{what}: encoder is not per fold; do not pass fold")
        values = np.array(values, dtype=np.float32)
        present = np.asarray(present)
        if values.shape != (k, self.dim):
            raise EmbeddingError(f"{what}: values must have shape ({k}, {self.dim}), got {values.shape}")
        if present.shape != (k,) or present.dtype != bool:
            raise EmbeddingError(f"{what}: present must be bool ({k},), got {present.dtype} {present.shape}")
        grp = self._group("r+")
        stay_ids = grp["stay"][sl]
        self._check_finite(values, present, stay_ids, what, self.nan_allowed)
        values[~present] = np.nan
        if (sequence is None) != (self.sequence_dim is None):
            need = "needs" if self.sequence_dim is not None else "has no"
            raise EmbeddingError(f"{what}: this embedding {need} a sequence array")
        if sequence is not None:
            sequence = np.array(sequence, dtype=np.float32)
            window = grp["time"].shape[0]
            if sequence.shape != (k, window, self.sequence_dim):
                raise EmbeddingError(
                    f"{what}: sequence must have shape ({k}, {window}, {self.sequence_dim}), got {sequence.shape}"
                )
            self._check_finite(sequence.reshape(k, -1), present, stay_ids, what + " sequence",
                               self.nan_allowed)
            sequence[~present] = np.nan
        if (spatial is None) != (self.map_shape is None):
            need = "needs" if self.map_shape is not None else "has no"
            raise EmbeddingError(f"{what}: this embedding {need} a spatial map array")
        if spatial is not None:
            spatial = np.array(spatial, dtype=np.float16)
            if spatial.shape != (k, *self.map_shape):
                raise EmbeddingError(f"{what}: spatial map must have shape ({k}, "
                                     f"{', '.join(map(str, self.map_shape))}), got {spatial.shape}")
            self._check_finite(spatial.reshape(k, -1), present, stay_ids, what + " map")
            spatial[~present] = np.nan
            grp["map"][sl] = spatial
        if self.per_fold:
            # present is one array for all folds: folds written earlier must agree with this one
            written = np.asarray(grp["done"][:, r], dtype=bool)
            written[int(fold)] = False
            if written.any():
                stored = np.asarray(grp["present"][sl], dtype=bool)
                if not np.array_equal(stored, present):
                    ids = stay_ids[stored != present][:10].tolist()
                    raise EmbeddingError(
                        f"{what} fold {fold}: present differs from the folds already written for stays "
                        f"{ids}; present must not depend on the fold"
                    )
            grp["values"][int(fold), sl] = values
            if sequence is not None:
                grp["sequence"][int(fold), sl] = sequence
        else:
            grp["values"][sl] = values
            if sequence is not None:
                grp["sequence"][sl] = sequence
        grp["present"][sl] = present
        # the flag goes last: a crash before it leaves the region to be redone
        if self.per_fold:
            grp["done"][int(fold), r] = True
        else:
            grp["done"][r] = True

    @staticmethod
    def _check_finite(values: np.ndarray, present: np.ndarray, stay_ids: np.ndarray, what: str,
                      nan_allowed: bool = False) -> None:
        ok = ~np.isinf(values).any(axis=1) if nan_allowed else np.isfinite(values).all(axis=1)
        bad = present & ~ok
        if bad.any():
            ids = stay_ids[bad][:10].tolist()
            kind = "inf" if nan_allowed else "NaN/inf"
            raise EmbeddingError(f"{what}: {kind} values for present stays {ids} ({int(bad.sum())} in all)")

    def finish(self) -> None:
        """Check every region is done and no present stay has NaN; mark complete; re-consolidate.

        Raises
        ------
        EmbeddingError
            Regions not written, or NaN values for present stays (the message names the stay ids).
        """
        done = self.done_matrix()
        if not done.all():
            missing = [(f, r) for f, r in zip(*np.nonzero(~done))]
            where = ", ".join(f"region {r}" + (f" fold {f}" if self.per_fold else "") for f, r in missing[:8])
            raise EmbeddingError(
                f"embedding {self.modality}/{self.encoder_id}: {len(missing)} region(s) not written yet "
                f"({where}{', ...' if len(missing) > 8 else ''}); resume the pass before finishing"
            )
        grp = self._group("r+")
        present = np.asarray(grp["present"][...], dtype=bool)
        stay_ids = np.asarray(grp["stay"][...])
        names = ["values"] + (["sequence"] if "sequence" in grp else [])
        for name in names:
            arr = grp[name]
            for f in range(self.n_folds):
                for r in range(self.n_regions):
                    sl = self.region(r)
                    block = np.asarray(arr[f, sl] if self.per_fold else arr[sl])
                    block = block.reshape(len(block), -1)
                    fold_note = f" fold {f}" if self.per_fold else ""
                    self._check_finite(block, present[sl], stay_ids[sl],
                                       f"embedding {self.modality}/{self.encoder_id} {name}{fold_note}",
                                       self.nan_allowed)
        grp.update_attributes({"complete": True, "completed_at": now()})
        consolidate(self.store_path)
