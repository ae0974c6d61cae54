"""Byte-deterministic writers for the synthetic source: quoted gzip CSV and datetime formatting.

MIMIC tables are gzip CSV files whose non-NULL fields are ``"``-quoted and whose NULLs are empty,
unquoted fields. ``pyarrow``'s ``quoting_style="all_valid"`` writes exactly that. The gzip header
carries no file name and ``mtime=0``, so the same rows give the same bytes.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

#: gzip level of the written tables: fastest (files ~25 % larger than level 6; readers do not care).
GZIP_LEVEL = 1

_WRITE_OPTIONS = dict(quoting_style="all_valid", delimiter=",")


def datetime_strings(seconds, valid=None, date_only: bool = False) -> pa.Array:
    """Format int64 seconds since 1970 as ``YYYY-MM-DD HH:MM:SS`` (or ``YYYY-MM-DD``) strings.

    Parameters
    ----------
    seconds : array-like of int
        Seconds since 1970-01-01 (naive).
    valid : array-like of bool, optional
        Where false, the result is NULL (written as an empty field).
    date_only : bool
        Format the date only.
    """
    seconds = np.asarray(seconds, dtype=np.int64)
    mask = None if valid is None else ~np.asarray(valid, dtype=bool)
    ts = pa.array(seconds, type=pa.int64(), mask=mask).cast(pa.timestamp("s"))
    # arrow's cast formats "YYYY-MM-DD HH:MM:SS" (and dates "YYYY-MM-DD"), much faster than strftime
    return (ts.cast(pa.date32()) if date_only else ts).cast(pa.string())


def float_strings(values, valid=None) -> pa.Array:
    """Shortest round-trip text of float values (``80.0`` -> ``"80"``); NULL where not ``valid``."""
    values = np.asarray(values, dtype=np.float64)
    mask = ~np.isfinite(values) if valid is None else ~np.asarray(valid, dtype=bool) | ~np.isfinite(values)
    return pa.array(values, mask=mask).cast(pa.string())


def take_strings(choices, index) -> pa.Array:
    """Strings ``choices[index]`` as an arrow array (``None`` entries of ``choices`` become NULL)."""
    return pa.array(list(choices), type=pa.string()).take(pa.array(np.asarray(index, dtype=np.int64)))


class GzipCsvWriter:
    """Stream record batches into one quoted, deterministic ``.csv.gz`` file.

    Parameters
    ----------
    path : path-like
        Output file (parent folders are created).
    columns : sequence of str
        Header, in order. Every written table must have exactly these columns.
    """

    def __init__(self, path, columns):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.columns = list(columns)
        self.n_rows = 0
        self._raw = open(self.path, "wb")
        self._gz = gzip.GzipFile(filename="", mode="wb", fileobj=self._raw, mtime=0,
                                 compresslevel=GZIP_LEVEL)
        self._header_written = False

    def write(self, table: pa.Table) -> None:
        """Append the rows of ``table`` (columns in header order; header written once)."""
        if table.column_names != self.columns:
            raise ValueError(f"{self.path.name}: columns {table.column_names} != header {self.columns}")
        options = pacsv.WriteOptions(include_header=not self._header_written, **_WRITE_OPTIONS)
        pacsv.write_csv(table, self._gz, write_options=options)
        self._header_written = True
        self.n_rows += table.num_rows

    def close(self) -> None:
        """Finish the file (writes the header even when no rows were written)."""
        if not self._header_written:
            self._gz.write((",".join(f'"{c}"' for c in self.columns) + "\n").encode())
            self._header_written = True
        self._gz.close()
        self._raw.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def write_table(path, table: pa.Table) -> int:
    """Write one whole table to ``path`` as quoted gzip CSV; returns the number of rows."""
    with GzipCsvWriter(path, table.column_names) as writer:
        writer.write(table)
    return table.num_rows
