"""Build configuration: the settings of ``cbstore build``, their defaults and validation.

The defaults live in :class:`BuildConfig` and are documented, key by key, in
``cbstore/build/resources/build.yaml`` (a test keeps the two equal). A configuration file (YAML or
TOML) holds a flat mapping of these keys; command-line options override file values.

Settings split in two:

* *content settings* change what a store holds (window, cohort age, X-ray views, splits, ...).
  They are echoed into the store as ``attrs["cbstore"]["config"]`` and hashed into
  ``config_sha256``, so two stores with the same hash and source hold the same data;
* *runtime settings* (:data:`RUNTIME_KEYS`: memory limit, threads, workers, work directory,
  partitions) only
  change how fast or where a build runs; they are recorded as ``attrs["cbstore"]["runtime"]``.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, StrictFloat, StrictInt, StrictStr,
                      ValidationError, field_validator)

from cbstore.errors import ConfigError, first_invalid_field
from cbstore.format.schema import config_sha256 as schema_config_sha256

#: Keys that change how a build runs but not what it produces.
RUNTIME_KEYS = ("memory_limit", "threads", "workers", "work_dir", "partitions")

_MEMORY_PATTERN = r"(?i)^\s*\d+(\.\d+)?\s*(B|KB|KiB|MB|MiB|GB|GiB|TB|TiB)\s*$"


def _views(value: Any) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or not value:
        raise ValueError("a non-empty list of view positions such as [AP, PA]")
    if not all(isinstance(v, str) and v.strip() for v in value):
        raise ValueError("a list of non-empty strings")
    views = tuple(v.strip().upper() for v in value)
    if len(set(views)) != len(views):
        raise ValueError("a list without repeated views")
    return views


def _path(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, (str, Path)) or not str(value).strip():
        raise ValueError("a path")
    return str(value)


_Path = Annotated[str | None, BeforeValidator(_path)]


class BuildConfig(BaseModel):
    """Settings of ``cbstore build`` (see ``cbstore/build/resources/build.yaml`` for each key).

    Attributes
    ----------
    window_hours : int
        Observation window after ICU admission; the prediction time is ``intime + window_hours``.
    min_age : float
        Minimum age in years at ICU admission.
    views : tuple of str
        X-ray view positions eligible for selection.
    cxr_lookback_hours : float
        How many hours before ``intime`` an X-ray may have been taken (0 = only films taken during
        the ICU window itself).
    image_size : int
        Side of the stored square images, in pixels.
    n_folds : int
        Number of cross-validation folds.
    val_fraction : float
        Fraction of each fold's non-test patients held out for validation.
    seed : int
        Seed of the split assignment.
    variables, phenotypes : str or None
        Paths of the EHR variable and phenotype definition files; ``None`` uses the packaged ones.
    memory_limit : str
        DuckDB memory limit, e.g. ``"2GB"``.
    threads : int
        DuckDB threads.
    workers : int
        Processes decoding X-ray JPEGs.
    work_dir : str or None
        Folder for DuckDB's spill files (a fresh subfolder is created and removed); ``None``
        uses the system temporary folder. The resume state lives beside the output instead.
    partitions : int or None
        Number of partitions the stays are processed in (each a run of whole 256-stay chunks, so
        at most one per chunk); ``None`` chooses the count closest to
        :data:`cbstore.build.pipeline.PARTITION_STAYS` cohort stays per partition.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    window_hours: StrictInt = Field(48, ge=1, le=24 * 30, description="an integer in [1, 720]")
    min_age: StrictFloat = Field(18.0, ge=0, le=120, description="a number in [0, 120]")
    views: Annotated[tuple[str, ...], BeforeValidator(_views)] = ("AP", "PA")
    cxr_lookback_hours: StrictFloat = Field(0.0, ge=0, le=24 * 365, description="a number in [0, 8760]")
    image_size: StrictInt = Field(224, ge=8, le=4096, description="an integer in [8, 4096]")
    n_folds: StrictInt = Field(5, ge=2, le=100, description="an integer in [2, 100]")
    val_fraction: StrictFloat = Field(0.125, ge=0, lt=1, description="a number in [0, 1)")
    seed: StrictInt = Field(0, ge=0, le=2**32 - 1, description="an integer in [0, 4294967295]")
    variables: _Path = None
    phenotypes: _Path = None
    memory_limit: StrictStr = Field("2GB", pattern=_MEMORY_PATTERN, description='a size such as "2GB" or "500MB"')
    threads: StrictInt = Field(2, ge=1, le=1024, description="an integer in [1, 1024]")
    workers: StrictInt = Field(2, ge=0, le=1024, description="an integer in [0, 1024]")
    work_dir: _Path = None
    partitions: StrictInt | None = Field(None, ge=1, le=1_000_000, description="an integer in [1, 1000000]")

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as err:
            bad = first_invalid_field(BuildConfig, err.errors(include_url=False))
            raise ConfigError(f"setting {bad.key!r} = {bad.value!r} is invalid: expected {bad.allowed}") from None

    @field_validator("memory_limit")
    @classmethod
    def _compact_size(cls, value: str) -> str:
        return value.strip().replace(" ", "")

    def replace(self, **changes: Any) -> "BuildConfig":
        """Return a copy with ``changes`` applied (``None`` values are ignored); validated."""
        changes = {k: v for k, v in changes.items() if v is not None}
        _check_keys(changes, "options")
        return BuildConfig(**{**self.model_dump(), **changes})

    def to_dict(self) -> dict[str, Any]:
        """All settings as plain JSON types."""
        out = self.model_dump()
        out["views"] = list(self.views)
        return out

    def content_dict(self) -> dict[str, Any]:
        """The settings that determine a store's content (stored as ``config``)."""
        return {k: v for k, v in self.to_dict().items() if k not in RUNTIME_KEYS}

    def runtime_dict(self) -> dict[str, Any]:
        """The settings that only affect how a build runs (stored as ``runtime``)."""
        return {k: v for k, v in self.to_dict().items() if k in RUNTIME_KEYS}


def config_sha256(config: BuildConfig) -> str:
    """SHA-256 of the canonical JSON of ``config.content_dict()``.

    Canonical JSON as in :func:`cbstore.format.schema.canonical_json`. Runtime settings are excluded, so
    the hash identifies what a store holds, not how fast it was built.
    """
    return schema_config_sha256(config.content_dict())


def load_config(path: str | Path | None = None, **overrides: Any) -> BuildConfig:
    """Read a build configuration file, apply ``overrides`` and validate.

    Parameters
    ----------
    path : str or Path or None
        A ``.yaml``/``.yml`` or ``.toml`` file holding a flat mapping of :class:`BuildConfig`
        keys (a YAML file may also nest them under a top-level ``build:`` key). ``None`` gives
        the defaults.
    **overrides
        Values that replace file values (``None`` means "not given").

    Returns
    -------
    BuildConfig

    Raises
    ------
    ConfigError
        If the file cannot be read or parsed, has an unknown key, or a value is invalid. The
        message names the file, the key and the value.
    """
    values: dict[str, Any] = {}
    where = "options"
    if path is not None:
        path = Path(path)
        where = str(path)
        values = _read_mapping(path)
        _check_keys(values, where)
    values.update({k: v for k, v in overrides.items() if v is not None})
    _check_keys(values, where)
    try:
        return BuildConfig(**values)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None


def _read_mapping(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix in (".yaml", ".yml"):
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        elif suffix == ".toml":
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        else:
            raise ConfigError(f"config file {path}: unknown format {suffix!r}; use .yaml, .yml or .toml")
    except (yaml.YAMLError, tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file {path} could not be parsed: {err}") from None
    if data is None:
        return {}
    if isinstance(data, dict) and set(data) == {"build"} and isinstance(data["build"], dict):
        data = data["build"]
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of settings, not {type(data).__name__}")
    return dict(data)


def _check_keys(values: dict[str, Any], where: str) -> None:
    known = list(BuildConfig.model_fields)
    for key in values:
        if key not in known:
            raise ConfigError(f"{where}: unknown setting {key!r}; valid settings are {', '.join(known)}")


#: Default settings file shipped with the package.
DEFAULTS_FILE = Path(__file__).parent / "resources" / "build.yaml"

__all__ = ["BuildConfig", "ConfigError", "RUNTIME_KEYS", "DEFAULTS_FILE", "config_sha256", "load_config"]
