"""Resume state of ``cbstore build``: the folder ``<out>.build/`` beside the output store.

Layout (see store_layout.md, "How the build bounds memory")::

    <out>.build/
      state.json          what the state belongs to (the resume key) and when it was started
      events/             the cohort's EHR events, Parquet, one folder per bucket (complete once renamed
                          from events.partial/)
      partitions/<p>.json one per finished partition: its rows and X-ray outcome
      partial.zarr/       the unfinished store; renamed to <out> when complete

The resume key holds the cbstore version, the content config hash, the SHA-256 of the variables
and phenotype files, the partition count and chunk size, and the size and modification time of
every source table read (the MIMIC-IV tables and the MIMIC-CXR-JPG metadata; not the film files,
which are too many to stat). A state whose key differs is removed and the build starts over,
with a warning that says what changed.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from cbstore.build.sources import CXR_METADATA, MimicCxrSource, MimicIVSource, find_cxr_file
from cbstore.format.schema import now

log = logging.getLogger(__name__)

STATE_FILE = "state.json"


def state_folder(out: Path) -> Path:
    """The resume state folder of the store ``out``: ``<out>.build`` beside it."""
    return out.with_name(f"{out.name}.build")


def source_files(iv: MimicIVSource, cx: MimicCxrSource) -> dict[str, dict]:
    """Path, size and modification time (ns) of every source table the build reads."""
    paths = {f"mimic-iv/{name}": table.path for name, table in sorted(iv.tables.items())}
    paths["mimic-cxr-jpg/metadata"] = find_cxr_file(cx.root, CXR_METADATA)
    out = {}
    for name, path in paths.items():
        st = Path(path).stat()
        out[name] = {"path": str(path), "size": int(st.st_size), "mtime_ns": int(st.st_mtime_ns)}
    return out


def why_different(old: dict, new: dict) -> str | None:
    """Why the resume key ``old`` does not match ``new`` (None if it does)."""
    if old == new:
        return None
    old_files, new_files = old.get("sources", {}), new.get("sources", {})
    for name in sorted(old_files.keys() | new_files.keys()):
        a, b = old_files.get(name), new_files.get(name)
        if a != b:
            path = (b or a)["path"]
            if a is None or b is None:
                return f"the source table {name} ({path}) {'appeared' if a is None else 'disappeared'}"
            if a["path"] != b["path"]:
                return f"the source table {name} is now {b['path']} (was {a['path']})"
            return f"the source file {path} changed (size or modification time)"
    labels = {"cbstore_version": "the cbstore version", "config_sha256": "the build settings (config hash)",
              "variables_sha256": "the variables file", "phenotypes_sha256": "the phenotype definitions",
              "partitions": "the partition count", "chunk_stays": "the chunk size"}
    for key, label in labels.items():
        if old.get(key) != new.get(key):
            return f"{label} changed ({old.get(key)} -> {new.get(key)})"
    return "the resume key changed"


class BuildState:
    """The resume state of one build, opened (or started over) for a resume key.

    Parameters
    ----------
    folder : Path
        The state folder (:func:`state_folder`).
    key : dict
        The resume key (JSON types).
    restart : bool
        Start over even if the key matches (``--overwrite``).
    """

    def __init__(self, folder: Path, key: dict, *, restart: bool = False) -> None:
        self.folder = Path(folder)
        self.key = json.loads(json.dumps(key))
        reason = self._reason_to_start_over(restart)
        if reason is not None:
            log.warning("starting the build over (removing %s): %s", self.folder, reason)
            shutil.rmtree(self.folder)
        self.partitions_dir.mkdir(parents=True, exist_ok=True)
        if not (self.folder / STATE_FILE).is_file():
            _write_json(self.folder / STATE_FILE, {"key": self.key, "started_at": now()})

    def _reason_to_start_over(self, restart: bool) -> str | None:
        if not self.folder.exists():
            return None
        if restart:
            return "--overwrite was given"
        try:
            old = json.loads((self.folder / STATE_FILE).read_text())["key"]
        except (OSError, ValueError, KeyError, TypeError):
            return f"its {STATE_FILE} is missing or unreadable"
        return why_different(old, self.key)

    @property
    def events_dir(self) -> Path:
        """The complete events folder (exists only once the extraction finished)."""
        return self.folder / "events"

    @property
    def partitions_dir(self) -> Path:
        """Folder of the finished partitions' records."""
        return self.folder / "partitions"

    @property
    def partial_store(self) -> Path:
        """Folder of the unfinished store."""
        return self.folder / "partial.zarr"

    def write_events(self, write: Callable[[Path], None]) -> None:
        """Run ``write(folder)`` into a fresh temporary folder and rename it to :attr:`events_dir`."""
        partial = self.folder / "events.partial"
        shutil.rmtree(partial, ignore_errors=True)
        write(partial)
        partial.mkdir(exist_ok=True)  # no event at all writes no folder
        os.rename(partial, self.events_dir)

    def _record_path(self, partition: int) -> Path:
        return self.partitions_dir / f"{partition:06d}.json"

    def partition_done(self, partition: int) -> bool:
        """Whether ``partition`` was finished by this or an earlier run."""
        return self._record_path(partition).is_file()

    def save_partition(self, partition: int, record: dict) -> None:
        """Mark ``partition`` finished, with its ``record`` (JSON types); written atomically."""
        _write_json(self._record_path(partition), record)

    def load_partition(self, partition: int) -> dict:
        """The record of a finished partition."""
        return json.loads(self._record_path(partition).read_text())

    def remove(self) -> None:
        """Remove the whole state folder (after the store was moved into place)."""
        shutil.rmtree(self.folder, ignore_errors=True)


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, sort_keys=True) + "\n")
    os.replace(tmp, path)

