"""Cached spatial maps: the encoders, the store format (1.1), validation and the read path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr

from cbstore.errors import EmbeddingError, InputsError
from cbstore.format.schema import FORMAT_VERSION
from cbstore.inputs.dataset import tensor_batch
from cbstore.inputs.reader import read_inputs, resolve_encoder
from cbstore.store.reader import open_store
from cbstore.store.validate import validate_store
from cbstore.store.writer import write_store
from cbstore.testing import random_content
from encoders.cxr import build_densenet, build_resnet50_imagenet
from encoders.pass_ import run_encoding_pass
from encoders.registry import build_map_tail

FAST = dict(weights="random", input_size=32, region_stays=16, progress=False, threads=1)
DENSE = "densenet121-res224-all-block3"


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    torch.set_num_threads(1)
    path = tmp_path_factory.mktemp("maps") / "store.zarr"
    write_store(path, random_content(n_stays=30, image_size=32, seed=4))
    run_encoding_pass(path, DENSE, **FAST)
    run_encoding_pass(path, "resnet50-imagenet-layer3", **FAST)
    return path


def test_format_version_is_1_1():
    assert FORMAT_VERSION == "1.1.0"


def test_pass_writes_float16_maps_per_stay_nan_where_absent(store_path):
    store = open_store(store_path)
    present = store.cxr_present
    assert present.any() and not present.all()
    for encoder_id, shape in ((f"{DENSE}-random", (512, 1, 1)),
                              ("resnet50-imagenet-layer3-random", (1024, 2, 2))):
        grp = zarr.open_group(str(store_path), path=f"embeddings/cxr/{encoder_id}", mode="r")
        arr = grp["map"]
        assert arr.dtype == np.float16 and arr.shape == (store.n_stays, *shape)
        assert arr.chunks == (1, *shape)
        assert tuple(arr.metadata.dimension_names) == ("stay", "channel", "map_y", "map_x")
        maps = store.embedding_map("cxr", encoder_id)
        assert np.isfinite(maps[present]).all() and np.isnan(maps[~present]).all()
        values, _ = store.embedding("cxr", encoder_id)
        # values are the float32 average pool of the map before it was rounded to float16
        np.testing.assert_allclose(values[present], maps[present].astype(np.float32).mean(axis=(2, 3)),
                                   rtol=1e-2, atol=1e-2)
        entry = resolve_encoder(store, "cxr", encoder_id, "cxr_map")
        assert entry["map_shape"] == list(shape) and entry["map_stage"] in ("block3", "layer3")
        assert entry["encoder_name"] in (DENSE, "resnet50-imagenet-layer3")
    assert validate_store(store_path) == []


def test_map_equals_the_backbone_and_the_tail_completes_it(store_path):
    store = open_store(store_path)
    encoder = build_densenet("all", "random", input_size=32, map_stage="block3")
    reference = build_densenet("all", "random", input_size=32)
    pos = np.flatnonzero(store.cxr_present)[:3]
    x = encoder.preprocess(torch.from_numpy(store.images(pos)))
    stored = torch.from_numpy(store.embedding_map("cxr", f"{DENSE}-random", pos).astype(np.float32))
    with torch.no_grad():
        np.testing.assert_allclose(stored.numpy(), encoder.embed_map(x).numpy(), rtol=1e-2, atol=1e-2)
        attrs = resolve_encoder(store, "cxr", f"{DENSE}-random", "cxr_map")
        tail = build_map_tail(attrs).eval()
        pooled = tail(encoder.embed_map(x)).mean(dim=(2, 3))
        np.testing.assert_allclose(pooled.numpy(), reference.embed(x).numpy(), rtol=1e-4, atol=1e-4)
    res = build_resnet50_imagenet("random", input_size=32, map_stage="layer3")
    full = build_resnet50_imagenet("random", input_size=32)
    tail = build_map_tail(resolve_encoder(store, "cxr", "resnet50-imagenet-layer3-random",
                                          "cxr_map")).eval()
    assert tail.out_channels == 2048 and all(p.requires_grad for p in tail.parameters())
    with torch.no_grad():
        np.testing.assert_allclose(tail(res.embed_map(x)).mean(dim=(2, 3)).numpy(),
                                   full.embed(x).numpy(), rtol=1e-4, atol=1e-4)


def test_read_path_gives_float32_maps_and_a_batch_key(store_path):
    store = open_store(store_path)
    rows = np.arange(store.n_stays)
    hidden = np.zeros(store.n_stays, dtype=bool)
    hidden[np.flatnonzero(store.cxr_present)[0]] = True
    x = read_inputs(store, 0, rows, inputs={"cxr_map"}, cxr_map_encoder=f"{DENSE}-random",
                    cxr_hidden=hidden)
    assert x.cxr_map.dtype == np.float32 and x.cxr_map.shape == (len(rows), 512, 1, 1)
    assert np.isfinite(x.cxr_map[x.cxr_present]).all()
    assert np.isnan(x.cxr_map[~x.cxr_present]).all()  # absent and hidden films
    batch = tensor_batch(x, [0, 1, 2], {"cxr_map"})
    assert batch["cxr_map"].shape == (3, 512, 1, 1) and batch["cxr_map"].dtype == torch.float32


def test_missing_embedding_errors_name_the_encode_command(store_path, tmp_path):
    store = open_store(store_path)
    with pytest.raises(InputsError, match="several X-ray spatial-map embeddings"):
        read_inputs(store, 0, [0], inputs={"cxr_map"})
    with pytest.raises(InputsError, match=rf"`cbstore encode {store.path} --encoder "
                                          r"densenet121-res224-chex-block3 --weights random`"):
        resolve_encoder(store, "cxr", "densenet121-res224-chex-block3-random", "cxr_map")
    with pytest.raises(InputsError, match=rf"`cbstore encode {store.path} --encoder "
                                          r"resnet50-imagenet-layer3`"):
        resolve_encoder(store, "cxr", "resnet50-imagenet-layer3", "cxr_map")
    bare = tmp_path / "bare.zarr"
    write_store(bare, random_content(n_stays=12, image_size=16, seed=1))
    bare_store = open_store(bare)
    with pytest.raises(InputsError, match=rf"`cbstore encode {bare_store.path} --encoder {DENSE}`"):
        read_inputs(bare_store, 0, [0], inputs={"cxr_map"})
    with pytest.raises(InputsError, match=rf"`cbstore encode {bare_store.path} --encoder ehr-stats`"):
        read_inputs(bare_store, 0, [0], inputs={"ehr_emb"})
    run_encoding_pass(bare, "densenet121-res224-all", **FAST)
    with pytest.raises(InputsError, match="stores no spatial map.*-layer3 or -block3"):
        resolve_encoder(open_store(bare), "cxr", "densenet121-res224-all-random", "cxr_map")
    with pytest.raises(EmbeddingError, match="stores no spatial map"):
        open_store(bare).embedding_map("cxr", "densenet121-res224-all-random")


def test_validate_reports_a_map_of_the_wrong_shape(store_path, tmp_path):
    import shutil

    copy = tmp_path / "copy.zarr"
    shutil.copytree(store_path, copy)
    grp = zarr.open_group(str(copy), path=f"embeddings/cxr/{DENSE}-random", mode="r+")
    grp.attrs["map_shape"] = [512, 2, 2]
    problems = validate_store(copy)
    assert any("map: shape" in p and "expected" in p for p in problems), problems



@pytest.fixture(scope="module")
def store_without_map(tmp_path_factory):
    from support import make_fusion_store

    return make_fusion_store(tmp_path_factory.mktemp("nomap") / "s.zarr", n_stays=12, maps=False)


@pytest.mark.parametrize("method", ["healnet", "flexmoe", "umse", "shaspec", "mmtm", "daft"])
def test_a_cached_map_method_on_a_store_without_a_map_names_the_encode_command(
        method, store_without_map):
    from fusion.config import RunConfig
    from fusion.registry import get_method
    from fusion.runs import resolve
    from support import EHR_ID

    assert "cxr_map" in get_method(method).inputs_for("cached")
    store = store_without_map
    with pytest.raises(InputsError, match=rf"`cbstore encode {store.path} --encoder {DENSE}`"):
        resolve(RunConfig(store=str(store.path), method=method, ehr_encoder=EHR_ID), store)


@pytest.mark.parametrize("method", ["healnet", "flexmoe", "umse", "shaspec"])
def test_building_a_cached_map_method_without_a_map_names_the_encode_command(method):
    from fusion.registry import MethodStateError, get_method
    from support import TOY_SPEC

    cls = get_method(method)
    model = cls(features="cached", **cls.test_hyperparameters)
    with pytest.raises(MethodStateError, match=rf"reads the X-ray as a stored spatial map.*"
                                               rf"`cbstore encode STORE --encoder {DENSE}`"):
        model.build_module({**TOY_SPEC, "features": "cached", "cxr_map_shape": None})
