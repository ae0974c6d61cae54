"""UMSE: observed-cell triplets, the per-stay bottleneck skip, the L >= 2 guard, dropped-cell counts."""

import numpy as np
import pytest
import torch

from fusion.data import load_fusion_data
from fusion.methods import umse
from fusion.methods.umse import UMSE, observed_triplets
from fusion.registry import HyperparameterError
from support import make_fusion_store, toy_map, toy_module

torch.set_num_threads(1)

def _module(features="raw", seed=0, **params):
    return toy_module(UMSE, features, seed, **params)


def _batch(features, present, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = len(present)
    present = torch.tensor(present)
    batch = {"cxr_present": present, "y": torch.randint(0, 2, (n, 1), generator=g).float(),
             "cxr_hours": torch.where(present, torch.rand(n, generator=g) * 10, torch.nan),
             "ehr_mask": (torch.rand(n, 8, 4, generator=g) > 0.6).float(),
             "ehr": torch.randn(n, 8, 4, generator=g)}  # both modes read the hourly cells
    if features == "cached":
        batch["cxr_map"] = toy_map(present, g)
    else:
        batch["cxr"] = torch.randn(n, 1, 16, 16, generator=g) * 500 * present[:, None, None, None]
    return batch


def _key(features):
    return "cxr_map" if features == "cached" else "cxr"


def test_triplets_are_exactly_the_observed_cells():
    batch = _batch("raw", [True, False, True])
    values = torch.where(batch["ehr_mask"] > 0, batch["ehr"], torch.tensor(999.0))  # sentinel
    cells = observed_triplets(values, batch["ehr_mask"])
    assert cells["valid"].sum() == batch["ehr_mask"].sum()
    assert cells["valid"].sum(dim=1).tolist() == batch["ehr_mask"].sum(dim=(1, 2)).int().tolist()
    assert not (cells["value"][cells["valid"]] == 999.0).any(), "an imputed value entered"
    assert cells["dropped"].sum() == 0
    for b in range(3):
        for k in torch.nonzero(cells["valid"][b]).squeeze(1):
            hour = int(cells["time"][b, k]) + 8
            j = int(cells["feature"][b, k])
            assert batch["ehr_mask"][b, hour, j] == 1
            assert cells["value"][b, k] == values[b, hour, j]


def test_a_cap_keeps_the_latest_cells_and_counts_the_dropped_ones():
    mask = torch.zeros(1, 4, 2)
    mask[0, [0, 1, 3], 0] = 1
    mask[0, 2, 1] = 1                                   # observed at hours 0, 1, 2, 3
    cells = observed_triplets(torch.arange(8.0).view(1, 4, 2), mask, max_cells=2)
    assert cells["dropped"].tolist() == [2]
    assert sorted(cells["time"][0].tolist()) == [-2.0, -1.0]  # hours 2 and 3 of a 4-hour window


@pytest.mark.parametrize("features", ["raw", "cached"])
def test_bottlenecks_skip_the_xray_stream_of_stays_without_a_film(features):
    module = _module(features, n_layers=3).eval()
    batch = _batch(features, [True, False, True, False])
    out = module(batch)
    assert len(out["bottleneck_trace"]) == 2  # the last layer's X-ray stream is never read
    absent = ~batch["cxr_present"]
    for step in out["bottleneck_trace"]:
        torch.testing.assert_close(step["z"][absent], step["z_ehr"][absent], rtol=0, atol=0)
        rows = step["rows"]
        torch.testing.assert_close(step["z"][rows], (step["z_ehr"][rows] + step["z_cxr"]) / 2)
    key = _key(features)
    noisy = dict(batch, **{key: batch[key].clone(), "cxr_hours": batch["cxr_hours"].clone()})
    noisy[key][absent] = 1e3 * torch.randn_like(noisy[key][absent])
    noisy["cxr_hours"][absent] = 5.0
    torch.testing.assert_close(module(noisy)["logits"][absent], out["logits"][absent], rtol=0, atol=0)
    shifted = dict(batch, **{key: batch[key].clone()})
    # not a constant shift: the map's cells are layer-normalised
    shifted[key][0] = shifted[key][0] + torch.randn_like(shifted[key][0]) * (
        3000.0 if features == "raw" else 3.0)
    assert (module(shifted)["logits"][0] - out["logits"][0]).abs().max() > 1e-6
    later = dict(batch, cxr_hours=batch["cxr_hours"].clone())
    later["cxr_hours"][2] += 20.0
    assert (module(later)["logits"][2] - out["logits"][2]).abs().max() > 1e-6


def test_cached_mode_reads_the_observed_cells_and_never_an_imputed_value():
    module = _module("cached").eval()
    batch = _batch("cached", [True, False, True])
    out = module(batch)
    observed = batch["ehr_mask"] > 0
    assert out["n_cells"].tolist() == observed.sum(dim=(1, 2)).tolist()
    assert out["dropped_cells"].sum() == 0
    imputed = dict(batch, ehr=torch.where(observed, batch["ehr"], torch.tensor(999.0)))
    torch.testing.assert_close(module(imputed)["logits"], out["logits"], rtol=0, atol=0)
    moved = dict(batch, ehr=batch["ehr"].clone())
    b, t, f = torch.nonzero(observed)[0].tolist()
    moved["ehr"][b, t, f] += 2.0
    assert (module(moved)["logits"][b] - out["logits"][b]).abs().max() > 1e-6
    capped = toy_module(UMSE, "cached", 0, max_cells=3).eval()(batch)
    assert capped["n_cells"].tolist() == observed.sum(dim=(1, 2)).clamp(max=3).tolist()
    assert capped["dropped_cells"].tolist() == (observed.sum(dim=(1, 2)) - 3).clamp(min=0).tolist()


def test_the_time_of_an_observation_matters():
    module = _module().eval()
    batch = _batch("raw", [False, False])
    out = module(batch)["logits"]
    moved = dict(batch, ehr=batch["ehr"].clone(), ehr_mask=batch["ehr_mask"].clone())
    moved["ehr_mask"][0, :, 0] = 0
    moved["ehr_mask"][0, 2, 0] = 1
    moved["ehr"][0, 2, 0] = 0.5
    later = dict(moved, ehr=moved["ehr"].clone(), ehr_mask=moved["ehr_mask"].clone())
    later["ehr_mask"][0, 2, 0], later["ehr_mask"][0, 6, 0] = 0, 1
    later["ehr"][0, 6, 0] = 0.5
    a, b = module(moved)["logits"], module(later)["logits"]
    assert (a[0] - b[0]).abs().max() > 1e-6
    torch.testing.assert_close(a[1], out[1])


def _read_triplets_changed(monkeypatch, permute: bool, extra: int):
    """Make the module read its triplets with the columns permuted (one permutation for all rows)
    and/or ``extra`` padding columns of arbitrary content appended."""
    original = umse.observed_triplets
    generator = torch.Generator().manual_seed(5)

    def triplets(values, mask, max_cells=0):
        cells = original(values, mask, max_cells)
        columns = {k: v for k, v in cells.items() if k != "dropped"}
        b, length = cells["valid"].shape
        if permute:
            index = torch.randperm(length, generator=generator)
            columns = {k: v[:, index] for k, v in columns.items()}
        pad = {"time": -8 * torch.rand(b, extra, generator=generator),
               "feature": torch.randint(0, 4, (b, extra), generator=generator),
               "value": 1e3 * torch.randn(b, extra, generator=generator),
               "valid": torch.zeros(b, extra, dtype=torch.bool)}
        columns = {k: torch.cat([v, pad[k].to(v.dtype)], dim=1) for k, v in columns.items()}
        return {**columns, "dropped": cells["dropped"]}
    monkeypatch.setattr(umse, "observed_triplets", triplets)


@pytest.mark.parametrize("permute,extra", [(True, 0), (False, 5), (True, 5)])
def test_the_ehr_cells_are_a_set(monkeypatch, permute, extra):
    module = _module().eval()
    batch = _batch("raw", [True, False, True, False])
    with torch.no_grad():
        out = module(batch)["logits"]
        _read_triplets_changed(monkeypatch, permute, extra)
        again = module(batch)
    assert again["n_cells"].tolist() == batch["ehr_mask"].sum(dim=(1, 2)).int().tolist()
    torch.testing.assert_close(again["logits"], out)


def test_ehr_and_xray_times_share_one_embedding_module():
    module = _module().eval()
    batch = _batch("raw", [True, False])
    batch["ehr_mask"][0, 5, 2] = 1.0   # hour 5 of 8: time 5 - 8 = -3
    batch["cxr_hours"][0] = 3.0        # the film 3 hours before the prediction time: -3
    times = observed_triplets(batch["ehr"], batch["ehr_mask"])["time"]
    calls = []
    hooks = [m.register_forward_hook(lambda m, i, o: calls.append((m, i[0] if i else None, o)))
             for m in module.modules() if m is not module]
    with torch.no_grad():
        module(batch)
    for hook in hooks:
        hook.remove()

    def embedder(expected):
        (found,) = [(m, o) for m, x, o in calls
                    if isinstance(x, torch.Tensor) and x.shape == expected.shape
                    and torch.equal(x, expected)]
        return found
    ehr_module, ehr_out = embedder(times)
    cxr_module, cxr_out = embedder(-batch["cxr_hours"][:1])
    assert ehr_module is cxr_module
    k = int(torch.nonzero(times[0] == -3.0)[0])
    torch.testing.assert_close(cxr_out[0], ehr_out[0, k])


def test_mixed_batch_equals_single_stay_runs_and_no_films_give_finite_output():
    module = _module().eval()
    batch = _batch("raw", [True, False, True, False, True])
    out = module(batch)["logits"]
    for i in range(5):  # alone, each stay has less padding than in the batch
        one = {k: v[i:i + 1] for k, v in batch.items()}
        torch.testing.assert_close(module(one)["logits"], out[i:i + 1], rtol=1e-5, atol=1e-5)
    module.train()
    none = module(_batch("raw", [False, False, False]))
    assert torch.isfinite(none["logits"]).all() and none["bottleneck_trace"] == []


def test_one_layer_is_refused():
    with pytest.raises(HyperparameterError, match="n_layers must be >= 2"):
        _module(n_layers=1)
    with pytest.raises(HyperparameterError, match="max_cells"):
        _module(max_cells=-1)


@pytest.mark.parametrize("features", ["raw", "cached"])
def test_fit_records_dropped_cells_and_hiding_xrays_changes_stays_with_one(tmp_path, features):
    store = make_fusion_store(tmp_path / "s.zarr", n_stays=60)
    inputs = UMSE.inputs_for(features)
    data = load_fusion_data(store, "mortality", 0, features=features, inputs=inputs)
    masked = load_fusion_data(store, "mortality", 0, features=features, inputs=inputs,
                              cxr_missing_rate=1.0, missing_at=("test",))
    cap = 3
    method = UMSE(features=features, **{**UMSE.test_hyperparameters, "max_cells": cap}).fit(
        data, device="cpu")
    for part, key in (("train", "umse_dropped_cells_train"), ("val", "umse_dropped_cells_val")):
        counts = data.part(part).ehr_mask.sum(axis=(1, 2))
        expected = np.clip(counts - cap, 0, None).sum()
        assert expected > 0
        assert all(epoch[key] == expected for epoch in method.history_["epochs"])
        kept = np.minimum(counts, cap).sum()
        assert all(epoch[key.replace("dropped_", "")] == kept for epoch in method.history_["epochs"])
    had = data.part("test").cxr_present
    before = method.predict_proba(data, "test")
    after = method.predict_proba(masked, "test")
    assert np.abs(before[had] - after[had]).min() > 0
    np.testing.assert_array_equal(before[~had], after[~had])
