"""``cbstore report``: numbers recomputed from the predictions files, the statistics against hand
and brute-force computations, valid figures, a self-contained HTML page and a tidy CSV."""

from __future__ import annotations

import html.parser
import itertools
import json
import math
import struct
import xml.etree.ElementTree as ET

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from scipy import stats
from sklearn.metrics import average_precision_score, roc_auc_score

from cli.report_cmd import report
from fusion.data import FusionPart
from fusion.evaluation import (
    PredictionsError, benjamini_hochberg, load_predictions, stratified_permutation_test,
)
from fusion.permuted import permute_modality
from fusion.reporting import ReportOptions, build_report, load_runs
from fusion.reporting.build import _variant, _variant_labels
from fusion.reporting.stats import (
    cliques, critical_difference, friedman_test, mean_ranks, nemenyi_q, normalised_auc,
)
from support import make_grid, make_run

FIGURES = ("critical_difference", "robustness", "fairness", "calibration", "reliance")


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    """A folder of tiny runs and the report built from it."""
    root = tmp_path_factory.mktemp("report")
    runs = root / "runs"
    make_grid(runs)
    out = root / "out"
    result = build_report([runs], out, ReportOptions(n_perm=200, n_boot=20))
    return {"runs": runs, "out": out, "result": result}


def _md_tables(text: str) -> dict:
    """Markdown tables of a report under their last heading: heading -> [list of row dicts]."""
    tables, heading, lines = {}, None, text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        if line.startswith("| ") and i + 1 < len(lines) and lines[i + 1].startswith("| -"):
            header = [c.strip() for c in line.strip("|").split(" | ")]
            rows = []
            i += 2
            while i < len(lines) and lines[i].startswith("|"):
                cells = [c.strip().strip("*") for c in lines[i].strip("|").split(" | ")]
                rows.append(dict(zip(header, cells)))
                i += 1
            tables.setdefault(heading, []).append(rows)
            continue
        i += 1
    return tables


def _test_part(folder):
    df, _ = load_predictions(folder / "predictions.parquet")
    test = df[df["part"] == "test"].sort_values("stay_id")
    return test["y_true_mortality"].to_numpy(), test["y_prob_mortality"].to_numpy()


def _runs(grid, **settings) -> list:
    found = []
    for folder in sorted(p for p in grid["runs"].iterdir() if (p / "COMPLETE").is_file()):
        config = json.loads((folder / "config.json").read_text())
        if all(config[k] == v for k, v in settings.items()):
            found.append(folder)
    return found


def _cell(values) -> str:
    """The report's ``mean ± sd [low, high]`` cell, recomputed with numpy and scipy."""
    x = np.asarray(values)
    mean, sd = x.mean(), x.std(ddof=1)
    half = stats.t.ppf(0.975, x.size - 1) * sd / math.sqrt(x.size)
    return f"{mean:.3f} ± {sd:.3f} [{mean - half:.3f}, {mean + half:.3f}]"


def _ece(y, p, bins=10):
    """ECE written out bin by bin (scores == 1 go in the last bin)."""
    edges = np.linspace(0, 1, bins + 1)
    total = 0.0
    for k in range(bins):
        inside = (p >= edges[k]) & ((p < edges[k + 1]) if k < bins - 1 else (p <= 1))
        if inside.any():
            total += inside.sum() / p.size * abs(p[inside].mean() - y[inside].mean())
    return total


# ----- numbers -----------------------------------------------------------------------------------
def test_main_table_equals_recomputation_from_predictions(grid):
    tables = _md_tables((grid["out"] / "report.md").read_text())
    (main,) = tables["mortality, cohort full"][:1]
    assert [row["method"] for row in main] == ["lgbm-early", "lgbm-ehr", "lgbm-cxr"], \
        "grouped by absent_cxr_policy (native, not_used, train_prevalence)"
    for row in main:
        folders = _runs(grid, method=row["method"], cohort="full", cxr_missing_rate=0.0)
        assert row["runs"] == str(len(folders)) == "4"
        arrays = [_test_part(f) for f in folders]
        assert row["auroc mean ± sd [95% t-CI]"] == _cell([roc_auc_score(y, p) for y, p in arrays])
        assert row["auprc mean ± sd [95% t-CI]"] == _cell(
            [average_precision_score(y, p) for y, p in arrays])
    # the best mean per column is bold, and only it
    text = (grid["out"] / "report.md").read_text()
    best = main[0]["auroc mean ± sd [95% t-CI]"]
    assert f"**{best}**" in text and text.count("**0.") >= 2


def test_results_csv_one_row_per_run_and_metric(grid):
    frame = pd.read_csv(grid["out"] / "results.csv")
    folders = _runs(grid)
    metrics = json.loads((folders[0] / "metrics.json").read_text())["metrics"]
    assert len(frame) == len(folders) * len(metrics)
    assert not frame.duplicated(["run_id", "metric"]).any()
    assert set(frame["run_id"]) == {f.name for f in folders}
    for column in ("method", "task", "cohort", "fold", "seed", "features", "cxr_missing_rate",
                   "missing_at", "absent_cxr_policy", "store_config_sha256", "hp.n_estimators"):
        assert column in frame.columns, column
    for folder in folders:
        y, p = _test_part(folder)
        auroc = frame[(frame["run_id"] == folder.name) & (frame["metric"] == "auroc")]["value"]
        assert auroc.item() == pytest.approx(roc_auc_score(y, p), abs=1e-12)


def test_calibration_and_robustness_numbers(grid):
    tables = _md_tables((grid["out"] / "report.md").read_text())
    (calibration,) = tables["Calibration"]
    for row in calibration:
        folders = _runs(grid, method=row["method"], cohort=row["cohort"], cxr_missing_rate=0.0)
        eces = [_ece(*_test_part(f)) for f in folders]
        expected = _cell(eces) if len(eces) > 1 else f"{eces[0]:.3f} (1 run)"
        assert row["ECE mean ± sd [95% t-CI]"] == expected
    (robustness,) = tables["Robustness to missing X-rays"]
    (row,) = robustness          # only lgbm-early was run with masks
    assert row["method"] == "lgbm-early" and row["rates"] == "0, 0.5, 1"
    means = [np.mean([roc_auc_score(*_test_part(f))
                      for f in _runs(grid, method="lgbm-early", cohort="full",
                                     cxr_missing_rate=rate)]) for rate in (0.0, 0.5, 1.0)]
    area = (0.5 * (means[0] + means[1]) / 2 + 0.5 * (means[1] + means[2]) / 2) / 1.0
    assert row["normalised AUC"] == f"{area:.3f}"


def test_significance_combined_test_and_bh(grid):
    tests = grid["result"]["tests"]
    assert {t["baseline"] for t in tests} == {"lgbm-ehr"}
    combined = [t for t in tests if t["method"] == "lgbm-early" and t["metric"] == "auroc"
                and t["cohort"] == "full" and t["stratum"].startswith("combined")]
    assert len(combined) == 1 and combined[0]["n"] == "160"
    pairs = []
    for fold, seed in itertools.product((0, 1), (0, 1)):
        a, = _runs(grid, method="lgbm-early", cohort="full", cxr_missing_rate=0.0, fold=fold,
                   seed=seed)
        b, = _runs(grid, method="lgbm-ehr", cohort="full", fold=fold, seed=seed)
        pairs.append((load_predictions(a / "predictions.parquet"),
                      load_predictions(b / "predictions.parquet")))
    expected = stratified_permutation_test(pairs, "auroc", n_perm=200, seed=0)
    assert combined[0]["p"] == expected["p_value"]
    assert combined[0]["diff"] == pytest.approx(np.mean(
        [roc_auc_score(*_test_part(a)) - roc_auc_score(*_test_part(b))
         for a, b in zip(_runs(grid, method="lgbm-early", cohort="full", cxr_missing_rate=0.0),
                         _runs(grid, method="lgbm-ehr", cohort="full"))]), abs=1e-12)
    # Benjamini-Hochberg across every test of the report (both cohorts, metrics, strata)
    q = benjamini_hochberg([t["p"] for t in tests])
    np.testing.assert_allclose([t["q"] for t in tests], q)
    assert {t["cohort"] for t in tests} == {"full", "matched"}


def test_default_baseline_is_best_unimodal(grid):
    text = (grid["out"] / "report.md").read_text()
    assert "baseline **lgbm-ehr** (the best unimodal method by mean auroc)" in text


# ----- statistics against hand and brute-force computations -------------------------------------
def test_critical_difference_hand_example():
    # Demsar (2006) section 3.2.2: k = 4 methods, N = 14 data sets, q_0.05 = 2.569:
    # CD = 2.569 * sqrt(4 * 5 / (6 * 14)) = 2.569 * 0.48795 = 1.2536
    assert nemenyi_q(4) == pytest.approx(2.569, abs=5e-4)
    assert critical_difference(4, 14) == pytest.approx(2.569 * math.sqrt(20 / 84), abs=2e-3)
    assert critical_difference(3, 4) == pytest.approx(2.343 * math.sqrt(12 / 24), abs=2e-3)
    # ranks by hand (higher score = rank 1; a tie shares 1.5):
    #   block 1: 0.9 0.8 0.7 -> 1 2 3;  block 2: 0.6 0.6 0.5 -> 1.5 1.5 3;
    #   block 3: 0.7 0.9 0.8 -> 3 1 2;  block 4: 0.8 0.7 0.6 -> 1 2 3
    scores = [[0.9, 0.8, 0.7], [0.6, 0.6, 0.5], [0.7, 0.9, 0.8], [0.8, 0.7, 0.6]]
    np.testing.assert_allclose(mean_ranks(scores), [6.5 / 4, 6.5 / 4, 11 / 4])
    # Friedman without ties: chi2 = 12 N / (k (k+1)) * sum(R_j^2) - 3 N (k + 1)
    untied = [[0.9, 0.8, 0.7], [0.6, 0.7, 0.5], [0.7, 0.9, 0.8], [0.8, 0.7, 0.6]]
    r = mean_ranks(untied)                       # [1.75, 1.75, 2.5]
    chi2 = 12 * 4 / (3 * 4) * np.sum(r ** 2) - 3 * 4 * 4
    assert friedman_test(untied)["statistic"] == pytest.approx(chi2)
    assert friedman_test([[1, 2], [2, 1]])["reason"].startswith("needs at least 3 methods")
    # groups not significantly different at CD 1.0: ranks 1.0 1.5 2.8 3.2 -> {0,1}, {2,3}
    assert cliques([1.0, 1.5, 2.8, 3.2], 1.0) == [(0, 1), (2, 3)]
    assert normalised_auc([0.0, 0.5], [0.8, 0.6]) == pytest.approx(0.7)
    with pytest.raises(ValueError, match="at least 2 methods"):
        nemenyi_q(1)


def _binary(y, p, stay0=0):
    return pd.DataFrame({"stay_id": np.arange(stay0, stay0 + len(y)), "part": "test", "fold": 0,
                         "task": "mortality", "y_true_mortality": y, "y_prob_mortality": p})


def test_combined_permutation_test_matches_brute_force():
    rng = np.random.default_rng(3)
    strata = []
    for n, stay0 in ((4, 0), (3, 100)):
        y = np.array([0, 1] * 2)[:n]
        strata.append((y, rng.random(n), rng.random(n), stay0))
    pairs = [((_binary(y, a, s0), None), (_binary(y, b, s0), None)) for y, a, b, s0 in strata]

    def statistic(swaps):
        diffs, start = [], 0
        for y, a, b, _ in strata:
            s = np.asarray(swaps[start:start + len(y)], dtype=bool)
            start += len(y)
            diffs.append(roc_auc_score(y, np.where(s, b, a)) - roc_auc_score(y, np.where(s, a, b)))
        return np.mean(diffs)

    observed = statistic([0] * 7)
    every = [statistic(s) for s in itertools.product((0, 1), repeat=7)]
    exact_p = np.mean(np.abs(every) >= abs(observed) - 1e-12)
    out = stratified_permutation_test(pairs, "auroc", n_perm=128, seed=0)
    assert out["exact"] and out["n_perm"] == 128 and out["n_triples"] == 7
    assert out["difference"] == pytest.approx(observed, abs=1e-12)
    assert out["p_value"] == pytest.approx(exact_p, abs=1e-12)

    # Monte Carlo path: the same draws as a loop over sklearn
    out = stratified_permutation_test(pairs, "auroc", n_perm=50, seed=5)
    swaps = np.random.default_rng(5).random((50, 7)) < 0.5
    diffs = np.array([statistic(s) for s in swaps])
    expected = (1 + np.sum(np.abs(diffs) >= abs(observed) - 1e-12)) / 51
    assert not out["exact"] and out["p_value"] == pytest.approx(expected)


def test_combined_permutation_test_errors():
    y = np.array([0, 1, 0, 1])
    with pytest.raises(ValueError, match="at least one stratum"):
        stratified_permutation_test([], "auroc")
    pair = ((_binary(y, y * 0.5), None), (_binary(y, y * 0.2), None))
    with pytest.raises(ValueError, match="unknown metric 'accuracy'"):
        stratified_permutation_test([pair], "accuracy")
    other = ((_binary(y, y * 0.5, stay0=50), None), (_binary(y, y * 0.2), None))
    with pytest.raises(PredictionsError, match="stratum 0: run a and stratum 0: run b have no "
                                               "test stay in common"):
        stratified_permutation_test([other], "auroc")


# ----- files -------------------------------------------------------------------------------------
def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def _svg_axes(path) -> list:
    root = ET.parse(path).getroot()
    assert root.tag.endswith("svg")
    return [g for g in root.iter() if g.tag.endswith("g")
            and (g.get("id") or "").startswith("axes_")]


def test_figures_are_valid_png_and_svg_with_their_panels(grid):
    # panels: one per (task, cohort) with unmasked runs (full, matched), one per masked setting
    expected = {"critical_difference": 1, "robustness": 1, "fairness": 2, "calibration": 2,
                "reliance": 2}
    for name in FIGURES:
        width, height = _png_size(grid["out"] / "figures" / f"{name}.png")
        assert width > 300 and height > 100, name
        assert len(_svg_axes(grid["out"] / "figures" / f"{name}.svg")) == expected[name], name
    # matplotlib writes each text as a comment before its glyphs
    assert "X-ray missing rate" in (grid["out"] / "figures" / "robustness.svg").read_text()
    cd = critical_difference(3, 4)   # 3 methods ranked in 4 (fold, seed) blocks
    text = (grid["out"] / "report.md").read_text()
    assert "3 methods ranked in 4 blocks" in text, "the matched block lacks lgbm-cxr: left out"
    assert f"CD = {cd:.2f}" in (grid["out"] / "figures" / "critical_difference.svg").read_text()
    calibration = (grid["out"] / "figures" / "calibration.svg").read_text()
    assert all(m in calibration for m in ("lgbm-early", "lgbm-ehr", "lgbm-cxr"))


class _Collector(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.refs = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.refs += [(tag, k, v) for k, v in attrs if k in ("src", "href", "srcset", "data")]


def test_html_parses_and_references_only_embedded_content(grid):
    text = (grid["out"] / "report.html").read_text()
    parser = _Collector()
    parser.feed(text)
    parser.close()
    assert parser.tags.count("img") == len(FIGURES)
    assert parser.tags.count("table") >= 8
    assert not {"script", "link", "iframe", "object"} & set(parser.tags)
    assert parser.refs and all(v.startswith("data:image/png;base64,") for _, _, v in parser.refs)
    assert "http:" not in text and "https:" not in text and "url(" not in text


def test_provenance_lists_runs_hash_version_and_presets(tmp_path):
    runs = tmp_path / "runs"
    make_run(runs, "lgbm-ehr", signal=1.5)
    make_run(runs, "lgbm-early", config_extra={"preset": "early-carebench",
                                               "tuned_on_test": True})
    make_run(runs, "lgbm-cxr", signal=0.5, permuted=False)
    (runs / "deadbeef0000").mkdir()                         # an interrupted run
    (runs / "deadbeef0000" / "config.json").write_text("{}")
    result = CliRunner().invoke(report, [str(runs), "--out", str(tmp_path / "out"), "--n-perm",
                                         "20", "--n-boot", "0"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "| native " in result.output and "auroc mean ± sd" in result.output
    assert "3 runs; wrote" in result.output
    text = (tmp_path / "out" / "report.md").read_text()
    assert "presets the reference tuned on its test data: lgbm-early: early-carebench" in text
    assert "store config hash (store path): `c0ffeec0ffeec0ffeec0ffee`" in text
    assert "cbstore version of the runs: 0.1.0" in text
    assert "1 incomplete run folder(s) skipped (deadbeef0000)" in text
    assert "hold no permuted-input predictions" in text
    keys = _md_tables(text)["Provenance"][0]
    assert {r["run ids"] for r in keys} >= {p.name for p in runs.iterdir()
                                            if (p / "COMPLETE").is_file()}
    # a single run per method: no combined test, no interval
    assert "combined, " not in text and "(1 run)" in text

    make_run(tmp_path / "plain", "lgbm-ehr")
    plain = build_report([tmp_path / "plain"], tmp_path / "out2",
                         ReportOptions(n_perm=20, n_boot=0))["markdown"].read_text()
    assert "presets the reference tuned on its test data: none among these runs" in plain


def test_report_errors(grid, tmp_path):
    runner = CliRunner()
    empty = tmp_path / "empty"
    empty.mkdir()
    result = runner.invoke(report, [str(empty), "--out", str(tmp_path / "o")])
    assert result.exit_code != 0 and "neither a complete run folder" in result.output
    a_file = tmp_path / "report.md"
    a_file.write_text("old")
    result = runner.invoke(report, [str(grid["runs"]), "--out", str(a_file)])
    assert result.exit_code != 0 and "is a file; give a folder" in result.output
    result = runner.invoke(report, [str(grid["runs"]), "--out", str(tmp_path / "o"),
                                    "--baseline", "nope"])
    assert result.exit_code != 0 and "'nope' has no run; methods run: lgbm-cxr" in result.output
    result = runner.invoke(report, [str(grid["runs"]), "--out", str(tmp_path / "o"),
                                    "--task", "los"])
    assert result.exit_code != 0 and "no complete run of task 'los'" in result.output
    broken = tmp_path / "broken"
    folder = make_run(broken, "lgbm-ehr")
    (folder / "metrics.json").write_text("{not json")
    result = runner.invoke(report, [str(broken), "--out", str(tmp_path / "o")])
    assert result.exit_code != 0 and "metrics.json: not valid JSON" in result.output


def test_permute_modality_moves_only_that_modality():
    n = 5
    part = FusionPart(name="test", index=np.arange(10, 15), stay_id=np.arange(n),
                      y=np.zeros((n, 1), np.float32),
                      cxr_present=np.array([True, False, True, False, False]),
                      cxr_masked=np.zeros(n, bool), ehr_emb=np.arange(n)[:, None] * 1.0,
                      cxr_emb=np.arange(n)[:, None] * 10.0,
                      image_loader=lambda positions: np.asarray(positions)[:, None, None],
                      image_size=1)
    permuted, order = permute_modality(part, "cxr", np.random.default_rng(1))
    np.testing.assert_array_equal(permuted.cxr_emb[:, 0], order * 10.0)
    np.testing.assert_array_equal(permuted.cxr_present, part.cxr_present[order])
    np.testing.assert_array_equal(permuted.ehr_emb, part.ehr_emb)      # EHR untouched
    np.testing.assert_array_equal(permuted.stay_id, part.stay_id)
    # stay i gets the image of stay order[i] (the loader sees store positions)
    shown = np.flatnonzero(permuted.cxr_present)
    np.testing.assert_array_equal(permuted.image_loader(permuted.index[shown])[:, 0, 0],
                                  part.index[order[shown]])
    with pytest.raises(ValueError, match="unknown modality 'ecg'"):
        permute_modality(part, "ecg", np.random.default_rng(0))


def test_runs_of_one_method_with_different_settings_get_distinct_labels(tmp_path):
    make_run(tmp_path, "lgbm-ehr")
    make_run(tmp_path, "lgbm-ehr", config_extra={"preset": "tuned"})
    make_run(tmp_path, "lgbm-ehr", fold=1, config_extra={"features": "raw"})
    runs, _ = load_runs([tmp_path])
    labels = sorted({_variant_labels(runs)[_variant(r)] for r in runs})
    assert len(labels) == 3 and "lgbm-ehr (raw)" in labels
    assert any(label.endswith("(cached, preset tuned)") for label in labels), labels
