"""InfoReg: the prime-window test over epochs, dominance, the proximal pull of the dominant encoder
(inside the window only), the Fisher trace, head-slice logits and the absent-X-ray handling."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

from fusion.data import load_fusion_data
from fusion.methods.inforeg import (
    InfoReg, InfoRegNet, fisher_parameters, plan_regulation, prime_window_k)
from fusion.modules import build_encoder
from fusion.registry import HyperparameterError
from fusion.trainer import FitContext, PartBatches, Trainer
from support import EHR_ID, fit_interrupted_and_resumed, predict_with_xrays_hidden

torch.set_num_threads(1)
CACHED = {"ehr_emb", "cxr_emb"}
SCALES = {"ehr": 0.95, "cxr": 0.10}


@pytest.fixture(scope="module")
def data(store80):
    return load_fusion_data(store80, "mortality", 0, features="cached", ehr_encoder=EHR_ID)


def _net(data, **kwargs):
    torch.manual_seed(0)
    spec = {"ehr_dim": data.ehr_dim, "cxr_dim": data.cxr_dim}
    params = {"hidden": 8, "dropout": 0.0}
    return InfoRegNet(build_encoder("ehr", "ehr_emb", spec, params),
                      build_encoder("cxr", "cxr_emb", spec, params), data.n_outputs, "mortality",
                      **kwargs)


def test_the_window_test_over_epochs():
    assert prime_window_k([]) == 1.0  # epoch 0: on
    rising_then_flat = [1.0, 1.2, 1.3, 1.3, 1.2, 1.2, 1.1, 1.1, 1.0, 1.0]
    for epoch in range(1, 11):  # first ten epochs, a trace that does not collapse: on
        assert prime_window_k(rising_then_flat[:epoch]) > 0.05
    assert prime_window_k(rising_then_flat + [1.0]) < 0.05  # flat after ten epochs: off
    assert prime_window_k(rising_then_flat + [0.5]) < 0.05  # falling: off
    # on again only when up, over 10 epochs, by more than half its 10-epoch mean
    assert prime_window_k(rising_then_flat + [3.0]) > 0.05  # 3.0 - 1.0 > 0.5 * 1.34
    assert prime_window_k(rising_then_flat + [1.5]) < 0.05  # 1.5 - 1.0 < 0.5 * 1.19
    assert prime_window_k([0.0, 0.0]) == 0.0
    assert prime_window_k([1.0, 2.0], window=1) == pytest.approx(0.5)


def test_the_dominant_modality_is_regulated_and_swapping_scores_swaps_it():
    both_open = {"ehr": True, "cxr": True}
    modality, beta = plan_regulation({"ehr": 3.0, "cxr": 1.0}, both_open, SCALES)
    assert modality == "ehr" and beta == pytest.approx(0.95 * np.exp(np.tanh(2.0)))
    modality, beta = plan_regulation({"ehr": 1.0, "cxr": 3.0}, both_open, SCALES)
    assert modality == "cxr" and beta == pytest.approx(0.10 * np.exp(np.tanh(2.0)))
    assert plan_regulation({"ehr": 3.0, "cxr": 1.0}, {"ehr": False, "cxr": True}, SCALES) is None
    assert plan_regulation({"ehr": 3.0, "cxr": float("nan")}, both_open, SCALES) is None
    # the authors' code tests the first modality's window whichever dominates
    assert plan_regulation({"ehr": 1.0, "cxr": 3.0}, {"ehr": True, "cxr": False}, SCALES,
                           window_modality="ehr")[0] == "cxr"
    assert plan_regulation({"ehr": 1.0, "cxr": 3.0}, {"ehr": True, "cxr": False}, SCALES) is None


def test_the_fisher_trace_uses_weight_matrices_and_kernels_only():
    encoder = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.LazyLinear(3),
                            nn.LayerNorm(3))
    encoder(torch.zeros(2, 1, 5, 5))
    assert fisher_parameters(encoder) == ["0.weight", "3.weight"]
    lstm = nn.LSTM(3, 4)
    assert fisher_parameters(lstm) == ["weight_ih_l0", "weight_hh_l0"]


def _step(net, data, window_open, optimizer="sgd", shift=1.0):
    """Start an epoch, move the encoders away from the snapshot, then take one training step."""
    trainer = Trainer("mortality", lr=0.1, weight_decay=0.0, device="cpu")
    ctx = FitContext(trainer, net)
    net.optimizer_name = optimizer
    ctx.optimizers = [net.configure_optimizers(ctx)]
    net.train()
    net.on_train_epoch_start(ctx)
    net.window_open = dict(window_open)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in net.encoders.parameters():
            parameter.add_(shift * torch.randn(parameter.shape, generator=generator))
    batch = PartBatches(data.part("train"), CACHED)[list(range(32))]
    assert batch["cxr_present"].sum() >= 2
    net.training_step(batch, ctx)
    return net


def _distance(net, modality):
    return sum(float((p.detach() - net.reference[modality][n]).square().sum())
               for n, p in net.encoders[modality].named_parameters())


def _same(a, b, prefix):
    return all(torch.equal(p, dict(b.named_parameters())[n]) for n, p in a.named_parameters()
               if n.startswith(prefix))


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_inside_the_window_the_dominant_encoder_is_pulled_back_and_nothing_else_changes(
        data, optimizer):
    open_ = {"ehr": True, "cxr": True}
    regulated = _step(_net(data), data, open_, optimizer)
    free = _step(_net(data, scales={"ehr": 0.0, "cxr": 0.0}), data, open_, optimizer)
    pulled = [m for m in ("ehr", "cxr") if not _same(regulated, free, f"encoders.{m}")]
    assert len(pulled) == 1, "exactly the dominant encoder is regulated"
    (dominant,) = pulled
    other = "cxr" if dominant == "ehr" else "ehr"
    assert _distance(regulated, dominant) < _distance(free, dominant)
    assert _same(regulated, free, "head") and _same(regulated, free, f"encoders.{other}")
    # the Fisher sums include the regulation term (computed after it, as the authors' code)
    assert any(not torch.equal(regulated._fisher_sums[dominant][n], free._fisher_sums[dominant][n])
               for n in regulated._fisher_sums[dominant])
    assert regulated._regulated[dominant] == 1


def test_outside_the_window_the_update_is_the_unregulated_one(data):
    closed = _step(_net(data), data, {"ehr": False, "cxr": False})
    free = _step(_net(data, scales={"ehr": 0.0, "cxr": 0.0}), data, {"ehr": True, "cxr": True})
    assert _same(closed, free, "")
    assert closed._regulated == {"ehr": 0, "cxr": 0}


class Probe(InfoRegNet):
    """Records the parameters at each epoch end and the reference at each epoch start."""

    def on_train_epoch_start(self, ctx):
        super().on_train_epoch_start(ctx)
        self.starts = getattr(self, "starts", []) + [copy.deepcopy(self.reference)]

    def on_train_epoch_end(self, ctx):
        super().on_train_epoch_end(ctx)
        self.ends = getattr(self, "ends", []) + [
            {m: {n: p.detach().clone() for n, p in self.encoders[m].named_parameters()}
             for m in ("ehr", "cxr")}]


def test_the_reference_is_refreshed_at_each_epoch_start_and_the_window_is_counted_in_epochs(data):
    torch.manual_seed(0)
    spec = {"ehr_dim": data.ehr_dim, "cxr_dim": data.cxr_dim}
    params = {"hidden": 8, "dropout": 0.0}
    net = Probe(build_encoder("ehr", "ehr_emb", spec, params),
                build_encoder("cxr", "cxr_emb", spec, params), 1, "mortality", window_epochs=2)
    trainer = Trainer("mortality", lr=0.01, batch_size=16, max_epochs=3, seed=0, device="cpu",
                      num_threads=1)
    empty = PartBatches(data.part("val"), CACHED, rows=np.array([], dtype=np.int64))
    history = trainer.fit(net, PartBatches(data.part("train"), CACHED), empty)
    for epoch in (1, 2):
        for m in ("ehr", "cxr"):
            for name, value in net.ends[epoch - 1][m].items():
                assert torch.equal(net.starts[epoch][m][name], value)
    assert len(net.fisher["ehr"]) == 3 and all(v > 0 for v in net.fisher["ehr"])
    for record, epoch in zip(history["epochs"], range(3)):
        expected = prime_window_k(net.fisher["ehr"][:epoch], 2)
        assert record["inforeg_k_ehr"] == pytest.approx(expected)
    # the per-epoch history is saved with the weights
    fresh = _net(data, window_epochs=2)
    fresh.load_state_dict(net.state_dict())
    assert fresh.fisher == net.fisher
    assert torch.equal(fresh.cxr_mean, net.cxr_mean) and bool(net.cxr_mean.abs().sum() > 0)


def test_head_slices_add_up_and_absent_xrays_get_the_training_mean(data):
    net = _net(data).eval()
    with torch.no_grad():
        net.cxr_mean.copy_(torch.arange(8.0))
        batch = PartBatches(data.part("test"), CACHED)[list(range(len(data.part("test"))))]
        out = net(batch)
    torch.testing.assert_close(out["logits"], out["logits_ehr"] + out["logits_cxr"])
    absent = ~batch["cxr_present"]
    assert absent.any()
    expected = net.head.weight[:, 8:] @ torch.arange(8.0) + net.head.bias / 2
    torch.testing.assert_close(out["logits_cxr"][absent],
                               expected.detach().expand(int(absent.sum()), -1))


def test_hiding_every_xray_at_test_changes_the_predictions_of_stays_that_have_one(store80, data):
    method = InfoReg(seed=0, features="cached", **{**InfoReg.test_hyperparameters, "max_epochs": 3})
    method.fit(data, device="cpu")
    before, after, present = predict_with_xrays_hidden(method, data, store80, ehr_encoder=EHR_ID)
    assert np.all(before[present] != after[present])
    np.testing.assert_array_equal(before[~present], after[~present])
    assert "inforeg_window_ehr" in method.history_["epochs"][0]


@pytest.mark.parametrize("setting", [{"ehr_scale": -1.0}, {"cxr_scale": -0.5},
                                     {"window_epochs": 0}])
def test_bad_settings_are_refused_by_name(data, setting):
    key = next(iter(setting))
    with pytest.raises(HyperparameterError, match=key):
        InfoReg(features="cached", **InfoReg.test_hyperparameters, **setting).fit(data,
                                                                                  device="cpu")
    with pytest.raises(HyperparameterError, match="window_modality"):
        InfoReg(window_modality="cxr")


def test_an_interrupted_fit_resumes_with_its_fisher_history_bit_identical(data, tmp_path,
                                                                          monkeypatch):
    settings = {**InfoReg.test_hyperparameters, "max_epochs": 4, "patience": 4, "window_epochs": 2}
    whole, resumed = fit_interrupted_and_resumed(
        lambda: InfoReg(seed=0, features="cached", **settings), data, tmp_path / "checkpoint.pt",
        monkeypatch)
    keys = ("inforeg_k_ehr", "inforeg_k_cxr", "inforeg_fisher_ehr", "inforeg_regulated_batches_ehr")
    assert [[e[k] for k in keys] for e in whole.history_["epochs"]] == \
        [[e[k] for k in keys] for e in resumed.history_["epochs"]]
    np.testing.assert_array_equal(whole.predict_proba(data, "test"),
                                  resumed.predict_proba(data, "test"))
