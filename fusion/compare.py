"""Compare finished runs: one row per run folder, read back from its files.

Every number here comes from a run's ``config.json`` and ``metrics.json``, so each cell of a
comparison table can be traced to a run folder (and recomputed from its predictions with
``cbstore evaluate``).
"""

from __future__ import annotations

import json
import pathlib

from fusion.evaluation import format_table

__all__ = ["PRIMARY_METRICS", "collect_runs", "comparison_rows", "comparison_table",
           "per_label_table"]

#: Metrics shown per task kind, in column order (names of ``metrics.json["metrics"]``).
PRIMARY_METRICS = {
    "mortality": ("auroc", "auprc"),
    "mortality_hosp": ("auroc", "auprc"),
    "phenotype": ("macro_auroc", "macro_auprc"),
    "los": ("accuracy", "macro_f1", "kappa_linear"),
}

_COMPLETE = "COMPLETE"


def collect_runs(runs_dir) -> list[dict]:
    """Read every complete run folder directly under ``runs_dir``.

    Parameters
    ----------
    runs_dir : path-like
        Folder holding ``<run-id>/`` folders written by ``cbstore fuse``.

    Returns
    -------
    list of dict
        One ``{"run_id", "path", "config", "metrics"}`` per complete run, sorted by
        (task, method, run id). Incomplete folders (no ``COMPLETE`` marker) are skipped.

    Raises
    ------
    FileNotFoundError
        ``runs_dir`` does not exist.
    """
    runs_dir = pathlib.Path(runs_dir)
    if not runs_dir.is_dir():
        raise FileNotFoundError(f"no runs folder at {runs_dir}")
    runs = []
    for folder in sorted(p for p in runs_dir.iterdir() if p.is_dir()):
        if not (folder / _COMPLETE).is_file():
            continue
        config = json.loads((folder / "config.json").read_text())
        metrics = json.loads((folder / "metrics.json").read_text())
        runs.append({"run_id": folder.name, "path": folder, "config": config, "metrics": metrics})
    runs.sort(key=lambda r: (r["config"]["task"], r["config"]["method"], r["run_id"]))
    return runs


def _setting(config: dict) -> str:
    """Short description of what a run was fed: features, encoders, cohort, masking."""
    parts = [config["features"]]
    embeddings = config.get("embeddings") or {}
    parts += [embeddings[m]["encoder_id"] for m in ("ehr", "cxr") if m in embeddings]
    parts.append(config["cohort"])
    if config.get("cxr_missing_rate"):
        parts.append(f"cxr-drop {config['cxr_missing_rate']:g} @ {','.join(config['missing_at'])}")
    return ", ".join(parts)


def comparison_rows(runs: list[dict], task: str) -> list[dict]:
    """Table rows (method, setting, fold, seed, metrics with CIs, run id) of one task."""
    rows = []
    for run in runs:
        config, metrics = run["config"], run["metrics"]
        if config["task"] != task:
            continue
        row = {"method": config["method"], "setting": _setting(config),
               "fold": config["fold"], "seed": config["seed"],
               "n test": metrics["n"]["test"]}
        for name in PRIMARY_METRICS[task]:
            row[name] = metrics["metrics"].get(name)
        row["run"] = run["run_id"]
        rows.append(row)
    return rows


def comparison_table(runs: list[dict], task: str | None = None) -> str:
    """Markdown tables comparing runs, one per task (or only ``task``), with 95% CIs.

    Parameters
    ----------
    runs : list of dict
        From :func:`collect_runs`.
    task : str, optional
        Only this task.

    Returns
    -------
    str
        ``"## <task>"`` headings, each followed by its table; ``""`` when nothing matches.
    """
    tasks = [task] if task else sorted({r["config"]["task"] for r in runs})
    blocks = []
    for name in tasks:
        rows = comparison_rows(runs, name)
        if rows:
            blocks.append(f"## {name}\n\n{format_table(rows)}")
    return "\n\n".join(blocks)


def per_label_table(runs: list[dict], metric: str = "auroc") -> str:
    """Markdown table of one per-label metric of the phenotype runs: a row per label, a column per run.

    Columns are named ``<method> (<run id>)``; cells carry 95% CIs. Use it to see on which
    phenotypes fusion helps, rather than only the macro average.

    Parameters
    ----------
    runs : list of dict
        From :func:`collect_runs`; runs of other tasks are ignored.
    metric : {"auroc", "auprc"}
        Per-label metric of ``metrics.json["per_label"]``.

    Returns
    -------
    str
        The table; ``""`` when there is no phenotype run.
    """
    runs = [r for r in runs if r["config"]["task"] == "phenotype"]
    if not runs:
        return ""
    labels = list(runs[0]["metrics"]["per_label"])
    rows = []
    for label in labels:
        row = {"phenotype": label}
        for run in runs:
            row[f"{run['config']['method']} ({run['run_id'][:6]})"] = \
                run["metrics"]["per_label"][label].get(metric)
        rows.append(row)
    return f"## phenotype, per label ({metric})\n\n{format_table(rows)}"
