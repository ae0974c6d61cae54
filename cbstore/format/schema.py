"""The store contract in code: format version, groups, arrays and the attrs JSON Schemas.

``store_layout.md`` is the prose form of this module; the writer (:mod:`cbstore.store.reader`), the
reader and the validator (:mod:`cbstore.store.validate`) all take names, dtypes and dimensions from here.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import resources
from typing import TYPE_CHECKING

from cbstore.errors import SchemaDefinitionError
from cbstore.format.content import CXR_COLUMNS, STAT_NAMES, STAY_COLUMNS

if TYPE_CHECKING:  # jsonschema is imported where it is used: 0.08 s that ``import cbstore`` need not pay
    from jsonschema import Draft202012Validator, ValidationError

#: Version of the on-disk format (semver). Readers refuse another major version.
FORMAT_VERSION = "1.1.0"

#: Name of the completion manifest, written last by a builder.
MANIFEST_NAME = "cbstore_manifest.json"

#: Key of the store metadata in the root group's attributes.
ROOT_ATTRS_KEY = "cbstore"

#: Groups directly under the root written by a build, in writing order.
GROUPS = ("stays", "labels", "ehr", "cxr", "splits", "stats")

#: Group that holds embeddings (``embeddings/<modality>/<encoder-id>``), added by ``cbstore encode``.
EMBEDDINGS_GROUP = "embeddings"

#: Embedding modalities.
MODALITIES = ("cxr", "ehr")

#: Columns of ``stays`` stored as int64 seconds since the epoch (CF-encoded datetimes).
DATETIME_COLUMNS = ("intime", "outtime", "prediction_time", "admittime", "dischtime")

#: CF attributes of datetime arrays.
DATETIME_ATTRS = {"units": "seconds since 1970-01-01", "calendar": "proleptic_gregorian"}

#: Task names and the LoS class names (``labels/los_class`` codes 0..6).
TASKS = ("mortality", "mortality_hosp", "phenotype", "los")
LOS_CLASS_NAMES = ("2-3d", "3-4d", "4-5d", "5-6d", "6-7d", "7-14d", "14+d")
#: Lower edges (days) of the LoS classes; the last class is open-ended.
LOS_CLASS_EDGES = (2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 14.0)

#: ``encoding-type`` / ``encoding-version`` of the build groups (anndata convention).
GROUP_ENCODING = {
    "stays": ("dataframe", "0.2.0"),
    "labels": ("cbstore.labels", FORMAT_VERSION),
    "ehr": ("cbstore.ehr", FORMAT_VERSION),
    "cxr": ("cbstore.cxr", FORMAT_VERSION),
    "splits": ("cbstore.splits", FORMAT_VERSION),
    "stats": ("cbstore.stats", FORMAT_VERSION),
    "embeddings": ("cbstore.embeddings", FORMAT_VERSION),
    "embedding": ("cbstore.embedding", FORMAT_VERSION),
}

#: Marker dtype for variable-length UTF-8 strings.
STR = "str"


@dataclass(frozen=True)
class ArraySpec:
    """Dtype, dimension names and fill value of one array of the layout."""

    dtype: str
    dims: tuple[str, ...]
    fill: object

    @property
    def is_string(self) -> bool:
        """Whether the array holds variable-length UTF-8 strings."""
        return self.dtype == STR


def _fill_for(dtype: str) -> object:
    if dtype == STR:
        return ""
    if dtype == "bool":
        return False
    if dtype.startswith("float"):
        return float("nan")
    return 0


def _spec(dtype: str, *dims: str, fill: object = None) -> ArraySpec:
    return ArraySpec(dtype, tuple(dims), _fill_for(dtype) if fill is None else fill)


_STAY_DTYPES = {
    "subject_id": "int64", "hadm_id": "int64", "age": "float32",
    **{c: "int64" for c in DATETIME_COLUMNS},
}

#: Every array of a build, keyed by ``group/name``.
ARRAYS: dict[str, ArraySpec] = {
    "stays/stay": _spec("int64", "stay"),
    **{f"stays/{c}": _spec(_STAY_DTYPES.get(c, STR), "stay") for c in STAY_COLUMNS},
    "labels/stay": _spec("int64", "stay"),
    "labels/phenotype": _spec(STR, "phenotype"),
    "labels/mortality": _spec("int8", "stay"),
    "labels/mortality_hosp": _spec("int8", "stay"),
    "labels/phenotype_labels": _spec("int8", "stay", "phenotype"),
    "labels/los": _spec("float32", "stay"),
    "labels/los_class": _spec("int8", "stay", fill=-1),
    "ehr/stay": _spec("int64", "stay"),
    "ehr/time": _spec("int16", "time"),
    "ehr/feature": _spec(STR, "feature"),
    "ehr/values": _spec("float32", "stay", "time", "feature"),
    "ehr/observed": _spec("bool", "stay", "time", "feature"),
    "ehr/unit": _spec(STR, "feature"),
    "ehr/kind": _spec(STR, "feature"),
    "ehr/normalize": _spec("bool", "feature"),
    "cxr/stay": _spec("int64", "stay"),
    "cxr/present": _spec("bool", "stay"),
    "cxr/images": _spec("uint8", "stay", "y", "x"),
    "cxr/dicom_id": _spec(STR, "stay"),
    "cxr/study_id": _spec("int64", "stay", fill=-1),
    "cxr/study_time": _spec("int64", "stay", fill=-1),
    "cxr/hours_before_prediction": _spec("float32", "stay"),
    "cxr/view_position": _spec(STR, "stay"),
    "cxr/n_eligible": _spec("int16", "stay"),
    "cxr/absent_reason": _spec(STR, "stay"),
    "splits/stay": _spec("int64", "stay"),
    "splits/fold": _spec("int8", "fold"),
    "splits/part": _spec("uint8", "stay", "fold"),
    "stats/fold": _spec("int8", "fold"),
    "stats/feature": _spec(STR, "feature"),
    **{f"stats/{s}": _spec("int64" if s == "n_observed" else "float32", "fold", "feature")
       for s in STAT_NAMES},
}

assert set(CXR_COLUMNS) == {k.split("/")[1] for k in ARRAYS if k.startswith("cxr/")} - {"stay", "images"}

#: Coordinate arrays (array name == dimension name) per dimension.
COORDINATES = ("stay", "time", "feature", "phenotype", "fold")

#: The spatial ``map`` array of a spatial-map embedding (``[stay, channel, y, x]``, float16, NaN
#: where absent; format 1.1).
MAP_SPEC = ArraySpec("float16", ("stay", "channel", "map_y", "map_x"), float("nan"))

#: Attributes of ``embeddings/<modality>/<encoder-id>`` that the caller of ``create_embedding`` must give.
EMBEDDING_CALLER_ATTRS = ("weights", "preprocessing")

#: Folder of :mod:`cbstore.format` (package data) holding the JSON Schema files (draft 2020-12).
SCHEMA_FOLDER = "schemas"

#: Metaschema that accepts the JSON Schemas of draft 2020-12 which use no keyword the draft lacks:
#: every subschema is checked against it too (``$dynamicAnchor``), so a misspelt keyword is an
#: error instead of being ignored.
STRICT_METASCHEMA: dict = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": "urn:cbstore:strict-metaschema",
    "$dynamicAnchor": "meta",
    "$ref": "https://json-schema.org/draft/2020-12/schema",
    "unevaluatedProperties": False,
}

#: Longest repr of a bad value quoted in a problem message.
_MAX_REPR = 80


def schema_problems(schema: dict) -> list[str]:
    """Why a JSON Schema is not a valid draft 2020-12 schema made of the draft's keywords.

    Parameters
    ----------
    schema : dict
        The schema.

    Returns
    -------
    list of str
        One message per problem (``schema.<path>: <what is wrong>``); empty when the schema is valid.
    """
    return list(_schema_problems(canonical_json(schema)))


@functools.lru_cache(maxsize=32)
def _schema_problems(text: str) -> tuple[str, ...]:
    """:func:`schema_problems` of the schema whose canonical JSON is ``text``.

    Memoised: the check against the strict metaschema takes about 0.1 s, and the same packaged
    schemas are checked at every store written or validated.
    """
    from jsonschema import Draft202012Validator

    errors = Draft202012Validator(STRICT_METASCHEMA).iter_errors(json.loads(text))
    problems = [(tuple(e.absolute_path), e.message) for e in errors]
    # An unknown keyword deep down also fails every schema above it; report only the deepest.
    deepest = [(path, msg) for path, msg in problems
               if not any(other[: len(path)] == path and len(other) > len(path) for other, _ in problems)]
    return tuple(f"schema{_json_path(path)}: {msg}" for path, msg in deepest)


def load_schema(name: str, *, check: bool = True) -> dict:
    """Read a JSON Schema shipped with cbstore (``cbstore/format/schemas/<name>.schema.json``).

    Parameters
    ----------
    name : str
        ``root_attrs``, ``embedding_attrs`` or ``manifest``.
    check : bool
        Check the schema against the strict draft 2020-12 metaschema (:func:`schema_problems`,
        about 0.1 s).

    Returns
    -------
    dict
        The schema.

    Raises
    ------
    SchemaDefinitionError
        If the file is missing or not JSON, or (with ``check``) not a valid draft 2020-12 schema.
    """
    filename = f"{name}.schema.json"
    try:
        text = (resources.files("cbstore.format") / SCHEMA_FOLDER / filename).read_text(encoding="utf-8")
        schema = json.loads(text)
    except (OSError, ValueError) as exc:
        raise SchemaDefinitionError(f"cannot read the JSON Schema cbstore/format/{SCHEMA_FOLDER}/{filename}: "
                                    f"{exc}") from None
    problems = schema_problems(schema) if check else []
    if problems:
        raise SchemaDefinitionError(f"{filename} is not a valid JSON Schema: " + "; ".join(problems))
    return schema


#: The JSON Schemas shipped with cbstore, by the module attribute that holds each: the root group's
#: ``attrs["cbstore"]``, the attributes of one embedding group, and ``cbstore_manifest.json``. Each is
#: read on first use, not when the module is imported. They are part of the package, so the test suite
#: checks them against the metaschema (tests/cbstore/format/test_schema_files.py), not every run.
PACKAGED_SCHEMAS = {
    "ROOT_ATTRS_SCHEMA": "root_attrs",
    "EMBEDDING_ATTRS_SCHEMA": "embedding_attrs",
    "MANIFEST_SCHEMA": "manifest",
}


@functools.cache
def packaged_schema(name: str) -> dict:
    """The schema ``name`` shipped with cbstore, read once per process (the dict is shared: do not
    modify it). Not checked against the metaschema (see :data:`PACKAGED_SCHEMAS`)."""
    return load_schema(name, check=False)


@functools.cache
def _packaged_validator(name: str) -> Draft202012Validator:
    return _validator(packaged_schema(name))


def check_packaged(instance: object, name: str, where: str = "attrs") -> list[str]:
    """:func:`check_schema` of ``instance`` against the shipped schema ``name`` (``root_attrs``,
    ``embedding_attrs`` or ``manifest``; :func:`packaged_schema`), with a validator built once per process."""
    return _violations(_packaged_validator(name), instance, where)


def __getattr__(name: str) -> dict:
    """``ROOT_ATTRS_SCHEMA``, ``EMBEDDING_ATTRS_SCHEMA`` and ``MANIFEST_SCHEMA`` (:data:`PACKAGED_SCHEMAS`)."""
    if name in PACKAGED_SCHEMAS:
        return packaged_schema(PACKAGED_SCHEMAS[name])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def check_schema(instance: object, schema: dict, where: str = "attrs") -> list[str]:
    """Check a JSON value against a JSON Schema (draft 2020-12, with format checks).

    Parameters
    ----------
    instance : object
        Value decoded from JSON.
    schema : dict
        The schema.
    where : str
        Name of the value, used as prefix in the messages.

    Returns
    -------
    list of str
        One message per violation, ``<where><path of the bad value>: <what is wrong>`` (e.g.
        ``attrs.cbstore.n_stays: -1 is less than the minimum of 0``); empty when the value is valid.

    Raises
    ------
    SchemaDefinitionError
        If ``schema`` itself is invalid or uses a keyword draft 2020-12 does not define.
    """
    problems = schema_problems(schema)
    if problems:
        raise SchemaDefinitionError("invalid JSON Schema: " + "; ".join(problems))
    return _violations(_validator(schema), instance, where)


def _validator(schema: dict) -> Draft202012Validator:
    """A draft 2020-12 validator of ``schema`` with format checks (jsonschema is imported here, on first use)."""
    from jsonschema import Draft202012Validator

    return Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)


def _violations(validator: Draft202012Validator, instance: object, where: str) -> list[str]:
    return [f"{where}{_json_path(e.absolute_path)}: {_message(e)}" for e in validator.iter_errors(instance)]


def _json_path(path) -> str:
    """``.key`` for an object key and ``[i]`` for an array index, joined."""
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path)


def _message(error: ValidationError) -> str:
    """The error's message with a long quoted value cut short (the message starts with its repr)."""
    quoted = repr(error.instance)
    if len(quoted) <= _MAX_REPR or not error.message.startswith(quoted):
        return error.message
    return quoted[: _MAX_REPR - 3] + "..." + error.message[len(quoted):]


def now() -> str:
    """The current UTC time, ISO 8601 to the second: the form of every time the format records
    (``created_at``, ``completed_at``, a build's ``started_at``)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def canonical_json(value: object) -> str:
    """Canonical JSON text (sorted keys, no whitespace) used for hashing."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def config_sha256(config: dict) -> str:
    """SHA-256 (hex) of the canonical JSON of a build configuration."""
    return hashlib.sha256(canonical_json(config).encode("ascii")).hexdigest()


def major(version: str) -> int:
    """Major component of a semver string (``"1.2.3"`` -> 1)."""
    return int(str(version).split(".")[0])

