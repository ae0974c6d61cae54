"""Phenotype definitions: the 25 benchmark CCS groups with version-tagged diagnosis codes.

The packaged file ``cbstore/build/resources/phenotypes.yaml`` lists, for each of the 25 HCUP CCS
single-level groups used by the MIMIC benchmarks, its CCS number, whether it is acute or chronic,
and two separate code lists, ``icd9`` and ``icd10``. Diagnosis rows must be matched on the pair
(``icd_code``, ``icd_version``): a few codes (for example ``V420`` or ``E870``) are valid in both
ICD versions with different meanings, so a version-blind match mislabels them.

The file was produced by :func:`derive_definitions` from two public fact files (see its docstring)
and is shipped with the package, so a build never needs those files.

Examples
--------
>>> ph = load_phenotypes()
>>> len(ph.names), ph.types.count("acute")
(25, 15)
>>> table = ph.code_table()
>>> sorted(table.loc[table.icd_code == "V420", "icd_version"].tolist())
[9]
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import yaml

from cbstore.errors import CbstoreError

if TYPE_CHECKING:  # the tables below are DataFrames; the build loads pandas only after it has started reading
    import pandas as pd

#: libyaml's safe loader when available (much faster), else the pure-Python one.
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

__all__ = [
    "PhenotypeDefinitionError",
    "Phenotypes",
    "derive_definitions",
    "render_definitions_yaml",
    "load_phenotypes",
    "DEFAULT_PHENOTYPES_RESOURCE",
]

#: Name of the packaged definitions file inside ``cbstore/build/resources``.
DEFAULT_PHENOTYPES_RESOURCE = "phenotypes.yaml"

#: Allowed values of a group's ``type``.
PHENOTYPE_TYPES = ("acute", "chronic")

_CODE_RE = re.compile(r"^[A-Z0-9]+$")


class PhenotypeDefinitionError(CbstoreError, ValueError):
    """A phenotype definitions file is malformed (the message names the file and the entry)."""


# --------------------------------------------------------------------------------------------
# derivation from the public fact files
# --------------------------------------------------------------------------------------------

def _normalise_code(code) -> str:
    """Return ``code`` as an upper-case string without dots or surrounding spaces."""
    return str(code).strip().replace(".", "").upper()


def _read_groups(path: Path) -> dict:
    with open(path, encoding="utf-8") as fh:
        data = yaml.load(fh, Loader=_YAML_LOADER)
    if not isinstance(data, dict):
        raise PhenotypeDefinitionError(f"{path}: expected a mapping of CCS group name -> definition")
    return data


def derive_definitions(ccs_yaml_path, icd910_yaml_path) -> dict:
    """Derive version-tagged definitions of the 25 benchmark phenotypes from two fact files.

    Parameters
    ----------
    ccs_yaml_path : str or path-like
        The HCUP CCS 2015 single-level groups as used by the MIMIC-III benchmark
        (``hcup_ccs_2015_definitions.yaml``): ICD-9-CM codes only. Its mapping order fixes the
        phenotype order.
    icd910_yaml_path : str or path-like
        The same groups with ICD-9 and ICD-10 codes mixed in one untagged list
        (``icd_9_10_definitions_2.yaml``).

    Returns
    -------
    dict
        ``{"phenotypes": [{"name", "id", "type", "icd9", "icd10"}, ...]}`` for the groups with
        ``use_in_benchmark: true`` in the CCS file, in its order. Derivation rule: codes are
        normalised (dots and spaces removed, upper case); a code of the combined list is tagged
        ICD-9 if it appears in the CCS (ICD-9) list of the same group, otherwise ICD-10; ICD-9 codes
        of the CCS list are all kept; duplicates are dropped and each list is sorted.

    Raises
    ------
    PhenotypeDefinitionError
        If a benchmark group of the CCS file is missing from the second file, or the two files
        disagree on its CCS number, type or benchmark flag.
    """
    ccs_path, mixed_path = Path(ccs_yaml_path), Path(icd910_yaml_path)
    ccs, mixed = _read_groups(ccs_path), _read_groups(mixed_path)
    out = []
    for name, group in ccs.items():
        if not group.get("use_in_benchmark"):
            continue
        other = mixed.get(name)
        if other is None:
            raise PhenotypeDefinitionError(f"{mixed_path}: benchmark group {name!r} of {ccs_path} is missing")
        for key in ("id", "type", "use_in_benchmark"):
            if other.get(key) != group.get(key):
                raise PhenotypeDefinitionError(
                    f"group {name!r}: {key} is {group.get(key)!r} in {ccs_path} but "
                    f"{other.get(key)!r} in {mixed_path}"
                )
        icd9 = {_normalise_code(c) for c in group.get("codes", [])}
        icd10 = {_normalise_code(c) for c in other.get("codes", [])} - icd9
        out.append({
            "name": str(name),
            "id": int(group["id"]),
            "type": str(group["type"]),
            "icd9": sorted(icd9),
            "icd10": sorted(icd10),
        })
    return {"phenotypes": out}


def _code_lines(codes: list[str], per_line: int = 12) -> list[str]:
    if not codes:
        return ["[]"]
    rows = [", ".join(json.dumps(c) for c in codes[i:i + per_line]) for i in range(0, len(codes), per_line)]
    if len(rows) == 1:
        return [f"[{rows[0]}]"]
    return ["[" + rows[0] + ","] + [r + "," for r in rows[1:-1]] + [rows[-1] + "]"]


def render_definitions_yaml(definitions: dict, header: str = "") -> str:
    """Render definitions (as returned by :func:`derive_definitions`) as a YAML document.

    Codes are written as quoted strings (so ``4019`` stays a string), several per line.

    Parameters
    ----------
    definitions : dict
        ``{"phenotypes": [...]}``.
    header : str, optional
        Comment text put on top of the file (each line is prefixed with ``# ``).

    Returns
    -------
    str
        The YAML text.
    """
    lines = [("# " + ln).rstrip() for ln in header.strip("\n").splitlines()] if header else []
    lines.append("phenotypes:")
    for ph in definitions["phenotypes"]:
        lines.append(f"  - name: {json.dumps(ph['name'])}")
        lines.append(f"    id: {int(ph['id'])}")
        lines.append(f"    type: {ph['type']}")
        for key in ("icd9", "icd10"):
            body = _code_lines(ph[key])
            lines.append(f"    {key}: {body[0]}")
            lines.extend(f"      {row}" for row in body[1:])
    return "\n".join(lines) + "\n"


#: Header comment of the packaged file.
PACKAGED_HEADER = """\
cbstore phenotype definitions: the 25 HCUP CCS single-level groups of the MIMIC benchmarks,
with diagnosis codes split by ICD version. Match diagnoses_icd rows on (icd_code, icd_version).

Derived (cbstore.build.phenotypes.derive_definitions) from two public fact files that both carry
codes from AHRQ HCUP Clinical Classifications Software (CCS):
  * hcup_ccs_2015_definitions.yaml (MIMIC-III benchmark resources, MIT licence): ICD-9-CM codes;
    the groups with use_in_benchmark true, in this file's order, are the 25 phenotypes here;
  * icd_9_10_definitions_2.yaml (MedFuse mimic4extract resources, MIT licence): the same groups
    with ICD-9 and ICD-10-CM codes mixed in one untagged list.
Rule: a code is ICD-9 if it is in the ICD-9 list of its group, otherwise ICD-10. Codes have no
dots, duplicates are removed, each list is sorted. Order = phenotype column order in the store.
"""


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Phenotypes:
    """Validated phenotype definitions.

    Attributes
    ----------
    names : list of str
        Group names in column order (25 for the packaged file).
    ids : list of int
        CCS numbers.
    types : list of str
        ``"acute"`` or ``"chronic"``.
    icd9, icd10 : list of tuple of str
        Sorted codes per group and ICD version.
    sha256 : str
        SHA-256 of the definitions file's bytes (recorded in the store).
    path : str
        Where the definitions were read from.
    """

    names: list
    ids: list
    types: list
    icd9: list
    icd10: list
    sha256: str
    path: str

    def __len__(self) -> int:
        return len(self.names)

    def code_table(self) -> pd.DataFrame:
        """All (phenotype, code, version) triples.

        Returns
        -------
        pandas.DataFrame
            Columns ``phenotype`` (int, column index), ``name``, ``icd_code`` (str),
            ``icd_version`` (int, 9 or 10); one row per code, ordered by phenotype, version, code.
        """
        import pandas as pd

        rows = []
        for i, name in enumerate(self.names):
            for version, codes in ((9, self.icd9[i]), (10, self.icd10[i])):
                rows.extend((i, name, code, version) for code in codes)
        table = pd.DataFrame(rows, columns=["phenotype", "name", "icd_code", "icd_version"])
        return table.astype({"phenotype": "int64", "icd_version": "int64"})

    def label_matrix(self, diagnoses: pd.DataFrame, hadm_ids) -> np.ndarray:
        """Phenotype labels of hospital admissions from diagnosis rows.

        Parameters
        ----------
        diagnoses : pandas.DataFrame
            Rows with columns ``hadm_id``, ``icd_code`` and ``icd_version`` (as in
            ``hosp/diagnoses_icd``); codes are compared after stripping spaces and dots.
        hadm_ids : array-like of int
            Admissions to label, in output row order.

        Returns
        -------
        numpy.ndarray
            int8 [len(hadm_ids), n_phenotypes]: 1 where any row of the admission matches a code
            of the group with the same ICD version.
        """
        import pandas as pd

        hadm_ids = np.asarray(hadm_ids, dtype=np.int64)
        out = np.zeros((len(hadm_ids), len(self.names)), dtype=np.int8)
        if len(diagnoses) == 0 or len(hadm_ids) == 0:
            return out
        dx = pd.DataFrame({
            "hadm_id": pd.to_numeric(diagnoses["hadm_id"]).astype("int64"),
            "icd_code": diagnoses["icd_code"].astype(str).str.strip().str.replace(".", "", regex=False),
            "icd_version": pd.to_numeric(diagnoses["icd_version"]).astype("int64"),
        })
        hits = dx.merge(self.code_table(), on=["icd_code", "icd_version"])
        unique, inverse = np.unique(hadm_ids, return_inverse=True)
        per_hadm = np.zeros((len(unique), len(self.names)), dtype=np.int8)
        pos = np.searchsorted(unique, hits["hadm_id"].to_numpy())
        found = (pos < len(unique)) & (unique[np.minimum(pos, len(unique) - 1)] == hits["hadm_id"].to_numpy())
        per_hadm[pos[found], hits["phenotype"].to_numpy()[found]] = 1
        return per_hadm[inverse]


def _fail(path, where: str, what: str):
    raise PhenotypeDefinitionError(f"{path}: {where}: {what}")


def _validate(data, path) -> tuple[list, list, list, list, list]:
    if not isinstance(data, dict) or not isinstance(data.get("phenotypes"), list):
        _fail(path, "top level", "expected a mapping with a list 'phenotypes'")
    entries = data["phenotypes"]
    if not entries:
        _fail(path, "phenotypes", "the list is empty")
    names, ids, types, icd9, icd10 = [], [], [], [], []
    for pos, entry in enumerate(entries):
        where = f"phenotypes[{pos}]"
        if not isinstance(entry, dict):
            _fail(path, where, "each entry must be a mapping with name, id, type, icd9, icd10")
        name = entry.get("name")
        if not isinstance(name, str) or not name.strip():
            _fail(path, where, "'name' must be a non-empty string")
        where = f"phenotypes[{pos}] ({name!r})"
        missing = [k for k in ("id", "type", "icd9", "icd10") if k not in entry]
        if missing:
            _fail(path, where, f"missing key(s) {missing}")
        unknown = sorted(set(entry) - {"name", "id", "type", "icd9", "icd10"})
        if unknown:
            _fail(path, where, f"unknown key(s) {unknown}")
        if name in names:
            _fail(path, where, "duplicate name")
        if not isinstance(entry["id"], int) or isinstance(entry["id"], bool):
            _fail(path, where, f"'id' must be an integer CCS number, got {entry['id']!r}")
        if entry["type"] not in PHENOTYPE_TYPES:
            _fail(path, where, f"'type' must be one of {PHENOTYPE_TYPES}, got {entry['type']!r}")
        lists = []
        for key in ("icd9", "icd10"):
            codes = entry[key]
            if not isinstance(codes, list):
                _fail(path, where, f"'{key}' must be a list of quoted code strings")
            for code in codes:
                if not isinstance(code, str) or not _CODE_RE.match(code):
                    _fail(path, where, f"{key} code {code!r} must be a quoted string of upper-case "
                                       "letters and digits without dots")
            dup = sorted({c for c in codes if codes.count(c) > 1})
            if dup:
                _fail(path, where, f"duplicate {key} code(s) {dup}")
            lists.append(tuple(sorted(codes)))
        names.append(name)
        ids.append(entry["id"])
        types.append(entry["type"])
        icd9.append(lists[0])
        icd10.append(lists[1])
    return names, ids, types, icd9, icd10


def load_phenotypes(path=None) -> Phenotypes:
    """Load and validate phenotype definitions.

    Parameters
    ----------
    path : str or path-like, optional
        A definitions YAML file; by default the packaged ``cbstore/build/resources/phenotypes.yaml``.

    Returns
    -------
    Phenotypes

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    PhenotypeDefinitionError
        If the file is not valid YAML or an entry is malformed (the message names the file and
        the entry, e.g. ``phenotypes[3] ('Shock'): duplicate icd10 code(s) ['R570']``).
    """
    if path is None:
        ref = resources.files("cbstore.build") / "resources" / DEFAULT_PHENOTYPES_RESOURCE
        raw, where = ref.read_bytes(), str(ref)
    else:
        where = str(path)
        raw = Path(path).read_bytes()
    try:
        data = yaml.load(raw, Loader=_YAML_LOADER)
    except yaml.YAMLError as exc:
        raise PhenotypeDefinitionError(f"{where}: not valid YAML ({exc})") from exc
    names, ids, types, icd9, icd10 = _validate(data, where)
    return Phenotypes(names=names, ids=ids, types=types, icd9=icd9, icd10=icd10,
                      sha256=hashlib.sha256(raw).hexdigest(), path=where)
