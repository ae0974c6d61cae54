"""The trainer's extension points, each with a toy module that shows it acts.

Hooks and their order, the context they receive, the module's own loss in validation, parameter
groups and schedulers, a module that grows (saved and restored, also from a best state taken
before it grew), a neighbour bank saved with the weights, fits in stages, manual optimisation with
two optimisers, an inner loop on fast weights, and the errors for malformed hooks.
"""

import io

import numpy as np
import pytest
import torch
from torch import nn

from fusion.methods.base import TorchMethod
from fusion.trainer import FitStage, Trainer, task_loss
from support import (
    BankNet, GrowingNet, InnerLoopNet, Linear, StagedNet, TwoOptimiserNet, toy_sources)

torch.set_num_threads(1)


def _trainer(**kwargs):
    settings = {"lr": 0.05, "batch_size": 32, "max_epochs": 3, "patience": 3, "seed": 0,
                "device": "cpu", "num_threads": 1, **kwargs}
    return Trainer("mortality", **settings)


def _fit(module, trainer=None, flip_val=False, **kwargs):
    train, val = toy_sources(flip_val=flip_val)
    trainer = trainer or _trainer(**kwargs)
    return trainer.fit(module, train, val), trainer, train, val


def _reload(module, fresh):
    """Save ``module``'s state dict as the method files do and load it into ``fresh``."""
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    buffer.seek(0)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    return fresh.eval()


class Recorder(Linear):
    """Records each hook call with what the context said at that moment."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def _note(self, name, ctx, **extra):
        self.calls.append({"hook": name, "epoch": ctx.epoch, "step": ctx.step,
                           "training": ctx.training, **extra})

    def on_fit_start(self, ctx, train):
        self._note("on_fit_start", ctx, rows=len(train))

    def configure_optimizers(self, ctx):
        self._note("configure_optimizers", ctx, stage=ctx.stage.name)
        return ctx.default_optimizer(self.parameters())

    def loss(self, out, batch, ctx):
        self._note("loss", ctx, max_epochs=ctx.max_epochs, task=ctx.task,
                   n_optimizers=len(ctx.optimizers))
        return 2.0 * task_loss(out["logits"], batch["y"], ctx.task)

    def on_after_backward(self, ctx):
        self._note("on_after_backward", ctx, has_grad=self.layer.weight.grad is not None)

    def on_train_epoch_start(self, ctx):
        self._note("on_train_epoch_start", ctx)

    def on_train_batch_end(self, ctx, outputs, batch):
        self._note("on_train_batch_end", ctx, keys=sorted(outputs),
                   rows=int(outputs["out"]["logits"].shape[0]), batch_rows=int(batch["y"].shape[0]))

    def on_train_epoch_end(self, ctx):
        self._note("on_train_epoch_end", ctx)

    def on_fit_end(self, ctx):
        self._note("on_fit_end", ctx)


def test_hooks_are_called_in_order_with_the_context():
    module = Recorder()
    history, trainer, train, val = _fit(module, max_epochs=2)
    hooks = [c["hook"] for c in module.calls]
    n_batches, n_val_batches = 4, 1  # 120 rows by 32 (the last 24); 60 validation rows by 128
    epoch = (["on_train_epoch_start"]
             + ["loss", "on_after_backward", "on_train_batch_end"] * n_batches
             + ["loss"] * n_val_batches + ["on_train_epoch_end"])
    assert hooks == ["on_fit_start", "configure_optimizers", *epoch, *epoch, "on_fit_end"]
    assert module.calls[0]["rows"] == len(train)
    losses = [c for c in module.calls if c["hook"] == "loss"]
    assert [c["epoch"] for c in losses if c["training"]] == [1] * 4 + [2] * 4
    assert [c["step"] for c in losses if c["training"]] == list(range(8)), "step counts batches"
    assert all(c["max_epochs"] == 2 and c["task"] == "mortality" and c["n_optimizers"] == 1
               for c in losses)
    assert [c["training"] for c in losses] == [True] * 4 + [False] + [True] * 4 + [False]
    ends = [c for c in module.calls if c["hook"] == "on_train_batch_end"]
    assert all(c["keys"] == ["loss", "out"] and c["rows"] == c["batch_rows"] for c in ends)
    assert all(c["has_grad"] for c in module.calls if c["hook"] == "on_after_backward")
    assert [c["epoch"] for c in module.calls if c["hook"] == "on_train_epoch_end"] == [1, 2]
    assert [c["epoch"] for c in module.calls if c["hook"] == "on_train_epoch_start"] == [1, 2]


def test_validation_loss_is_the_modules_own_loss():
    module = Recorder()
    history, trainer, _, val = _fit(module, max_epochs=1)
    batch = val[list(range(len(val)))]
    with torch.no_grad():
        plain = float(task_loss(module(batch)["logits"], batch["y"], "mortality"))
    # fit leaves the module in its best state, here its only epoch
    assert history["epochs"][0]["val_loss"] == pytest.approx(2.0 * plain, rel=1e-6)


class EpochWeighted(Linear):
    """A loss whose weight grows with the epoch (as Flex-MoE weights its gate loss)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def loss(self, out, batch, ctx):
        if ctx.training:
            self.seen.append((ctx.epoch, ctx.max_epochs))
        return ctx.epoch / ctx.max_epochs * task_loss(out["logits"], batch["y"], ctx.task)


def test_the_loss_sees_the_epoch():
    module = EpochWeighted()
    history, *_ = _fit(module, max_epochs=3)
    assert sorted(set(module.seen)) == [(1, 3), (2, 3), (3, 3)]
    # The train loss is the weighted loss: epoch 1 reports a third of an unweighted loss.
    assert history["epochs"][0]["train_loss"] < history["epochs"][2]["train_loss"]


class GroupedNet(Linear):
    """Two parameter groups with their own learning rates, and a scheduler."""

    def configure_optimizers(self, ctx):
        optimizer = ctx.default_optimizer([{"params": [self.layer.weight], "lr": 0.01},
                                           {"params": [self.layer.bias], "lr": 0.1}])
        self.optimizer = optimizer
        return {"optimizer": optimizer,
                "lr_scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=0.5)}


def test_parameter_groups_and_schedulers_come_from_the_module():
    module = GroupedNet()
    _fit(module, max_epochs=3)
    lrs = [g["lr"] for g in module.optimizer.param_groups]
    assert lrs == pytest.approx([0.01 * 0.5 ** 3, 0.1 * 0.5 ** 3]), "one scheduler step per epoch"
    assert module.optimizer.param_groups[0]["weight_decay"] == 0.01, "trainer's AdamW settings"


@pytest.mark.parametrize("returned", [None, "adam", [], ([1], [])])
def test_malformed_configure_optimizers_is_refused(returned):
    class Bad(Linear):
        def configure_optimizers(self, ctx):
            return returned

    with pytest.raises(TypeError, match="Bad.configure_optimizers returned .*return an optimizer"):
        _fit(Bad())


def test_a_module_that_grows_trains_its_new_head_and_reloads():
    module = GrowingNet(grow_at=(2,))
    history, trainer, _, val = _fit(module, max_epochs=4, patience=4)
    assert [e["heads"] for e in history["epochs"]] == [0, 1, 1, 1]
    assert history["best_epoch"] > 2, "the toy data keep improving"
    assert len(module.heads) == 1
    assert not torch.equal(module.heads[0].weight, module.initial[0]), "the new head trained"
    prob = trainer.predict(module, val)["prob"]
    fresh = _reload(module, GrowingNet(grow_at=(2,)))
    assert len(fresh.heads) == 1
    np.testing.assert_array_equal(trainer.predict(fresh, val)["prob"], prob)


def test_a_best_state_taken_before_the_module_grew_restores_the_smaller_module():
    # Validation labels are inverted: the best epoch is an early one, before the module grew
    # to its final two heads.
    torch.manual_seed(0)
    module = GrowingNet(grow_at=(1, 2))
    history, trainer, _, val = _fit(module, flip_val=True, max_epochs=4, patience=2)
    assert history["best_epoch"] <= 2 and history["epochs"][-1]["heads"] == 2
    heads_then = history["best_epoch"] - 1  # a head is added at the end of epochs 1 and 2
    assert len(module.heads) == heads_then, "the best state rebuilds the architecture it had"
    scored = trainer.predict(module, val)["prob"]
    from fusion.trainer import monitor_score
    assert monitor_score("auroc", "mortality", val.part.y, scored) == pytest.approx(
        history["best_score"], abs=1e-12)
    grown = GrowingNet()
    for _ in range(2):
        grown.add_head()
    np.testing.assert_array_equal(trainer.predict(_reload(module, grown), val)["prob"], scored)


def test_a_neighbour_bank_built_at_fit_start_is_saved_with_the_weights():
    module = BankNet()
    _, trainer, train, val = _fit(module, max_epochs=2)
    assert torch.equal(module.bank_x, torch.from_numpy(train.part.ehr_emb))
    assert "_extra_state" in module.state_dict()
    prob = trainer.predict(module, val)["prob"]
    fresh = _reload(module, BankNet())
    assert torch.equal(fresh.bank_x, module.bank_x) and torch.equal(fresh.bank_y, module.bank_y)
    np.testing.assert_array_equal(trainer.predict(fresh, val)["prob"], prob)


def test_stages_train_their_own_parameters():
    torch.manual_seed(0)
    module = StagedNet()
    start = {k: v.clone() for k, v in module.state_dict().items()}
    history, *_ = _fit(module, max_epochs=10, patience=10)
    assert [(e["stage"], e["epoch"]) for e in history["epochs"]] == [
        ("first", 1), ("first", 2), ("second", 1), ("second", 2), ("second", 3)]
    assert [s["name"] for s in history["stages"]] == ["first", "second"]
    assert [s["epochs"] for s in history["stages"]] == [2, 3]
    state = module.state_dict()
    assert not torch.equal(state["first.weight"], start["first.weight"])
    assert not torch.equal(state["second.weight"], start["second.weight"])
    assert all(p.requires_grad for p in module.parameters()), "flags are put back after the fit"


class StagedRecorder(StagedNet):
    def __init__(self):
        super().__init__()
        self.by_stage = {}

    def on_train_epoch_end(self, ctx):
        self.by_stage.setdefault(ctx.stage.name, []).append(
            (self.first.weight.detach().clone(), self.second.weight.detach().clone(),
             self.first.weight.requires_grad, self.second.weight.requires_grad))


def test_a_stage_freezes_the_other_parameters():
    torch.manual_seed(0)
    module = StagedRecorder()
    second_at_start = module.second.weight.detach().clone()
    _fit(module, max_epochs=10, patience=10)
    first, second = module.by_stage["first"], module.by_stage["second"]
    assert all(f_grad and not s_grad for _, _, f_grad, s_grad in first)
    assert all(s_grad and not f_grad for _, _, f_grad, s_grad in second)
    assert all(torch.equal(s, second_at_start) for _, s, _, _ in first), "second frozen in stage 1"
    frozen_first = second[0][0]
    assert all(torch.equal(f, frozen_first) for f, _, _, _ in second), "first frozen in stage 2"


def test_a_parameter_frozen_before_the_fit_stays_frozen():
    module = StagedNet()
    module.second.bias.requires_grad_(False)
    bias = module.second.bias.detach().clone()
    _fit(module)
    assert torch.equal(module.second.bias, bias) and not module.second.bias.requires_grad


def test_a_stage_naming_an_unknown_submodule_is_refused():
    class Typo(StagedNet):
        def fit_stages(self):
            return [FitStage("one", trainable=("frist",))]

    with pytest.raises(ValueError, match="no parameter under 'frist'.*live under: first, second"):
        _fit(Typo())
    with pytest.raises(TypeError, match="tuple of submodule names"):
        FitStage("one", trainable="first")


class CountedTwoOptimiserNet(TwoOptimiserNet):
    """Counts the steps of each optimiser and keeps them for the test."""

    def configure_optimizers(self, ctx):
        optimizers, schedulers = super().configure_optimizers(ctx)
        self.steps = [0, 0]
        for i, optimizer in enumerate(optimizers):
            optimizer.register_step_post_hook(
                lambda opt, args, kwargs, i=i: self.steps.__setitem__(i, self.steps[i] + 1))
        self.optimizers, self.schedulers = optimizers, schedulers
        return optimizers, schedulers


def test_a_stage_monitoring_a_missing_output_is_refused():
    class Missing(StagedNet):
        def fit_stages(self):
            return [FitStage("only", monitor_output="logits_ehr")]

    with pytest.raises(ValueError, match="monitors output 'logits_ehr' but Missing returns only "
                                         r"\['logits', 'logits_first'\]"):
        _fit(Missing())


def test_manual_optimisation_with_two_optimisers():
    torch.manual_seed(0)
    module = CountedTwoOptimiserNet()
    b_start = module.b.weight.detach().clone()
    history, *_ = _fit(module, max_epochs=3)
    assert module.steps == [3 * 4, 3 * 4], "each optimiser steps once per batch"
    assert module.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 ** 3)
    assert module.optimizers[1].param_groups[0]["lr"] == pytest.approx(0.2 * 0.5 ** 3)
    assert not torch.equal(module.b.weight, b_start)
    assert np.isfinite(history["epochs"][-1]["train_loss"])


def test_on_after_backward_can_regulate_the_update():
    class Regulated(Linear):
        def on_after_backward(self, ctx):
            self.layer.weight.grad.zero_()  # e.g. InfoReg acting on a modality's gradients

    module = Regulated()
    module.layer.weight.data.zero_()
    _fit(module, max_epochs=2)
    # AdamW with a zero gradient and zero weights: weight decay keeps them exactly zero
    assert torch.count_nonzero(module.layer.weight) == 0
    assert torch.count_nonzero(module.layer.bias) > 0


class OneLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(4, 1)

    def forward(self, batch):
        return {"logits": self.layer(batch["ehr_emb"])}


class Proximal(Linear):
    """Pulls the weights towards those of the epoch start (InfoReg's regulation), with SGD."""

    def __init__(self, beta):
        super().__init__()
        self.beta, self.starts, self.ends = beta, [], []

    def configure_optimizers(self, ctx):
        return torch.optim.SGD(self.parameters(), lr=0.05)

    def on_train_epoch_start(self, ctx):
        self.reference = {n: p.detach().clone() for n, p in self.named_parameters()}
        self.starts.append(self.reference["layer.weight"])

    def on_after_backward(self, ctx):
        for name, parameter in self.named_parameters():
            parameter.grad.add_(parameter.detach() - self.reference[name], alpha=self.beta)

    def on_train_epoch_end(self, ctx):
        self.ends.append(self.layer.weight.detach().clone())


def test_the_epoch_start_hook_sees_the_weights_the_epoch_starts_from():
    drift = {}
    for beta in (0.0, 10.0):
        torch.manual_seed(0)
        module = Proximal(beta)
        _fit(module, max_epochs=3, patience=3)
        assert all(torch.equal(start, end) for start, end in zip(module.starts[1:], module.ends))
        drift[beta] = [float((e - s).norm()) for s, e in zip(module.starts, module.ends)]
    assert all(pulled < free for pulled, free in zip(drift[10.0], drift[0.0])), drift


def test_an_inner_loop_on_fast_weights():
    torch.manual_seed(0)
    meta = InnerLoopNet(inner_lr=0.5)
    _fit(meta, max_epochs=2)
    slow, fast = np.array(meta.losses).T
    assert np.all(fast < slow), "one inner step on the batch lowers its loss"

    # With a zero inner rate the fast weights are the weights: the default step, to rounding.
    torch.manual_seed(0)
    plain = InnerLoopNet(inner_lr=0.0)
    default = OneLayer()
    default.load_state_dict(plain.state_dict())
    _fit(plain, max_epochs=2)
    _fit(default, max_epochs=2)
    for key, value in default.state_dict().items():
        torch.testing.assert_close(plain.state_dict()[key], value, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(meta.layer.weight, plain.layer.weight), "fast weights change the fit"


def test_a_malformed_training_step_is_refused():
    class Bad(Linear):
        def training_step(self, batch, ctx):
            return {"value": 1}

    with pytest.raises(TypeError, match="Bad.training_step must return the loss tensor"):
        _fit(Bad())


def test_a_module_attribute_named_loss_is_not_a_hook():
    class WithLossModule(Linear):
        def __init__(self):
            super().__init__()
            self.loss = nn.BCEWithLogitsLoss()

    history, *_ = _fit(WithLossModule(), max_epochs=1)
    assert np.isfinite(history["epochs"][0]["train_loss"])


class _OrderedLinear(Linear):
    """Reverse row order in the first epoch, the seeded shuffle afterwards; records the rows seen."""

    def __init__(self, fixed_epochs=1):
        super().__init__()
        self.fixed_epochs = fixed_epochs
        self.seen = {}

    def train_batch_order(self, ctx, train):
        return list(range(len(train)))[::-1] if ctx.epoch <= self.fixed_epochs else None

    def on_train_batch_end(self, ctx, outputs, batch):
        self.seen.setdefault(ctx.epoch, []).append(batch["ehr_emb"].clone())


def _rows_seen(module, epoch, train):
    x = torch.cat(module.seen[epoch]).numpy()
    reference = train.part.ehr_emb[train.rows]
    return [int(np.flatnonzero((reference == row).all(axis=1))[0]) for row in x]


def test_a_module_orders_the_training_rows_of_an_epoch():
    module = _OrderedLinear()
    _, _, train, _ = _fit(module, max_epochs=3, patience=3)
    n = len(train)
    assert _rows_seen(module, 1, train) == list(range(n))[::-1]
    shuffled = [_rows_seen(module, e, train) for e in (2, 3)]
    assert all(sorted(rows) == list(range(n)) for rows in shuffled)
    assert shuffled[0] != list(range(n))[::-1] and shuffled[0] != shuffled[1]
    # the fixed epoch does not consume the seeded shuffle: epoch 2 here is epoch 1 of a plain fit
    plain = _OrderedLinear(fixed_epochs=0)
    _fit(plain, max_epochs=1)
    assert _rows_seen(plain, 1, train) == shuffled[0]


def test_a_malformed_batch_order_is_refused():
    class Bad(Linear):
        def train_batch_order(self, ctx, train):
            return [0, 0, 1]

    with pytest.raises(ValueError, match="Bad.train_batch_order must return each of the 120"):
        _fit(Bad())


class _ToyGrowingMethod(TorchMethod):
    """A method outside the registry whose module grows and keeps a bank (save/load test)."""

    name = "toy-growing"
    inputs = {"cached": frozenset({"ehr_emb"})}
    modalities = frozenset({"ehr"})
    test_hyperparameters = {"max_epochs": 3, "patience": 3, "batch_size": 16, "lr": 0.05}

    def build_module(self, spec):
        return _GrowingBank()


class _GrowingBank(GrowingNet):
    def __init__(self):
        super().__init__(grow_at=(1,))
        self.register_buffer("bank", torch.zeros(0, 6), persistent=False)
        self.base = nn.Linear(6, 1)

    def add_head(self):
        head = nn.Linear(6, 1)
        self.initial[len(self.heads)] = head.weight.detach().clone()
        self.heads.append(head)

    def on_fit_start(self, ctx, train):
        self.bank = torch.cat([b["ehr_emb"] for b in ctx.batches(train)])

    def forward(self, batch):
        x = torch.nan_to_num(batch["ehr_emb"]) + 0.01 * self.bank.mean(dim=0)
        return super().forward({"ehr_emb": x})

    def get_extra_state(self):
        return {**super().get_extra_state(), "bank": self.bank}

    def set_extra_state(self, state):
        super().set_extra_state(state)
        self.bank = state["bank"]


def test_a_method_saves_and_loads_a_grown_module_with_its_bank(tmp_path):
    from fusion.data import load_fusion_data
    from support import EHR_ID, make_fusion_store

    store = make_fusion_store(tmp_path / "store.zarr", n_stays=60)
    data = load_fusion_data(store, "mortality", 0, features="cached", ehr_encoder=EHR_ID,
                            inputs={"ehr_emb"})
    method = _ToyGrowingMethod(seed=0, **_ToyGrowingMethod.test_hyperparameters)
    method.fit(data, device="cpu")
    # the best state is taken before the epoch's growth: no head if the best epoch is the first
    assert len(method.module_.heads) == (0 if method.history_["best_epoch"] == 1 else 1)
    prob = method.predict_proba(data, "test")
    method.save(tmp_path / "saved")
    loaded = _ToyGrowingMethod.load(tmp_path / "saved")
    assert len(loaded.module_.heads) == len(method.module_.heads)
    assert loaded.module_.bank.shape[0] > 0
    assert torch.equal(loaded.module_.bank, method.module_.bank)
    np.testing.assert_array_equal(loaded.predict_proba(data, "test"), prob)
