"""Modality reliance: how much a model loses when one modality's inputs are permuted.

The fusion side predicts the test stays twice: once on intact inputs, once with one modality's
inputs (e.g. the CXR embeddings) permuted across test stays, which keeps their distribution but
breaks their link to the stay. Reliance is the drop in AUROC (macro over labels for phenotype,
macro one-vs-rest for los) between the two, with a paired, stratified bootstrap CI (the same
resampled stays score both predictions).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from fusion.evaluation.bootstrap import bootstrap, summarise
from fusion.evaluation.metrics import STRATA_DESCRIPTION, bootstrap_strata, task_statistic
from fusion.evaluation.predictions import align_test_parts, as_validated, is_binary

__all__ = ["modality_reliance"]


def modality_reliance(df_full: pd.DataFrame, df_permuted: pd.DataFrame, task: str | None = None,
                      *, modality: str | None = None, meta_full: dict | None = None,
                      meta_permuted: dict | None = None, n_boot: int = 1000,
                      seed: int = 0) -> dict:
    """Drop in AUROC when one modality's inputs are permuted across test stays.

    Parameters
    ----------
    df_full : pandas.DataFrame
        Predictions on intact inputs.
    df_permuted : pandas.DataFrame
        Predictions of the same model with one modality permuted (same test stays and labels).
    task : str, optional
        Task; default: from the metas or the ``task`` column.
    modality : str, optional
        Name of the permuted modality, copied into the result (e.g. ``"cxr"``).
    meta_full, meta_permuted : dict, optional
        Metas of the two prediction sets (labels are inferred from the columns when absent).
    n_boot : int
        Bootstrap resamples for the CIs.
    seed : int

    Returns
    -------
    dict
        ``{"modality", "task", "metric", "n_stays", "full", "permuted", "drop", "bootstrap"}``;
        ``full``, ``permuted`` and ``drop`` (= full - permuted; positive when the model relies on
        the modality) are ``{"value", "ci_low", "ci_high", "n_boot", "seed"}``.

    Raises
    ------
    PredictionsError
        Different tasks or labels, no common test stay, or labels that disagree.
    """
    full = as_validated(df_full, meta_full, task, "full-input predictions")
    permuted = as_validated(df_permuted, meta_permuted, task, "permuted-input predictions")
    paired = align_test_parts(full, permuted,
                              names=("full-input predictions", "permuted-input predictions"))
    task = paired["meta"]["task"]
    key = "auroc" if is_binary(task) else "macro_auroc"
    stat_full = task_statistic(task, paired["y"], paired["scores_a"], micro=False)
    stat_permuted = task_statistic(task, paired["y"], paired["scores_b"], micro=False)

    def stat(weights: np.ndarray) -> dict:
        a = stat_full(weights)[key]
        b = stat_permuted(weights)[key]
        return {"full": a, "permuted": b, "drop": a - b}

    point, replicates = bootstrap(stat, bootstrap_strata(task, paired["y"]), n_boot, seed)
    out = {"modality": modality, "task": task, "metric": key,
           "n_stays": int(paired["stay_id"].size),
           "n_only_full": paired["n_only_a"], "n_only_permuted": paired["n_only_b"],
           "bootstrap": {"n_boot": int(n_boot), "seed": int(seed), "interval": "percentile 95%",
                         "strata": STRATA_DESCRIPTION[task], "paired": True}}
    for name in ("full", "permuted", "drop"):
        out[name] = summarise(point[name], replicates[name], n_boot, seed)
    return out
