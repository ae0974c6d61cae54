"""Tiny stores with fake cached embeddings for the fusion tests.

``make_fusion_store(path)`` writes a :func:`cbstore.testing.random_content` store and adds
embeddings ``ehr/ehr-test`` (fold-independent), ``ehr/ehr-perfold`` (per fold) and
``cxr/cxr-test``, and a spatial-map embedding ``cxr/cxr-map-test`` (maps ``[4, 2, 2]`` whose
average pool is its ``values``). The embeddings carry a weak signal of the labels, so a method can learn
something, and the X-ray embedding is NaN where the store has no film.
"""

from __future__ import annotations

import numpy as np

from cbstore.store import open_store, write_store
from cbstore.testing import random_content

EHR_ID, EHR_PERFOLD_ID, CXR_ID, CXR_MAP_ID = "ehr-test", "ehr-perfold", "cxr-test", "cxr-map-test"
EHR_DIM, CXR_DIM = 6, 5
MAP_SHAPE = (4, 2, 2)


def _signal(store) -> np.ndarray:
    """A per-stay score mixing the labels of every task (so each task has some signal)."""
    y = store.labels("mortality").astype(np.float32)
    y += store.labels("phenotype")[:, :3].sum(axis=1) / 3.0
    y += np.clip(store.labels("los"), 0, None) / 6.0
    return y


def _write(store, modality, encoder_id, dim, values_for_fold, present, per_fold=False):
    writer = store.create_embedding(modality, encoder_id, dim, per_fold=per_fold,
                                    attrs={"weights": None, "preprocessing": "test fixture"})
    for r in range(writer.n_regions):
        sl = writer.region(r)
        if per_fold:
            for fold in range(store.n_folds):
                writer.write(r, values_for_fold(fold)[sl], present[sl], fold=fold)
        else:
            writer.write(r, values_for_fold(None)[sl], present[sl])
    writer.finish()


def make_fusion_store(path, *, n_stays: int = 60, image_size: int = 16, n_folds: int = 3,
                      seed: int = 0, embeddings: bool = True, maps: bool = True):
    """Write a tiny store (with fake embeddings unless ``embeddings`` is False, with the spatial
    map unless ``maps`` is False) and open it."""
    write_store(path, random_content(n_stays=n_stays, n_folds=n_folds, window=8, n_features=4,
                                     image_size=image_size, seed=seed))
    store = open_store(path)
    if not embeddings:
        return store
    rng = np.random.default_rng(seed + 1)
    n = store.n_stays
    signal = _signal(store)[:, None]
    ehr = (rng.normal(size=(n, EHR_DIM)) + signal * rng.normal(size=(1, EHR_DIM))).astype(np.float32)
    cxr = (rng.normal(size=(n, CXR_DIM)) + signal * rng.normal(size=(1, CXR_DIM))).astype(np.float32)
    present = store.cxr_present
    cxr[~present] = np.nan
    _write(store, "ehr", EHR_ID, EHR_DIM, lambda fold: ehr, np.ones(n, dtype=bool))
    _write(store, "ehr", EHR_PERFOLD_ID, EHR_DIM, lambda fold: ehr + fold, np.ones(n, dtype=bool),
           per_fold=True)
    _write(store, "cxr", CXR_ID, CXR_DIM, lambda fold: cxr, present)
    if not maps:
        return open_store(path)
    maps = (rng.normal(size=(n, *MAP_SHAPE)) + signal[:, :, None, None]).astype(np.float16)
    maps[~present] = np.nan
    writer = store.create_embedding("cxr", CXR_MAP_ID, MAP_SHAPE[0], map_shape=MAP_SHAPE,
                                    attrs={"weights": None, "preprocessing": "test fixture"})
    for r in range(writer.n_regions):
        sl = writer.region(r)
        pooled = maps[sl].astype(np.float32).mean(axis=(2, 3))
        writer.write(r, pooled, present[sl], spatial=maps[sl])
    writer.finish()
    return open_store(path)


def toy_map(present, generator) -> "torch.Tensor":
    """Random spatial maps ``[n, *MAP_SHAPE]`` for a hand-made batch, NaN where ``present`` is False."""
    import torch

    maps = torch.randn(len(present), *MAP_SHAPE, generator=generator)
    return torch.where(torch.as_tensor(present)[:, None, None, None], maps, torch.nan)


#: Module specification matching the tiny stores (4 EHR features, 8 hours, 16 px images), for
#: method tests that build a module without data and feed it hand-made batches.
TOY_SPEC = {"task": "mortality", "n_outputs": 1, "n_features": 4, "window_hours": 8,
            "image_size": 16, "ehr_dim": EHR_DIM, "cxr_dim": CXR_DIM,
            "cxr_map_shape": list(MAP_SHAPE)}


def toy_module(cls, features: str, seed: int = 0, **params):
    """The module of method class ``cls`` for ``features``: its test hyperparameters updated by
    ``params``, built from :data:`TOY_SPEC` after seeding torch with ``seed``."""
    import torch

    method = cls(features=features, **{**cls.test_hyperparameters, **params})
    torch.manual_seed(seed)
    return method.build_module({**TOY_SPEC, "features": features})
