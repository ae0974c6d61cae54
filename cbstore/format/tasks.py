"""The prediction tasks of a store, each described once by a :class:`TaskSpec`.

A task is a store fact: which labels array it reads, what kind of target that is, and which stays
have a usable label. Everything that used to branch on a task name (``task == "los"``) asks the
task's spec instead:

========================  ===========  =========================  ===============  ============
task                      kind         labels array               monitored        outputs
========================  ===========  =========================  ===============  ============
``mortality``             binary       ``labels/mortality``       ``auroc``        1
``mortality_hosp``        binary       ``labels/mortality_hosp``  ``auroc``        1
``phenotype``             multilabel   ``labels/phenotype_labels`` ``macro_auroc``  one per phenotype
``los``                   multiclass   ``labels/los_class``       ``macro_f1``     7 classes
========================  ===========  =========================  ===============  ============

The kind decides the rest: ``binary`` and ``multilabel`` tasks are trained with binary
cross-entropy and predict ``sigmoid(logits)``; ``multiclass`` tasks with cross-entropy and predict
``softmax(logits)`` (the torch side is :mod:`fusion.tasks`). This module imports neither torch nor
zarr.

Examples
--------
>>> get_task("los").kind, get_task("los").n_classes
('multiclass', 7)
>>> get_task("mortality").loss, get_task("mortality").probabilities
('bce', 'sigmoid')
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cbstore.errors import UnknownTaskError
from cbstore.format.schema import LOS_CLASS_NAMES

__all__ = ["KINDS", "TASKS", "TASK_SPECS", "TaskSpec", "get_task"]

#: Task kinds.
BINARY, MULTILABEL, MULTICLASS = "binary", "multilabel", "multiclass"
KINDS = (BINARY, MULTILABEL, MULTICLASS)


@dataclass(frozen=True)
class TaskSpec:
    """What a task predicts and how it is trained and monitored.

    Attributes
    ----------
    name : str
        Task name (``--task``).
    kind : str
        ``binary`` (one 0/1 label), ``multilabel`` (several 0/1 labels) or ``multiclass`` (one
        class index).
    labels_array : str
        Array under ``labels/`` holding the targets.
    monitor : str
        Validation metric monitored for early stopping (higher is better): ``auroc``,
        ``macro_auroc`` or ``macro_f1``.
    description : str
        One line for help texts.
    class_names : tuple of str
        Class names of a ``multiclass`` task (empty otherwise).
    """

    name: str
    kind: str
    labels_array: str
    monitor: str
    description: str
    class_names: tuple = ()

    @property
    def multiclass(self) -> bool:
        """True when the target is one class index (softmax over the outputs)."""
        return self.kind == MULTICLASS

    @property
    def loss(self) -> str:
        """``cross_entropy`` (multiclass) or ``bce`` (binary cross-entropy per output)."""
        return "cross_entropy" if self.multiclass else "bce"

    @property
    def probabilities(self) -> str:
        """``softmax`` (multiclass) or ``sigmoid`` (each output on its own)."""
        return "softmax" if self.multiclass else "sigmoid"

    @property
    def n_classes(self) -> int | None:
        """Number of classes of a multiclass task, else None."""
        return len(self.class_names) if self.multiclass else None

    def label_names(self, phenotype_names=()) -> list[str]:
        """Names of the model outputs.

        Parameters
        ----------
        phenotype_names : sequence of str
            The store's phenotype names (``Store.phenotype_names``), used by ``multilabel`` tasks.

        Returns
        -------
        list of str
            ``[name]`` (binary), the phenotype names (multilabel) or the class names (multiclass).
        """
        if self.kind == MULTILABEL:
            return [str(n) for n in phenotype_names]
        if self.multiclass:
            return list(self.class_names)
        return [self.name]

    def targets(self, raw: np.ndarray, n_outputs: int) -> tuple[np.ndarray, np.ndarray]:
        """Model targets and the stays whose label is usable.

        Parameters
        ----------
        raw : numpy.ndarray
            The labels array as stored (``int8``; ``[n]`` or ``[n, P]``).
        n_outputs : int
            Number of outputs (label names).

        Returns
        -------
        y : numpy.ndarray
            int64 ``[n]`` class indices (multiclass; unusable rows keep their stored code), or
            float32 ``[n, C]`` 0/1 targets.
        usable : numpy.ndarray
            bool ``[n]``: a class in ``0..n_outputs-1``, or every label 0 or 1.
        """
        raw = np.asarray(raw)
        if self.multiclass:
            y = raw.astype(np.int64).reshape(-1)
            return y, (y >= 0) & (y < n_outputs)
        flat = raw.reshape(raw.shape[0], -1)
        usable = np.all((flat == 0) | (flat == 1), axis=1)
        return flat.astype(np.float32), usable


#: Every task, in the store's order.
TASK_SPECS = {spec.name: spec for spec in (
    TaskSpec("mortality", BINARY, "mortality", "auroc", "death in the ICU stay"),
    TaskSpec("mortality_hosp", BINARY, "mortality_hosp", "auroc", "death in the hospital stay"),
    TaskSpec("phenotype", MULTILABEL, "phenotype_labels", "macro_auroc",
             "acute care conditions of the stay (one output per phenotype)"),
    TaskSpec("los", MULTICLASS, "los_class", "macro_f1",
             "remaining length of stay, 7 classes (stays of 2 days or more)",
             class_names=tuple(LOS_CLASS_NAMES)),
)}
#: Task names.
TASKS = tuple(TASK_SPECS)


def get_task(task) -> TaskSpec:
    """The :class:`TaskSpec` of ``task`` (a name, or a spec returned as is).

    Raises
    ------
    UnknownTaskError
        If ``task`` is not a known task; the message lists the tasks.
    """
    if isinstance(task, TaskSpec):
        return task
    try:
        return TASK_SPECS[task]
    except (KeyError, TypeError):
        raise UnknownTaskError(f"unknown task {task!r}; valid tasks: {', '.join(TASKS)}") from None
