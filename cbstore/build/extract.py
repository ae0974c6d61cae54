"""DuckDB over the raw MIMIC-IV files: typed views, bounded memory, errors that name the file.

An :class:`Extractor` opens an in-memory DuckDB database whose spill files go to a work folder
(never a source folder), with ``memory_limit`` and ``threads`` set, and with the background
threads of DuckDB's allocator (jemalloc) on: they return what a step freed to the operating
system within about a second, where otherwise it stayed resident into the next steps (35 MB
after reading the 40,000 stays of a synthetic source, for instance). Each checked table becomes
a view ``mimiciv_<module>.<table>`` over its ``.csv.gz`` (or ``.csv``) file, read with explicit
column types (identifiers BIGINT, times TIMESTAMP, ``dod`` DATE, numbers DOUBLE, everything
else VARCHAR; the empty string is NULL; no type sniffing). Queries are SQL files in
``cbstore/build/resources/sql/``; the large event tables are only ever read by DuckDB, once, into
Parquet files of the cohort's events (:func:`cbstore.build.ehr.write_events`).
"""

from __future__ import annotations

import logging
import re
import time
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import duckdb
import numpy as np

from cbstore.build.sources import MimicIVSource, SourceTable
from cbstore.errors import SourceError

if TYPE_CHECKING:  # DuckDB's .df() makes DataFrames; the build starts reading before pandas is loaded
    import pandas as pd

log = logging.getLogger(__name__)

_BIGINT = {"subject_id", "hadm_id", "stay_id", "itemid", "labevent_id", "specimen_id", "caregiver_id",
           "anchor_age", "anchor_year", "seq_num", "icd_version", "hospital_expire_flag", "order_provider_id"}
_TIMESTAMP = {"intime", "outtime", "admittime", "dischtime", "deathtime", "charttime", "storetime",
              "edregtime", "edouttime"}
_DATE = {"dod"}
_DOUBLE = {"valuenum", "los"}
#: Bytes of one read buffer of DuckDB's CSV reader. With its default (32 MiB) the buffers of the three
#: event tables, read together, held up to 290 MB at 40,000 synthetic stays but less at 5,000 (a
#: small file fills fewer buffers); 4 MiB keeps them under 45 MB at every size, and parses as fast.
#: It must exceed the longest line (DuckDB's max_line_size, 2 MB by default).
CSV_BUFFER_BYTES = 4 * 2**20
#: Per-table exceptions to the name-based types above.
_TABLE_TYPES = {"icu/outputevents": {"value": "DOUBLE"}}


def column_types(table: SourceTable) -> dict[str, str]:
    """DuckDB type of each column of ``table``, in header order."""
    special = _TABLE_TYPES.get(table.name, {})
    types = {}
    for col in table.columns:
        if col in special:
            types[col] = special[col]
        elif col in _BIGINT:
            types[col] = "BIGINT"
        elif col in _TIMESTAMP:
            types[col] = "TIMESTAMP"
        elif col in _DATE:
            types[col] = "DATE"
        elif col in _DOUBLE:
            types[col] = "DOUBLE"
        else:
            types[col] = "VARCHAR"
    return types


def load_sql(name: str) -> str:
    """Text of ``cbstore/build/resources/sql/<name>.sql``."""
    return resources.files("cbstore.build").joinpath("resources", "sql", f"{name}.sql").read_text(encoding="utf-8")


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def read_csv_sql(table: SourceTable) -> str:
    """The ``SELECT`` over ``table``'s file that its view ``mimiciv_<module>.<table>`` is."""
    columns = ", ".join(f"{_quote(c)}: {_quote(t)}" for c, t in column_types(table).items())
    return (f"SELECT * FROM read_csv({_quote(str(table.path))}, header = true, auto_detect = false, "
            f"delim = ',', quote = '\"', escape = '\"', nullstr = '', "
            f"compression = {_quote('gzip' if table.compressed else 'none')}, buffer_size = {CSV_BUFFER_BYTES}, "
            f"columns = {{{columns}}})")


def setup_statements(tables, *, memory_limit: str, threads: int, spill: Path) -> list[str]:
    """The statements that set up an :class:`Extractor`'s connection: settings, schemas, one view per table.

    Parameters
    ----------
    tables : iterable of SourceTable
        The tables to make views of.
    memory_limit : str
        DuckDB ``memory_limit``.
    threads : int
        DuckDB ``threads``.
    spill : Path
        DuckDB's ``temp_directory``.

    Returns
    -------
    list of str
        SQL statements, in order.
    """
    tables = list(tables)
    settings = (("memory_limit", memory_limit), ("threads", threads), ("temp_directory", str(spill)),
                ("preserve_insertion_order", False), ("enable_progress_bar", False),
                ("allocator_background_threads", True))
    statements = [f"SET {name} = {_quote(value) if isinstance(value, str) else value}" for name, value in settings]
    statements += [f"CREATE SCHEMA IF NOT EXISTS mimiciv_{schema}"
                   for schema in sorted({t.name.split("/")[0] for t in tables})]
    statements += [f"CREATE VIEW mimiciv_{t.name.replace('/', '.')} AS {read_csv_sql(t)}" for t in tables]
    return statements


class Extractor:
    """An open DuckDB connection with views over a MIMIC-IV source.

    Parameters
    ----------
    source : MimicIVSource
        The checked release (see :func:`cbstore.build.sources.locate_mimic_iv`).
    work_dir : Path
        Folder for DuckDB's spill files; must not lie inside the source.
    memory_limit : str
        DuckDB ``memory_limit`` (e.g. ``"2GB"``).
    threads : int
        DuckDB ``threads``.

    Use as a context manager; :meth:`close` releases the connection.
    """

    def __init__(self, source: MimicIVSource, work_dir: Path, *, memory_limit: str = "2GB", threads: int = 2):
        work_dir = Path(work_dir).resolve()
        if work_dir.is_relative_to(source.root):
            raise SourceError(f"work folder {work_dir} lies inside the MIMIC-IV source {source.root}; "
                              f"choose a work folder outside the source")
        self.source = source
        self.timings: dict[str, float] = {}
        spill = work_dir / "duckdb_tmp"
        spill.mkdir(parents=True, exist_ok=True)
        self.con = duckdb.connect(":memory:")
        try:
            for statement in setup_statements(source.tables.values(), memory_limit=memory_limit, threads=threads,
                                              spill=spill):
                self.con.execute(statement)
        except BaseException:
            self.close()
            raise

    def cursor(self) -> "Extractor":
        """Another connection to the same database, for a thread of its own.

        It sees the views and the tables that are not temporary; it has its own temporary
        tables. Close it (or use it as a context manager) when done.
        """
        other = object.__new__(Extractor)
        other.source, other.timings, other.con = self.source, {}, self.con.cursor()
        return other

    def __enter__(self) -> "Extractor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Close the DuckDB connection (idempotent)."""
        if self.con is not None:
            self.con.close()
            self.con = None

    def register(self, name: str, frame: pd.DataFrame) -> None:
        """Make a pandas DataFrame queryable as table ``name`` (replacing an earlier one)."""
        self.con.register(name, frame)

    def load_rows(self, name: str, columns: dict[str, str], rows: list[tuple]) -> None:
        """Create temporary table ``name`` with ``columns`` (name: DuckDB type) holding ``rows`` (None is NULL)."""
        self.con.execute(f"CREATE OR REPLACE TEMP TABLE {name} ({', '.join(f'{c} {t}' for c, t in columns.items())})")
        if rows:  # one statement: executemany runs one per row, ten times slower for these small tables
            row = f"({', '.join('?' * len(columns))})"
            self.con.execute(f"INSERT INTO {name} VALUES {', '.join([row] * len(rows))}",
                             [value for r in rows for value in r])

    def run(self, sql_name: str, *, reads: tuple[str, ...] = ()) -> None:
        """Execute the statements of SQL file ``sql_name``.

        ``reads`` names the source tables the statements read, for error messages.
        """
        self.execute(sql_name, load_sql(sql_name), reads=reads)

    def fetch(self, sql_name: str, *, reads: tuple[str, ...] = ()) -> pd.DataFrame:
        """Execute SQL file ``sql_name`` and return its (last) result as a DataFrame."""
        return self.execute(sql_name, load_sql(sql_name), reads=reads, fetch="frame")

    def fetch_arrays(self, sql_name: str, *, reads: tuple[str, ...] = (),
                     params: dict | None = None) -> dict[str, np.ndarray]:
        """Execute SQL file ``sql_name`` and return its (last) result as NumPy arrays by column.

        Cheaper than :meth:`fetch` for large numeric results. NULLs come back as masked
        arrays (``numpy.ma``). ``params`` gives the values of the file's named parameters
        (``$name``); the file must then hold a single statement.
        """
        return self.execute(sql_name, load_sql(sql_name), reads=reads, fetch="arrays", params=params)

    def execute(self, step: str, sql: str, *, reads: tuple[str, ...] = (), fetch: str | None = None,
                params: dict | None = None):
        """Execute ``sql`` as step ``step`` (its name in timings and error messages).

        ``fetch`` is ``None`` (no result), ``"frame"`` (a DataFrame) or ``"arrays"`` (a dict of
        NumPy arrays); ``params`` the values of named parameters (``$name``) of a single statement.
        """
        return self._execute(step, sql, reads, fetch, params)

    def _execute(self, sql_name: str, sql: str, reads: tuple[str, ...], fetch: str | None, params: dict | None):
        start = time.perf_counter()
        try:
            result = self.con.execute(sql) if params is None else self.con.execute(sql, params)
            if fetch == "frame":
                frame = result.df()
            elif fetch == "arrays":
                frame = result.fetchnumpy()
            else:
                frame = None
        except duckdb.OutOfMemoryException as err:
            raise SourceError(f"DuckDB ran out of memory in step {sql_name!r} ({err}); raise --memory-limit "
                              f"or free disk space in the work folder for spilling") from None
        except duckdb.Error as err:
            raise self._source_error(sql_name, reads, err) from None
        self.timings[sql_name] = time.perf_counter() - start
        log.debug("%s took %.2f s", sql_name, self.timings[sql_name])
        return frame

    def _source_error(self, sql_name: str, reads: tuple[str, ...], err: Exception) -> SourceError:
        message = str(err)
        named = [t for t in self.source.tables.values() if str(t.path) in message or t.path.name in message]
        tables = named or [self.source.tables[r] for r in reads if r in self.source.tables]
        files = ", ".join(str(t.path) for t in tables) or "the source tables"
        first_line = re.split(r"\n", message.strip(), maxsplit=1)[0]
        return SourceError(f"reading {files} failed in step {sql_name!r}: {first_line}. If the file is truncated or "
                           f"corrupt, re-download it and check it against the release's SHA256SUMS.txt")
