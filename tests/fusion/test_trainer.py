"""The torch training loop: learning, early stopping with best-state restore, determinism."""

import numpy as np
import pytest
import torch
from torch import nn

from fusion.data import FusionPart
from fusion.trainer import (
    PartBatches, Trainer, _batches, _BatchOrder, choose_monitor, deterministic_mode, monitor_score,
    probabilities, task_loss)

torch.set_num_threads(1)


def _part(x, y, name="train"):
    n = x.shape[0]
    return FusionPart(name=name, index=np.arange(n), stay_id=np.arange(n) + 1000, y=y,
                      cxr_present=np.zeros(n, dtype=bool), cxr_masked=np.zeros(n, dtype=bool),
                      ehr_emb=x.astype(np.float32))


def _toy(n=200, seed=0, flip=False, task="mortality"):
    """Linearly separable toy data on ``ehr_emb``; ``flip`` inverts the labels."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4)).astype(np.float32)
    score = x[:, 0] + 0.5 * x[:, 1]
    if task == "los":
        y = np.digitize(score, [-0.5, 0.5]).astype(np.int64)
        return x, (2 - y) if flip else y
    y = (score > 0).astype(np.float32)[:, None]
    return x, (1 - y) if flip else y


class Linear(nn.Module):
    def __init__(self, n_out=1):
        super().__init__()
        self.layer = nn.Linear(4, n_out)

    def forward(self, batch):
        return {"logits": self.layer(batch["ehr_emb"])}


def _sources(train_xy, val_xy):
    return (PartBatches(_part(*train_xy), {"ehr_emb"}),
            PartBatches(_part(*val_xy, name="val"), {"ehr_emb"}))


@pytest.mark.parametrize("task,n_out", [("mortality", 1), ("los", 3)])
def test_loss_decreases_and_the_problem_is_learned(task, n_out):
    train, val = _sources(_toy(task=task), _toy(seed=1, task=task))
    torch.manual_seed(0)
    module = Linear(n_out)
    history = Trainer(task, lr=0.05, batch_size=32, max_epochs=15, patience=15, seed=0).fit(
        module, train, val)
    losses = [e["train_loss"] for e in history["epochs"]]
    assert losses[-1] < 0.7 * losses[0]
    assert history["monitor"] == ("auroc" if task == "mortality" else "macro_f1")
    assert history["best_score"] > (0.95 if task == "mortality" else 0.8)
    assert not module.training, "fit leaves the module in eval mode"


def test_early_stopping_restores_the_best_state():
    # Validation labels are the inverse of the training labels: the better the fit, the worse the
    # validation AUROC, so the best epoch is early and training stops after `patience` epochs.
    train, val = _sources(_toy(), _toy(seed=1, flip=True))
    torch.manual_seed(0)
    module = Linear()
    trainer = Trainer("mortality", lr=0.05, batch_size=32, max_epochs=40, patience=3, seed=0)
    history = trainer.fit(module, train, val)
    scores = [e["val_score"] for e in history["epochs"]]
    assert history["stopped_early"]
    assert len(scores) == history["best_epoch"] + 3
    assert history["best_score"] == max(scores)
    assert scores[-1] < history["best_score"]
    prob = trainer.predict(module, val)["prob"]
    restored = monitor_score("auroc", "mortality", val.part.y, prob)
    assert restored == pytest.approx(history["best_score"], abs=1e-12)


def _fit_state(seed):
    train, val = _sources(_toy(), _toy(seed=1))
    torch.manual_seed(seed)
    module = Linear()
    history = Trainer("mortality", lr=0.05, batch_size=16, max_epochs=4, patience=4, seed=seed).fit(
        module, train, val)
    return module.state_dict(), history


def test_training_is_bitwise_reproducible_for_a_seed():
    (state_a, hist_a), (state_b, hist_b) = _fit_state(3), _fit_state(3)
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key])
    assert hist_a == hist_b
    state_c, _ = _fit_state(4)
    assert not torch.equal(state_a["layer.weight"], state_c["layer.weight"])


def _sizes(n, batch_size, generator=None):
    return [len(b) for b in _BatchOrder(n, batch_size, generator)]


def test_batch_order_is_seeded_and_no_batch_has_a_single_row():
    x, y = _toy(n=33)
    source = PartBatches(_part(x, y), {"ehr_emb"})
    assert _sizes(33, 16, torch.Generator()) == [16, 17]
    assert _sizes(33, 16) == [16, 17], "evaluation merges a trailing single row too"
    assert _sizes(32, 16) == [16, 16] and _sizes(1, 16) == [1]

    def order(seed):
        generator = torch.Generator()
        generator.manual_seed(seed)
        return [b["ehr_emb"] for b in _batches(source, 16, generator)]
    assert all(torch.equal(a, b) for a, b in zip(order(5), order(5)))
    assert not torch.equal(order(5)[0], order(6)[0])


def test_evaluation_batches_have_their_own_size():
    assert Trainer("mortality", batch_size=16).eval_batch_size == 64
    trainer = Trainer("mortality", batch_size=16, eval_batch_size=10)
    x, y = _toy(n=21)
    seen = []
    module = Linear()
    module.register_forward_pre_hook(lambda m, args: seen.append(int(args[0]["y"].shape[0])))
    trainer.predict(module, PartBatches(_part(x, y), {"ehr_emb"}))
    assert seen == [10, 11]


def test_probabilities_are_sigmoid_or_softmax_never_logits():
    logits = torch.tensor([[-3.0, 0.0, 4.0]])
    assert torch.allclose(probabilities(logits, "phenotype"), torch.sigmoid(logits))
    soft = probabilities(logits, "los")
    assert torch.allclose(soft.sum(dim=1), torch.ones(1))
    assert torch.all((soft >= 0) & (soft <= 1))


def test_task_loss_weights_select_stays():
    logits = torch.tensor([[2.0], [-2.0]])
    y = torch.tensor([[1.0], [1.0]])
    only_first = task_loss(logits, y, "mortality", weight=torch.tensor([1.0, 0.0]))
    assert only_first == pytest.approx(task_loss(logits[:1], y[:1], "mortality").item())
    assert task_loss(logits, y, "mortality", weight=torch.zeros(2)).item() == 0.0


def test_monitor_falls_back_to_validation_loss_for_single_class_labels():
    assert choose_monitor("mortality", np.zeros((5, 1))) == "val_loss"
    assert choose_monitor("mortality", np.array([[0.0], [1.0]])) == "auroc"
    assert choose_monitor("phenotype", np.array([[0, 1], [0, 0]])) == "macro_auroc"
    assert choose_monitor("los", np.array([2, 2, 2])) == "macro_f1"


def test_early_stopping_on_loss_when_validation_has_one_class():
    x, y = _toy()
    train, val = _sources((x, y), (x[:20], np.zeros((20, 1), np.float32)))
    history = Trainer("mortality", lr=0.05, batch_size=32, max_epochs=3, patience=3).fit(
        Linear(), train, val)
    assert history["monitor"] == "val_loss"
    assert all(e["val_score"] == -e["val_loss"] for e in history["epochs"])


def test_deterministic_mode_restores_the_global_setting():
    before = torch.are_deterministic_algorithms_enabled()
    with deterministic_mode(torch.device("cpu")):
        assert torch.are_deterministic_algorithms_enabled()
    assert torch.are_deterministic_algorithms_enabled() == before


@pytest.mark.parametrize("fill", [True, False])
def test_deterministic_mode_leaves_uninitialised_memory_unfilled_and_restores_the_flag(fill):
    previous = torch.utils.deterministic.fill_uninitialized_memory
    torch.utils.deterministic.fill_uninitialized_memory = fill
    try:
        with deterministic_mode(torch.device("cpu")):
            assert torch.utils.deterministic.fill_uninitialized_memory is False
        assert torch.utils.deterministic.fill_uninitialized_memory is fill
    finally:
        torch.utils.deterministic.fill_uninitialized_memory = previous


def test_invalid_settings_are_rejected():
    with pytest.raises(ValueError, match="unknown task"):
        Trainer("survival")
    with pytest.raises(ValueError, match="batch_size"):
        Trainer("mortality", batch_size=0)
    with pytest.raises(ValueError, match="patience"):
        Trainer("mortality", patience=0)
    with pytest.raises(ValueError, match="eval_batch_size must be >= 2"):
        Trainer("mortality", eval_batch_size=1)


class _PrecisionProbe(Linear):
    """Records the dtype of its output in each mode and whether the backward ran under autocast."""

    def __init__(self):
        super().__init__()
        self.seen = {}

    def forward(self, batch):
        out = super().forward(batch)
        self.seen["train" if self.training else "eval"] = out["logits"].dtype
        return out

    def on_after_backward(self, ctx):
        self.seen["backward_autocast"] = torch.is_autocast_enabled("cpu")


@pytest.mark.parametrize("precision,dtype", [("32", torch.float32), ("bf16-mixed", torch.bfloat16)])
def test_precision_sets_the_forward_dtype_and_keeps_float32_weights(precision, dtype):
    train, val = _sources(_toy(), _toy(seed=1))
    torch.manual_seed(0)
    module = _PrecisionProbe()
    trainer = Trainer("mortality", lr=0.05, batch_size=32, max_epochs=3, patience=3,
                      device="cpu", precision=precision)
    history = trainer.fit(module, train, val)
    assert module.seen == {"train": dtype, "eval": dtype, "backward_autocast": False}
    assert all(p.dtype == torch.float32 for p in module.parameters())
    assert history["best_score"] > 0.9, "the toy problem is learned in either precision"
    prob = trainer.predict(module, val)["prob"]
    assert prob.dtype == np.float64 and module.seen["eval"] == dtype
    assert trainer.settings()["precision"] == precision


def test_mixed_precision_changes_the_result_and_an_unknown_precision_is_refused():
    from fusion.registry import HyperparameterError

    train, val = _sources(_toy(), _toy(seed=1))
    probs = []
    for precision in ("32", "bf16-mixed"):
        torch.manual_seed(0)
        module = Linear()
        trainer = Trainer("mortality", lr=0.05, batch_size=32, max_epochs=2, patience=2,
                          device="cpu", precision=precision)
        trainer.fit(module, train, val)
        probs.append(trainer.predict(module, val)["prob"])
    assert not np.array_equal(*probs)
    np.testing.assert_allclose(*probs, atol=0.05)
    with pytest.raises(HyperparameterError, match="precision='bf16' is not one of 32, bf16-mixed"):
        Trainer("mortality", precision="bf16")


def test_torch_methods_record_the_precision_and_refuse_an_unknown_one():
    from fusion.methods.latefusion import LateFusion
    from fusion.registry import HyperparameterError

    assert LateFusion.resolve_hyperparameters(features="cached")["precision"] == "32"
    method = LateFusion(features="cached", precision="bf16-mixed")
    assert method._trainer("mortality").precision == "bf16-mixed"
    with pytest.raises(HyperparameterError, match="'latefusion': hyperparameter precision='fp16' is not one"):
        LateFusion(features="cached", precision="fp16")
