"""The shared evaluator: one scorer for every run's predictions file.

Imports neither torch nor any fusion method, so outside models and reports can use it alone::

    from fusion.evaluation import load_predictions, evaluate_predictions
    df, meta = load_predictions("runs/<run-id>/predictions.parquet")
    result = evaluate_predictions(df, meta, n_boot=1000, seed=0)
"""

from fusion.evaluation.bootstrap import bootstrap, resample_counts, summarise
from fusion.evaluation.evaluate import (
    EVALUATOR_VERSION, compare_files, compare_predictions, evaluate_file, evaluate_predictions,
    file_sha256, json_ready, write_json,
)
from fusion.evaluation.fairness import DEFAULT_GROUPS, fairness_report, fairness_table
from fusion.evaluation.metrics import (
    THRESHOLD_RULE, RankedScores, expected_calibration_error, youden_threshold,
)
from fusion.evaluation.predictions import (
    LOS_CLASS_NAMES, TASKS, EvaluationError, PredictionsError, load_predictions, validate_predictions,
    write_predictions,
)
from fusion.evaluation.reliance import modality_reliance
from fusion.evaluation.report import format_table, render_comparison, render_summary
from fusion.evaluation.significance import (
    benjamini_hochberg, permutation_test, stratified_permutation_test,
)

__all__ = [
    "DEFAULT_GROUPS", "EVALUATOR_VERSION", "LOS_CLASS_NAMES", "TASKS", "THRESHOLD_RULE",
    "EvaluationError", "PredictionsError", "RankedScores", "benjamini_hochberg", "bootstrap", "compare_files",
    "compare_predictions", "evaluate_file", "evaluate_predictions", "expected_calibration_error",
    "fairness_report", "fairness_table", "file_sha256", "format_table", "json_ready",
    "load_predictions", "modality_reliance", "permutation_test", "render_comparison",
    "render_summary", "resample_counts", "stratified_permutation_test", "summarise",
    "validate_predictions", "write_json",
    "write_predictions", "youden_threshold",
]
