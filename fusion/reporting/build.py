"""Build a report from run folders: ``report.md``, ``report.html``, ``figures/``, ``results.csv``.

Sections (each computed from the run folders alone, see :mod:`fusion.reporting.collect`):

1. Main table per task and cohort: each method's test metric as mean +/- sd over its runs
   (folds x seeds) with a 95% t-interval, best per column in bold, methods grouped by their
   ``absent_cxr_policy``. Only runs without a simulated X-ray mask enter it.
2. Per-run table with the evaluator's bootstrap CIs (every run, masked ones included).
3. Significance: paired permutation tests of each method against a baseline on common test stays,
   per (fold, seed) and combined over the (fold, seed, stay) triples
   (:func:`fusion.evaluation.stratified_permutation_test`), Benjamini-Hochberg across every test
   of the report; Friedman test and Nemenyi critical-difference diagram of mean ranks.
4. Robustness: metric against X-ray missing rate (mean, band +/- sd over runs) and the normalised
   area under each curve.
5. Fairness: between-group gaps (the evaluator's fairness section) as a heatmap.
6. Calibration: reliability diagram and ECE (10 equal-width bins).
7. Modality reliance (:func:`fusion.evaluation.modality_reliance` on the permuted-input
   predictions kept in the run folders).
8. Provenance: run ids behind every row (keys ``P1``, ``P2``, ...), store config hashes, cbstore
   versions, presets tuned on the reference's test data.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import pathlib
from collections import defaultdict
from importlib import metadata

import numpy as np

from fusion.compare import PRIMARY_METRICS
from fusion.evaluation import (
    EVALUATOR_VERSION, benjamini_hochberg, expected_calibration_error,
    modality_reliance, stratified_permutation_test,
)
from fusion.evaluation.predictions import select_test, task_arrays, task_kind
from fusion.evaluation.report import format_value
from fusion.reporting import figures as fig
from fusion.reporting.collect import ReportInputError, load_runs, results_frame
from fusion.reporting.document import (
    Figure, Heading, Paragraph, Table, render_html, render_markdown,
)
from fusion.reporting.stats import (
    critical_difference, friedman_test, mean_ranks, normalised_auc, reliability_curve, t_interval,
)

__all__ = ["FAIRNESS_ATTRIBUTES", "ReportOptions", "build_report"]

#: Attributes of the fairness section (single attributes of the evaluator's fairness section).
FAIRNESS_ATTRIBUTES = ("gender", "age_group", "race", "insurance", "admission_type")
#: Gaps shown per task kind (names of the evaluator's gap metrics).
FAIRNESS_GAPS = {"binary": ("auroc", "tpr", "fpr"), "multilabel": ("macro_auroc",),
                 "multiclass": ("accuracy", "macro_f1")}
#: Bins of the reliability diagram and the ECE (the reference's choice).
CALIBRATION_BINS = 10


@dataclasses.dataclass
class ReportOptions:
    """Options of :func:`build_report`.

    Attributes
    ----------
    baseline : str or None
        Method the others are tested against; None: the best unimodal method of each task and
        cohort (by the mean of the task's first primary metric).
    n_perm : int
        Permutations of each test (tiny cases are enumerated exactly).
    seed : int
        Seed of the permutation tests and of the reliance bootstrap.
    alpha : float
        Level of the tests and of the critical difference.
    n_boot : int
        Bootstrap resamples of the modality-reliance CIs.
    task : str or None
        Only runs of this task.
    per_label : str or None
        Also a per-phenotype table of this metric (``auroc`` or ``auprc``).
    """

    baseline: str | None = None
    n_perm: int = 1000
    seed: int = 0
    alpha: float = 0.05
    n_boot: int = 200
    task: str | None = None
    per_label: str | None = None


def _kind(task: str) -> str:
    """``binary``, ``multilabel`` or ``multiclass`` (the task's :class:`cbstore.format.tasks.TaskSpec`)."""
    return task_kind(task)


def _version() -> str:
    try:
        return metadata.version("cbstore")
    except metadata.PackageNotFoundError:
        return "unknown"


def _num(value, digits: int = 3) -> str:
    return format_value(None if value is None else float(value), digits)


def _summary_cell(summary: dict, digits: int = 3) -> str:
    """``mean ± sd [low, high]`` (or the single value with ``(1 run)``)."""
    if summary["n"] == 0:
        return "n/a"
    if summary["n"] == 1:
        return f"{_num(summary['mean'], digits)} (1 run)"
    return (f"{_num(summary['mean'], digits)} ± {_num(summary['sd'], digits)} "
            f"[{_num(summary['ci_low'], digits)}, {_num(summary['ci_high'], digits)}]")


def _metric(run, name: str) -> float:
    value = ((run.metrics.get("metrics") or {}).get(name) or {}).get("value")
    return float("nan") if value is None else float(value)


class _Provenance:
    """Keys ``P1``, ``P2``, ... for the sets of runs behind the report's numbers."""

    def __init__(self):
        self.keys: dict[tuple, str] = {}

    def key(self, runs) -> str:
        ids = tuple(sorted(r.run_id for r in runs))
        if ids not in self.keys:
            self.keys[ids] = f"P{len(self.keys) + 1}"
        return self.keys[ids]

    def table(self) -> Table:
        return Table(["key", "runs", "run ids"],
                     [[key, str(len(ids)), " ".join(ids)] for ids, key in self.keys.items()])


class _Context:
    """What every section reads: the runs, their labels, options, output folders and caches."""

    def __init__(self, runs, out: pathlib.Path, options: ReportOptions):
        self.runs = runs
        self.out = out
        self.figures = out / "figures"
        self.options = options
        self.provenance = _Provenance()
        self.labels = _variant_labels(runs)
        self.colours = fig.method_colours(sorted(set(self.labels.values())))
        self._predictions: dict[str, tuple] = {}
        self.q_values: list = []

    def label(self, run) -> str:
        return self.labels[_variant(run)]

    def predictions(self, run):
        if run.run_id not in self._predictions:
            self._predictions[run.run_id] = run.predictions()
        return self._predictions[run.run_id]

    def clean(self):
        """Runs without a simulated X-ray mask, grouped by (task, cohort)."""
        return _group(r for r in self.runs if r.cxr_missing_rate == 0)

    def figure(self, figure_obj, name: str, caption: str) -> Figure:
        png, svg = fig.save_figure(figure_obj, self.figures, name)
        return Figure(name, caption, png, svg)


def _variant(run) -> tuple:
    """Method, feature mode, embeddings and hyperparameters: what makes runs the same model."""
    hyper = json.dumps(run.config.get("hyperparameters") or {}, sort_keys=True)
    return (*run.variant, hyper, run.settings["preset"])


def _variant_labels(runs) -> dict:
    """A readable, unique label per variant: the method name, plus what tells variants apart."""
    by_method = defaultdict(set)
    for run in runs:
        by_method[run.method].add(_variant(run))
    labels = {}
    for method, variants in by_method.items():
        variants = sorted(variants, key=lambda v: tuple(str(x) for x in v))
        if len(variants) == 1:
            labels[variants[0]] = method
            continue
        base = {v: tuple(str(p) for i, p in enumerate(v[1:4])
                         if len({w[i + 1] for w in variants}) > 1) for v in variants}
        for v in variants:
            parts = list(base[v])
            if sum(base[w] == base[v] for w in variants) > 1:  # same inputs: settings differ
                hyper, preset = v[4], v[5]
                parts.append(f"preset {preset}" if preset else
                             "hp " + hashlib.sha256(hyper.encode()).hexdigest()[:6])
            labels[v] = f"{method} ({', '.join(parts)})"
    return labels


def _group(runs) -> dict:
    groups = defaultdict(list)
    for run in runs:
        groups[(run.task, run.cohort)].append(run)
    return dict(sorted(groups.items()))


def _by_label(ctx, runs) -> dict:
    """Runs per variant label, sorted by (absent-X-ray policy, label)."""
    groups = defaultdict(list)
    for run in runs:
        groups[ctx.label(run)].append(run)
    return dict(sorted(groups.items(), key=lambda kv: (kv[1][0].policy, kv[0])))


# ----- 1. main table ---------------------------------------------------------------------------
def _main_tables(ctx) -> list:
    blocks = [Heading("Main results"),
              Paragraph("Test metrics over the runs without a simulated X-ray mask: mean ± sd "
                        "over folds x seeds [95% t-interval across runs]; best per column in bold; "
                        "methods grouped by how they treat an absent X-ray (`absent_cxr_policy`). "
                        "`provenance` names the runs behind each row (section Provenance).")]
    for (task, cohort), runs in ctx.clean().items():
        metrics = PRIMARY_METRICS.get(task, ())
        rows, means = [], []
        for label, group in _by_label(ctx, runs).items():
            summaries = [t_interval([_metric(r, m) for r in group]) for m in metrics]
            rows.append([group[0].policy, label, str(len(group)),
                         *[_summary_cell(s) for s in summaries], ctx.provenance.key(group)])
            means.append([s["mean"] for s in summaries])
        bold = set()
        means = np.asarray(means, dtype=np.float64).reshape(len(rows), len(metrics))
        for j in range(len(metrics)):
            column = means[:, j]
            if np.isfinite(column).any():
                best = np.nanmax(column)
                bold |= {(i, 3 + j) for i in np.flatnonzero(column == best)}
        blocks.append(Heading(f"{task}, cohort {cohort}", 3))
        blocks.append(Table(["absent X-ray policy", "method", "runs",
                             *[f"{m} mean ± sd [95% t-CI]" for m in metrics], "provenance"],
                            rows, bold))
    return blocks


# ----- 2. per-run table ------------------------------------------------------------------------
def _per_run_tables(ctx) -> list:
    blocks = [Heading("Per run"),
              Paragraph("Every run's test metrics with the evaluator's 95% bootstrap CIs "
                        "(stratified, percentile).")]
    for (task, cohort), runs in _group(ctx.runs).items():
        metrics = PRIMARY_METRICS.get(task, ())
        ordered = sorted(runs, key=lambda r: (r.policy, ctx.label(r), r.cxr_missing_rate,
                                              r.missing_at, r.fold, r.seed))
        rows = [[r.run_id, ctx.label(r), str(r.fold), str(r.seed), f"{r.cxr_missing_rate:g}",
                 r.missing_at or "-", str(r.settings["n_test"]),
                 *[format_value((r.metrics.get("metrics") or {}).get(m)) for m in metrics]]
                for r in ordered]
        blocks.append(Heading(f"{task}, cohort {cohort}", 3))
        blocks.append(Table(["run", "method", "fold", "seed", "X-ray missing rate",
                             "masked parts", "n test", *[f"{m} [95% CI]" for m in metrics]],
                            rows))
    return blocks


# ----- 3. significance -------------------------------------------------------------------------
def _modalities(run) -> frozenset:
    from fusion.registry import UnknownMethodError, get_method

    try:
        return frozenset(get_method(run.method).modalities)
    except UnknownMethodError:
        permuted = {m for m in ("ehr", "cxr") if run.permuted_predictions(m) is not None}
        return frozenset(permuted or (run.config.get("embeddings") or {}))


def _baseline(ctx, task: str, groups: dict) -> tuple[str | None, str]:
    """The baseline label of one task and cohort, and how it was chosen."""
    first = PRIMARY_METRICS[task][0]
    if ctx.options.baseline is not None:
        matching = [label for label, runs in groups.items()
                    if runs[0].method == ctx.options.baseline]
        if not matching:
            return None, f"no run of the baseline {ctx.options.baseline!r}"
        best = max(matching, key=lambda lb: np.nanmean([_metric(r, first) for r in groups[lb]]))
        return best, "given with --baseline"
    unimodal = [label for label, runs in groups.items() if len(_modalities(runs[0])) == 1]
    if not unimodal:
        return None, "no unimodal method among the runs (give --baseline)"
    best = max(unimodal, key=lambda lb: np.nanmean([_metric(r, first) for r in groups[lb]]))
    return best, f"the best unimodal method by mean {first}"


def _significance(ctx) -> list:
    opts = ctx.options
    blocks = [Heading("Significance"),
              Paragraph(f"Paired permutation tests ({opts.n_perm} permutations, seed {opts.seed}; "
                        "exact enumeration when there are fewer swap patterns) of each method "
                        "against the baseline on their common test stays: per (fold, seed), and "
                        "combined over every common (fold, seed, stay) triple with swaps within "
                        "each triple (statistic: mean over (fold, seed) of the difference). "
                        "q: Benjamini-Hochberg across every test in this report; "
                        f"significant: q < {opts.alpha:g}.")]
    tests = []
    for (task, cohort), runs in ctx.clean().items():
        groups = _by_label(ctx, runs)
        baseline, why = _baseline(ctx, task, groups)
        if baseline is None:
            blocks.append(Paragraph(f"{task}, cohort {cohort}: no test ({why})."))
            continue
        base_runs = {(r.fold, r.seed): r for r in groups[baseline]}
        blocks.append(Paragraph(f"{task}, cohort {cohort}: baseline **{baseline}** ({why})."))
        for label, group in groups.items():
            if label == baseline:
                continue
            pairs = [(r, base_runs[(r.fold, r.seed)]) for r in group
                     if (r.fold, r.seed) in base_runs]
            if not pairs:
                continue
            for metric in PRIMARY_METRICS[task]:
                tests += _tests_of(ctx, task, cohort, label, baseline, metric, pairs)
    if tests:
        q = benjamini_hochberg([t["p"] for t in tests])
        rows = []
        for test, q_value in zip(tests, q):
            rows.append([test["task"], test["cohort"], test["method"], test["baseline"],
                         test["metric"], test["stratum"], test["n"], _num(test["a"]),
                         _num(test["b"]), _num(test["diff"], 4), _num(test["p"], 4),
                         _num(q_value, 4),
                         "yes" if np.isfinite(q_value) and q_value < opts.alpha else "no",
                         test["runs"]])
        ctx.q_values = [dict(t, q=qv) for t, qv in zip(tests, q)]
        blocks.append(Table(["task", "cohort", "method", "baseline", "metric", "comparison",
                             "n stays", "method value", "baseline value", "difference", "p", "q",
                             "significant", "runs"], rows))
    blocks += _ranks(ctx)
    return blocks


def _tests_of(ctx, task, cohort, label, baseline, metric, pairs) -> list:
    """Per-(fold, seed) tests and, with several pairs, the combined test of one comparison."""
    opts = ctx.options
    strata = [(ctx.predictions(a), ctx.predictions(b)) for a, b in pairs]
    base = {"task": task, "cohort": cohort, "method": label, "baseline": baseline,
            "metric": metric}
    out = []
    for (a, b), stratum in zip(pairs, strata):
        res = stratified_permutation_test([stratum], metric, n_perm=opts.n_perm, seed=opts.seed)
        out.append({**base, "stratum": f"fold {a.fold}, seed {a.seed}", "n": str(res["n_triples"]),
                    "a": res["value_a"], "b": res["value_b"], "diff": res["difference"],
                    "p": res["p_value"], "runs": f"{a.run_id} vs {b.run_id}"})
    if len(pairs) > 1:
        res = stratified_permutation_test(strata, metric, n_perm=opts.n_perm, seed=opts.seed)
        keys = (ctx.provenance.key([a for a, _ in pairs]),
                ctx.provenance.key([b for _, b in pairs]))
        out.append({**base, "stratum": f"combined, {len(pairs)} (fold, seed) pairs",
                    "n": str(res["n_triples"]), "a": res["value_a"], "b": res["value_b"],
                    "diff": res["difference"], "p": res["p_value"],
                    "runs": f"{keys[0]} vs {keys[1]}"})
    return out


def _rank_blocks(ctx) -> tuple[list, list, np.ndarray, list, list]:
    """Blocks (task, cohort, fold, seed) x methods of each task's first primary metric.

    The methods kept are those run in at least half of the blocks; the blocks kept are those
    where every kept method has a defined score (a rank comparison needs complete blocks).

    Returns
    -------
    (list of str, list of tuple, numpy.ndarray, list of RunRecord, list of str)
        Method labels, blocks, scores ``[n_blocks, k]``, the runs used and the methods left out.
    """
    cells = defaultdict(dict)
    for (task, cohort), runs in ctx.clean().items():
        first = PRIMARY_METRICS[task][0]
        for run in runs:
            cells[(task, cohort, run.fold, run.seed)][ctx.label(run)] = (_metric(run, first), run)
    counts = defaultdict(int)
    for cell in cells.values():
        for label in cell:
            counts[label] += 1
    methods = sorted(m for m, c in counts.items() if 2 * c >= len(cells))
    dropped = sorted(set(counts) - set(methods))
    blocks, scores, used = [], [], []
    for key, cell in sorted(cells.items()):
        if not all(m in cell for m in methods):
            continue
        row = [cell[m][0] for m in methods]
        if methods and np.all(np.isfinite(row)):
            blocks.append(key)
            scores.append(row)
            used += [cell[m][1] for m in methods]
    scores = np.asarray(scores, dtype=np.float64).reshape(len(blocks), len(methods))
    return methods, blocks, scores, used, dropped


def _ranks(ctx) -> list:
    alpha = ctx.options.alpha
    methods, blocks, scores, used, dropped = _rank_blocks(ctx)
    out = [Heading("Ranks across tasks x folds x seeds", 3)]
    if len(methods) < 2 or not blocks:
        out.append(Paragraph("Not enough methods run on common (task, cohort, fold, seed) blocks "
                             "for a rank comparison."))
        return out
    ranks = mean_ranks(scores)
    friedman = friedman_test(scores)
    cd = critical_difference(len(methods), len(blocks), alpha)
    order = np.argsort(ranks, kind="stable")
    text = (f"{len(methods)} methods ranked in {len(blocks)} blocks (task x cohort x fold x seed, "
            "each task's first primary metric; rank 1 best). ")
    if friedman["reason"]:
        text += f"Friedman test not run: {friedman['reason']}. "
    else:
        text += (f"Friedman chi² = {friedman['statistic']:.3f}, p = {friedman['p_value']:.4g}. ")
    text += (f"Nemenyi critical difference at alpha {alpha:g}: CD = {cd:.3f} (studentized range, "
             "infinite degrees of freedom); methods joined by a bar are not significantly "
             f"different. Methods run in fewer than half of the blocks are left out"
             f"{' (' + ', '.join(dropped) + ')' if dropped else ' (none)'}, and so are blocks "
             f"missing a kept method. Runs: {ctx.provenance.key(used)}.")
    out.append(Paragraph(text))
    out.append(Table(["method", "mean rank"],
                     [[methods[i], f"{ranks[i]:.3f}"] for i in order], {(0, 0), (0, 1)}))
    out.append(ctx.figure(
        fig.critical_difference_figure([methods[i] for i in order], ranks[order].tolist(), cd,
                                       f"Mean ranks over {len(blocks)} blocks (CD = {cd:.2f})"),
        "critical_difference", "Nemenyi critical-difference diagram of mean ranks"))
    return out


# ----- 4. robustness ---------------------------------------------------------------------------
def _robustness(ctx) -> list:
    blocks = [Heading("Robustness to missing X-rays")]
    masked = [r for r in ctx.runs if r.cxr_missing_rate > 0]
    if not masked:
        blocks.append(Paragraph("No run with a simulated X-ray missing rate."))
        return blocks
    clean = ctx.clean()
    panels, rows, bold = [], [], set()
    for (task, cohort, parts) in sorted({(r.task, r.cohort, r.missing_at) for r in masked}):
        metric = PRIMARY_METRICS[task][0]
        runs = [r for r in masked if (r.task, r.cohort, r.missing_at) == (task, cohort, parts)]
        runs += clean.get((task, cohort), [])
        curves, first_row = {}, len(rows)
        for label, group in _by_label(ctx, runs).items():
            rates = sorted({r.cxr_missing_rate for r in group})
            if len(rates) < 2:  # a method run at rate 0 only has no curve here
                continue
            summaries = [t_interval([_metric(r, metric) for r in group
                                     if r.cxr_missing_rate == rate]) for rate in rates]
            mean = np.array([s["mean"] for s in summaries])
            sd = np.nan_to_num(np.array([s["sd"] for s in summaries]), nan=0.0)
            curves[label] = {"rates": rates, "mean": mean, "low": mean - sd, "high": mean + sd}
            area = normalised_auc(rates, mean)
            rows.append([task, cohort, parts, label, ", ".join(f"{x:g}" for x in rates),
                         _num(mean[0]), _num(mean[-1]), _num(area), ctx.provenance.key(group)])
        areas = [float(r[7]) if r[7] != "n/a" else np.nan for r in rows[first_row:]]
        if np.isfinite(areas).any():
            bold |= {(first_row + i, 7) for i, a in enumerate(areas) if a == np.nanmax(areas)}
        panels.append({"title": f"{task}, {cohort}, masked at {parts}", "ylabel": metric,
                       "curves": curves})
    blocks.append(Paragraph(
        "Each task's first primary metric against the X-ray missing rate (mean over folds x "
        "seeds, band ± sd); the rate-0 point is the unmasked runs. Normalised AUC: trapezoid "
        "area over the rates run divided by the rate range (one robustness number per method; "
        "best per panel in bold)."))
    blocks.append(Table(["task", "cohort", "masked parts", "method", "rates", "at lowest rate",
                         "at highest rate", "normalised AUC", "provenance"], rows, bold))
    blocks.append(ctx.figure(fig.robustness_figure(panels, ctx.colours), "robustness",
                             "Metric against X-ray missing rate (band: ± sd over folds x seeds)"))
    return blocks


# ----- 5. fairness -----------------------------------------------------------------------------
def _fairness_entries(group, attribute: str) -> list:
    """The evaluator's fairness entries of ``attribute`` in the runs of ``group``."""
    entries = [(((r.metrics.get("fairness") or {}).get("attributes") or {}).get(attribute))
               for r in group]
    return [e for e in entries if e]


def _gap(entry: dict, metric: str) -> float:
    value = (entry["gaps"].get(metric) or {}).get("gap")
    return float("nan") if value is None else float(value)


def _fairness(ctx) -> list:
    blocks = [Heading("Fairness")]
    sizes = sorted({(r.metrics.get("fairness") or {}).get("min_group_size") for r in ctx.runs}
                   - {None})
    blocks.append(Paragraph(
        "Between-group gaps (max - min over the groups of an attribute on the test part, from "
        "the evaluator's fairness section; mean over runs): binary tasks AUROC, TPR and FPR (at "
        "the validation-chosen threshold), phenotype macro AUROC, LoS accuracy and macro-F1. "
        f"Groups with fewer than {', '.join(map(str, sizes)) or '?'} stays are left out of the "
        "gaps; `small groups` counts them (most in any run) and the heatmap marks such cells "
        "with *."))
    panels = []
    for (task, cohort), runs in ctx.clean().items():
        gaps = FAIRNESS_GAPS[_kind(task)]
        groups = _by_label(ctx, runs)
        attributes = [a for a in FAIRNESS_ATTRIBUTES
                      if any(_fairness_entries(g, a) for g in groups.values())]
        if not attributes:
            continue
        values = np.full((len(groups), len(attributes) * len(gaps)), np.nan)
        flags = np.zeros(values.shape, dtype=bool)
        rows = []
        for i, (label, group) in enumerate(groups.items()):
            for a, attribute in enumerate(attributes):
                entries = _fairness_entries(group, attribute)
                if not entries:
                    continue
                small = max(sum(bool(g.get("small")) for g in e["groups"]) for e in entries)
                means = [t_interval([_gap(e, g) for e in entries])["mean"] for g in gaps]
                values[i, a * len(gaps):(a + 1) * len(gaps)] = means
                flags[i, a * len(gaps):(a + 1) * len(gaps)] = small > 0
                rows.append([label, attribute, *[_num(m) for m in means], str(small),
                             ctx.provenance.key(group)])
        blocks.append(Heading(f"{task}, cohort {cohort}", 3))
        blocks.append(Table(["method", "attribute", *[f"{g} gap" for g in gaps], "small groups",
                             "provenance"], rows))
        panels.append({"title": f"{task}, {cohort}: between-group gaps",
                       "methods": list(groups), "values": values, "flags": flags,
                       "columns": [f"{a}: {g}" for a in attributes for g in gaps]})
    if not panels:
        blocks.append(Paragraph("No fairness section in the runs' metrics."))
        return blocks
    blocks.append(ctx.figure(fig.fairness_figure(panels), "fairness",
                             "Between-group gaps per method and attribute (* small groups "
                             "left out)"))
    return blocks


# ----- 6. calibration --------------------------------------------------------------------------
def calibration_arrays(task: str, y, p) -> tuple[np.ndarray, np.ndarray, float]:
    """Binary outcomes and scores for the reliability diagram, and the ECE of one run.

    Binary tasks: the label and its probability. Phenotype: every (stay, label) pair for the
    diagram; the ECE is the mean of the per-label ECEs (as the reference). LoS: whether the
    arg-max class is right and its probability (top-label calibration).
    """
    if _kind(task) == "binary":
        return y, p, expected_calibration_error(y, p, CALIBRATION_BINS)
    if _kind(task) == "multilabel":
        ece = float(np.mean([expected_calibration_error(y[:, j], p[:, j], CALIBRATION_BINS)
                             for j in range(y.shape[1])]))
        return y.ravel(), p.ravel(), ece
    correct = (np.argmax(p, axis=1) == y).astype(np.int64)
    confidence = p.max(axis=1)
    return correct, confidence, expected_calibration_error(correct, confidence, CALIBRATION_BINS)


def _calibration(ctx) -> list:
    blocks = [Heading("Calibration")]
    panels, rows, bold = [], [], set()
    for (task, cohort), runs in ctx.clean().items():
        curves, first_row = {}, len(rows)
        for label, group in _by_label(ctx, runs).items():
            ys, ps, eces = [], [], []
            for run in group:
                df, meta = ctx.predictions(run)
                y, p = task_arrays(select_test(df), meta)
                y_flat, p_flat, ece = calibration_arrays(task, y, p)
                ys.append(y_flat)
                ps.append(p_flat)
                eces.append(ece)
            summary = t_interval(eces)
            curve = reliability_curve(np.concatenate(ys), np.concatenate(ps), CALIBRATION_BINS)
            curves[label] = {**curve, "ece": summary["mean"]}
            rows.append([task, cohort, group[0].policy, label, str(len(group)),
                         _summary_cell(summary), ctx.provenance.key(group)])
        eces = np.array([curves[label]["ece"] for label in curves], dtype=np.float64)
        if np.isfinite(eces).any():
            bold |= {(first_row + i, 5) for i in np.flatnonzero(eces == np.nanmin(eces))}
        panels.append({"title": f"{task}, {cohort}", "curves": curves})
    blocks.append(Paragraph(
        f"Expected calibration error with {CALIBRATION_BINS} equal-width bins on [0, 1] "
        "(sum over bins of n_bin / n x |mean score - observed frequency|), per run, then mean ± "
        "sd [95% t-interval] over runs; lowest in bold. Phenotype: mean of the per-label ECEs; "
        "LoS: top-label (arg-max class) calibration. The diagram pools the runs' test "
        "predictions."))
    blocks.append(Table(["task", "cohort", "absent X-ray policy", "method", "runs",
                         "ECE mean ± sd [95% t-CI]", "provenance"], rows, bold))
    blocks.append(ctx.figure(fig.calibration_figure(panels, ctx.colours), "calibration",
                             "Reliability diagrams (10 equal-width bins; dashed: perfect "
                             "calibration)"))
    return blocks


# ----- 7. modality reliance --------------------------------------------------------------------
def _reliance(ctx) -> list:
    opts = ctx.options
    blocks = [Heading("Modality reliance")]
    panels, rows, missing = [], [], []
    for (task, cohort), runs in ctx.clean().items():
        bars = []
        for label, group in _by_label(ctx, runs).items():
            for modality in sorted(_modalities(group[0])):
                drops, full, permuted, used = [], [], [], []
                for run in group:
                    other = run.permuted_predictions(modality)
                    if other is None:
                        missing.append(run.run_id)
                        continue
                    df, meta = ctx.predictions(run)
                    res = modality_reliance(df, other[0], meta_full=meta, meta_permuted=other[1],
                                            modality=modality, n_boot=opts.n_boot, seed=opts.seed)
                    drops.append(res["drop"]["value"])
                    full.append(res["full"]["value"])
                    permuted.append(res["permuted"]["value"])
                    used.append((run, res))
                if not used:
                    continue
                summary = t_interval([np.nan if d is None else d for d in drops])
                per_run = "; ".join(f"{run.run_id}: {format_value(res['drop'])}"
                                    for run, res in used)
                rows.append([task, cohort, label, modality, str(len(used)),
                             _num(t_interval(_finite(full))["mean"]),
                             _num(t_interval(_finite(permuted))["mean"]),
                             _summary_cell(summary), per_run])
                bars.append({"method": label, "modality": modality, "mean": summary["mean"],
                             "sd": summary["sd"]})
        if bars:
            metric = "AUROC" if _kind(task) == "binary" else "macro AUROC"
            panels.append({"title": f"{task}, {cohort}", "metric": metric, "bars": bars})
    if missing:
        blocks.append(Paragraph(
            f"{len(set(missing))} run(s) hold no permuted-input predictions (made before they "
            "were recorded); they are left out: " + ", ".join(sorted(set(missing))[:10])
            + ("..." if len(set(missing)) > 10 else "")))
    if not rows:
        blocks.append(Paragraph("No permuted-input predictions in the runs."))
        return blocks
    blocks.insert(1, Paragraph(
        "Drop in AUROC (phenotype: macro over labels; LoS: macro one-vs-rest) when one modality's "
        "inputs are permuted across the test stays (`predictions_permuted_<modality>.parquet`); "
        f"per run with a paired bootstrap 95% CI ({opts.n_boot} resamples), then mean ± sd "
        "[95% t-interval] over runs. Positive: the model uses that modality."))
    blocks.append(Table(["task", "cohort", "method", "permuted", "runs", "AUROC intact",
                         "AUROC permuted", "drop mean ± sd [95% t-CI]",
                         "per run: drop [95% bootstrap CI]"], rows))
    blocks.append(ctx.figure(fig.reliance_figure(panels, ctx.colours), "reliance",
                             "Drop in AUROC when a modality is permuted (error bar: sd over "
                             "runs)"))
    return blocks


def _finite(values) -> list:
    return [np.nan if v is None else v for v in values]


# ----- per label ------------------------------------------------------------------------------
def _per_label(ctx, metric: str) -> list:
    """Mean ± sd over runs of one per-label metric of the phenotype runs: a column per method."""
    blocks = []
    for (task, cohort), runs in ctx.clean().items():
        if _kind(task) != "multilabel":
            continue
        groups = _by_label(ctx, runs)
        labels = list((runs[0].metrics.get("per_label") or {}))
        rows, bold = [], set()
        for i, name in enumerate(labels):
            summaries = [t_interval([np.nan if ((r.metrics["per_label"].get(name) or {})
                                                .get(metric) or {}).get("value") is None
                                     else r.metrics["per_label"][name][metric]["value"]
                                     for r in group]) for group in groups.values()]
            means = np.array([s["mean"] for s in summaries])
            if np.isfinite(means).any():
                bold |= {(i, 1 + j) for j in np.flatnonzero(means == np.nanmax(means))}
            rows.append([name, *[_summary_cell(s) for s in summaries]])
        keys = [ctx.provenance.key(g) for g in groups.values()]
        blocks.append(Heading(f"Phenotype per label ({metric}), cohort {cohort}"))
        blocks.append(Table(["phenotype", *[f"{lb} ({k})" for lb, k in zip(groups, keys)]],
                            rows, bold, caption="mean ± sd over runs [95% t-interval]; best "
                                                "per label in bold"))
    return blocks


# ----- 8. provenance ---------------------------------------------------------------------------
def _provenance(ctx, notes: list) -> list:
    runs, opts = ctx.runs, ctx.options
    stores = sorted({(r.settings["store_config_sha256"] or "unknown", r.settings["store_path"]
                      or "unknown") for r in runs})
    versions = sorted({str(r.settings["cbstore_version"]) for r in runs})
    evaluators = sorted({str((r.metrics.get("evaluator") or {}).get("version")) for r in runs})
    tuned = sorted({(r.method, r.settings["preset"] or "(unnamed preset)") for r in runs
                    if r.settings["tuned_on_test"]})
    presets = sorted({(r.method, r.settings["preset"]) for r in runs if r.settings["preset"]})
    lines = [
        f"- runs: {len(runs)}; report made by cbstore {_version()} (evaluator "
        f"{EVALUATOR_VERSION}) at "
        f"{datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
        "- cbstore version of the runs: " + ", ".join(versions),
        "- evaluator version of the runs' metrics: " + ", ".join(evaluators),
        "- store config hash (store path): " + "; ".join(f"`{h}` ({p})" for h, p in stores),
        "- presets used: " + (", ".join(f"{m}: {p}" for m, p in presets) or "none"),
        "- presets the reference tuned on its test data: "
        + (", ".join(f"{m}: {p}" for m, p in tuned) or "none among these runs"),
        f"- options: baseline {opts.baseline or 'best unimodal'}, {opts.n_perm} permutations, "
        f"seed {opts.seed}, alpha {opts.alpha:g}, {opts.n_boot} bootstrap resamples for "
        "reliance",
    ]
    lines += [f"- note: {n}" for n in notes]
    return [Heading("Provenance"), Paragraph("\n".join(lines)),
            Paragraph("Every row above names its runs: a run id, or a key below listing the run "
                      "ids; `results.csv` holds every run's settings and metrics."),
            ctx.provenance.table()]


def build_report(paths, out, options: ReportOptions | None = None) -> dict:
    """Build the report of the runs under ``paths`` into the folder ``out``.

    Parameters
    ----------
    paths : sequence of path-like
        Run folders or folders of runs.
    out : path-like
        Report folder (created; files in it are replaced).
    options : ReportOptions, optional

    Returns
    -------
    dict
        ``{"markdown", "html", "csv", "figures": [paths], "main": main tables as Markdown,
        "n_runs", "tests": [significance tests with q-values]}``.

    Raises
    ------
    ReportInputError
        No usable run, an unknown baseline, or an output path that is a file.
    """
    options = options or ReportOptions()
    out = pathlib.Path(out)
    if out.exists() and not out.is_dir():
        raise ReportInputError(f"--out {out} is a file; give a folder for the report "
                               "(report.md, report.html, figures/, results.csv)")
    runs, notes = load_runs(paths)
    if options.task is not None:
        runs = [r for r in runs if r.task == options.task]
        if not runs:
            raise ReportInputError(f"no complete run of task {options.task!r} under "
                                   f"{', '.join(map(str, paths))}")
    unknown = sorted({r.task for r in runs} - set(PRIMARY_METRICS))
    if unknown:
        raise ReportInputError(f"runs of unknown task(s) {unknown}; known: "
                               f"{', '.join(PRIMARY_METRICS)}")
    if options.baseline is not None and options.baseline not in {r.method for r in runs}:
        raise ReportInputError(f"--baseline {options.baseline!r} has no run; methods run: "
                               f"{', '.join(sorted({r.method for r in runs}))}")
    out.mkdir(parents=True, exist_ok=True)
    ctx = _Context(runs, out, options)
    main = _main_tables(ctx)
    blocks = [Heading("cbstore report", 1),
              Paragraph(f"{len(runs)} runs: tasks {', '.join(sorted({r.task for r in runs}))}; "
                        f"methods {', '.join(sorted(set(ctx.labels.values())))}. Numbers come "
                        "from the run folders (metrics.json, predictions files).")]
    blocks += main
    blocks += _per_run_tables(ctx)
    blocks += _significance(ctx)
    blocks += _robustness(ctx)
    blocks += _fairness(ctx)
    blocks += _calibration(ctx)
    blocks += _reliance(ctx)
    if options.per_label:
        blocks += _per_label(ctx, options.per_label)
    blocks += _provenance(ctx, notes)

    md = out / "report.md"
    md.write_text(render_markdown(blocks))
    page = out / "report.html"
    page.write_text(render_html(blocks, "cbstore report"))
    csv = out / "results.csv"
    results_frame(runs).to_csv(csv, index=False)
    return {"markdown": md, "html": page, "csv": csv,
            "figures": sorted(p for b in blocks if isinstance(b, Figure) for p in (b.png, b.svg)),
            "main": render_markdown(main), "n_runs": len(runs), "tests": ctx.q_values}
