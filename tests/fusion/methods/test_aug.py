"""AUG: trained learners in the optimiser, the bounded residual loss, the assignment rule, the
shared classifier and the absent-X-ray handling, on a tiny store80 with fake embeddings."""

import copy
import types

import numpy as np
import pytest
import torch
from torch import nn

from fusion.data import load_fusion_data
from fusion.methods.aug import (
    AUG, AUGNet, aca_assignment, aug_modality_loss, check_interval_for, is_check_epoch)
from fusion.modules import EmbeddingInput
from fusion.registry import HyperparameterError
from fusion.trainer import FitContext, PartBatches, Trainer
from support import EHR_ID, fit_interrupted_and_resumed, predict_with_xrays_hidden

torch.set_num_threads(1)
CACHED = {"ehr_emb", "cxr_emb"}


@pytest.fixture(scope="module")
def data(store80):
    return load_fusion_data(store80, "mortality", 0, features="cached", ehr_encoder=EHR_ID)


class Probe(AUGNet):
    """Keeps the optimisers at the fit's end and each learner's weights at creation."""

    def add_learner(self, modality):
        super().add_learner(modality)
        learner = self.learners[modality][-1]
        self.initial = getattr(self, "initial", {})
        key = (modality, len(self.learners[modality]) - 1)
        self.initial[key] = learner[0].weight.detach().clone()

    def on_fit_end(self, ctx):
        self.optimizers = ctx.optimizers


def _net(data, cls=AUGNet, hidden=8, task="mortality", **kwargs):
    torch.manual_seed(0)
    net = cls(EmbeddingInput("ehr_emb", data.ehr_dim), EmbeddingInput("cxr_emb", data.cxr_dim),
              data.n_outputs, task, hidden=hidden, **kwargs)
    return net


def _fit_without_early_stopping(net, data, epochs=3):
    """Train every epoch (an empty validation part keeps the last epoch, so learners stay)."""
    train = data.part("train")
    trainer = Trainer("mortality", lr=0.01, batch_size=16, max_epochs=epochs, seed=0, device="cpu",
                      num_threads=1)
    empty = PartBatches(data.part("val"), CACHED, rows=np.array([], dtype=np.int64))
    history = trainer.fit(net, PartBatches(train, CACHED), empty)
    return history


@pytest.mark.parametrize("frozen", [False, True])
def test_every_added_learner_is_in_the_optimiser_with_its_settings_and_trains(data, frozen):
    # margin 0 and a check every epoch: a learner is added at the end of each epoch
    net = _net(data, cls=Probe, margin=0.0, check_interval=1, frozen_learners=frozen)
    history = _fit_without_early_stopping(net, data, epochs=3)
    counts = {m: len(net.learners[m]) for m in ("ehr", "cxr")}
    assert sum(counts.values()) == 3
    assert history["epochs"][-1]["aug_learners_ehr"] == counts["ehr"]
    (optimizer,) = net.optimizers
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    base = group_of[id(net.classifier.weight)]
    created = list(net.initial)  # in order; the last one came at the end of the last epoch
    for order, (modality, index) in enumerate(created):
        learner = net.learners[modality][index]
        for parameter in learner.parameters():
            if frozen:
                assert id(parameter) not in group_of and not parameter.requires_grad
            else:
                group = group_of[id(parameter)]
                assert group["lr"] == base["lr"] and group["weight_decay"] == base["weight_decay"]
        if order < len(created) - 1:
            moved = not torch.equal(learner[0].weight, net.initial[(modality, index)])
            assert moved != frozen, f"learner {modality}[{index}] moved: {moved} (frozen={frozen})"


def test_the_residual_loss_is_nonnegative_for_any_logits_unlike_the_references():
    generator = torch.Generator().manual_seed(0)
    for task, y in (("mortality", torch.randint(0, 2, (256, 1), generator=generator).float()),
                    ("phenotype", torch.randint(0, 2, (256, 25), generator=generator).float()),
                    ("los", torch.randint(0, 7, (256,), generator=generator))):
        k = 7 if task == "los" else y.shape[1]
        z_prev, z_new = (30 * torch.randn(256, k, generator=generator) for _ in range(2))
        loss = aug_modality_loss(z_prev + z_new, z_prev, z_new, y, task)
        per_stay = [aug_modality_loss((z_prev + z_new)[i:i + 1], z_prev[i:i + 1], z_new[i:i + 1],
                                      y[i:i + 1], task) for i in range(0, 256, 17)]
        assert float(loss) >= 0 and min(float(v) for v in per_stay) >= 0
    # the reference's sigmoid term, -0.5 BCE(z_new, y * sigmoid(z_prev)), goes below zero
    y, z_prev, z_new = torch.ones(1, 1), torch.zeros(1, 1), torch.full((1, 1), 30.0)
    bce = nn.functional.binary_cross_entropy_with_logits
    reference = (bce(z_prev + z_new, y) + bce(z_prev, y) + bce(z_new, y)
                 - 0.5 * bce(z_new, y * torch.sigmoid(z_prev)))
    assert float(reference) < 0
    assert float(aug_modality_loss(z_prev + z_new, z_prev, z_new, y, "mortality")) >= 0


def test_the_newest_learner_is_weighted_by_one_minus_half_the_ensembles_confidence():
    y = torch.ones(2, 1)
    z_prev = torch.tensor([[40.0], [-40.0]])  # q_prev = 1 (right), 0 (wrong)
    z_new = torch.zeros(2, 1, requires_grad=True)
    other = torch.zeros(2, 1)  # the full logits are held apart to isolate the newest term
    aug_modality_loss(other, z_prev, z_new, y, "mortality").backward()
    plain = torch.zeros(2, 1, requires_grad=True)
    nn.functional.binary_cross_entropy_with_logits(plain, y).backward()
    np.testing.assert_allclose((z_new.grad / plain.grad).flatten().numpy(), [0.5, 1.0], atol=1e-6)


def test_the_assignment_rule_and_its_check_epochs():
    assert aca_assignment(0.9, 0.5, 1.0, 0.01) == "cxr"  # EHR stronger: the X-ray gets capacity
    assert aca_assignment(0.5, 0.9, 1.0, 0.01) == "ehr"
    assert aca_assignment(0.700, 0.697, 1.0, 0.01) is None  # inside the band
    assert aca_assignment(0.7, float("nan"), 1.0, 0.01) is None
    assert [e for e in range(1, 21) if is_check_epoch(e, 5)] == [1, 5, 10, 15, 20]
    assert check_interval_for(0, 200) == 20 and check_interval_for(0, 8) == 1
    assert check_interval_for(3, 200) == 3


def _epoch_end(net, epoch, q_ehr, q_cxr, max_epochs=9):
    """End an epoch whose stays had true-label probability q_ehr (EHR) and q_cxr (X-ray)."""
    net.on_train_epoch_start(None)
    y = torch.ones(4, 1)
    net._scores["ehr"].add(torch.full((4, 1), q_ehr), y)
    net._scores["cxr"].add(torch.full((2, 1), q_cxr), y[:2])
    logged = {}
    ctx = types.SimpleNamespace(epoch=epoch, max_epochs=max_epochs,
                                log=lambda name, value: logged.__setitem__(name, value))
    net.on_train_epoch_end(ctx)
    return {m: len(net.learners[m]) for m in ("ehr", "cxr")}, logged


def test_learners_are_added_only_at_check_epochs_to_the_modality_the_rule_names(data):
    net = _net(data, check_interval=3)
    assert _epoch_end(net, 1, 0.9, 0.6)[0] == {"ehr": 0, "cxr": 1}
    assert _epoch_end(net, 2, 0.9, 0.6)[0] == {"ehr": 0, "cxr": 1}  # not a check epoch
    assert _epoch_end(net, 3, 0.6, 0.9)[0] == {"ehr": 1, "cxr": 1}
    counts, logged = _epoch_end(net, 6, 0.8, 0.8)  # inside the band
    assert counts == {"ehr": 1, "cxr": 1} and logged["aug_score_ehr"] == pytest.approx(0.8)
    capped = _net(data, check_interval=1, max_learners=1)
    for epoch in (1, 2, 3):
        counts, _ = _epoch_end(capped, epoch, 0.9, 0.5)
    assert counts == {"ehr": 0, "cxr": 1}


def test_balanced_scores_weigh_each_class_of_each_label_alike(data):
    net = _net(data, aca_score="balanced")
    net._scores["ehr"].add(torch.tensor([[0.9], [0.9], [0.9], [0.1]]),
                           torch.tensor([[0.0], [0.0], [0.0], [1.0]]))
    assert net._scores["ehr"].value("mean") == pytest.approx(0.7)
    assert net._scores["ehr"].value("balanced") == pytest.approx(0.5)


def test_stays_without_an_xray_are_left_out_of_the_xray_loss_and_score(data):
    y = torch.tensor([[1.0], [0.0], [1.0]])
    used = torch.tensor([True, True, False])
    logits = torch.tensor([[2.0], [-1.0], [5.0]])
    changed = logits.clone()
    changed[2] = -40.0
    assert torch.equal(aug_modality_loss(logits, None, None, y, "mortality", weight=used),
                       aug_modality_loss(changed, None, None, y, "mortality", weight=used))
    net = _net(data)
    net.on_train_batch_end(None, {"logits_ehr": logits, "logits_cxr": changed, "cxr_used": used},
                           {"y": y})
    assert float(net._scores["ehr"].counts.sum()) == 3
    assert float(net._scores["cxr"].counts.sum()) == 2
    expected = (torch.sigmoid(changed[0]) + 1 - torch.sigmoid(changed[1])) / 2
    assert net._scores["cxr"].value("mean") == pytest.approx(float(expected))


def test_one_shared_classifier_and_alpha_fusion_renormalised_when_the_xray_is_absent(data):
    net = _net(data, alpha=0.4).eval()
    net.add_learner("ehr")
    net.add_learner("cxr")
    batch = PartBatches(data.part("test"), CACHED)[list(range(len(data.part("test"))))]
    calls = []
    handle = net.classifier.register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        out = net(batch)
    handle.remove()
    assert len(calls) == 4  # base + learner, for each modality: one classifier object
    present = batch["cxr_present"]
    assert present.any() and not present.all()
    expected = 0.4 * out["logits_ehr"] + 0.6 * out["logits_cxr"]
    torch.testing.assert_close(out["logits"][present], expected[present])
    torch.testing.assert_close(out["logits"][~present], out["logits_ehr"][~present])


def test_each_modality_step_moves_only_that_modality_and_the_shared_classifier(store80):
    data = load_fusion_data(store80, "mortality", 0, features="raw")
    from fusion.modules import build_encoder

    spec = {"n_features": data.n_features, "window_hours": data.window_hours}
    params = {"hidden": 8, "backbone": "small", "cxr_weights": "random", "dropout": 0.0}
    torch.manual_seed(0)
    net = AUGNet(build_encoder("ehr", "ehr_ts", spec, params),
                 build_encoder("cxr", "cxr_img", spec, params), 1, "mortality", hidden=8)
    net.add_learner("ehr")
    net.add_learner("cxr")
    net.train()
    trainer = Trainer("mortality", lr=0.01, device="cpu")
    ctx = FitContext(trainer, net)
    ctx.optimizers = [ctx.default_optimizer(net.parameters())]
    rows = np.flatnonzero(data.part("train").cxr_present)[:4].tolist() + [0, 1, 2, 3]
    batch = PartBatches(data.part("train"), {"ehr_ts", "cxr_img"})[sorted(set(rows))]
    features = net.features(batch)

    def snapshot(prefixes):
        return {n: p.detach().clone() for n, p in net.named_parameters() if n.startswith(prefixes)}

    ehr_side, cxr_side = ("encoders.ehr", "base.ehr", "learners.ehr"), \
        ("encoders.cxr", "base.cxr", "learners.cxr")
    for stepped, other in (("ehr", cxr_side), ("cxr", ehr_side)):
        before_other, before_classifier = snapshot(other), snapshot(("classifier",))
        mine = snapshot(ehr_side if stepped == "ehr" else cxr_side)
        x, used = features[stepped]
        net.modality_step(stepped, x, batch["y"], used, ctx)
        for name, value in snapshot(other).items():
            assert torch.equal(value, before_other[name]), f"{stepped} step moved {name}"
        assert not torch.equal(net.classifier.weight, before_classifier["classifier.weight"])
        assert any(not torch.equal(v, mine[n])
                   for n, v in snapshot(ehr_side if stepped == "ehr" else cxr_side).items())


def test_a_grown_module_reloads_with_its_learners(data):
    net = _net(data)
    net.add_learner("cxr")
    net.add_learner("cxr")
    net.add_learner("ehr")
    fresh = _net(data)
    fresh.load_state_dict(copy.deepcopy(net.state_dict()))
    assert [len(fresh.learners[m]) for m in ("ehr", "cxr")] == [1, 2]
    batch = PartBatches(data.part("test"), CACHED)[list(range(10))]
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(batch)["logits"], net.eval()(batch)["logits"])


def test_hiding_every_xray_at_test_changes_the_predictions_of_stays_that_have_one(store80, data):
    method = AUG(seed=0, features="cached", **{**AUG.test_hyperparameters, "max_epochs": 3})
    method.fit(data, device="cpu")
    before, after, present = predict_with_xrays_hidden(method, data, store80, ehr_encoder=EHR_ID)
    assert np.all(before[present] != after[present])
    np.testing.assert_array_equal(before[~present], after[~present])


@pytest.mark.parametrize("setting", [{"alpha": 0.0}, {"alpha": 1.5}, {"residual_weight": 1.2},
                                     {"margin": -0.1}, {"lam": 0.0}])
def test_bad_settings_are_refused_by_name(data, setting):
    key = next(iter(setting))
    with pytest.raises(HyperparameterError, match=key):
        AUG(features="cached", **AUG.test_hyperparameters, **setting).fit(data, device="cpu")
    with pytest.raises(HyperparameterError, match="aca_score"):
        AUG(aca_score="median")


def test_an_interrupted_fit_resumes_with_its_learners_bit_identical(data, tmp_path, monkeypatch):
    settings = {**AUG.test_hyperparameters, "max_epochs": 4, "patience": 4, "margin": 0.0}
    whole, resumed = fit_interrupted_and_resumed(
        lambda: AUG(seed=0, features="cached", **settings), data, tmp_path / "checkpoint.pt",
        monkeypatch)

    def learners(method):
        return [e["aug_learners_cxr"] + e["aug_learners_ehr"] for e in method.history_["epochs"]]
    assert learners(whole) == learners(resumed) == [1, 2, 3, 4]
    np.testing.assert_array_equal(whole.predict_proba(data, "test"),
                                  resumed.predict_proba(data, "test"))
