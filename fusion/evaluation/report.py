"""Plain-text (Markdown) rendering of evaluation results."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

__all__ = ["format_table", "format_value", "render_comparison", "render_summary"]

_MISSING = "n/a"


def format_value(value, digits: int = 3) -> str:
    """Render one cell.

    A metric dict ``{"value", "ci_low", "ci_high", ...}`` becomes ``"0.812 [0.790, 0.833]"``;
    floats get ``digits`` decimals; None and NaN become ``"n/a"``.

    Examples
    --------
    >>> format_value({"value": 0.8123, "ci_low": 0.79, "ci_high": 0.8333})
    '0.812 [0.790, 0.833]'
    >>> format_value(float("nan"))
    'n/a'
    """
    if isinstance(value, Mapping) and "value" in value:
        point = format_value(value["value"], digits)
        low, high = value.get("ci_low"), value.get("ci_high")
        if point == _MISSING or _is_missing(low) or _is_missing(high):
            return point
        return f"{point} [{format_value(low, digits)}, {format_value(high, digits)}]"
    if _is_missing(value):
        return _MISSING
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _is_missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def format_table(rows: Iterable[Mapping], columns: list[str] | None = None,
                 digits: int = 3) -> str:
    """Render rows of values (or metric dicts with CIs) as a Markdown table.

    Parameters
    ----------
    rows : iterable of mapping
        One mapping per row, column name -> value (see :func:`format_value`).
    columns : list of str, optional
        Column order; default: keys in order of first appearance.
    digits : int
        Decimals for floats.

    Returns
    -------
    str
        The table (no trailing newline); ``""`` for no rows.

    Examples
    --------
    >>> print(format_table([{"metric": "auroc", "value": {"value": 0.9, "ci_low": 0.85,
    ...                                                     "ci_high": 0.94}}]))
    | metric | value                |
    | ------ | -------------------- |
    | auroc  | 0.900 [0.850, 0.940] |
    """
    rows = list(rows)
    if not rows:
        return ""
    if columns is None:
        columns = []
        for row in rows:
            columns.extend(k for k in row if k not in columns)
    cells = [[format_value(row.get(c), digits) for c in columns] for row in rows]
    widths = [max(len(str(c)), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    header = "| " + " | ".join(str(c).ljust(w) for c, w in zip(columns, widths)) + " |"
    rule = "| " + " | ".join("-" * w for w in widths) + " |"
    body = ["| " + " | ".join(v.ljust(w) for v, w in zip(r, widths)) + " |" for r in cells]
    return "\n".join([header, rule, *body])


def render_summary(result: Mapping, *, max_groups: int = 12) -> str:
    """A readable summary of an :func:`~fusion.evaluation.evaluate.evaluate_predictions` result."""
    lines = [f"task: {result['task']}   method: {result.get('method') or _MISSING}   "
             f"run: {result.get('run_id') or _MISSING}   fold: {result.get('fold')}"]
    n = result["n"]
    lines.append("rows: " + ", ".join(f"{part} {n[part]}" for part in n))
    if result.get("source"):
        lines.append(f"file: {result['source']['path']}  sha256 {result['source']['sha256'][:16]}…")
    threshold = result.get("threshold")
    if threshold:
        value = format_value(threshold["value"], 4)
        lines.append(f"threshold: {value} (Youden's J on the {threshold['part']} part)"
                     + (f" -- {threshold['reason']}" if threshold.get("reason") else ""))
    boot = result["bootstrap"]
    lines.append(f"\nTest metrics, 95% CI from {boot['n_boot']} bootstrap resamples "
                 f"(seed {boot['seed']}, strata: {boot['strata']})")
    lines.append(format_table([{"metric": k, "estimate [95% CI]": v}
                               for k, v in result["metrics"].items()]))
    if result.get("per_label"):
        lines.append("\nPer label")
        lines.append(format_table([{"label": k, "n_pos": v["n_pos"], "auroc": v["auroc"],
                                    "auprc": v["auprc"]} for k, v in result["per_label"].items()]))
    if result.get("per_class"):
        lines.append("\nPer class (one-vs-rest)")
        lines.append(format_table([{"class": k, "n": v["n"], "auroc": v["auroc"]}
                                   for k, v in result["per_class"].items()]))
    fairness = result.get("fairness")
    if fairness:
        lines.append(f"\nFairness (test part; groups with n < {fairness['min_group_size']} are "
                     "flagged small and left out of gaps)")
        rows = []
        for name, entry in fairness["attributes"].items():
            row = {"attribute": name, "groups": len(entry["groups"]),
                   "small": sum(bool(g["small"]) for g in entry["groups"])}
            for metric, gap in entry["gaps"].items():
                row[f"{metric} gap"] = gap["gap"]
            if "equalized_odds_difference" in entry:
                row["EO diff"] = entry["equalized_odds_difference"]
                row["DP diff"] = entry["demographic_parity_difference"]
            rows.append(row)
        lines.append(format_table(rows[:max_groups]) if rows else "(no demographic columns)")
        if len(rows) > max_groups:
            lines.append(f"... {len(rows) - max_groups} more attribute sets in the JSON")
        if fairness.get("skipped"):
            lines.append("skipped: " + ", ".join(f"{k} ({v})" for k, v in
                                                 fairness["skipped"].items()))
    if result.get("comparison"):
        lines.append("")
        lines.append(render_comparison(result["comparison"]))
    for note in result.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)


def render_comparison(comparison: Mapping) -> str:
    """Table of the permutation tests of :func:`~fusion.evaluation.evaluate.compare_predictions`."""
    a = comparison.get("method_a") or "a"
    b = comparison.get("method_b") or "b"
    tests = comparison["tests"]
    first = next(iter(tests.values()))
    lines = [f"Paired permutation tests, {a} vs {b} ({first['n_stays']} common test stays, "
             f"{first['n_perm']} permutations)"]
    lines.append(format_table([{"metric": m, a: t["value_a"], b: t["value_b"],
                                "difference": t["difference"], "p": t["p_value"]}
                               for m, t in tests.items()], digits=4))
    for metric, test in tests.items():
        labels = test.get("per_label")
        if labels:
            significant = [x["label"] for x in labels
                           if x["q_value"] is not None and x["q_value"] < 0.05]
            lines.append(f"{metric}: {len(significant)} of {len(labels)} labels with BH q < 0.05"
                         + (f" ({', '.join(significant)})" if significant else ""))
    return "\n".join(lines)
