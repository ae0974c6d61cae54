"""The predictions file: one row per (stay, part) predicted by a run, read by the evaluator.

Format (parquet, written with pandas + pyarrow)
-----------------------------------------------
Required columns:

``stay_id`` int64, ``part`` str (``"train"`` | ``"val"`` | ``"test"``), ``fold`` int (one value per
file), ``task`` str (equal to the task in the metadata), and per task:

* ``mortality`` / ``mortality_hosp`` (binary) and ``phenotype`` (multi-label): for every label
  ``<l>`` a ``y_true_<l>`` column (0/1) and a ``y_prob_<l>`` column (probability in [0, 1]);
* ``los`` (7 classes): ``y_true_los`` (class 0..K-1) and ``y_prob_<class-name>`` for every class,
  each row summing to 1.

Optional columns: ``y_prob_ehr_<...>`` / ``y_prob_cxr_<...>`` (per-modality probabilities, NaN
allowed where a modality was absent), ``cxr_present``, ``cxr_masked`` and the demographic columns
``gender``, ``age_group``, ``race``, ``insurance``, ``admission_type``.

The parquet key-value metadata holds, under the key ``b"cbstore"``, a JSON object
``{"task": ..., "labels": [...], "class_names": [...] (los), "method": ..., "run_id": ...}``.
"""

from __future__ import annotations

import json
import os
import pathlib
import secrets

import numpy as np
import pandas as pd

from cbstore.format.tasks import TASKS as STORE_TASKS
from cbstore.format.tasks import get_task
from fusion.registry import FusionError

__all__ = [
    "BINARY_TASKS", "EvaluationError", "LOS_CLASS_NAMES", "META_KEY", "PARTS", "PredictionsError", "TASKS",
    "align_test_parts", "as_validated", "is_binary", "task_kind", "label_columns", "load_predictions",
    "prob_columns", "task_arrays", "select_test", "validate_predictions", "write_predictions",
]

#: Tasks the evaluator knows (:data:`cbstore.format.tasks.TASKS`); their kind comes from their TaskSpec.
TASKS = STORE_TASKS
BINARY_TASKS = tuple(name for name in TASKS if get_task(name).kind == "binary")
#: Values of the ``part`` column.
PARTS = ("train", "val", "test")
#: Parquet key-value metadata key holding the JSON meta.
META_KEY = b"cbstore"
#: Default LoS class names (bins [2,3) [3,4) [4,5) [5,6) [6,7) [7,14) [14,inf) days).
LOS_CLASS_NAMES = get_task("los").class_names
#: Tolerance on the LoS probability row sums.
LOS_SUM_TOLERANCE = 1e-4
#: How many offending stay ids an error message shows.
_SHOW_IDS = 5

_BASE_COLUMNS = ("stay_id", "part", "fold", "task")


class PredictionsError(FusionError, ValueError):
    """A predictions file or frame does not follow the predictions format."""


class EvaluationError(FusionError, ValueError):
    """An evaluation option is invalid (threshold part, metric name)."""


def is_binary(task: str) -> bool:
    """Return True for the single-label binary tasks (mortality, mortality_hosp)."""
    return task in BINARY_TASKS


def task_kind(task: str) -> str:
    """``binary``, ``multilabel`` or ``multiclass``: the kind of ``task`` (its TaskSpec)."""
    return get_task(task).kind


def _multiclass(meta: dict) -> bool:
    return get_task(meta["task"]).multiclass


def label_columns(meta: dict) -> list[str]:
    """Names of the ``y_true_*`` columns for a validated meta."""
    if _multiclass(meta):
        return [f"y_true_{meta['task']}"]
    return [f"y_true_{label}" for label in meta["labels"]]


def prob_columns(meta: dict) -> list[str]:
    """Names of the main ``y_prob_*`` columns (labels, or LoS classes) for a validated meta."""
    names = meta["class_names"] if _multiclass(meta) else meta["labels"]
    return [f"y_prob_{name}" for name in names]


def _ids(df: pd.DataFrame, bad: np.ndarray) -> str:
    """The first few stay ids of the rows flagged in ``bad``, for error messages."""
    ids = df["stay_id"].to_numpy()[np.asarray(bad, dtype=bool)][:_SHOW_IDS]
    return ", ".join(str(int(i)) if _is_int_like(i) else repr(i) for i in ids)


def _is_int_like(value) -> bool:
    try:
        return float(value) == int(value)
    except (TypeError, ValueError, OverflowError):
        return False


def _complete_meta(df: pd.DataFrame, meta: dict, where: str) -> dict:
    """Check the meta and fill ``labels`` / ``class_names`` (inferred from columns if absent)."""
    if not isinstance(meta, dict):
        raise PredictionsError(
            f"{where}: meta must be a JSON object (dict), got {type(meta).__name__}")
    task = meta.get("task")
    if task not in TASKS:
        raise PredictionsError(
            f"{where}: unknown task {task!r} in meta; valid tasks: {', '.join(TASKS)}")
    meta = dict(meta)
    spec = get_task(task)
    if spec.multiclass:
        names = meta.get("class_names") or list(spec.class_names)
        if len(set(names)) != len(names) or len(names) < 2:
            raise PredictionsError(
                f"{where}: meta class_names must be >= 2 distinct names, got {names!r}")
        meta["class_names"] = [str(n) for n in names]
        meta["labels"] = [task]
        return meta
    labels = meta.get("labels")
    if not labels:
        labels = [c[len("y_true_"):] for c in df.columns if str(c).startswith("y_true_")]
        if not labels:
            raise PredictionsError(
                f"{where}: meta has no 'labels' and the frame has no y_true_<label> columns; "
                "add one y_true_<label> and one y_prob_<label> column per label")
    labels = [str(label) for label in labels]
    if len(set(labels)) != len(labels):
        raise PredictionsError(f"{where}: duplicate names in meta labels: {labels!r}")
    if is_binary(task) and len(labels) != 1:
        raise PredictionsError(
            f"{where}: task {task!r} is binary and needs exactly one label, got {labels!r}")
    meta["labels"] = labels
    return meta


def validate_predictions(df: pd.DataFrame, meta: dict, *, source: str = "predictions") -> tuple[
        pd.DataFrame, dict]:
    """Check a predictions frame and its meta against the predictions format.

    Parameters
    ----------
    df : pandas.DataFrame
        The predictions, one row per (stay, part).
    meta : dict
        The file's meta (``task``, ``labels``, ``class_names``, ``method``, ``run_id``).
    source : str
        Name used in error messages (the file path when loading).

    Returns
    -------
    (pandas.DataFrame, dict)
        A copy of the frame with ``part`` and ``task`` as plain strings, ``stay_id`` and ``fold`` as
        int64, and the meta with ``labels`` (and ``class_names`` for LoS) filled in.

    Raises
    ------
    PredictionsError
        With a message naming the column, the count and the first offending stay ids.
    """
    if not isinstance(df, pd.DataFrame):
        raise PredictionsError(f"{source}: expected a pandas DataFrame, got {type(df).__name__}")
    meta = _complete_meta(df, meta, source)
    task = meta["task"]
    required = list(_BASE_COLUMNS) + label_columns(meta) + prob_columns(meta)
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise PredictionsError(
            f"{source}: missing required column(s) {', '.join(missing)} for task {task!r}")
    df = df.copy()

    if df["stay_id"].isna().any() or not pd.api.types.is_integer_dtype(df["stay_id"]):
        raise PredictionsError(f"{source}: column stay_id must be integer without missing values "
                               f"(dtype {df['stay_id'].dtype})")
    df["stay_id"] = df["stay_id"].astype(np.int64)
    part = df["part"].astype("string")
    bad = ~part.isin(PARTS).fillna(False).to_numpy(dtype=bool)
    if bad.any():
        values = sorted({str(v) for v in part[bad].unique()})
        raise PredictionsError(
            f"{source}: column part has {int(bad.sum())} row(s) with invalid values "
            f"{values} (stay ids {_ids(df, bad)}); valid parts: {', '.join(PARTS)}")
    df["part"] = part.astype(object).astype(str)
    tasks = set(df["task"].astype(str).unique())
    if tasks - {task}:
        raise PredictionsError(
            f"{source}: column task holds {sorted(tasks)} but meta task is {task!r}; "
            "write one task per file")
    df["task"] = task
    if df["fold"].isna().any() or not pd.api.types.is_integer_dtype(df["fold"]):
        raise PredictionsError(f"{source}: column fold must be integer without missing values")
    folds = sorted(int(f) for f in df["fold"].unique())
    if len(folds) > 1:
        raise PredictionsError(
            f"{source}: predictions from several folds {folds} in one file; "
            "write one file per fold")
    df["fold"] = df["fold"].astype(np.int64)

    dup = df.duplicated(["stay_id", "part"], keep=False).to_numpy()
    if dup.any():
        raise PredictionsError(
            f"{source}: {int(dup.sum())} row(s) share a (stay_id, part) pair "
            f"(stay ids {_ids(df, dup)}); keep one prediction per stay and part")
    if not (df["part"] == "test").any():
        raise PredictionsError(
            f"{source}: the test part is empty (parts present: {sorted(df['part'].unique())}); "
            "the evaluator scores the test part only")

    _check_labels(df, meta, source)
    for col in prob_columns(meta):
        _check_probabilities(df, col, source, allow_nan=False)
    if get_task(task).multiclass:
        probs = df[prob_columns(meta)].to_numpy(dtype=np.float64)
        off = np.abs(probs.sum(axis=1) - 1.0) > LOS_SUM_TOLERANCE
        if off.any():
            sums = probs.sum(axis=1)[off]
            raise PredictionsError(
                f"{source}: {int(off.sum())} row(s) of the LoS probabilities "
                f"({', '.join(prob_columns(meta))}) do not sum to 1 within {LOS_SUM_TOLERANCE:g} "
                f"(sums {sums[:_SHOW_IDS].round(6).tolist()}, stay ids {_ids(df, off)}); "
                "apply a softmax before writing")
    main = set(prob_columns(meta))
    for col in df.columns:
        name = str(col)
        if name.startswith(("y_prob_ehr_", "y_prob_cxr_")) and name not in main:
            _check_probabilities(df, name, source, allow_nan=True)
    return df, meta


def _check_labels(df: pd.DataFrame, meta: dict, source: str) -> None:
    n_classes = len(meta["class_names"]) if _multiclass(meta) else 2
    valid = np.arange(n_classes)
    for col in label_columns(meta):
        values = pd.to_numeric(df[col], errors="coerce").to_numpy(dtype=np.float64)
        bad = ~np.isin(values, valid)
        if bad.any():
            shown = pd.unique(df[col][bad])[:_SHOW_IDS].tolist()
            allowed = "0/1" if n_classes == 2 else f"class indices 0..{n_classes - 1}"
            raise PredictionsError(
                f"{source}: column {col} has {int(bad.sum())} label(s) that are not {allowed} "
                f"(values {shown}, stay ids {_ids(df, bad)})")
        df[col] = values.astype(np.int64)


def _check_probabilities(df: pd.DataFrame, col: str, source: str, *, allow_nan: bool) -> None:
    if not pd.api.types.is_numeric_dtype(df[col]) or pd.api.types.is_bool_dtype(df[col]):
        raise PredictionsError(f"{source}: column {col} must be numeric probabilities "
                               f"(dtype {df[col].dtype})")
    values = df[col].to_numpy(dtype=np.float64, na_value=np.nan)
    nonfinite = ~np.isfinite(values)
    if allow_nan:
        nonfinite &= ~np.isnan(values)
    if nonfinite.any():
        raise PredictionsError(
            f"{source}: column {col} has {int(nonfinite.sum())} NaN/inf value(s) "
            f"(stay ids {_ids(df, nonfinite)}); every prediction must be a finite probability")
    outside = (values < 0.0) | (values > 1.0)
    if outside.any():
        raise PredictionsError(
            f"{source}: column {col} has {int(outside.sum())} value(s) outside [0, 1] "
            f"(min {np.nanmin(values):.4g}, max {np.nanmax(values):.4g}, stay ids "
            f"{_ids(df, outside)}); these look like logits: apply a sigmoid/softmax before writing")
    df[col] = values


def task_arrays(df: pd.DataFrame, meta: dict) -> tuple[np.ndarray, np.ndarray]:
    """Labels and scores of a validated frame, in row order.

    Returns
    -------
    (numpy.ndarray, numpy.ndarray)
        Binary: ``y`` int [n] and ``p`` float [n]; phenotype: ``Y`` [n, L] and ``P`` [n, L];
        los: class ``y`` [n] and ``P`` [n, K].
    """
    y = df[label_columns(meta)].to_numpy(dtype=np.int64)
    p = df[prob_columns(meta)].to_numpy(dtype=np.float64)
    kind = task_kind(meta["task"])
    if kind == "multilabel":
        return y, p
    if kind == "multiclass":
        return y[:, 0], p
    return y[:, 0], p[:, 0]


def select_test(df: pd.DataFrame) -> pd.DataFrame:
    """The test part of a validated frame, sorted by ``stay_id`` (so results ignore row order)."""
    return df[df["part"] == "test"].sort_values("stay_id", kind="stable").reset_index(drop=True)


def as_validated(df: pd.DataFrame, meta: dict | None, task: str | None, source: str) -> tuple[
        pd.DataFrame, dict]:
    """Validate a frame whose meta may be missing (then built from ``task`` or the task column)."""
    if meta is None:
        if task is None:
            if "task" not in df.columns or df.empty:
                raise PredictionsError(f"{source}: give the task (no meta and no task column)")
            task = str(df["task"].iloc[0])
        meta = {"task": task}
    elif task is not None and meta.get("task") != task:
        raise PredictionsError(
            f"{source}: meta task {meta.get('task')!r} differs from task {task!r}")
    return validate_predictions(df, meta, source=source)


def align_test_parts(a: tuple[pd.DataFrame, dict], b: tuple[pd.DataFrame, dict], *,
                     names: tuple[str, str] = ("a", "b")) -> dict:
    """Pair the test parts of two validated runs on their common stays.

    Parameters
    ----------
    a, b : (pandas.DataFrame, dict)
        Validated frames and metas of the same task and labels.
    names : (str, str)
        Names of the runs for error messages.

    Returns
    -------
    dict
        ``stay_id`` (common test stays, ascending), ``y`` (labels), ``scores_a``, ``scores_b``,
        ``meta`` (of ``a``), ``n_only_a``, ``n_only_b``.

    Raises
    ------
    PredictionsError
        Different tasks or labels, no common test stay, or labels that disagree on common stays.
    """
    (df_a, meta_a), (df_b, meta_b) = a, b
    if meta_a["task"] != meta_b["task"]:
        raise PredictionsError(
            f"cannot pair {names[0]} (task {meta_a['task']!r}) with {names[1]} "
            f"(task {meta_b['task']!r}); compare runs of the same task")
    if prob_columns(meta_a) != prob_columns(meta_b):
        raise PredictionsError(
            f"cannot pair {names[0]} and {names[1]}: their labels/classes differ "
            f"({prob_columns(meta_a)} vs {prob_columns(meta_b)})")
    ta, tb = select_test(df_a), select_test(df_b)
    common = np.intersect1d(ta["stay_id"].to_numpy(), tb["stay_id"].to_numpy())
    if common.size == 0:
        raise PredictionsError(f"{names[0]} and {names[1]} have no test stay in common")
    ta = ta[ta["stay_id"].isin(common)].reset_index(drop=True)
    tb = tb[tb["stay_id"].isin(common)].reset_index(drop=True)
    for col in label_columns(meta_a):
        differ = ta[col].to_numpy() != tb[col].to_numpy()
        if differ.any():
            raise PredictionsError(
                f"{names[0]} and {names[1]} disagree on {col} for {int(differ.sum())} common "
                f"test stay(s) (stay ids {_ids(ta, differ)}); were they made from the same store "
                "and fold?")
    y, scores_a = task_arrays(ta, meta_a)
    _, scores_b = task_arrays(tb, meta_b)
    return {"stay_id": common, "y": y, "scores_a": scores_a, "scores_b": scores_b,
            "meta": meta_a, "n_only_a": int(len(select_test(df_a)) - common.size),
            "n_only_b": int(len(select_test(df_b)) - common.size)}


def write_predictions(df: pd.DataFrame, meta: dict, path) -> pathlib.Path:
    """Validate and write a predictions file (parquet with the meta under key ``b"cbstore"``).

    The file is written to a temporary sibling and renamed, so a failed write never leaves a
    half-written file under ``path``.

    Parameters
    ----------
    df : pandas.DataFrame
        Predictions in the format of this module.
    meta : dict
        JSON-serialisable meta with at least ``task``.
    path : str or os.PathLike
        Destination file.

    Returns
    -------
    pathlib.Path
        The written path.

    Raises
    ------
    PredictionsError
        When the frame or meta is invalid (nothing is written).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = pathlib.Path(path)
    df, meta = validate_predictions(df, meta, source=str(path))
    try:
        meta_json = json.dumps(meta, allow_nan=False, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise PredictionsError(f"{path}: meta is not JSON-serialisable: {exc}") from exc
    table = pa.Table.from_pandas(df.reset_index(drop=True), preserve_index=False)
    metadata = dict(table.schema.metadata or {})
    metadata[META_KEY] = meta_json.encode("utf-8")
    table = table.replace_schema_metadata(metadata)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temporary_sibling(path)
    os.close(fd)
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise
    return path


def temporary_sibling(path: pathlib.Path) -> tuple[int, pathlib.Path]:
    """Create a new, empty hidden sibling of ``path`` to write before renaming it into place.

    Returns an open file descriptor and the sibling's path. Unlike ``tempfile.mkstemp`` (mode
    0o600), the file gets the mode of any new file (0o666 filtered by the process umask), so the
    renamed result is as readable as the folder it lands in; the umask itself is never changed.
    """
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.partial")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:  # another writer drew the same name
            continue


def load_predictions(path) -> tuple[pd.DataFrame, dict]:
    """Read and validate a predictions file.

    Parameters
    ----------
    path : str or os.PathLike
        A parquet file written by :func:`write_predictions` (or any writer following the format).

    Returns
    -------
    (pandas.DataFrame, dict)
        The validated frame and meta (see :func:`validate_predictions`).

    Raises
    ------
    PredictionsError
        File missing or not parquet, meta missing or not JSON, or any format violation.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = pathlib.Path(path)
    if not path.is_file():
        raise PredictionsError(f"{path}: predictions file not found")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise PredictionsError(f"{path}: not a readable parquet file ({exc})") from exc
    raw = (table.schema.metadata or {}).get(META_KEY)
    if raw is None:
        raise PredictionsError(
            f"{path}: no {META_KEY.decode()!r} key in the parquet metadata; write the file with "
            "fusion.evaluation.write_predictions or add the JSON meta under that key")
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PredictionsError(f"{path}: the {META_KEY.decode()!r} metadata is not JSON ({exc})") \
            from exc
    return validate_predictions(table.to_pandas(), meta, source=str(path))
