"""The one torch training loop of cbstore: AdamW, early stopping on a validation metric, best state.

Every neural method trains through :class:`Trainer`. A method supplies an ``nn.Module`` whose
``forward(batch: dict) -> dict`` returns

* ``"logits"`` ``[B, C]`` (required): the prediction; probabilities are ``sigmoid(logits)``
  (binary and multi-label tasks) or ``softmax(logits)`` (LoS), always;
* ``"logits_ehr"`` / ``"logits_cxr"`` (optional): per-modality predictions, reported as
  per-modality probabilities;
* ``"aux_loss"`` (optional scalar): added to the task loss.

A module may define ``training_loss(out, batch, task) -> Tensor`` to replace the default loss
(``task_loss(out["logits"], batch["y"]) + aux_loss``), e.g. to train modality heads separately.

Batches are dicts of tensors built by :class:`PartBatches` from a :class:`fusion.data.FusionPart`:
``y`` and, depending on the inputs, ``ehr``/``ehr_mask`` ``[B, T, F]``, ``cxr`` ``[B, 1, H, W]``,
``ehr_emb``/``cxr_emb`` ``[B, d]`` (NaN where absent), ``cxr_present`` ``[B]`` (bool).

Early stopping monitors AUROC (binary tasks), macro AUROC over the labels with both classes
(phenotype) or macro F1 (LoS) on the validation part, computed with scikit-learn; when the
validation labels make that metric undefined (a single class), the validation loss is monitored
instead. The final scoring is the evaluator's job (:mod:`fusion.evaluation`).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import random

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from cbstore.dataset import PartBatches  # noqa: F401  (public here too; the read path owns it)
from cbstore.tasks import TASK_SPECS
from fusion import tasks

__all__ = ["PartBatches", "TrainHistory", "Trainer", "choose_monitor", "deterministic_mode",
           "monitor_score", "probabilities", "resolve_device", "seed_everything", "task_loss",
           "torch_threads"]

log = logging.getLogger(__name__)

#: Metric monitored for early stopping, per task (higher is better; ``TaskSpec.monitor``);
#: "val_loss" is the fallback.
MONITORS = {name: spec.monitor for name, spec in TASK_SPECS.items()}


def seed_everything(seed: int) -> None:
    """Seed Python ``random``, NumPy's global generator and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(device=None) -> torch.device:
    """``None``/``"auto"`` -> CUDA when available, else CPU; otherwise ``torch.device(device)``."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@contextlib.contextmanager
def deterministic_mode(device: torch.device):
    """Run with deterministic torch algorithms, restoring the previous settings afterwards.

    On CPU every op used by cbstore's modules has a deterministic implementation. On CUDA,
    cuDNN is put in deterministic mode and non-deterministic ops only warn.
    """
    previous = (torch.are_deterministic_algorithms_enabled(),
                torch.is_deterministic_algorithms_warn_only_enabled())
    cudnn = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
        torch.use_deterministic_algorithms(True, warn_only=True)
    else:
        torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn


@contextlib.contextmanager
def torch_threads(n: int | None):
    """Use ``n`` intra-op CPU threads (None: leave as is), restoring the previous count afterwards.

    Results on CPU are bit-identical only for a fixed thread count, and small models gain
    nothing from more threads on a busy machine (threads spin-wait).
    """
    previous = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def task_loss(logits: torch.Tensor, y: torch.Tensor, task,
              weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean task loss: BCE-with-logits (binary, multi-label) or cross-entropy (multiclass).

    Delegates to :func:`fusion.tasks.task_loss` (see there for the parameters); ``task`` is a
    task name or a :class:`cbstore.tasks.TaskSpec`.
    """
    return tasks.task_loss(logits, y, task, weight)


def probabilities(logits: torch.Tensor, task) -> torch.Tensor:
    """Sigmoid (binary, multi-label) or softmax (multiclass) of ``logits`` (:mod:`fusion.tasks`)."""
    return tasks.probabilities(logits, task)


def choose_monitor(task, y_val: np.ndarray) -> str:
    """The metric to monitor: the task's metric if defined on these labels, else ``val_loss``."""
    return tasks.choose_monitor(task, y_val)


def monitor_score(metric: str, task, y_true: np.ndarray, prob: np.ndarray) -> float:
    """Validation score (higher is better) for ``metric`` (see :data:`MONITORS`)."""
    return tasks.monitor_score(metric, task, y_true, prob)


class _BatchOrder(Sampler):
    """Row batches: a seeded permutation per epoch (train) or the natural order (evaluation).

    A trailing batch of a single row is merged into the previous one (batch norm cannot train
    on one sample).
    """

    def __init__(self, n: int, batch_size: int, generator: torch.Generator | None):
        self.n, self.batch_size, self.generator = n, batch_size, generator

    def _batches(self, order: list) -> list:
        batches = [order[i:i + self.batch_size] for i in range(0, self.n, self.batch_size)]
        if self.generator is not None and len(batches) > 1 and len(batches[-1]) == 1:
            last = batches.pop()
            batches[-1] = batches[-1] + last
        return batches

    def __iter__(self):
        if self.generator is None:
            order = list(range(self.n))
        else:
            order = torch.randperm(self.n, generator=self.generator).tolist()
        return iter(self._batches(order))

    def __len__(self) -> int:
        return len(self._batches(list(range(self.n))))


class TrainHistory(dict):
    """What happened in :meth:`Trainer.fit` (a JSON-serialisable dict).

    Keys: ``monitor``, ``epochs`` (list of ``{epoch, train_loss, val_loss, val_score}``),
    ``best_epoch``, ``best_score``, ``stopped_early``.
    """


class Trainer:
    """Plain torch training loop with early stopping (see the module docstring).

    Parameters
    ----------
    task : str
        Decides the loss, the probabilities and the monitored metric.
    lr, weight_decay : float
        AdamW settings.
    batch_size : int
    max_epochs : int
    patience : int
        Epochs without improvement of the monitored metric before stopping.
    seed : int
        Seeds the batch order and dropout.
    device : str or torch.device, optional
        ``None`` picks CUDA when available.
    progress : bool
        Show a tqdm bar over epochs with the validation metric.
    num_threads : int, optional
        CPU threads while training and predicting (see :func:`torch_threads`).
    """

    def __init__(self, task: str, *, lr: float = 1e-4, weight_decay: float = 0.01,
                 batch_size: int = 16, max_epochs: int = 50, patience: int = 10, seed: int = 0,
                 device=None, progress: bool = False, num_threads: int | None = None):
        if task not in MONITORS:
            raise ValueError(f"unknown task {task!r}; valid tasks: {', '.join(MONITORS)}")
        for name, value in (("batch_size", batch_size), ("max_epochs", max_epochs)):
            if int(value) < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if int(patience) < 1:
            raise ValueError(f"patience must be >= 1, got {patience}")
        self.task = task
        self.lr, self.weight_decay = float(lr), float(weight_decay)
        self.batch_size, self.max_epochs, self.patience = int(batch_size), int(max_epochs), int(patience)
        self.seed = int(seed)
        self.device = resolve_device(device)
        self.progress = progress
        self.num_threads = num_threads

    def _loader(self, source: Dataset, *, train: bool, batch_size: int) -> DataLoader:
        generator = None
        if train:
            generator = torch.Generator()
            generator.manual_seed(self.seed)
        return DataLoader(source, batch_size=None, sampler=_BatchOrder(len(source), batch_size, generator))

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def _loss(self, module: nn.Module, out: dict, batch: dict) -> torch.Tensor:
        if hasattr(module, "training_loss"):
            return module.training_loss(out, batch, self.task)
        loss = task_loss(out["logits"], batch["y"], self.task)
        if "aux_loss" in out:
            loss = loss + out["aux_loss"]
        return loss

    def fit(self, module: nn.Module, train: Dataset, val: Dataset) -> TrainHistory:
        """Train ``module`` in place and leave it in its best validation state (eval mode).

        Parameters
        ----------
        module : nn.Module
            Returns a dict with ``logits`` (see the module docstring).
        train, val : Dataset
            Batch sources (:class:`PartBatches`). An empty ``val`` disables early stopping (the
            last epoch is kept).

        Returns
        -------
        TrainHistory
        """
        from tqdm.auto import tqdm

        if len(train) == 0:
            raise ValueError("the training part is empty")
        seed_everything(self.seed)
        module.to(self.device)
        # The fused kernel updates all parameters in one call; the default per-tensor loop was
        # about 40 % of a cached late-fusion epoch on CPU.
        optimiser = torch.optim.AdamW(module.parameters(), lr=self.lr, weight_decay=self.weight_decay,
                                      fused=self.device.type in ("cpu", "cuda"))
        loader = self._loader(train, train=True, batch_size=self.batch_size)
        y_val = val.part.y[val.rows] if len(val) else np.empty((0,))
        monitor = choose_monitor(self.task, y_val) if len(val) else "none"
        history = TrainHistory(monitor=monitor, epochs=[], best_epoch=None, best_score=None,
                               stopped_early=False)
        best_state, best_score, since_best = None, -np.inf, 0
        bar = tqdm(range(1, self.max_epochs + 1), desc="epochs", unit="epoch",
                   disable=not self.progress, leave=False)
        with deterministic_mode(self.device), torch_threads(self.num_threads):
            for epoch in bar:
                module.train()
                total, count = 0.0, 0
                for batch in loader:
                    batch = self._to_device(batch)
                    out = module(batch)
                    loss = self._loss(module, out, batch)
                    optimiser.zero_grad(set_to_none=True)
                    loss.backward()
                    optimiser.step()
                    n = int(batch["y"].shape[0])
                    total += float(loss.detach()) * n
                    count += n
                record = {"epoch": epoch, "train_loss": total / count}
                if monitor == "none":
                    history["epochs"].append(record)
                    history["best_epoch"] = epoch
                    continue
                val_out = self._evaluate(module, val)
                record["val_loss"] = val_out["loss"]
                score = (-val_out["loss"] if monitor == "val_loss" else
                         monitor_score(monitor, self.task, y_val, val_out["prob"]))
                record["val_score"] = score
                history["epochs"].append(record)
                bar.set_postfix({f"val_{monitor}" if monitor != "val_loss" else "val_loss":
                                 f"{abs(score) if monitor == 'val_loss' else score:.4f}"})
                if score > best_score:
                    best_score, since_best = score, 0
                    best_state = copy.deepcopy(module.state_dict())
                    history["best_epoch"], history["best_score"] = epoch, float(score)
                else:
                    since_best += 1
                    if since_best >= self.patience:
                        history["stopped_early"] = True
                        break
        bar.close()
        if best_state is not None:
            module.load_state_dict(best_state)
        module.eval()
        log.info("trained %d epoch(s); best epoch %s (%s = %s)", len(history["epochs"]),
                 history["best_epoch"], monitor, history["best_score"])
        return history

    @torch.no_grad()
    def _evaluate(self, module: nn.Module, source: Dataset) -> dict:
        module.eval()
        logits, losses, sizes = [], [], []
        for batch in self._loader(source, train=False, batch_size=self.batch_size * 4):
            batch = self._to_device(batch)
            out = module(batch)
            losses.append(float(task_loss(out["logits"], batch["y"], self.task)))
            sizes.append(int(batch["y"].shape[0]))
            logits.append(out["logits"].float())
        logits = torch.cat(logits)
        return {"prob": probabilities(logits, self.task).cpu().numpy(),
                "loss": float(np.average(losses, weights=sizes))}

    @torch.no_grad()
    def predict(self, module: nn.Module, source: Dataset) -> dict:
        """Probabilities of every output the module returns.

        Returns
        -------
        dict
            ``"prob"`` (from ``logits``) and, where returned, ``"ehr"`` and ``"cxr"`` (from
            ``logits_ehr`` / ``logits_cxr``): float64 ``[n, C]`` numpy arrays.
        """
        module.to(self.device)
        module.eval()
        keys = {"logits": "prob", "logits_ehr": "ehr", "logits_cxr": "cxr"}
        chunks: dict = {v: [] for v in keys.values()}
        with deterministic_mode(self.device), torch_threads(self.num_threads):
            for batch in self._loader(source, train=False, batch_size=self.batch_size * 4):
                out = module(self._to_device(batch))
                for key, name in keys.items():
                    if key in out:
                        chunks[name].append(probabilities(out[key].float(), self.task).cpu())
        return {name: torch.cat(parts).double().numpy() for name, parts in chunks.items() if parts}
