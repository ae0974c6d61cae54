"""Shared helpers of the missing-modality method tests: tiny data, a built module, batches.

``tiny_data(tmp, mode)`` loads mortality from a tiny fusion store; ``module_for(name, data)``
builds the method's untrained module for that data, with the method's test hyperparameters;
``batch_of(data, part, rows)`` returns rows of a part as one batch.
"""

from __future__ import annotations

import numpy as np
import torch

from fusion.data import load_fusion_data
from fusion.registry import get_method
from fusion.trainer import PartBatches, fit_process_state
from fusion_store import EHR_ID, make_fusion_store


def tiny_store(path, n_stays=60):
    return make_fusion_store(path, n_stays=n_stays)


def tiny_data(store, mode, task="mortality", **kwargs):
    return load_fusion_data(store, task, 0, features=mode, ehr_encoder=EHR_ID, **kwargs)


def method_for(name, data, **params):
    cls = get_method(name)
    return cls(seed=0, features=data.features, **{**cls.test_hyperparameters, **params})


def module_for(name, data, seed=0, **params):
    """The untrained module of method ``name`` for ``data`` (built with a seeded generator)."""
    method = method_for(name, data, **params)
    with fit_process_state(seed, torch.device("cpu"), 1):
        return method.build_module(method._spec(data))


def source_of(data, part, name):
    return PartBatches(data.part(part), get_method(name).inputs_for(data.features))


def batch_of(data, part, name, rows=None):
    source = source_of(data, part, name)
    rows = np.arange(len(source)) if rows is None else np.asarray(rows)
    return source[rows]


def mixed_test_batch(data, name):
    """The test part of ``data`` as one batch for method ``name``, and its X-ray present flags
    (the tiny store's test part mixes stays with and without an X-ray)."""
    batch = batch_of(data, "test", name)
    present = batch["cxr_present"].numpy()
    assert present.any() and not present.all()
    return batch, present


def assert_batch_independent(module, batch, seed=0):
    """Each stay's logits are the same in the whole batch, in a shuffled batch and alone."""
    n = batch["y"].shape[0]
    order = np.random.default_rng(seed).permutation(n)
    with torch.no_grad():
        whole = module(batch)["logits"]
        shuffled = module(with_rows(batch, order))["logits"]
        alone = torch.cat([module(with_rows(batch, [i]))["logits"] for i in range(n)])
    torch.testing.assert_close(shuffled, whole[order])
    torch.testing.assert_close(alone, whole)


def with_rows(batch, rows):
    """Rows ``rows`` of a batch (a dict of tensors) as a new batch."""
    index = torch.as_tensor(np.asarray(rows), dtype=torch.long)
    return {k: v[index] for k, v in batch.items()}


def randomise_xray(batch, rows, seed=0):
    """A copy of ``batch`` whose X-ray inputs (image or embedding) at ``rows`` are random noise."""
    generator = torch.Generator().manual_seed(seed)
    out = {k: v.clone() for k, v in batch.items()}
    index = torch.as_tensor(np.asarray(rows), dtype=torch.long)
    for key in ("cxr", "cxr_emb"):
        if key in out:
            shape = out[key][index].shape
            out[key][index] = torch.randn(shape, generator=generator) * (
                500.0 if key == "cxr" else 3.0)
    return out


def hide_all_xrays(batch):
    """A copy of ``batch`` in which no stay has an X-ray (zero image, NaN embedding)."""
    out = {k: v.clone() for k, v in batch.items()}
    out["cxr_present"] = torch.zeros_like(out["cxr_present"])
    if "cxr" in out:
        out["cxr"].zero_()
    if "cxr_emb" in out:
        out["cxr_emb"].fill_(float("nan"))
    return out


def fit_and_hide(name, store, mode="cached", **params):
    """Fit ``name`` and predict the test part as loaded and with every X-ray hidden.

    Returns ``(prob, prob_hidden, present)`` where ``present`` marks the test stays with an X-ray.
    """
    data = tiny_data(store, mode)
    method = method_for(name, data, **params).fit(data, device="cpu")
    hidden = tiny_data(store, mode, cxr_missing_rate=1.0, missing_at=("test",))
    return (method.predict_proba(data, "test"), method.predict_proba(hidden, "test"),
            data.part("test").cxr_present)
