"""The one torch training loop of cbstore, and the points where a method may hook into it.

Every neural method trains through :class:`Trainer`. A method supplies an ``nn.Module`` whose
``forward(batch: dict) -> dict`` returns

* ``"logits"`` ``[B, C]`` (required): the prediction; probabilities are ``sigmoid(logits)``
  (binary and multi-label tasks) or ``softmax(logits)`` (LoS), always;
* ``"logits_ehr"`` / ``"logits_cxr"`` (optional): per-modality predictions, reported as
  per-modality probabilities;
* ``"aux_loss"`` (optional scalar): added to the task loss by the default loss.

Batches are dicts of tensors built by :class:`PartBatches` from a :class:`fusion.data.FusionPart`:
``y`` and, depending on the inputs, ``ehr``/``ehr_mask`` ``[B, T, F]``, ``cxr`` ``[B, 1, H, W]``,
``ehr_emb``/``cxr_emb`` ``[B, d]`` (NaN where absent), ``cxr_present`` ``[B]`` (bool).

Extension points
----------------
The module may define any of these methods (names as in PyTorch Lightning); the trainer calls
them at fixed points of its single loop and passes a :class:`FitContext` (``ctx``: task, stage,
epoch, step, max epochs, optimisers, device)::

    fit_stages()                                  -> list of FitStage (default: one stage)
    on_fit_start(ctx, train)                      once; train = the training batch source
    for each stage:
        configure_optimizers(ctx)                 default: AdamW over the trainable parameters
        for each epoch:
            on_train_epoch_start(ctx)             e.g. snapshot the weights of the epoch start
            train_batch_order(ctx, train)         this epoch's row order (None: seeded shuffle)
            for each batch:
                training_step(batch, ctx)         default: forward, loss, backward, step
                    loss(out, batch, ctx)         default: task loss + out["aux_loss"]
                    on_after_backward(ctx)        after each backward (ctx.backward in a
                                                  training_step of its own)
                on_train_batch_end(ctx, outputs, batch)
            validation (eval mode, the same loss) and early stopping
            on_train_epoch_end(ctx)               may grow the module or add a parameter group
            schedulers step; epoch checkpoint
        best state of the stage restored
    on_fit_end(ctx)

A module that grows (adds a head at an epoch end) is saved and restored through
``get_extra_state`` / ``set_extra_state``: ``get_extra_state`` returns its architecture (and any
data-dependent tensor such as a neighbour bank), and ``set_extra_state`` rebuilds exactly that
architecture, growing or shrinking, so a state dict taken before the module grew loads back into a
grown module and the other way round. Parameters that appear during training are trained: after
``on_train_epoch_end`` every trainable parameter that no optimiser holds is added to the first
optimiser as a new parameter group.

Early stopping monitors AUROC (binary tasks), macro AUROC over the labels with both classes
(phenotype) or macro F1 (LoS) on the validation part, computed with scikit-learn; when the
validation labels make that metric undefined (a single class), the validation loss (the module's
own loss in eval mode) is monitored instead. The final scoring is the evaluator's job
(:mod:`fusion.evaluation`).

Process state
-------------
While it runs, a fit sets three process-wide torch settings and restores them when it ends
(:func:`fit_process_state`): the global torch random generator (forked: seeded with the fit's seed
for initialisation and dropout, then put back as it was), the intra-op thread count
(``num_threads``) and deterministic algorithms (plus cuDNN flags and ``CUBLAS_WORKSPACE_CONFIG`` on
CUDA; uninitialised memory is not filled, :func:`deterministic_mode`). The batch order comes from
a ``torch.Generator`` owned by the fit. Python's ``random`` and NumPy's global generator are not
touched. Concurrency is by processes (one fit per process), not threads: torch's thread count
and deterministic flag are process-wide.

Epoch checkpoints
-----------------
Given a ``checkpoint`` path, :meth:`Trainer.fit` writes the whole fit state there after every
epoch (module, optimisers, schedulers, early-stopping state, history, the batch-order and torch
generator states) and, when the file exists at the start, resumes from it; the result is
bit-identical on CPU to an uninterrupted fit. State a module keeps across epochs must live in its
state dict (buffers or extra state) to survive a resume.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import os
import pathlib

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from cbstore.format.tasks import TASK_SPECS
from cbstore.inputs.dataset import PartBatches  # noqa: F401  (public here too; the read path owns it)
from fusion import tasks
from fusion.registry import PRECISIONS, FusionError, HyperparameterError

__all__ = ["CheckpointError", "FitContext", "FitStage", "PRECISIONS", "PartBatches", "TrainHistory",
           "Trainer", "choose_monitor", "deterministic_mode", "fit_process_state", "monitor_score",
           "probabilities", "resolve_device", "task_loss", "torch_threads"]

log = logging.getLogger(__name__)

#: Metric monitored for early stopping, per task (higher is better; ``TaskSpec.monitor``);
#: "val_loss" is the fallback.
MONITORS = {name: spec.monitor for name, spec in TASK_SPECS.items()}
#: Version of the epoch checkpoint layout (a checkpoint of another version is refused).
CHECKPOINT_FORMAT = 1


class CheckpointError(FusionError, ValueError):
    """An epoch checkpoint cannot be read or belongs to a fit with other settings."""


def resolve_device(device=None) -> torch.device:
    """``None``/``"auto"`` -> CUDA when available, else CPU; otherwise ``torch.device(device)``."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@contextlib.contextmanager
def deterministic_mode(device: torch.device):
    """Run with deterministic torch algorithms, restoring the previous settings afterwards.

    On CPU every op used by cbstore's modules has a deterministic implementation. On CUDA,
    cuDNN is put in deterministic mode, non-deterministic ops only warn, and
    ``CUBLAS_WORKSPACE_CONFIG`` is set when unset (and unset again afterwards).

    Uninitialised memory is not filled (``torch.utils.deterministic.fill_uninitialized_memory``
    off): that debugging aid of deterministic mode writes NaN into every ``torch.empty``, which
    no op of cbstore reads before writing; on CPU it filled about 190 MB of workspace per LSTM
    layer and training step (``mmtm``: about 13 % of a layer's forward and backward).
    """
    previous = (torch.are_deterministic_algorithms_enabled(),
                torch.is_deterministic_algorithms_warn_only_enabled())
    fill = torch.utils.deterministic.fill_uninitialized_memory
    cudnn = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    set_cublas = device.type == "cuda" and "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    if device.type == "cuda":
        if set_cublas:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
        torch.use_deterministic_algorithms(True, warn_only=True)
    else:
        torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.utils.deterministic.fill_uninitialized_memory = fill
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn
        if set_cublas:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


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


@contextlib.contextmanager
def fit_process_state(seed: int, device: torch.device, num_threads: int | None):
    """What a fit sets process-wide, put back as it was when the block ends.

    Inside the block the global torch generator (CPU, and the CUDA device's) is seeded with
    ``seed`` (it drives weight initialisation and dropout), torch uses ``num_threads`` intra-op
    threads and deterministic algorithms (:func:`deterministic_mode`). On exit, normal or not,
    the generator states, the thread count and the deterministic settings are restored.

    Parameters
    ----------
    seed : int
    device : torch.device
    num_threads : int or None
        None leaves the thread count as it is.
    """
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), deterministic_mode(device), \
            torch_threads(num_threads):
        torch.default_generator.manual_seed(seed)
        if devices:
            with torch.cuda.device(devices[0]):
                torch.cuda.manual_seed(seed)
        yield


def task_loss(logits: torch.Tensor, y: torch.Tensor, task,
              weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean task loss: BCE-with-logits (binary, multi-label) or cross-entropy (multiclass).

    Delegates to :func:`fusion.tasks.task_loss` (see there for the parameters); ``task`` is a
    task name or a :class:`cbstore.format.tasks.TaskSpec`.
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

    A trailing batch of a single row is merged into the previous one, in training (batch norm
    cannot train on one sample) and in evaluation alike; only a part of one row gives a batch of
    one.
    """

    def __init__(self, n: int, batch_size: int, generator: torch.Generator | None):
        self.n, self.batch_size, self.generator = n, batch_size, generator
        self.fixed: list | None = None  # this epoch's order from the module (train_batch_order)

    def _batches(self, order: list) -> list:
        batches = [order[i:i + self.batch_size] for i in range(0, self.n, self.batch_size)]
        if len(batches) > 1 and len(batches[-1]) == 1:
            last = batches.pop()
            batches[-1] = batches[-1] + last
        return batches

    def __iter__(self):
        if self.fixed is not None:
            order = self.fixed
        elif self.generator is None:
            order = list(range(self.n))
        else:
            order = torch.randperm(self.n, generator=self.generator).tolist()
        return iter(self._batches(order))

    def __len__(self) -> int:
        return len(self._batches(list(range(self.n))))


def _batches(source: Dataset, batch_size: int, generator: torch.Generator | None = None):
    return DataLoader(source, batch_size=None,
                      sampler=_BatchOrder(len(source), batch_size, generator))


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _hook(module: nn.Module, name: str):
    """The module's method ``name`` if its class defines one (a submodule so named is no hook)."""
    attribute = getattr(type(module), name, None)
    if attribute is None or isinstance(attribute, nn.Module) or not callable(attribute):
        return None
    return getattr(module, name)


def _call(module: nn.Module, name: str, *args):
    hook = _hook(module, name)
    return None if hook is None else hook(*args)


class TrainHistory(dict):
    """What happened in :meth:`Trainer.fit` (a JSON-serialisable dict).

    Keys: ``monitor``; ``epochs`` (list of ``{stage, epoch, train_loss, val_loss, val_score}`` plus
    what the hooks logged with :meth:`FitContext.log`); ``stages`` (per stage: ``name``,
    ``epochs``, ``best_epoch``, ``best_score``, ``stopped_early``); ``best_epoch``, ``best_score``
    and ``stopped_early`` of the last stage; ``resumed`` (``{stage, epoch}`` of each resume from an
    epoch checkpoint, only when there was one).
    """


@dataclasses.dataclass(frozen=True)
class FitStage:
    """One stage of a fit: which parameters train, for how long, what early stopping watches.

    Each stage gets fresh optimisers (``configure_optimizers`` is called at its start), its own
    early stopping, and ends in its best validation state, from which the next stage starts.

    Parameters
    ----------
    name : str
    trainable : tuple of str, optional
        Submodule names (as in ``module.named_modules()``, e.g. ``"ehr_encoder"``) whose parameters
        train in this stage; the other parameters are frozen (``requires_grad`` False) for the
        stage. None: every parameter that was trainable when the fit started.
    max_epochs, patience : int, optional
        None: the trainer's.
    monitor_output : str
        Output of the module whose probabilities early stopping scores (e.g. ``"logits_ehr"`` for
        a stage that trains the EHR branch alone).
    """

    name: str = "fit"
    trainable: tuple | None = None
    max_epochs: int | None = None
    patience: int | None = None
    monitor_output: str = "logits"

    def __post_init__(self):
        if self.trainable is not None:
            names = self.trainable
            if isinstance(names, str) or not all(isinstance(t, str) for t in names):
                raise TypeError(f"stage {self.name!r}: trainable must be a tuple of submodule names, "
                                f"got {self.trainable!r}")
            object.__setattr__(self, "trainable", tuple(self.trainable))
        for key in ("max_epochs", "patience"):
            value = getattr(self, key)
            if value is not None and int(value) < 1:
                raise ValueError(f"stage {self.name!r}: {key} must be >= 1, got {value}")

    def trains(self, parameter: str) -> bool:
        """Whether the parameter named ``parameter`` trains in this stage."""
        if self.trainable is None:
            return True
        return any(parameter == name or parameter.startswith(name + ".") for name in self.trainable)


class FitContext:
    """What the trainer passes to a module's hooks (see the module docstring).

    Attributes
    ----------
    task : str
    device : torch.device
    seed : int
    lr, weight_decay : float
        The trainer's AdamW settings (see :meth:`default_optimizer`).
    eval_batch_size : int
    stage : FitStage
        The current stage (the first one in ``on_fit_start``); ``stage_index`` its position.
    epoch : int
        1-based epoch within the current stage (0 before its first epoch).
    max_epochs : int
        Epoch limit of the current stage.
    step : int
        Training batches completed since the fit started.
    optimizers, schedulers : list
        Those of the current stage (from ``configure_optimizers``).
    training : bool
        True during training steps, False during validation.
    """

    def __init__(self, trainer: "Trainer", module: nn.Module):
        self.task, self.device, self.seed = trainer.task, trainer.device, trainer.seed
        self.lr, self.weight_decay = trainer.lr, trainer.weight_decay
        self.eval_batch_size = trainer.eval_batch_size
        self.stage, self.stage_index = FitStage(), 0
        self.epoch, self.max_epochs, self.step = 0, trainer.max_epochs, 0
        self.optimizers: list = []
        self.schedulers: list = []
        self.training = False
        self._module = module
        self._logged: dict = {}

    def default_optimizer(self, params) -> torch.optim.Optimizer:
        """The trainer's AdamW (lr, weight decay, fused kernel) over ``params``.

        ``params`` is what ``torch.optim.AdamW`` takes: tensors, or parameter groups (dicts with
        ``params`` and optional settings such as ``lr``).
        """
        # The fused kernel updates all parameters in one call; the default per-tensor loop was
        # about 40 % of a cached late-fusion epoch on CPU.
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay,
                                 fused=self.device.type in ("cpu", "cuda"))

    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()`` followed by the module's ``on_after_backward(ctx)``, both outside
        autocast (``precision="bf16-mixed"`` casts the forward passes only)."""
        with torch.autocast(self.device.type, enabled=False):
            loss.backward()
            _call(self._module, "on_after_backward", self)

    def batches(self, source: Dataset):
        """Batches of ``source`` in their natural order, on the device (e.g. to build a bank)."""
        for batch in _batches(source, self.eval_batch_size):
            yield _to_device(batch, self.device)

    def log(self, name: str, value) -> None:
        """Record a number in this epoch's history entry (e.g. how many heads the module has)."""
        self._logged[str(name)] = float(value)


def _optimizers_of(value, owner: str) -> tuple[list, list]:
    """Optimisers and schedulers from what ``configure_optimizers`` returned."""
    optimizers, schedulers = None, []
    if isinstance(value, torch.optim.Optimizer):
        optimizers = [value]
    elif isinstance(value, dict) and "optimizer" in value:
        optimizers = [value["optimizer"]]
        schedulers = [value["lr_scheduler"]] if value.get("lr_scheduler") is not None else []
    elif (isinstance(value, tuple) and len(value) == 2
          and all(isinstance(v, (list, tuple)) for v in value)):
        optimizers, schedulers = list(value[0]), list(value[1])
    elif isinstance(value, (list, tuple)):
        optimizers = list(value)
    if (not optimizers or not all(isinstance(o, torch.optim.Optimizer) for o in optimizers)
            or not all(callable(getattr(s, "step", None)) for s in schedulers)):
        raise TypeError(
            f"{owner}.configure_optimizers returned {value!r}; return an optimizer, a list of "
            "optimizers, ([optimizers], [schedulers]) or {'optimizer': ..., 'lr_scheduler': ...}")
    return optimizers, schedulers


def _step_outputs(value, owner: str) -> dict:
    """``training_step``'s result as a dict with a detached ``loss``."""
    if isinstance(value, torch.Tensor):
        value = {"loss": value}
    if not isinstance(value, dict) or not isinstance(value.get("loss"), torch.Tensor):
        raise TypeError(f"{owner}.training_step must return the loss tensor or a dict with a "
                        f"'loss' tensor, got {type(value).__name__}")
    return {**value, "loss": value["loss"].detach()}


@dataclasses.dataclass
class _StageProgress:
    """Early-stopping state of the current stage (saved in epoch checkpoints)."""

    epoch: int = 0
    best_score: float = -math.inf
    best_state: dict | None = None
    since_best: int = 0
    stopped: bool = False

    def as_dict(self) -> dict:
        return {"epoch": self.epoch, "best_score": self.best_score, "best_state": self.best_state,
                "since_best": self.since_best, "stopped": self.stopped}


class Trainer:
    """Plain torch training loop with early stopping and extension points (module docstring).

    Parameters
    ----------
    task : str
        Decides the default loss, the probabilities and the monitored metric.
    lr, weight_decay : float
        AdamW settings of the default optimiser.
    batch_size : int
    eval_batch_size : int, optional
        Batch size for validation and prediction (no gradients, so it can be larger); None: 4 x
        ``batch_size``. At least 2.
    max_epochs : int
        Per stage, unless the stage sets its own.
    patience : int
        Epochs without improvement of the monitored metric before stopping (per stage).
    seed : int
        Seeds the batch order, initialisation done inside the fit and dropout.
    device : str or torch.device, optional
        ``None`` picks CUDA when available.
    progress : bool
        Show a tqdm bar over epochs with the validation metric.
    num_threads : int, optional
        CPU threads while training and predicting (see :func:`torch_threads`).
    precision : {"32", "bf16-mixed"}
        ``"bf16-mixed"`` runs every forward pass (training steps, validation, prediction) under
        ``torch.autocast`` with bfloat16 on the trainer's device; weights, gradients, the
        optimiser and the backward pass stay float32 (:data:`PRECISIONS`). Opt-in: results
        differ from float32 ones.
    """

    def __init__(self, task: str, *, lr: float = 1e-4, weight_decay: float = 0.01,
                 batch_size: int = 16, eval_batch_size: int | None = None, max_epochs: int = 50,
                 patience: int = 10, seed: int = 0, device=None, progress: bool = False,
                 num_threads: int | None = None, precision: str = "32"):
        if task not in MONITORS:
            raise ValueError(f"unknown task {task!r}; valid tasks: {', '.join(MONITORS)}")
        for name, value in (("batch_size", batch_size), ("max_epochs", max_epochs),
                            ("patience", patience)):
            if int(value) < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        eval_batch_size = 4 * int(batch_size) if eval_batch_size is None else int(eval_batch_size)
        if eval_batch_size < 2:
            raise ValueError(f"eval_batch_size must be >= 2, got {eval_batch_size}")
        if precision not in PRECISIONS:
            raise HyperparameterError(f"precision={precision!r} is not one of "
                                      f"{', '.join(PRECISIONS)}")
        self.task = task
        self.lr, self.weight_decay = float(lr), float(weight_decay)
        self.batch_size, self.eval_batch_size = int(batch_size), eval_batch_size
        self.max_epochs, self.patience = int(max_epochs), int(patience)
        self.seed = int(seed)
        self.device = resolve_device(device)
        self.progress = progress
        self.num_threads = num_threads
        self.precision = precision

    def autocast(self):
        """The context of a forward pass: bfloat16 autocast with ``precision="bf16-mixed"``,
        else none (float32)."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16,
                              enabled=self.precision == "bf16-mixed")

    def fit(self, module: nn.Module, train: Dataset, val: Dataset, *,
            checkpoint=None) -> TrainHistory:
        """Train ``module`` in place and leave it in its best validation state (eval mode).

        Parameters
        ----------
        module : nn.Module
            Returns a dict with ``logits``; may define the hooks of the module docstring.
        train, val : Dataset
            Batch sources (:class:`PartBatches`). An empty ``val`` disables early stopping (the
            last epoch is kept).
        checkpoint : path, optional
            Epoch checkpoint file: written after every epoch, and resumed from when it exists.

        Returns
        -------
        TrainHistory

        Raises
        ------
        CheckpointError
            The checkpoint cannot be read or was written by a fit with other settings.
        """
        if len(train) == 0:
            raise ValueError("the training part is empty")
        path = None if checkpoint is None else pathlib.Path(checkpoint)
        with fit_process_state(self.seed, self.device, self.num_threads):
            history = _Fit(self, module, train, val, path).run()
        log.info("trained %d epoch(s); best epoch %s (%s = %s)", len(history["epochs"]),
                 history["best_epoch"], history["monitor"], history["best_score"])
        return history

    def loss(self, module: nn.Module, out: dict, batch: dict, ctx: FitContext) -> torch.Tensor:
        """The module's ``loss(out, batch, ctx)``, or the task loss plus ``out["aux_loss"]``."""
        hook = _hook(module, "loss")
        if hook is not None:
            return hook(out, batch, ctx)
        loss = task_loss(out["logits"], batch["y"], self.task)
        if "aux_loss" in out:
            loss = loss + out["aux_loss"]
        return loss

    @torch.no_grad()
    def evaluate(self, module: nn.Module, source: Dataset, ctx: FitContext,
                 output: str = "logits") -> dict:
        """Validation pass: probabilities of ``output`` and the mean of the module's loss."""
        module.eval()
        ctx.training = False
        logits, losses, sizes = [], [], []
        for batch in _batches(source, self.eval_batch_size):
            batch = _to_device(batch, self.device)
            with self.autocast():
                out = module(batch)
                if output not in out:
                    raise ValueError(f"stage {ctx.stage.name!r} monitors output {output!r} but "
                                     f"{type(module).__name__} returns only {sorted(out)}")
                losses.append(float(self.loss(module, out, batch, ctx)))
            sizes.append(int(batch["y"].shape[0]))
            logits.append(out[output].float())
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
            for batch in _batches(source, self.eval_batch_size):
                with self.autocast():
                    out = module(_to_device(batch, self.device))
                for key, name in keys.items():
                    if key in out:
                        chunks[name].append(probabilities(out[key].float(), self.task).cpu())
        return {name: torch.cat(parts).double().numpy() for name, parts in chunks.items() if parts}

    def settings(self) -> dict:
        """The settings an epoch checkpoint must share with the fit that resumes it."""
        return {"task": self.task, "lr": self.lr, "weight_decay": self.weight_decay,
                "batch_size": self.batch_size, "max_epochs": self.max_epochs,
                "patience": self.patience, "seed": self.seed, "precision": self.precision}


class _Fit:
    """One call of :meth:`Trainer.fit`: the loop, its hooks and its epoch checkpoints."""

    def __init__(self, trainer: Trainer, module: nn.Module, train: Dataset, val: Dataset,
                 checkpoint: pathlib.Path | None):
        self.trainer, self.module, self.train, self.val = trainer, module, train, val
        self.checkpoint = checkpoint
        self.device = trainer.device
        self.order = torch.Generator()
        self.order.manual_seed(trainer.seed)
        self.sampler = _BatchOrder(len(train), trainer.batch_size, self.order)
        self.loader = DataLoader(train, batch_size=None, sampler=self.sampler)
        self.y_val = val.part.y[val.rows] if len(val) else np.empty((0,))
        monitor = choose_monitor(trainer.task, self.y_val) if len(val) else "none"
        self.history = TrainHistory(monitor=monitor, epochs=[], stages=[], best_epoch=None,
                                    best_score=None, stopped_early=False)
        self.ctx = FitContext(trainer, module)
        self.stages = self._stages()
        self.ctx.stage = self.stages[0]
        self.flags: dict = {}  # requires_grad of each parameter before the fit

    # ----- the loop -----------------------------------------------------------------------------
    def run(self) -> TrainHistory:
        module = self.module
        module.to(self.device)
        self._record_flags()
        try:
            _call(module, "on_fit_start", self.ctx, self.train)
            module.to(self.device)
            saved = self._read_checkpoint()
            if saved is not None:
                self.history = TrainHistory(saved["history"])
                self.history.setdefault("resumed", []).append(
                    {"stage": self.stages[saved["stage"]].name,
                     "epoch": saved["progress"]["epoch"]})
                self.ctx.step = saved["step"]
            for index, stage in enumerate(self.stages):
                if saved is not None and index < saved["stage"]:
                    continue
                progress = self._start_stage(index, stage, saved)
                saved = None
                self._run_stage(progress)
            _call(module, "on_fit_end", self.ctx)
        finally:
            for name, parameter in module.named_parameters():
                parameter.requires_grad_(self.flags.get(name, parameter.requires_grad))
        module.eval()
        return self.history

    def _start_stage(self, index: int, stage: FitStage, saved: dict | None) -> _StageProgress:
        ctx = self.ctx
        ctx.stage, ctx.stage_index, ctx.epoch = stage, index, 0
        ctx.max_epochs = stage.max_epochs or self.trainer.max_epochs
        if saved is not None:
            self.module.load_state_dict(saved["module"])
            self.module.to(self.device)
        self._apply_stage()
        ctx.optimizers, ctx.schedulers = self._configure_optimizers()
        if saved is None:
            self.history.update(best_epoch=None, best_score=None, stopped_early=False)
            return _StageProgress()
        self._load_optimizers(saved)
        progress = _StageProgress(**saved["progress"])
        ctx.epoch = progress.epoch
        self.order.set_state(saved["rng"]["order"])
        torch.set_rng_state(saved["rng"]["torch"])
        if self.device.type == "cuda" and saved["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(saved["rng"]["cuda"], self.device)
        return progress

    def _run_stage(self, progress: _StageProgress) -> None:
        from tqdm.auto import tqdm

        ctx, history, module = self.ctx, self.history, self.module
        stage = ctx.stage
        patience = stage.patience or self.trainer.patience
        epochs = range(progress.epoch + 1, ctx.max_epochs + 1) if not progress.stopped else []
        bar = tqdm(epochs, desc=f"epochs ({stage.name})" if len(self.stages) > 1 else "epochs",
                   unit="epoch", disable=not self.trainer.progress, leave=False)
        for epoch in bar:
            ctx.epoch, ctx._logged = epoch, {}
            module.train()
            ctx.training = True
            _call(module, "on_train_epoch_start", ctx)
            self.sampler.fixed = self._epoch_order()
            record = {"stage": stage.name, "epoch": epoch, "train_loss": self._train_epoch()}
            if history["monitor"] == "none":
                history["best_epoch"] = epoch
            else:
                self._validate(record, progress, patience)
                monitor = history["monitor"]
                label = monitor if monitor == "val_loss" else f"val_{monitor}"
                bar.set_postfix({label: f"{abs(record['val_score']):.4f}"})
            _call(module, "on_train_epoch_end", ctx)
            self._adopt_new_parameters()
            self._step_schedulers(record.get("val_loss", record["train_loss"]))
            record.update(ctx._logged)
            history["epochs"].append(record)
            progress.epoch = epoch
            self._write_checkpoint(progress)
            if progress.stopped:
                break
        bar.close()
        if progress.best_state is not None:
            module.load_state_dict(progress.best_state)
            module.to(self.device)
        history["stages"].append({
            "name": stage.name, "epochs": sum(e["stage"] == stage.name for e in history["epochs"]),
            "best_epoch": history["best_epoch"], "best_score": history["best_score"],
            "stopped_early": history["stopped_early"]})

    def _train_epoch(self) -> float:
        module, ctx = self.module, self.ctx
        module.train()
        ctx.training = True
        step = _hook(module, "training_step")
        owner = type(module).__name__
        total, count = 0.0, 0
        for batch in self.loader:
            batch = _to_device(batch, self.device)
            with self.trainer.autocast():
                result = step(batch, ctx) if step else self._automatic_step(batch)
            outputs = _step_outputs(result, owner)
            ctx.step += 1
            _call(module, "on_train_batch_end", ctx, outputs, batch)
            n = int(batch["y"].shape[0])
            total += float(outputs["loss"]) * n
            count += n
        return total / count

    def _automatic_step(self, batch: dict) -> dict:
        ctx = self.ctx
        out = self.module(batch)
        loss = self.trainer.loss(self.module, out, batch, ctx)
        for optimizer in ctx.optimizers:
            optimizer.zero_grad(set_to_none=True)
        ctx.backward(loss)
        for optimizer in ctx.optimizers:
            optimizer.step()
        return {"loss": loss, "out": out}

    def _validate(self, record: dict, progress: _StageProgress, patience: int) -> None:
        trainer, history = self.trainer, self.history
        scored = trainer.evaluate(self.module, self.val, self.ctx, self.ctx.stage.monitor_output)
        monitor = history["monitor"]
        score = (-scored["loss"] if monitor == "val_loss" else
                 monitor_score(monitor, trainer.task, self.y_val, scored["prob"]))
        record["val_loss"], record["val_score"] = scored["loss"], float(score)
        if score > progress.best_score:
            progress.best_score, progress.since_best = float(score), 0
            progress.best_state = copy.deepcopy(self.module.state_dict())
            history["best_epoch"], history["best_score"] = record["epoch"], float(score)
        else:
            progress.since_best += 1
            if progress.since_best >= patience:
                progress.stopped = history["stopped_early"] = True
        self.module.train()

    def _epoch_order(self) -> list | None:
        """The module's order of the training rows for this epoch, checked; None: shuffled."""
        hook = _hook(self.module, "train_batch_order")
        order = None if hook is None else hook(self.ctx, self.train)
        if order is None:
            return None
        order = [int(i) for i in np.asarray(order).reshape(-1)]
        if sorted(order) != list(range(len(self.train))):
            raise ValueError(f"{type(self.module).__name__}.train_batch_order must return each of "
                             f"the {len(self.train)} training rows once (0..{len(self.train) - 1}) "
                             f"or None, got {len(order)} values")
        return order

    # ----- stages, optimisers and growth ----------------------------------------------------------
    def _stages(self) -> list:
        hook = _hook(self.module, "fit_stages")
        stages = [FitStage()] if hook is None else list(hook())
        owner = type(self.module).__name__
        if not stages or not all(isinstance(s, FitStage) for s in stages):
            raise TypeError(f"{owner}.fit_stages must return a non-empty list of FitStage, got "
                            f"{stages!r}")
        names = [s.name for s in stages]
        if len(set(names)) != len(names):
            raise ValueError(f"{owner}.fit_stages: stage names must be unique, got {names}")
        return stages

    def _record_flags(self) -> list:
        """Remember ``requires_grad`` of parameters not seen before; return their names."""
        new = [n for n, _ in self.module.named_parameters() if n not in self.flags]
        for name, parameter in self.module.named_parameters():
            self.flags.setdefault(name, parameter.requires_grad)
        return new

    def _apply_stage(self) -> None:
        stage = self.ctx.stage
        self._record_flags()
        names = [n for n, _ in self.module.named_parameters()]
        for prefix in stage.trainable or ():
            if not any(n == prefix or n.startswith(prefix + ".") for n in names):
                tops = sorted({n.split(".", 1)[0] for n in names})
                raise ValueError(f"stage {stage.name!r}: no parameter under {prefix!r} in "
                                 f"{type(self.module).__name__}; its parameters live under: "
                                 f"{', '.join(tops)}")
        for name, parameter in self.module.named_parameters():
            parameter.requires_grad_(self.flags[name] and stage.trains(name))

    def _configure_optimizers(self) -> tuple[list, list]:
        hook = _hook(self.module, "configure_optimizers")
        if hook is not None:
            return _optimizers_of(hook(self.ctx), type(self.module).__name__)
        params = [p for p in self.module.parameters() if p.requires_grad]
        if not params:
            raise ValueError(f"stage {self.ctx.stage.name!r}: {type(self.module).__name__} has no "
                             "trainable parameter")
        return [self.ctx.default_optimizer(params)], []

    def _adopt_new_parameters(self) -> None:
        """Train the parameters that appeared during the epoch (a new parameter group)."""
        module, ctx = self.module, self.ctx
        module.to(self.device)
        new = set(self._record_flags())
        for name, parameter in module.named_parameters():
            if name in new:
                parameter.requires_grad_(self.flags[name] and ctx.stage.trains(name))
        held = {id(p) for o in ctx.optimizers for g in o.param_groups for p in g["params"]}
        loose = [p for p in module.parameters() if p.requires_grad and id(p) not in held]
        if loose:
            if not ctx.optimizers:
                raise ValueError(f"{type(module).__name__} grew trainable parameters but the stage "
                                 f"{ctx.stage.name!r} has no optimizer to train them")
            ctx.optimizers[0].add_param_group({"params": loose})

    def _step_schedulers(self, metric: float) -> None:
        for scheduler in self.ctx.schedulers:
            if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                scheduler.step(metric)
            else:
                scheduler.step()

    # ----- epoch checkpoints ----------------------------------------------------------------------
    def _settings(self) -> dict:
        return {**self.trainer.settings(), "module": type(self.module).__qualname__,
                "stages": [dataclasses.asdict(s) for s in self.stages]}

    def _write_checkpoint(self, progress: _StageProgress) -> None:
        if self.checkpoint is None:
            return
        ctx, module = self.ctx, self.module
        names = {id(p): n for n, p in module.named_parameters()}
        groups = []
        for optimizer in ctx.optimizers:
            try:
                groups.append([[names[id(p)] for p in g["params"]] for g in optimizer.param_groups])
            except KeyError:
                raise CheckpointError(f"{self.checkpoint}: an optimizer of "
                                      f"{type(module).__name__} holds a tensor that is not one of "
                                      "its parameters, so it cannot be checkpointed") from None
        cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        rng = {"order": self.order.get_state(), "torch": torch.get_rng_state(), "cuda": cuda}
        doc = {"format": CHECKPOINT_FORMAT, "settings": self._settings(), "stage": ctx.stage_index,
               "step": ctx.step, "progress": progress.as_dict(), "module": module.state_dict(),
               "optimizers": [o.state_dict() for o in ctx.optimizers], "param_groups": groups,
               "schedulers": [s.state_dict() for s in ctx.schedulers],
               "history": copy.deepcopy(dict(self.history)), "rng": rng}
        self.checkpoint.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.checkpoint.with_name(self.checkpoint.name + ".tmp")
        torch.save(doc, tmp)
        os.replace(tmp, self.checkpoint)  # a kill while writing leaves the previous checkpoint

    def _read_checkpoint(self) -> dict | None:
        path = self.checkpoint
        if path is None or not path.is_file():
            return None
        try:
            doc = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # truncated or foreign file: torch raises several kinds
            raise CheckpointError(f"{path}: cannot read the epoch checkpoint (truncated, or not "
                                  f"a checkpoint: {type(exc).__name__}); delete the file to train "
                                  "from the start") from exc
        if not isinstance(doc, dict) or doc.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(f"{path}: not an epoch checkpoint of format {CHECKPOINT_FORMAT}; "
                                  "delete the file to train from the start")
        settings = self._settings()
        if doc["settings"] != settings:
            changed = sorted(k for k in set(settings) | set(doc["settings"])
                             if settings.get(k) != doc["settings"].get(k))
            detail = ", ".join(f"{k}: {doc['settings'].get(k)!r} -> {settings.get(k)!r}"
                               for k in changed)
            raise CheckpointError(f"{path}: the checkpoint belongs to a fit with other settings "
                                  f"({detail}); delete the file to train from the start")
        log.info("resuming from %s (stage %d, epoch %d)", path, doc["stage"],
                 doc["progress"]["epoch"])
        return doc

    def _load_optimizers(self, saved: dict) -> None:
        """Give each optimiser back its parameter groups (by parameter name) and its state."""
        ctx = self.ctx
        params = dict(self.module.named_parameters())
        if (len(saved["optimizers"]) != len(ctx.optimizers)
                or len(saved["schedulers"]) != len(ctx.schedulers)):
            raise CheckpointError(
                f"{self.checkpoint}: holds {len(saved['optimizers'])} optimizer(s) and "
                f"{len(saved['schedulers'])} scheduler(s), configure_optimizers gave "
                f"{len(ctx.optimizers)} and {len(ctx.schedulers)}; delete the file to train "
                "from the start")
        for optimizer, state, groups in zip(ctx.optimizers, saved["optimizers"],
                                            saved["param_groups"]):
            missing = sorted(n for names in groups for n in names if n not in params)
            if missing:
                raise CheckpointError(f"{self.checkpoint}: parameters {missing} of the checkpoint "
                                      "are not in the module; delete the file to train from the "
                                      "start")
            template = {k: v for k, v in optimizer.param_groups[0].items() if k != "params"}
            optimizer.param_groups = []
            for names in groups:
                optimizer.add_param_group({**template, "params": [params[n] for n in names]})
            optimizer.load_state_dict(state)
        for scheduler, state in zip(ctx.schedulers, saved["schedulers"]):
            scheduler.load_state_dict(state)
