"""The store contract in code: format version, groups, arrays and the attrs JSON Schema.

``store_layout.md`` is the prose form of this module; the writer (:mod:`cbstore.store.reader`), the
reader and the validator (:mod:`cbstore.store.validate`) all take names, dtypes and dimensions from here.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass

from cbstore.format.content import CXR_COLUMNS, STAT_NAMES, STAY_COLUMNS

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

_SHA256 = {"type": "string", "pattern": r"^[0-9a-f]{64}$"}
_SOURCE = {
    "type": "object",
    "required": ["path", "version", "synthetic"],
    "properties": {
        "path": {"type": "string"},
        "version": {"type": "string"},
        "synthetic": {"type": "boolean"},
    },
}

#: JSON Schema (draft 2020-12 subset) of ``attrs["cbstore"]`` on the root group.
ROOT_ATTRS_SCHEMA: dict = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "cbstore root attributes",
    "type": "object",
    "required": [
        "format_version", "created_by", "created_at", "sources", "config", "config_sha256",
        "variables_sha256", "phenotypes_sha256", "cohort_flow", "n_stays", "window_hours",
        "n_folds", "image_size", "cxr_skips", "chunks",
    ],
    "properties": {
        "format_version": {"type": "string", "pattern": r"^\d+\.\d+\.\d+$"},
        "created_by": {"type": "string", "pattern": r"^cbstore \S+$"},
        "created_at": {"type": "string", "pattern": r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}"},
        "sources": {
            "type": "object",
            "required": ["mimic-iv", "mimic-cxr-jpg"],
            "properties": {"mimic-iv": _SOURCE, "mimic-cxr-jpg": _SOURCE},
        },
        "config": {"type": "object"},
        "config_sha256": _SHA256,
        "variables_sha256": _SHA256,
        "phenotypes_sha256": _SHA256,
        "cohort_flow": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["step", "n", "note"],
                "properties": {
                    "step": {"type": "string"},
                    "n": {"type": "integer", "minimum": 0},
                    "note": {"type": "string"},
                },
            },
        },
        "n_stays": {"type": "integer", "minimum": 0},
        "window_hours": {"type": "integer", "minimum": 1},
        "n_folds": {"type": "integer", "minimum": 1},
        "image_size": {"type": "integer", "minimum": 1},
        "cxr_skips": {"type": "object", "additionalProperties": {"type": "integer", "minimum": 0}},
        "chunks": {
            "type": "object",
            "additionalProperties": {"type": "array", "items": {"type": "integer", "minimum": 1}},
        },
        "shards": {
            "type": "object",
            "additionalProperties": {"type": "array", "items": {"type": "integer", "minimum": 1}},
        },
    },
}

#: JSON Schema of the attributes of one embedding group.
EMBEDDING_ATTRS_SCHEMA: dict = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "cbstore embedding attributes",
    "type": "object",
    "required": [
        "encoding-type", "encoding-version", "encoder_id", "modality", "per_fold", "dim",
        "region_stays", "weights", "weights_sha256", "library_versions", "preprocessing",
        "created_at", "complete",
    ],
    "properties": {
        "encoder_id": {"type": "string", "pattern": r"^[A-Za-z0-9][A-Za-z0-9._-]*$"},
        "modality": {"enum": list(MODALITIES)},
        "per_fold": {"type": "boolean"},
        "dim": {"type": "integer", "minimum": 1},
        "sequence_dim": {"type": ["integer", "null"], "minimum": 1},
        "region_stays": {"type": "integer", "minimum": 1},
        "weights": {"type": ["string", "null"]},
        "weights_sha256": {"type": ["string", "null"]},
        "library_versions": {"type": "object", "additionalProperties": {"type": "string"}},
        "preprocessing": {"type": ["object", "string"]},
        "image_size": {"type": ["integer", "null"], "minimum": 1},
        "nan_allowed": {"type": "boolean"},
        "map_shape": {"type": ["array", "null"], "items": {"type": "integer", "minimum": 1}},
        "map_stage": {"type": "string"},
        "created_at": {"type": "string"},
        "complete": {"type": "boolean"},
    },
}

#: JSON Schema of ``cbstore_manifest.json``.
MANIFEST_SCHEMA: dict = {
    "type": "object",
    "required": ["format_version", "n_stays", "arrays", "complete", "created_at"],
    "properties": {
        "format_version": {"type": "string", "pattern": r"^\d+\.\d+\.\d+$"},
        "n_stays": {"type": "integer", "minimum": 0},
        "complete": {"const": True},
        "created_at": {"type": "string"},
        "arrays": {
            "type": "object",
            "additionalProperties": {
                "type": "object",
                "required": ["shape", "dtype"],
                "properties": {
                    "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
                    "dtype": {"type": "string"},
                },
            },
        },
    },
}

_JSON_TYPES = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "null": lambda v: v is None,
}


def check_schema(instance: object, schema: dict, where: str = "attrs") -> list[str]:
    """Check a JSON value against a JSON Schema subset.

    Supports ``type`` (str or list), ``enum``, ``const``, ``required``, ``properties``,
    ``additionalProperties`` (bool or schema), ``items``, ``minimum`` and ``pattern``, which is
    all the cbstore schemas use. Unknown keywords are ignored.

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
        One message per violation; empty when the value is valid.
    """
    problems: list[str] = []
    types = schema.get("type")
    if types is not None:
        names = [types] if isinstance(types, str) else list(types)
        if not any(_JSON_TYPES[t](instance) for t in names):
            return [f"{where}: expected {' or '.join(names)}, got {type(instance).__name__} {instance!r:.80}"]
    if "enum" in schema and instance not in schema["enum"]:
        problems.append(f"{where}: {instance!r} is not one of {schema['enum']}")
    if "const" in schema and instance != schema["const"]:
        problems.append(f"{where}: must be {schema['const']!r}, got {instance!r}")
    if "minimum" in schema and _JSON_TYPES["number"](instance) and instance < schema["minimum"]:
        problems.append(f"{where}: {instance} is below the minimum {schema['minimum']}")
    if "pattern" in schema and isinstance(instance, str) and not re.search(schema["pattern"], instance):
        problems.append(f"{where}: {instance!r} does not match {schema['pattern']!r}")
    if isinstance(instance, dict):
        for key in schema.get("required", []):
            if key not in instance:
                problems.append(f"{where}: missing required key {key!r}")
        properties = schema.get("properties", {})
        extra = schema.get("additionalProperties", True)
        for key, value in instance.items():
            if key in properties:
                problems += check_schema(value, properties[key], f"{where}.{key}")
            elif extra is False:
                problems.append(f"{where}: unexpected key {key!r}")
            elif isinstance(extra, dict):
                problems += check_schema(value, extra, f"{where}.{key}")
    if isinstance(instance, list) and "items" in schema:
        for i, item in enumerate(instance):
            problems += check_schema(item, schema["items"], f"{where}[{i}]")
    return problems


def canonical_json(value: object) -> str:
    """Canonical JSON text (sorted keys, no whitespace) used for hashing."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def config_sha256(config: dict) -> str:
    """SHA-256 (hex) of the canonical JSON of a build configuration."""
    return hashlib.sha256(canonical_json(config).encode("ascii")).hexdigest()


def major(version: str) -> int:
    """Major component of a semver string (``"1.2.3"`` -> 1)."""
    return int(str(version).split(".")[0])

