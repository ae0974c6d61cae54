"""The training side of a task: loss, probabilities and the monitored metric, keyed on its kind.

A task is described once, by its :class:`cbstore.format.tasks.TaskSpec` (a store fact: kind, labels,
monitored metric). This module turns the kind into torch and scikit-learn operations:

==============  =====================================  ==================  ==================
kind            loss (mean over stays)                 probabilities       monitored metric
==============  =====================================  ==================  ==================
binary          BCE-with-logits                        ``sigmoid``         ``auroc``
multilabel      BCE-with-logits, mean over the labels  ``sigmoid``         ``macro_auroc``
multiclass      cross-entropy on the class index       ``softmax``         ``macro_f1``
==============  =====================================  ==================  ==================

Every function takes a task name or a ``TaskSpec``; an unknown name raises
:class:`cbstore.errors.UnknownTaskError`, which lists the tasks.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from cbstore.format.tasks import TASKS, TaskSpec, get_task

__all__ = ["TASKS", "TaskSpec", "choose_monitor", "get_task", "logit_of_mean_probability",
           "monitor_score", "probabilities", "task_loss", "true_class_probability"]


def task_loss(logits: torch.Tensor, y: torch.Tensor, task, weight: torch.Tensor | None = None
              ) -> torch.Tensor:
    """Mean task loss over the stays of a batch.

    Parameters
    ----------
    logits : Tensor
        ``[B, C]``.
    y : Tensor
        float ``[B, C]`` targets, or int64 ``[B]`` classes (multiclass).
    task : str or TaskSpec
    weight : Tensor, optional
        ``[B]`` per-stay weights (e.g. 0/1 to train a head only on stays with an X-ray); the
        result is the weighted mean (0 when all weights are 0).
    """
    if get_task(task).multiclass:
        per_stay = nn.functional.cross_entropy(logits, y, reduction="none")
    else:
        per_stay = nn.functional.binary_cross_entropy_with_logits(
            logits, y, reduction="none").mean(dim=1)
    if weight is None:
        return per_stay.mean()
    weight = weight.to(per_stay.dtype)
    return (per_stay * weight).sum() / weight.sum().clamp_min(1.0)


def probabilities(logits: torch.Tensor, task) -> torch.Tensor:
    """``softmax`` over the outputs (multiclass) or ``sigmoid`` of each output."""
    return torch.softmax(logits, dim=1) if get_task(task).multiclass else torch.sigmoid(logits)


def logit_of_mean_probability(probs: list, weights: list, task) -> torch.Tensor:
    """Logits whose :func:`probabilities` are the weighted mean of per-modality probabilities.

    Used by late fusion, so that the rule "probabilities = sigmoid/softmax(logits)" holds for
    averaged predictions too.

    Parameters
    ----------
    probs : list of Tensor
        ``[B, C]`` probabilities per modality.
    weights : list of Tensor
        ``[B]`` weights per modality (0 where the modality is absent); at least one positive per row.
    task : str or TaskSpec
    """
    total = sum(w.unsqueeze(1) * p for p, w in zip(probs, weights))
    mean = total / sum(weights).unsqueeze(1)
    eps = torch.finfo(mean.dtype).eps
    mean = mean.clamp(eps, 1 - eps)
    if get_task(task).multiclass:
        return torch.log(mean)
    return torch.log(mean) - torch.log1p(-mean)


def choose_monitor(task, y_val: np.ndarray) -> str:
    """The metric to monitor: the task's metric if defined on these labels, else ``val_loss``.

    A multiclass metric (macro F1) is defined on any non-empty part; AUROC needs, for at least one
    output, both classes among the validation labels.
    """
    spec = get_task(task)
    if spec.multiclass:
        return spec.monitor if len(y_val) else "val_loss"
    y_val = np.asarray(y_val).reshape(len(y_val), -1)
    both = (y_val.min(axis=0) != y_val.max(axis=0)) if len(y_val) else np.array([False])
    return spec.monitor if both.any() else "val_loss"


def monitor_score(metric: str, task, y_true: np.ndarray, prob: np.ndarray) -> float:
    """Validation score (higher is better) of ``metric`` (a :attr:`TaskSpec.monitor`).

    ``macro_f1`` scores the arg-max class; ``auroc`` / ``macro_auroc`` average the AUROC of the
    outputs whose validation labels hold both classes (NaN when none does).
    """
    from sklearn.metrics import f1_score, roc_auc_score

    get_task(task)  # an unknown task raises here, naming the tasks
    if metric == "macro_f1":
        return float(f1_score(y_true, prob.argmax(axis=1), average="macro", zero_division=0))
    y_true = np.asarray(y_true).reshape(len(y_true), -1)
    scores = [roc_auc_score(y_true[:, j], prob[:, j]) for j in range(y_true.shape[1])
              if y_true[:, j].min() != y_true[:, j].max()]
    return float(np.mean(scores)) if scores else float("nan")


def true_class_probability(logits: torch.Tensor, y: torch.Tensor, task) -> torch.Tensor:
    """Probability each output gives to the true label (the confidence scores of AUG and InfoReg).

    Multiclass: ``softmax(logits)[y]`` as ``[B, 1]``. Binary and multi-label (each label a
    two-class problem): ``y * p + (1 - y) * (1 - p)`` with ``p = sigmoid(logits)``, ``[B, C]``.

    Parameters
    ----------
    logits : Tensor
        ``[B, C]``.
    y : Tensor
        float ``[B, C]`` targets, or int64 ``[B]`` classes (multiclass).
    task : str or TaskSpec
    """
    if get_task(task).multiclass:
        return torch.softmax(logits, dim=1).gather(1, y.long().unsqueeze(1))
    p = torch.sigmoid(logits)
    y = y.to(p.dtype)
    return y * p + (1 - y) * (1 - p)
