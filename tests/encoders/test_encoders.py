"""Encoders: registry, weights resolution and safe loading, CXR models, EHR statistics and LSTM."""

from __future__ import annotations

import hashlib
import pathlib

import numpy as np
import pytest
import torch

from encoders import weights as W
from encoders.errors import EncodingInputError, UnknownEncoderError, WeightsError, WeightsNotFoundError
from encoders.registry import ENCODERS, get_encoder


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _films(n=3, size=32, seed=0):
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.integers(0, 256, (n, size, size), dtype=np.uint8))


# ------------------------------------------------------------------------------------ registry

def test_registry_lists_every_encoder_with_its_contract():
    expected = {"densenet121-res224-all", "densenet121-res224-chex", "densenet121-res224-mimic_ch",
                "densenet121-res224-mimic_nb", "resnet-ae-101-elastic", "resnet50-imagenet",
                "ehr-stats", "ehr-lstm"}
    assert expected <= set(ENCODERS)
    for name, spec in ENCODERS.items():
        assert spec.name == name and spec.modality in ("cxr", "ehr") and callable(spec.factory)
    assert get_encoder("ehr-lstm").per_fold and not get_encoder("ehr-stats").per_fold
    assert get_encoder("densenet121-res224-chex").dim == 1024
    assert get_encoder("resnet50-imagenet").dim == 2048
    assert get_encoder("resnet-ae-101-elastic").dim == 4608
    # MIMIC-trained weights carry the leakage caveat, CheXpert ones do not
    assert "MIMIC-CXR" in get_encoder("densenet121-res224-mimic_ch").leakage_note
    assert get_encoder("densenet121-res224-chex").leakage_note == ""


def test_unknown_encoder_lists_valid_names():
    with pytest.raises(UnknownEncoderError) as err:
        get_encoder("densenet999")
    assert "densenet999" in str(err.value) and "ehr-stats" in str(err.value)
    assert "densenet121-res224-chex" in str(err.value)


def test_encoder_id_marks_non_default_weights():
    dn = get_encoder("densenet121-res224-chex")
    assert dn.encoder_id(None) == dn.encoder_id("densenet121-res224-chex") == "densenet121-res224-chex"
    assert dn.encoder_id("random") == "densenet121-res224-chex-random"
    assert get_encoder("resnet50-imagenet").encoder_id("IMAGENET1K_V2") == "resnet50-imagenet-imagenet1k-v2"
    with pytest.raises(WeightsError, match="densenet121-res224-all"):
        dn.check_weights("densenet121-res224-all")
    with pytest.raises(WeightsError, match="no pretrained weights"):
        get_encoder("ehr-stats").check_weights("random")


# ------------------------------------------------------------------------------------- weights

def test_weights_source_comes_from_library_metadata():
    import torchvision
    import torchxrayvision as xrv

    src = W.weights_source("densenet121-res224-chex")
    assert src.url == xrv.models.model_urls["densenet121-res224-chex"]["weights_url"]
    assert src.filename == src.url.rsplit("/", 1)[1] and src.file_format == W.FORMAT_XRV_DENSENET
    assert W.weights_source("101-elastic").url == xrv.autoencoders.model_urls["101-elastic"]["weights_url"]
    assert W.weights_source("IMAGENET1K_V1").url == torchvision.models.ResNet50_Weights.IMAGENET1K_V1.url
    with pytest.raises(WeightsError, match="valid names"):
        W.weights_source("densenet121-res224-nope")


def test_missing_weights_file_names_file_dirs_and_url(tmp_path, no_library_cache):
    mine = tmp_path / "mine"
    mine.mkdir()
    src = W.weights_source("densenet121-res224-chex")
    with pytest.raises(WeightsNotFoundError) as err:
        W.resolve_weights_file("densenet121-res224-chex", mine)
    msg = str(err.value)
    assert src.filename in msg and src.url in msg
    assert str(mine) in msg and str(no_library_cache) in msg and W.WEIGHTS_DIR_ENV in msg


def test_weights_dir_then_env_var_then_cache(tmp_path, no_library_cache, monkeypatch):
    name = "densenet121-res224-chex"
    filename = W.weights_source(name).filename
    env_dir, arg_dir = tmp_path / "env", tmp_path / "arg"
    env_dir.mkdir()
    arg_dir.mkdir()
    (no_library_cache / filename).write_bytes(b"cache")
    assert W.resolve_weights_file(name) == no_library_cache / filename
    (env_dir / filename).write_bytes(b"env")
    monkeypatch.setenv(W.WEIGHTS_DIR_ENV, str(env_dir))
    assert W.resolve_weights_file(name) == env_dir / filename
    (arg_dir / filename).write_bytes(b"arg")
    assert W.resolve_weights_file(name, arg_dir) == arg_dir / filename


def _write_densenet_module_file(folder: pathlib.Path, seed: int = 7) -> tuple[pathlib.Path, dict]:
    """The official format: a pickled whole xrv DenseNet module (install_notes §2)."""
    import torchxrayvision as xrv

    torch.manual_seed(seed)
    module = xrv.models.DenseNet(weights=None, num_classes=18)
    path = folder / W.weights_source("densenet121-res224-chex").filename
    torch.save(module, path)
    return path, module.state_dict()


def test_densenet_named_weights_load_offline_from_pickled_module(tmp_path, no_library_cache):
    from encoders.cxr import build_densenet

    path, state = _write_densenet_module_file(tmp_path)
    enc = build_densenet("chex", weights_dir=tmp_path, input_size=32)
    assert enc.weights == "densenet121-res224-chex" and enc.seed is None
    assert enc.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    loaded = enc.module.state_dict()
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    assert enc.targets and "Effusion" in enc.targets


def test_densenet_named_weights_accept_a_state_dict_file(tmp_path, no_library_cache):
    import torchxrayvision as xrv

    from encoders.cxr import build_densenet

    torch.manual_seed(3)
    state = xrv.models.DenseNet(weights=None).state_dict()
    torch.save(state, tmp_path / W.weights_source("densenet121-res224-chex").filename)
    enc = build_densenet("chex", weights_dir=tmp_path, input_size=32)
    assert torch.equal(enc.module.state_dict()["features.conv0.weight"], state["features.conv0.weight"])


class _Exploit:
    """Unpickling this would run a shell command (what the safe loader must refuse)."""

    def __reduce__(self):
        import os

        return (os.system, (f"touch {_Exploit.marker}",))


def test_safe_loader_refuses_arbitrary_pickles(tmp_path, no_library_cache):
    _Exploit.marker = tmp_path / "pwned"
    path = tmp_path / W.weights_source("densenet121-res224-chex").filename
    torch.save({"state_dict": _Exploit()}, path)
    with pytest.raises(WeightsError, match="refused by the safe loader"):
        W.load_state_dict(path, W.FORMAT_XRV_DENSENET)
    assert not _Exploit.marker.exists()


def test_weights_of_the_wrong_model_name_the_file(tmp_path, no_library_cache):
    from encoders.cxr import build_densenet

    path = tmp_path / W.weights_source("densenet121-res224-chex").filename
    torch.save({"conv.weight": torch.zeros(3)}, path)
    with pytest.raises(WeightsError, match="do not fit") as err:
        build_densenet("chex", weights_dir=tmp_path)
    assert str(path) in str(err.value)


def test_resnet50_imagenet_weights_sum_conv1_over_rgb(tmp_path, no_library_cache):
    import torchvision

    from encoders.cxr import build_resnet50_imagenet

    torch.manual_seed(5)
    state = torchvision.models.resnet50(weights=None).state_dict()
    torch.save(state, tmp_path / W.weights_source("IMAGENET1K_V1").filename)
    enc = build_resnet50_imagenet(weights_dir=tmp_path, input_size=32)
    conv1 = enc.module.resnet.conv1.weight
    assert conv1.shape == (64, 1, 7, 7)
    assert torch.equal(conv1, state["conv1.weight"].sum(dim=1, keepdim=True))
    assert torch.equal(enc.module.resnet.layer4[2].conv3.weight, state["layer4.2.conv3.weight"])
    assert enc(_films(2)).shape == (2, 2048)


# ---------------------------------------------------------------------------------------- CXR

@pytest.mark.parametrize("name, dim", [("densenet121-res224-chex", 1024), ("resnet50-imagenet", 2048),
                                       ("resnet-ae-101-elastic", 512)])
def test_cxr_encoders_build_with_random_weights(name, dim):
    spec = get_encoder(name)
    enc = spec.factory(None, weights="random", input_size=32, seed=0)
    out = enc(_films(3))
    assert out.shape == (3, dim) and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert enc.dim == dim and enc.weights == "random" and enc.weights_sha256 is None and enc.seed == 0
    prov = enc.provenance()
    assert prov["input_resolution"] == 32 and prov["preprocessing"]["channels"] == 1


def test_resnet_ae_latent_is_4608_at_native_resolution():
    from encoders.cxr import build_resnet_ae

    enc = build_resnet_ae("random")
    assert enc.input_size == 224 and enc.dim == 4608
    assert enc(_films(1, size=224)).shape == (1, 4608)


def test_cxr_random_weights_are_seeded():
    from encoders.cxr import build_densenet

    films = _films(2)
    a = build_densenet("chex", "random", input_size=32, seed=1)(films)
    b = build_densenet("chex", "random", input_size=32, seed=1)(films)
    c = build_densenet("chex", "random", input_size=32, seed=2)(films)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_densenet_embedding_is_xrv_features2():
    import torchxrayvision as xrv

    from encoders.cxr import build_densenet

    enc = build_densenet("chex", "random", input_size=32, seed=4)
    torch.manual_seed(4)
    reference = xrv.models.DenseNet(weights=None).eval()
    films = _films(3)
    x = torch.from_numpy(np.stack([xrv.utils.normalize(f, 255) for f in films.numpy()]))[:, None]
    with torch.inference_mode():
        assert torch.equal(enc(films), reference.features2(x))


def test_preprocess_scales_to_xrv_range_and_resizes():
    import torch.nn.functional as F
    import torchxrayvision as xrv

    from encoders.cxr import build_densenet

    enc = build_densenet("chex", "random", input_size=32)
    films = _films(2, size=40)
    x = enc.preprocess(films)
    assert x.shape == (2, 1, 32, 32)
    native = torch.from_numpy(np.stack([xrv.utils.normalize(f, 255) for f in films.numpy()]))[:, None]
    assert torch.equal(x, F.interpolate(native, size=(32, 32), mode="bilinear", antialias=True))
    assert float(enc.preprocess(torch.zeros(1, 32, 32, dtype=torch.uint8)).min()) == -1024.0
    assert float(enc.preprocess(torch.full((1, 32, 32), 255, dtype=torch.uint8)).max()) == 1024.0
    with pytest.raises(EncodingInputError, match="square"):
        enc.preprocess(torch.zeros(1, 32, 30, dtype=torch.uint8))


# ------------------------------------------------------------------------------------ ehr-stats

def test_ehr_stats_hand_computed():
    from encoders.ehr_stats import INDICATORS, STATISTICS, EhrStatsEncoder

    nan = np.nan
    enc = EhrStatsEncoder(["hr", "na"], window_hours=4)
    # one stay: hr observed at hours 0, 1, 3; na never observed
    values = np.array([[[80, nan], [82, nan], [nan, nan], [86, nan]]], dtype=np.float32)
    out = enc(values)
    names = enc.dim_names
    assert out.shape == (1, enc.dim) == (1, len(names)) and out.dtype == np.float32
    assert enc.dim == 2 * (4 * len(STATISTICS) + len(INDICATORS))
    got = dict(zip(names, out[0]))
    assert got["hr__all__mean"] == pytest.approx(248 / 3)
    assert got["hr__all__min"] == 80 and got["hr__all__max"] == 86
    assert got["hr__all__std"] == pytest.approx(np.std([80, 82, 86]))
    assert got["hr__all__first"] == 80 and got["hr__all__last"] == 86
    assert got["hr__all__slope"] == pytest.approx(np.polyfit([0, 1, 3], [80, 82, 86], 1)[0])
    assert got["hr__all__frac_observed"] == pytest.approx(0.75)
    assert got["hr__observed_any"] == 1.0 and got["hr__hours_since_last"] == 0.0
    # na: every statistic NaN, fraction 0, indicator 0, hours since last NaN
    na_stats = [v for k, v in got.items() if k.startswith("na__") and "frac_observed" not in k
                and "observed_any" not in k]
    assert np.isnan(na_stats).all()
    assert got["na__all__frac_observed"] == 0.0 and got["na__observed_any"] == 0.0


def test_ehr_stats_sub_windows_clip_to_the_window_and_single_observation():
    from encoders.ehr_stats import EhrStatsEncoder

    nan = np.nan
    enc = EhrStatsEncoder(["x"], window_hours=30)
    values = np.full((1, 30, 1), nan, dtype=np.float32)
    values[0, 2, 0] = 5.0            # only in first24h, not in last24h (hours 6..29)
    got = dict(zip(enc.dim_names, enc(values)[0]))
    assert got["x__first24h__mean"] == 5.0 and got["x__first24h__std"] == 0.0
    assert np.isnan(got["x__first24h__slope"])            # one observation: no slope
    assert np.isnan(got["x__last24h__mean"]) and got["x__last24h__frac_observed"] == 0.0
    assert got["x__hours_since_last"] == 27.0
    assert got["x__first24h__frac_observed"] == pytest.approx(1 / 24)


def test_ehr_stats_is_deterministic_and_checks_shape():
    from encoders.ehr_stats import EhrStatsEncoder

    rng = np.random.default_rng(0)
    values = np.where(rng.random((5, 48, 3)) < 0.3, rng.normal(size=(5, 48, 3)), np.nan).astype(np.float32)
    enc = EhrStatsEncoder(["a", "b", "c"], 48)
    assert enc(values).tobytes() == enc(values.copy()).tobytes()
    with pytest.raises(ValueError, match="expects values shaped"):
        enc(values[:, :24])


# ------------------------------------------------------------------------------------- ehr-lstm

def _stats(values):
    from cbstore.format.stats import training_stats

    return training_stats(values, np.ones(len(values), dtype=bool))


def test_ehr_lstm_fit_transform_shapes_and_determinism():
    from encoders.ehr_seq import EhrLstmEncoder, LstmConfig

    rng = np.random.default_rng(1)
    raw = np.where(rng.random((24, 12, 3)) < 0.5, rng.normal(50, 10, (24, 12, 3)), np.nan).astype(np.float32)
    stats, normalize = _stats(raw[:16]), np.ones(3, dtype=bool)
    config = LstmConfig(hidden=8, epochs=2, batch_size=8, seed=3)
    a = EhrLstmEncoder(3, 12, config).fit(raw[:16], raw[16:20], stats, normalize)
    b = EhrLstmEncoder(3, 12, config).fit(raw[:16], raw[16:20], stats, normalize)
    pooled, seq = a.transform(raw)
    assert pooled.shape == (24, 8) and seq.shape == (24, 12, 8) and np.isfinite(seq).all()
    assert np.array_equal(pooled, seq[:, -1])
    assert pooled.tobytes() == b.transform(raw)[0].tobytes()
    assert len(a.history_["train_loss"]) == 2 and a.history_["n_train"] == 16 and a.history_["n_val"] == 4
    c = EhrLstmEncoder(3, 12, LstmConfig(hidden=8, epochs=2, batch_size=8, seed=4))
    assert c.fit(raw[:16], raw[16:20], stats, normalize).transform(raw)[0].tobytes() != pooled.tobytes()


def test_ehr_lstm_learns_to_forecast():
    from encoders.ehr_seq import EhrLstmEncoder, LstmConfig

    rng = np.random.default_rng(2)
    t = np.arange(16)
    raw = (100 + 10 * np.sin(t[None, :, None] / 3 + rng.uniform(0, 6, (64, 1, 2)))).astype(np.float32)
    enc = EhrLstmEncoder(2, 16, LstmConfig(hidden=16, epochs=8, patience=8, batch_size=16, lr=1e-2))
    enc.fit(raw[:48], raw[48:], _stats(raw[:48]), np.ones(2, dtype=bool))
    assert enc.history_["val_loss"][-1] < 0.5 * enc.history_["val_loss"][0]
