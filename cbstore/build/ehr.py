"""Hourly EHR tensor of each cohort stay, from the variables file and DuckDB.

Semantics (also in the header of ``cbstore/build/resources/variables.yaml``):

* hour ``h`` of a stay covers ``[intime + h, intime + h + 1)``, ``0 <= h < window_hours``; events
  before ``intime`` or at/after the prediction time (``intime + window_hours``) are not used;
* chartevents and outputevents are joined on ``stay_id``; labevents (no ``stay_id``, often no
  ``hadm_id``) on ``subject_id`` and ``charttime`` inside the window;
* numeric items use ``valuenum`` (outputevents: ``value``); an optional per-item conversion
  ``value * scale + offset`` (only where the raw value is below ``below`` when that is given) brings
  them to the canonical unit; values outside ``range`` are then dropped;
* exact duplicate events are dropped, then events are aggregated per hour with the variable's
  ``agg`` (``mean``, ``sum``, ``max`` or ``last``);
* binary variables read text items: their ``category`` prefixes are matched case-insensitively
  against the value with surrounding spaces stripped. Variables sharing an item form a one-hot
  group (the first matching variable in file order wins; ``"*"`` takes values nobody else
  matches); every variable of the group is observed (0 or 1) in an hour with an event;
* derived variables (``derived: {sum: [...]}``) are the hourly sum of their parts, where every
  part is observed, then range-checked.

Values are stored raw: no imputation, NaN = not observed. Non-finite numeric values (``NaN`` or
``inf`` in a CSV) are not measurements and are ignored.

The build works in three steps, so that memory does not grow with the event tables:
:func:`write_events` reads each event table once into Parquet (the cohort's events only),
:func:`stays_with_ehr` finds the stays with a value, and :func:`hourly_values` aggregates the
events of one contiguous range of stays at a time.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import yaml

from cbstore.build.cohort import COHORT_TABLE
from cbstore.build.extract import Extractor, load_sql
from cbstore.errors import CbstoreError

if TYPE_CHECKING:  # the events are extracted before the build loads pandas
    import pandas as pd

log = logging.getLogger(__name__)

#: Event tables a variable may read, with the SQL step that collects their events.
SOURCES = ("chartevents", "labevents", "outputevents")
_SOURCE_TABLE = {"chartevents": "icu/chartevents", "labevents": "hosp/labevents", "outputevents": "icu/outputevents"}
AGGS = ("mean", "last", "sum", "max")
#: Event rows DuckDB may buffer over all buckets before writing them to Parquet (write_events).
_FLUSH_ROWS = 1 << 19
#: Most stays aggregated by one query of hourly_values (a partition is cut into equal slices): DuckDB's
#: working set of the aggregation, and the result handed to NumPy, are those of at most this many
#: stays, whatever the partition's size. Measured on a 2,048-stay partition (after a first one):
#: peak RSS of the aggregation +274 MB in one query, +87 MB in slices of 512, CPU time the same.
QUERY_STAYS = 512
KINDS = ("continuous", "binary")
#: libyaml's safe loader when available (the variables file parses in a fifth of the time), else the pure-Python one.
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class VariablesError(CbstoreError):
    """The EHR variables file is invalid."""


@dataclass(frozen=True)
class Conversion:
    """Unit conversion of one item: ``value * scale + offset`` (only below ``below`` if set)."""

    itemid: int
    scale: float
    offset: float
    below: float | None = None


@dataclass(frozen=True)
class Variable:
    """One EHR variable (one feature of ``ehr/values``)."""

    name: str
    unit: str
    kind: str
    sources: tuple[str, ...] = ()
    itemids: tuple[int, ...] = ()
    agg: str | None = None
    low: float | None = None
    high: float | None = None
    convert: tuple[Conversion, ...] = ()
    category: tuple[str, ...] = ()
    derived_sum: tuple[str, ...] = ()

    @property
    def is_derived(self) -> bool:
        """Whether the variable is computed from other variables."""
        return bool(self.derived_sum)

    @property
    def is_text(self) -> bool:
        """Whether the variable reads a text item (binary category variable)."""
        return bool(self.category)


@dataclass(frozen=True)
class Variables:
    """The parsed variables file.

    Attributes
    ----------
    items : tuple of Variable
        In file order (= feature order of the store).
    path : Path
        The file read.
    sha256 : str
        SHA-256 of the file's bytes.
    """

    items: tuple[Variable, ...]
    path: Path
    sha256: str

    @property
    def names(self) -> list[str]:
        """Feature names in store order."""
        return [v.name for v in self.items]

    def index(self, name: str) -> int:
        """Position of variable ``name``."""
        return self.names.index(name)

    def features_table(self) -> pd.DataFrame:
        """The store's features table: name, unit, kind, normalize (= continuous)."""
        import pandas as pd

        return pd.DataFrame({
            "name": [v.name for v in self.items],
            "unit": [v.unit for v in self.items],
            "kind": [v.kind for v in self.items],
            "normalize": np.array([v.kind == "continuous" for v in self.items], dtype=bool),
        })

    def text_groups(self) -> list[list[int]]:
        """One-hot groups: positions of text variables that share an item (file order)."""
        parent: dict[int, int] = {}

        def find(i: int) -> int:
            while parent[i] != i:
                i = parent[i]
            return i

        by_item: dict[int, int] = {}
        for i, v in enumerate(self.items):
            if not v.is_text:
                continue
            parent.setdefault(i, i)
            for itemid in v.itemids:
                if itemid in by_item:
                    a, b = find(i), find(by_item[itemid])
                    parent[max(a, b)] = min(a, b)
                else:
                    by_item[itemid] = i
        groups: dict[int, list[int]] = {}
        for i in sorted(parent):
            groups.setdefault(find(i), []).append(i)
        return [groups[k] for k in sorted(groups)]


def default_variables_path() -> Path:
    """Path of the packaged ``variables.yaml``."""
    return Path(str(resources.files("cbstore.build").joinpath("resources", "variables.yaml")))


def load_variables(path: str | Path | None = None) -> Variables:
    """Read and validate a variables file (``None``: the packaged one).

    Raises
    ------
    VariablesError
        Naming the file, the variable and the bad key or value.
    """
    path = Path(path) if path is not None else default_variables_path()
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise VariablesError(f"cannot read variables file {path}: {err}") from None
    try:
        data = yaml.load(raw, Loader=_YAML_LOADER)
    except yaml.YAMLError as err:
        raise VariablesError(f"variables file {path} could not be parsed: {err}") from None
    if not isinstance(data, dict) or not isinstance(data.get("variables"), list) or not data["variables"]:
        raise VariablesError(f"variables file {path} must hold a non-empty list under the key 'variables'")
    items = tuple(_parse_variable(entry, k, path) for k, entry in enumerate(data["variables"]))
    _check_variables(items, path)
    return Variables(items=items, path=path.resolve(), sha256=hashlib.sha256(raw).hexdigest())


def _parse_variable(entry: object, k: int, path: Path) -> Variable:
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not entry["name"]:
        raise VariablesError(f"variables file {path}: entry {k} needs a 'name'")
    name = entry["name"]

    def bad(key: str, expected: str) -> VariablesError:
        return VariablesError(f"variables file {path}: variable {name!r} has invalid {key!r} = "
                              f"{entry.get(key)!r}; expected {expected}")

    known = {"name", "source", "itemids", "unit", "convert", "range", "agg", "kind", "category", "derived"}
    unknown = sorted(set(entry) - known)
    if unknown:
        raise VariablesError(f"variables file {path}: variable {name!r} has unknown key {unknown[0]!r}; "
                             f"known keys are {', '.join(sorted(known))}")
    kind = entry.get("kind")
    if kind not in KINDS:
        raise bad("kind", " or ".join(KINDS))
    unit = entry.get("unit", "")
    if not isinstance(unit, str):
        raise bad("unit", "a string")
    low = high = None
    if "range" in entry:
        rng = entry["range"]
        if (not isinstance(rng, list) or len(rng) != 2
                or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in rng) or rng[0] > rng[1]):
            raise bad("range", "[low, high] with low <= high")
        low, high = float(rng[0]), float(rng[1])
    if "derived" in entry:
        derived = entry["derived"]
        if not isinstance(derived, dict) or set(derived) != {"sum"} or not isinstance(derived["sum"], list) \
                or len(derived["sum"]) < 2 or not all(isinstance(p, str) for p in derived["sum"]):
            raise bad("derived", "{sum: [two or more variable names]}")
        if any(key in entry for key in ("source", "itemids", "convert", "category")):
            raise VariablesError(f"variables file {path}: derived variable {name!r} cannot also have "
                                 f"source, itemids, convert or category")
        return Variable(name=name, unit=unit, kind=kind, low=low, high=high, agg=None,
                        derived_sum=tuple(derived["sum"]))
    sources = entry.get("source")
    sources = [sources] if isinstance(sources, str) else sources
    if not isinstance(sources, list) or not sources or any(s not in SOURCES for s in sources):
        raise bad("source", f"one or a list of {', '.join(SOURCES)}")
    itemids = entry.get("itemids")
    if (not isinstance(itemids, list) or not itemids
            or not all(isinstance(i, int) and not isinstance(i, bool) for i in itemids)):
        raise bad("itemids", "a non-empty list of integer itemids")
    agg = entry.get("agg")
    if agg not in AGGS:
        raise bad("agg", " | ".join(AGGS))
    conversions = []
    for conv in entry.get("convert", []) or []:
        if (not isinstance(conv, dict) or set(conv) - {"itemid", "scale", "offset", "below"}
                or conv.get("itemid") not in itemids
                or not all(isinstance(conv.get(k, 0.0), (int, float)) for k in ("scale", "offset"))
                or ("below" in conv and not isinstance(conv["below"], (int, float)))):
            raise bad("convert", "a list of {itemid (one of the variable's itemids), scale, offset, optional below}")
        conversions.append(Conversion(itemid=int(conv["itemid"]), scale=float(conv.get("scale", 1.0)),
                                      offset=float(conv.get("offset", 0.0)),
                                      below=float(conv["below"]) if "below" in conv else None))
    if len({c.itemid for c in conversions}) != len(conversions):
        raise bad("convert", "at most one conversion per itemid")
    category = entry.get("category", [])
    if category:
        if not isinstance(category, list) or not all(isinstance(c, str) and c for c in category):
            raise bad("category", "a list of non-empty value prefixes (or \"*\")")
        if kind != "binary":
            raise bad("kind", "binary for a variable with 'category'")
        if sources != ["chartevents"]:
            raise bad("source", "chartevents for a text (category) variable")
    elif kind == "binary":
        raise bad("category", "a list of value prefixes for a binary variable")
    return Variable(name=name, unit=unit, kind=kind, sources=tuple(sources), itemids=tuple(int(i) for i in itemids),
                    agg=agg, low=low, high=high, convert=tuple(conversions), category=tuple(category))


def _check_variables(items: tuple[Variable, ...], path: Path) -> None:
    names = [v.name for v in items]
    seen = set()
    for n in names:
        if n in seen:
            raise VariablesError(f"variables file {path}: variable {n!r} is defined twice")
        seen.add(n)
    for v in items:
        for part in v.derived_sum:
            if part not in seen:
                raise VariablesError(f"variables file {path}: derived variable {v.name!r} sums unknown variable {part!r}")
            if items[names.index(part)].is_derived:
                raise VariablesError(f"variables file {path}: derived variable {v.name!r} sums derived variable {part!r}")
    text_items = {i for v in items if v.is_text for i in v.itemids}
    for v in items:
        if not v.is_text and not v.is_derived and text_items.intersection(v.itemids):
            raise VariablesError(f"variables file {path}: numeric variable {v.name!r} uses a text item "
                                 f"{sorted(text_items.intersection(v.itemids))[0]} of a binary variable")
    variables = Variables(items=items, path=path, sha256="")
    for group in variables.text_groups():
        catch_all = [items[i].name for i in group if "*" in items[i].category]
        if len(catch_all) > 1:
            raise VariablesError(f"variables file {path}: binary variables {', '.join(catch_all)} share an item and "
                                 f"all claim the catch-all '*'; at most one may")


#: Columns (DuckDB types) of the variable definition tables the SQL steps read (_item_tables).
_ITEM_TABLE_COLUMNS = {
    "ehr_items": {"var_idx": "INTEGER", "itemid": "BIGINT", "source": "VARCHAR", "is_text": "BOOLEAN"},
    "ehr_vars": {"var_idx": "INTEGER", "agg": "VARCHAR", "low": "DOUBLE", "high": "DOUBLE"},
    "ehr_convert": {"var_idx": "INTEGER", "itemid": "BIGINT", "below": "DOUBLE", "scale": "DOUBLE",
                    '"offset"': "DOUBLE"},
    "ehr_text_groups": {"group_id": "INTEGER", "itemid": "BIGINT"},
    "ehr_text_vars": {"group_id": "INTEGER", "var_idx": "INTEGER"},
    "ehr_text_prefixes": {"group_id": "INTEGER", "var_idx": "INTEGER", "prefix": "VARCHAR"},
}


def _item_tables(variables: Variables) -> dict[str, list[tuple]]:
    """The variable definitions as the rows of small tables for the SQL steps (:data:`_ITEM_TABLE_COLUMNS`)."""
    items, vars_, convert = [], [], []
    text_groups, text_vars, text_prefixes = [], [], []
    for k, v in enumerate(variables.items):
        if v.is_derived:
            continue
        vars_.append((k, v.agg, v.low, v.high))
        for source in v.sources:
            for itemid in v.itemids:
                items.append((k, itemid, source, v.is_text))
        for c in v.convert:
            convert.append((k, c.itemid, c.below, c.scale, c.offset))
    for g, group in enumerate(variables.text_groups()):
        for itemid in sorted({i for k in group for i in variables.items[k].itemids}):
            text_groups.append((g, itemid))
        for k in group:
            text_vars.append((g, k))
            for prefix in variables.items[k].category:
                text_prefixes.append((g, k, prefix))
    return {"ehr_items": items, "ehr_vars": vars_, "ehr_convert": convert, "ehr_text_groups": text_groups,
            "ehr_text_vars": text_vars, "ehr_text_prefixes": text_prefixes}


def load_ehr_tables(extractor: Extractor, variables: Variables) -> None:
    """Load the cohort and the variable definitions into DuckDB for the EHR steps.

    The cohort (``ehr_cohort``) is every candidate of :func:`cbstore.build.cohort.select_cohort`,
    which must have run on this connection; candidate ``i`` in ``stay_id`` order is ``stay_idx`` ``i``.

    Parameters
    ----------
    extractor : Extractor
        Open DuckDB connection over the source.
    variables : Variables
        The EHR variables.
    """
    extractor.con.execute(f"CREATE OR REPLACE TEMP TABLE ehr_cohort AS SELECT "
                          f"CAST(row_number() OVER (ORDER BY stay_id) - 1 AS INTEGER) AS stay_idx, stay_id, "
                          f"subject_id, intime, prediction_time FROM {COHORT_TABLE} WHERE candidate")
    for name, rows in _item_tables(variables).items():
        extractor.load_rows(name, _ITEM_TABLE_COLUMNS[name], rows)


def write_events(extractor: Extractor, variables: Variables, folder: Path, bucket_stays: int) -> None:
    """Read each event table once and write the cohort's events to Parquet, partitioned by bucket.

    Keeps only the events of the cohort stays loaded by :func:`load_ehr_tables`, inside each
    stay's window and of the variables' items (the ``ehr_events_<table>.sql`` steps), in one
    statement over the ``UNION ALL`` of the tables in use, so DuckDB may scan the files together.
    Stay ``stay_idx`` goes to bucket ``stay_idx // bucket_stays``: ``folder/bucket=<b>/*.parquet``.
    A bucket without events has no folder.

    Parameters
    ----------
    extractor : Extractor
        Open DuckDB connection with the tables of :func:`load_ehr_tables`.
    variables : Variables
        The EHR variables (they decide which tables are read).
    folder : Path
        Output folder; must not exist yet.
    bucket_stays : int
        Consecutive stays per bucket (>= 1).
    """
    used = [s for s in SOURCES if any(s in v.sources for v in variables.items)]
    selects = [load_sql(f"ehr_events_{source}").strip().rstrip(";") for source in used]
    union = "\nUNION ALL\n".join(selects)
    sql = (f"COPY (SELECT CAST(stay_idx AS INTEGER) AS stay_idx, CAST(hour AS INTEGER) AS hour, charttime, "
           f"CAST(itemid AS BIGINT) AS itemid, CAST(num AS DOUBLE) AS num, CAST(text AS VARCHAR) AS text, "
           f"CAST(stay_idx // {int(bucket_stays)} AS INTEGER) AS bucket FROM (\n{union}\n)) "
           f"TO '{_sql_path(folder)}' (FORMAT PARQUET, PARTITION_BY (bucket))")
    # DuckDB has no row count for a CSV file (it guesses a few dozen rows), so its join optimizers
    # make the event table the build side of the hash joins: a hash table of every matching
    # event, which grows with the source (2.2 GB at 20,000 stays; out of memory at 40,000). With
    # them off, the joins run as written: the event table streams through as the probe side
    # and the small cohort and item tables are the build sides.
    # DuckDB buffers up to partitioned_write_flush_threshold rows per bucket (and thread) before
    # writing them (default 524,288): with many buckets that grew with the source (1.4 GB at
    # 40,000 stays). A budget of _FLUSH_ROWS rows over all buckets keeps it flat (0.65 GB).
    n_buckets = -(-int(extractor.con.execute("SELECT count(*) FROM ehr_cohort").fetchone()[0]) // int(bucket_stays))
    extractor.con.execute("SET disabled_optimizers = 'join_order,build_side_probe_side'")
    extractor.con.execute(f"SET partitioned_write_flush_threshold = {max(16_384, _FLUSH_ROWS // max(1, n_buckets))}")
    try:
        extractor.execute("ehr_events", sql, reads=tuple(_SOURCE_TABLE[s] for s in used))
    finally:
        extractor.con.execute("RESET disabled_optimizers")
        extractor.con.execute("RESET partitioned_write_flush_threshold")


def _sql_path(path: Path) -> str:
    return str(path).replace("'", "''")


def event_files(folder: Path, buckets: range | None = None) -> list[Path]:
    """The Parquet files of ``buckets`` (default: all) under ``folder``, in bucket order."""
    if buckets is None:
        dirs = sorted(folder.glob("bucket=*"), key=lambda d: int(d.name.split("=", 1)[1]))
    else:
        dirs = [folder / f"bucket={b}" for b in buckets]
    return [f for d in dirs if d.is_dir() for f in sorted(d.glob("*.parquet"))]


def _parquet_list(files: list[Path]) -> str:
    return "[" + ", ".join(f"'{_sql_path(f)}'" for f in files) + "]"


def stays_with_ehr(extractor: Extractor, folder: Path) -> np.ndarray:
    """``stay_idx`` (sorted, int64) of the stays with at least one EHR value, from the events of :func:`write_events`.

    These are the stays whose hourly tensor has an observed value (cohort step 5); the
    aggregation of each partition checks it again.
    """
    files = event_files(folder)
    if not files:
        return np.zeros(0, dtype=np.int64)
    extractor.con.execute("DROP TABLE IF EXISTS ehr_events")
    extractor.con.execute(f"CREATE OR REPLACE TEMP VIEW ehr_events AS SELECT stay_idx, hour, charttime, itemid, "
                          f"num, text FROM read_parquet({_parquet_list(files)})")
    try:
        extractor.run("ehr_numeric_valid")  # (re)created over what ehr_events is now
        result = extractor.fetch_arrays("ehr_stays_with_data")
    finally:
        extractor.con.execute("DROP VIEW IF EXISTS ehr_events")
    return np.asarray(result["stay_idx"], dtype=np.int64)


def hourly_values(extractor: Extractor, folder: Path, stay_idx: np.ndarray, bucket_stays: int,
                  variables: Variables, window_hours: int) -> np.ndarray:
    """Hourly values of every variable for the stays ``stay_idx``, from the events of :func:`write_events`.

    Parameters
    ----------
    extractor : Extractor
        Open DuckDB connection with the tables of :func:`load_ehr_tables`.
    folder : Path
        The events folder written by :func:`write_events`.
    stay_idx : numpy.ndarray
        Sorted ``stay_idx`` of the stays wanted, in output order (a contiguous part of the store).
    bucket_stays : int
        The bucket size the events were written with.
    variables : Variables
        The EHR variables.
    window_hours : int
        Length of the time axis.

    Returns
    -------
    numpy.ndarray
        float32 ``[len(stay_idx), window_hours, variable]``; NaN where not observed.
    """
    stay_idx = np.asarray(stay_idx, dtype=np.int64)
    values = np.full((len(stay_idx), window_hours, len(variables.items)), np.nan, dtype=np.float32)
    if len(stay_idx) == 0:
        return values
    lo, hi = int(stay_idx[0]), int(stay_idx[-1])
    files = event_files(folder, range(lo // bucket_stays, hi // bucket_stays + 1))
    extractor.run("ehr_events_create")
    if files:
        extractor.execute("ehr_partition_events",
                          f"INSERT INTO ehr_events SELECT stay_idx, hour, charttime, itemid, num, text "
                          f"FROM read_parquet({_parquet_list(files)}) WHERE stay_idx BETWEEN {lo} AND {hi}")
    extractor.run("ehr_numeric_valid")
    n_queries = -(-len(stay_idx) // QUERY_STAYS)
    bounds = [k * len(stay_idx) // n_queries for k in range(n_queries + 1)]
    try:
        for start, stop in zip(bounds[:-1], bounds[1:]):
            params = {"first": int(stay_idx[start]), "last": int(stay_idx[stop - 1])}
            for step in ("ehr_numeric", "ehr_text"):
                _place(extractor.fetch_arrays(step, params=params), stay_idx[start:stop], values[start:stop])
    finally:
        extractor.con.execute("DROP TABLE ehr_events")
    _fill_derived(values, variables)
    empty = np.isnan(values).all(axis=(1, 2))
    if empty.any():  # ehr_stays_with_data.sql and the aggregation disagree
        raise AssertionError(f"stay_idx {int(stay_idx[np.argmax(empty)])} was selected for its EHR data "
                             f"but has no hourly value")
    return values


def _place(result: dict[str, np.ndarray], stay_idx: np.ndarray, values: np.ndarray) -> None:
    """Write aggregated rows (``stay_idx``, ``hour``, ``var_idx``, ``value``) into ``values`` (rows = ``stay_idx``)."""
    if not len(result["hour"]):
        return
    hour = np.asarray(result["hour"], dtype=np.int64)
    if hour.min() < 0 or hour.max() >= values.shape[1]:  # the SQL window guarantees this
        raise AssertionError("hour index outside the window")
    # events of stays between the first and the last that are not wanted have no valid value (step 5)
    row = np.searchsorted(stay_idx, np.asarray(result["stay_idx"], dtype=np.int64))
    if (row >= len(stay_idx)).any() or (stay_idx[np.minimum(row, len(stay_idx) - 1)]
                                         != np.asarray(result["stay_idx"])).any():
        raise AssertionError("an aggregated value belongs to a stay without EHR data")
    value = np.ma.filled(np.ma.asarray(result["value"], dtype=np.float64), np.nan)
    values[row, hour, np.asarray(result["var_idx"], dtype=np.int64)] = value.astype(np.float32)


def _fill_derived(values: np.ndarray, variables: Variables) -> None:
    for k, v in enumerate(variables.items):
        if not v.is_derived:
            continue
        parts = [variables.index(p) for p in v.derived_sum]
        total = values[:, :, parts].astype(np.float64).sum(axis=2)  # NaN unless every part is observed
        if v.low is not None:
            total[total < v.low] = np.nan
        if v.high is not None:
            total[total > v.high] = np.nan
        values[:, :, k] = total.astype(np.float32)
