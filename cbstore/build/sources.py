"""Locate and check the raw MIMIC-IV and MIMIC-CXR-JPG folders before a build reads them.

Checks are cheap: file presence and each table's header line (never the data). Errors name the
file or the column and say what to do. Reading errors inside the data (a truncated or corrupt
gzip file) surface later, when DuckDB reads the file; :mod:`cbstore.build.extract` turns them into
:class:`~cbstore.errors.SourceError` naming the file.

Accepted MIMIC-IV layouts: the release root of v2.x or v3.x (folders ``hosp/`` and ``icu/``),
or a folder holding exactly one such root (e.g. ``physionet.org/files/mimiciv`` with ``2.2/``
inside). Every table may be ``<table>.csv.gz`` or ``<table>.csv``; column names are compared
case-insensitively (``icu/procedureevents`` writes two of them upper-case). MIMIC-IV v1.0
(``core/`` module) is refused with a clear message.

Nothing here writes to the source folders.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from cbstore.errors import SourceError

#: Marker files ``cbstore synth`` writes into each source folder it creates.
SYNTHETIC_MARKER_JSON = "cbstore_synthetic.json"
SYNTHETIC_MARKER_TEXT = "SYNTHETIC.txt"

#: MIMIC-IV tables the build reads: name -> (what it is, required columns).
REQUIRED_TABLES: dict[str, tuple[str, tuple[str, ...]]] = {
    "hosp/patients": ("patients (gender, anchor age, date of death)",
                      ("subject_id", "gender", "anchor_age", "anchor_year", "dod")),
    "hosp/admissions": ("hospital admissions (times, death, demographics)",
                        ("subject_id", "hadm_id", "admittime", "dischtime", "deathtime", "admission_type",
                         "insurance", "language", "marital_status", "race", "hospital_expire_flag")),
    "hosp/diagnoses_icd": ("ICD diagnoses per admission (phenotype labels)",
                           ("subject_id", "hadm_id", "icd_code", "icd_version")),
    "hosp/labevents": ("laboratory measurements (EHR variables)",
                       ("subject_id", "hadm_id", "itemid", "charttime", "value", "valuenum")),
    "icu/icustays": ("ICU stays (the cohort)",
                     ("subject_id", "hadm_id", "stay_id", "first_careunit", "intime", "outtime", "los")),
    "icu/chartevents": ("charted ICU measurements (EHR variables)",
                        ("subject_id", "hadm_id", "stay_id", "charttime", "itemid", "value", "valuenum")),
    "icu/outputevents": ("ICU outputs such as urine (EHR variables)",
                         ("subject_id", "hadm_id", "stay_id", "charttime", "itemid", "value")),
}

#: The MIMIC-CXR-JPG image metadata table: one row per image, with ids, view, study date and time.
CXR_METADATA = "mimic-cxr-2.0.0-metadata.csv.gz"
#: MIMIC-CXR-JPG metadata columns the build needs (header spelling of the release).
CXR_METADATA_COLUMNS = ("dicom_id", "subject_id", "study_id", "ViewPosition", "StudyDate", "StudyTime")

_VERSION_RE = re.compile(r"(?<![\d.])(\d+\.\d+(?:\.\d+)?)(?![\d.])")
_GZIP_MAGIC = b"\x1f\x8b"


@dataclass(frozen=True)
class SourceTable:
    """One raw table file.

    Attributes
    ----------
    name : str
        ``module/table``, e.g. ``"icu/chartevents"``.
    path : Path
        The ``.csv.gz`` or ``.csv`` file.
    columns : tuple of str
        Header names in file order, lower-cased.
    """

    name: str
    path: Path
    columns: tuple[str, ...]

    @property
    def compressed(self) -> bool:
        """Whether the file is gzip-compressed."""
        return self.path.name.endswith(".gz")


@dataclass(frozen=True)
class MimicIVSource:
    """A checked MIMIC-IV release folder."""

    root: Path
    version: str
    synthetic: bool
    tables: dict[str, SourceTable] = field(default_factory=dict)

    def table(self, name: str) -> SourceTable:
        """The table ``module/name``; SourceError if the build did not check it."""
        try:
            return self.tables[name]
        except KeyError:
            raise SourceError(f"table {name} was not located in {self.root}") from None

    def describe(self) -> dict:
        """``{"path", "version", "synthetic"}`` for the store's ``sources`` attribute."""
        return {"path": str(self.root), "version": self.version, "synthetic": self.synthetic}


@dataclass(frozen=True)
class MimicCxrSource:
    """A checked MIMIC-CXR-JPG release folder."""

    root: Path
    metadata: Path
    version: str
    synthetic: bool

    def describe(self) -> dict:
        """``{"path", "version", "synthetic"}`` for the store's ``sources`` attribute."""
        return {"path": str(self.root), "version": self.version, "synthetic": self.synthetic}


def locate_mimic_iv(root: str | Path, tables: dict[str, tuple[str, tuple[str, ...]]] | None = None) -> MimicIVSource:
    """Find the MIMIC-IV release under ``root`` and check the tables the build reads.

    Parameters
    ----------
    root : str or Path
        The release root (holding ``hosp/`` and ``icu/``) or a folder holding exactly one.
    tables : dict, optional
        Tables to check, as :data:`REQUIRED_TABLES` (the default).

    Returns
    -------
    MimicIVSource

    Raises
    ------
    SourceError
        If the folder, a table file or a required column is missing, or a header is unreadable.
    """
    given = Path(root).expanduser()
    if not given.is_dir():
        raise SourceError(f"MIMIC-IV folder {given} does not exist or is not a folder; pass the release "
                          f"folder that holds hosp/ and icu/ with --mimic-iv")
    release = _find_release_root(given.resolve())
    checked = {}
    for name, (what, required) in (tables or REQUIRED_TABLES).items():
        path = _table_file(release, name, what)
        columns = read_header(path)
        missing = [c for c in required if c.lower() not in columns]
        if missing:
            raise SourceError(f"table {name} ({path}) has no column {missing[0]!r} (missing: {', '.join(missing)}); "
                              f"its header is: {', '.join(columns)}. Is this a MIMIC-IV v2.2/v3.x file?")
        checked[name] = SourceTable(name=name, path=path, columns=columns)
    return MimicIVSource(root=release, version=_version_of(release), synthetic=_is_synthetic(release),
                         tables=checked)


def locate_mimic_cxr(root: str | Path) -> MimicCxrSource:
    """Find MIMIC-CXR-JPG's metadata file and ``files/`` folder under ``root`` and check them.

    Raises
    ------
    SourceError
        If the folder, the metadata file, a metadata column or the ``files/`` folder is missing.
    """
    given = Path(root).expanduser()
    if not given.is_dir():
        raise SourceError(f"MIMIC-CXR-JPG folder {given} does not exist or is not a folder; pass the release "
                          f"folder that holds mimic-cxr-2.0.0-metadata.csv.gz and files/ with --mimic-cxr")
    release = given.resolve()
    candidates = sorted(release.glob("mimic-cxr-*-metadata.csv.gz")) + sorted(release.glob("mimic-cxr-*-metadata.csv"))
    if not candidates:
        raise SourceError(f"MIMIC-CXR-JPG metadata file mimic-cxr-2.0.0-metadata.csv.gz (one row per image: "
                          f"view position, study date and time) is missing from {release}")
    metadata = candidates[0]
    columns = read_header(metadata)
    missing = [c for c in CXR_METADATA_COLUMNS if c.lower() not in columns]
    if missing:
        raise SourceError(f"MIMIC-CXR-JPG metadata {metadata} has no column {missing[0]!r} "
                          f"(missing: {', '.join(missing)}); its header is: {', '.join(columns)}")
    if not (release / "files").is_dir():
        raise SourceError(f"MIMIC-CXR-JPG image folder {release / 'files'} (files/pXX/pSUBJECT/sSTUDY/DICOM.jpg) "
                          f"is missing")
    match = re.search(r"mimic-cxr-(\d+\.\d+\.\d+)-metadata", metadata.name)
    version = match.group(1) if match else _version_of(release)
    return MimicCxrSource(root=release, metadata=metadata, version=version, synthetic=_is_synthetic(release))


def read_header(path: Path) -> tuple[str, ...]:
    """Column names of a CSV or CSV.gz file, lower-cased, read from its first line only.

    Raises
    ------
    SourceError
        If the file is empty, not gzip although named ``.gz``, or the header cannot be read.
    """
    try:
        if path.name.endswith(".gz"):
            with path.open("rb") as raw:
                if raw.read(2) != _GZIP_MAGIC:
                    raise SourceError(f"{path} is not a gzip file although its name ends in .gz; "
                                      f"re-download it (compare with the release's SHA256SUMS.txt)")
            with gzip.open(path, "rt", encoding="utf-8", newline="") as fh:
                line = fh.readline()
        else:
            with path.open("r", encoding="utf-8", newline="") as fh:
                line = fh.readline()
    except (OSError, EOFError, UnicodeDecodeError, gzip.BadGzipFile) as err:
        raise SourceError(f"could not read the header line of {path}: {err}. The file may be truncated or corrupt; "
                          f"re-download it (compare with the release's SHA256SUMS.txt)") from None
    if not line.strip():
        raise SourceError(f"{path} is empty: it has no header line")
    header = next(csv.reader(io.StringIO(line)))
    columns = tuple(c.strip().lower() for c in header)
    if len(set(columns)) != len(columns):
        raise SourceError(f"{path} has repeated column names in its header: {', '.join(columns)}")
    return columns


def _find_release_root(folder: Path) -> Path:
    if (folder / "hosp").is_dir() and (folder / "icu").is_dir():
        return folder
    if (folder / "core").is_dir():
        raise SourceError(f"{folder} looks like MIMIC-IV v1.0 (it has a core/ module); cbstore reads MIMIC-IV "
                          f"v2.x or v3.x (modules hosp/ and icu/)")
    found = sorted({p.parent for depth in ("*/hosp", "*/*/hosp") for p in folder.glob(depth)
                    if p.is_dir() and (p.parent / "icu").is_dir()})
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        raise SourceError(f"{folder} holds several MIMIC-IV releases ({', '.join(map(str, found))}); "
                          f"pass one of them with --mimic-iv")
    missing = [m for m in ("hosp", "icu") if not (folder / m).is_dir()]
    raise SourceError(f"MIMIC-IV module folder {', '.join(m + '/' for m in missing)} is missing from {folder}; "
                      f"pass the release folder that holds hosp/ and icu/ (MIMIC-IV v2.2 or v3.x)")


def _table_file(release: Path, name: str, what: str) -> Path:
    for suffix in (".csv.gz", ".csv"):
        path = release / f"{name}{suffix}"
        if path.is_file():
            return path
    raise SourceError(f"MIMIC-IV table file {release / (name + '.csv.gz')} ({what}) is missing; "
                      f"download the full release (hosp/ and icu/ modules) or check the folder given")


def _version_of(release: Path) -> str:
    """Release version: a synthetic source's marker, else the folder names (PhysioNet's
    ``mimiciv/2.2/``), else ``"unknown"``."""
    marker = _synthetic_marker(release)
    if marker and isinstance(marker.get("version"), str) and marker["version"]:
        return marker["version"]
    for part in (release.name, release.parent.name):
        match = _VERSION_RE.search(part)
        if match:
            return match.group(1)
    return "unknown"


def _synthetic_marker(release: Path) -> dict | None:
    """Content of ``cbstore_synthetic.json`` written by ``cbstore synth``, if present and valid."""
    path = release / SYNTHETIC_MARKER_JSON
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise SourceError(f"synthetic-source marker {path} is not valid JSON ({err}); "
                          f"regenerate the source with cbstore synth") from None
    return data if isinstance(data, dict) else None


def _is_synthetic(release: Path) -> bool:
    marker = _synthetic_marker(release)
    return bool(marker and marker.get("synthetic")) or (release / SYNTHETIC_MARKER_TEXT).is_file()


def find_cxr_file(cxr_root: str | Path, name: str) -> Path:
    """Locate a MIMIC-CXR-JPG table in ``cxr_root``, gzipped or not.

    Parameters
    ----------
    cxr_root : str or path-like
        Root of the MIMIC-CXR-JPG release (the folder that holds ``files/`` and the CSV tables).
    name : str
        File name of the table as released, e.g. :data:`CXR_METADATA`.

    Returns
    -------
    pathlib.Path
        ``cxr_root/name`` if present, else ``cxr_root/name`` without ``.gz`` (a user may have
        gunzipped it).

    Raises
    ------
    SourceError
        If neither exists.
    """
    root = Path(cxr_root)
    candidates = [root / name]
    if name.endswith(".gz"):
        candidates.append(root / name[: -len(".gz")])
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    tried = " or ".join(str(c) for c in candidates)
    raise SourceError(
        f"MIMIC-CXR-JPG table {name} not found: looked for {tried}. Point the CXR source at the "
        "root of the MIMIC-CXR-JPG v2.0.0 release (the folder holding files/ and the "
        "mimic-cxr-2.0.0-*.csv.gz tables)."
    )
