"""The JSON Schema files shipped in cbstore/format/schemas/: valid, strict, and usable without cbstore."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from importlib import resources
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from jsonschema import Draft202012Validator

from cbstore.errors import SchemaDefinitionError
from cbstore.format import schema
from cbstore.format.schema import check_packaged, check_schema, load_schema, schema_problems
from cbstore.store.reader import open_store
from cbstore.store.writer import write_store
from cbstore.testing import random_content

SCHEMAS = resources.files("cbstore.format") / schema.SCHEMA_FOLDER
NAMES = ("root_attrs", "embedding_attrs", "manifest")

#: Top-level names of this project's packages (an installed or editable cbstore).
PROJECT = {"cbstore", "encoders", "fusion", "cli"}

#: How another project checks a store: json and jsonschema only. Arguments: schema folder, store.
CHECK_WITHOUT_CBSTORE = """
import importlib.util, json, pathlib, sys
from jsonschema import Draft202012Validator

assert importlib.util.find_spec("cbstore") is None, "cbstore is importable"
schemas, store = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])

def problems(schema_file, value):
    schema = json.loads((schemas / schema_file).read_text())
    Draft202012Validator.check_schema(schema)
    return [f"{schema_file} {e.json_path}: {e.message}" for e in Draft202012Validator(schema).iter_errors(value)]

found = problems("root_attrs.schema.json", json.loads((store / "zarr.json").read_text())["attributes"]["cbstore"])
found += problems("manifest.schema.json", json.loads((store / "cbstore_manifest.json").read_text()))
groups = sorted(store.glob("embeddings/*/*/zarr.json"))
for meta in groups:
    found += problems("embedding_attrs.schema.json", json.loads(meta.read_text())["attributes"])
print(f"{len(groups)} embedding group(s)", *found, sep="\\n")
"""


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    content = random_content(n_stays=24, n_folds=2, window=6, n_features=4, image_size=8, seed=3)
    path = write_store(tmp_path_factory.mktemp("schema") / "s.zarr", content, chunk_stays=8)
    s = open_store(path)
    writer = s.create_embedding("cxr", "enc", 3, attrs={"weights": "random-init", "preprocessing": "none"})
    writer.write(0, np.ones((24, 3)), s.cxr_present)
    writer.finish()
    return path


@pytest.fixture(scope="module")
def site_without_cbstore(tmp_path_factory):
    """A folder with every installed distribution except this project's (no .pth files)."""
    site = Path(jsonschema.__file__).resolve().parent.parent
    folder = tmp_path_factory.mktemp("site")
    for entry in site.iterdir():
        top = re.split(r"[-.]", entry.name)[0]
        if entry.suffix != ".pth" and top not in PROJECT and not entry.name.startswith("__editable__"):
            (folder / entry.name).symlink_to(entry)
    return folder


def _check_without_cbstore(site: Path, store: Path, cwd: Path) -> list[str]:
    # -I: no PYTHONPATH, no user site, no script folder; -S: no site-packages and no .pth (an
    # editable install of cbstore is a .pth file): the stdlib and `site` alone are importable.
    code = f"import sys; sys.path.append({str(site)!r})\n" + CHECK_WITHOUT_CBSTORE
    out = subprocess.run([sys.executable, "-I", "-S", "-c", code, str(SCHEMAS), str(store)],
                         capture_output=True, text=True, timeout=120, cwd=cwd)
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


@pytest.mark.parametrize("name", NAMES)
def test_shipped_schema_is_draft_2020_12_with_an_id(name):
    doc = json.loads((SCHEMAS / f"{name}.schema.json").read_text(encoding="utf-8"))
    assert doc["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert doc["$id"] == f"urn:cbstore:format:1:{name.replace('_', '-')}"
    Draft202012Validator.check_schema(doc)
    assert schema_problems(doc) == []
    assert load_schema(name) == doc


@pytest.mark.parametrize("name", NAMES)
def test_the_shipped_schema_is_read_unchecked_at_run_time_and_checks_like_check_schema(name, monkeypatch):
    doc = json.loads((SCHEMAS / f"{name}.schema.json").read_text(encoding="utf-8"))
    assert schema.packaged_schema(name) == doc
    bad = {"format_version": 7, "n_stays": -1}
    assert check_packaged(bad, name, "attrs") == check_schema(bad, doc, "attrs") != []
    # at run time the metaschema is not consulted: the test above is what checks the files
    monkeypatch.setattr(schema, "schema_problems", lambda s: pytest.fail("metaschema check at run time"))
    assert load_schema(name, check=False) == doc


def test_schemas_agree_with_the_constants():
    assert re.fullmatch(schema.ROOT_ATTRS_SCHEMA["properties"]["format_version"]["pattern"], schema.FORMAT_VERSION)
    assert tuple(schema.EMBEDDING_ATTRS_SCHEMA["properties"]["modality"]["enum"]) == schema.MODALITIES


@pytest.mark.parametrize("bad, message", [
    ({"type": "object", "properties": {"n": {"type": "integer", "minimun": 0}}},
     r"schema\.properties\.n: .*'minimun' was unexpected"),
    ({"items": {"patern": "^a$"}}, r"schema\.items: .*'patern' was unexpected"),
    ({"type": "integr"}, r"schema\.type: 'integr' is not valid"),
    ({"minimum": "0"}, r"schema\.minimum: '0' is not of type 'number'"),
])
def test_a_bad_schema_is_an_error_not_ignored(bad, message):
    with pytest.raises(SchemaDefinitionError, match=message):
        check_schema(5, bad)


def test_unknown_schema_file_is_an_error():
    with pytest.raises(SchemaDefinitionError, match=r"cbstore/format/schemas/nope\.schema\.json"):
        load_schema("nope")


def test_long_values_are_cut_but_the_problem_is_kept():
    [problem] = check_schema(list(range(1000)), {"type": "object"})
    assert problem.startswith("attrs: [0, 1, 2") and problem.endswith("... is not of type 'object'")
    assert len(problem) < 120


def test_store_attributes_check_with_plain_jsonschema_without_cbstore(store, site_without_cbstore, tmp_path):
    assert _check_without_cbstore(site_without_cbstore, store, tmp_path) == ["1 embedding group(s)"]
    broken = tmp_path / "broken.zarr"
    shutil.copytree(store, broken)
    meta = json.loads((broken / "zarr.json").read_text())
    meta["attributes"]["cbstore"]["n_stays"] = -1
    (broken / "zarr.json").write_text(json.dumps(meta))
    group = broken / "embeddings" / "cxr" / "enc" / "zarr.json"
    meta = json.loads(group.read_text())
    meta["attributes"]["modality"] = "ecg"
    group.write_text(json.dumps(meta))
    assert _check_without_cbstore(site_without_cbstore, broken, tmp_path) == [
        "1 embedding group(s)",
        "root_attrs.schema.json $.n_stays: -1 is less than the minimum of 0",
        "embedding_attrs.schema.json $.modality: 'ecg' is not one of ['cxr', 'ehr']",
    ]
