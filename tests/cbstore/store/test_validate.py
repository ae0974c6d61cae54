"""`validate_store` catches corrupted stores; `cbstore validate` / `cbstore info` print the right text."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from cbstore.format.content import TEST, TRAIN
from cbstore.format.schema import FORMAT_VERSION, MANIFEST_NAME, ROOT_ATTRS_SCHEMA, check_schema
from cbstore.store.info import store_summary
from cbstore.store.reader import open_store
from cbstore.store.validate import validate_store
from cbstore.store.writer import write_store
from cbstore.testing import random_content
from cli.store_cmds import info, validate

pytestmark = pytest.mark.filterwarnings("error")

ATTRS = {"weights": "random-init", "preprocessing": "none"}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    content = random_content(n_stays=40, n_folds=3, window=8, n_features=5, image_size=16, seed=11)
    return write_store(tmp_path_factory.mktemp("val") / "base.zarr", content, chunk_stays=16)


@pytest.fixture
def copy(base, tmp_path):
    target = tmp_path / "c.zarr"
    shutil.copytree(base, target)
    return target


def _rw(path):
    return zarr.open_group(str(path), mode="r+", use_consolidated=False)


def _edit_root_attrs(path, edit):
    meta_path = path / "zarr.json"
    meta = json.loads(meta_path.read_text())
    edit(meta["attributes"]["cbstore"])
    meta_path.write_text(json.dumps(meta))


def test_valid_store_has_no_problems(base):
    assert validate_store(base) == []


def _leak_patient(path):
    g = _rw(path)
    subject = g["stays/subject_id"][:]
    part = g["splits/part"][:]
    # a patient with two stays: put one in train and the other in test of fold 0
    values, counts = np.unique(subject, return_counts=True)
    rows = np.flatnonzero(subject == values[counts > 1][0])
    part[rows[0], 0], part[rows[1], 0] = TRAIN, TEST
    g["splits/part"][:] = part


def _present_without_id(path):
    g = _rw(path)
    absent = np.flatnonzero(~g["cxr/present"][:])[0]
    g["cxr/present"][absent] = True


def _film_after_prediction(path):
    g = _rw(path)
    row = np.flatnonzero(g["cxr/present"][:])[0]
    g["cxr/hours_before_prediction"][row] = -2.5


def _bad_label(path):
    _rw(path)["labels/mortality"][3] = 3


def _stay_coordinate(path):
    g = _rw(path)
    stay = g["labels/stay"][:]
    stay[5] += 1
    g["labels/stay"][:] = stay


def _no_manifest(path):
    (path / MANIFEST_NAME).unlink()


def _manifest_shape(path):
    m = json.loads((path / MANIFEST_NAME).read_text())
    m["arrays"]["ehr/values"]["shape"][0] = 41
    (path / MANIFEST_NAME).write_text(json.dumps(m))


def _observed_mismatch(path):
    g = _rw(path)
    obs = g["ehr/observed"][:]
    obs[2, 0, :] = ~obs[2, 0, :]
    g["ehr/observed"][:] = obs


def _stats_not_training(path):
    g = _rw(path)
    med = g["stats/median"][:]
    med[1, 2] += 10
    g["stats/median"][:] = med


def _attrs_schema(path):
    _edit_root_attrs(path, lambda a: a.pop("cohort_flow"))


def _config_hash(path):
    _edit_root_attrs(path, lambda a: a["config"].__setitem__("seed", 99))


def _group_encoding(path):
    g = _rw(path)
    attrs = dict(g["labels"].attrs)
    attrs.pop("encoding-type")
    meta_path = path / "labels" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["attributes"] = attrs
    meta_path.write_text(json.dumps(meta))


def _wrong_dtype(path):
    g = _rw(path)
    data = g["labels/mortality"][:]
    del g["labels/mortality"]
    arr = g["labels"].create_array("mortality", shape=data.shape, dtype="int32", dimension_names=("stay",))
    arr[:] = data


def _image_without_film(path):
    g = _rw(path)
    absent = np.flatnonzero(~g["cxr/present"][:])[0]
    g["cxr/images"][absent] = np.full((16, 16), 9, dtype=np.uint8)


def _los_class(path):
    g = _rw(path)
    lc = g["labels/los_class"][:]
    lc[0] = (lc[0] + 1) % 7
    g["labels/los_class"][:] = lc


def _bad_split_code(path):
    _rw(path)["splits/part"][0, 1] = 7


def _unsorted_stays(path):
    g = _rw(path)
    for group in ("stays", "labels", "ehr", "cxr", "splits"):
        stay = g[f"{group}/stay"][:]
        stay[[0, 1]] = stay[[1, 0]]
        g[f"{group}/stay"][:] = stay


def _deleted_group(path):
    shutil.rmtree(path / "stats")


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (_leak_patient, r"splits: fold 0 puts patients \(subject_id\) in more than one part"),
        (_present_without_id, r"cxr/present disagrees with cxr/dicom_id"),
        (_film_after_prediction, r"hours_before_prediction is negative or missing .*leaks the future"),
        (_bad_label, r"labels/mortality: values outside 0/1 for stays \[\d+\]"),
        (_stay_coordinate, r"labels/stay differs from stays/stay"),
        (_no_manifest, r"no cbstore_manifest\.json: the build did not finish"),
        (_manifest_shape, r"ehr/values: shape \[40, 8, 5\] differs from the manifest's \[41, 8, 5\]"),
        (_observed_mismatch, r"ehr/observed is not exactly the non-NaN entries"),
        (_stats_not_training, r"stats/median of fold 1 is not the statistic of that fold's training stays"),
        (_attrs_schema, r"attrs\.cbstore: 'cohort_flow' is a required property"),
        (_config_hash, r"config_sha256 is not the SHA-256 of attrs\.config"),
        (_group_encoding, r"group labels/ has no attr 'encoding-type'"),
        (_wrong_dtype, r"labels/mortality: dtype int32, expected int8"),
        (_image_without_film, r"cxr/images is not zero for stays without a film"),
        (_los_class, r"labels/los_class does not match labels/los"),
        (_bad_split_code, r"splits/part has codes \[7\]"),
        (_unsorted_stays, r"stays/stay is not sorted ascending and unique"),
        (_deleted_group, r"group stats/ is missing"),
    ],
)
def test_corruption_is_reported(copy, corrupt, message):
    corrupt(copy)
    problems = validate_store(copy)
    assert any(re.search(message, p) for p in problems), problems


def test_embedding_flags_checked(copy):
    s = open_store(copy)
    w = s.create_embedding("cxr", "enc", 3, attrs=ATTRS, region_stays=16)
    for r in range(w.n_regions):
        sl = w.region(r)
        w.write(r, np.ones((sl.stop - sl.start, 3)), s.cxr_present[sl])
    assert validate_store(copy) == []  # an unfinished pass is not a problem (readers ignore it)
    w.finish()
    assert validate_store(copy) == []
    g = _rw(copy)
    g["embeddings/cxr/enc/done"][1] = False
    row = int(np.flatnonzero(s.cxr_present)[0])
    g["embeddings/cxr/enc/values"][row] = np.nan
    problems = validate_store(copy)
    assert any("marked complete but 1 region flag(s) in done are false" in p for p in problems), problems
    assert any(f"NaN/inf for present stays [{s.stay_ids[row]}]" in p for p in problems), problems


def test_stale_consolidated_metadata(copy):
    s = open_store(copy)
    w = s.create_embedding("ehr", "enc", 2, attrs=ATTRS)
    w.write(0, np.zeros((40, 2)), np.ones(40, bool))
    # mark complete behind the writer's back, without re-consolidating
    _rw(copy)["embeddings/ehr/enc"].update_attributes({"complete": True})
    problems = validate_store(copy)
    assert any("consolidated metadata says otherwise (stale)" in p for p in problems), problems


def test_missing_path_and_plain_folder(tmp_path):
    assert validate_store(tmp_path / "nope") == [f"no store at {tmp_path / 'nope'} (not a folder)"]
    assert "not a Zarr v3 group" in validate_store(tmp_path)[0]


def test_schema_checker():
    assert check_schema({"a": 1}, {"type": "object", "required": ["a", "b"]}) == ["attrs: 'b' is a required property"]
    assert check_schema(True, {"type": "integer"}) == ["attrs: True is not of type 'integer'"]
    assert check_schema(None, {"type": ["string", "null"]}) == []
    assert check_schema([1, -1], {"type": "array", "items": {"type": "integer", "minimum": 0}}) == [
        "attrs[1]: -1 is less than the minimum of 0"]
    assert check_schema({"x": "ab"}, {"additionalProperties": {"pattern": "^a$"}}) == [
        "attrs.x: 'ab' does not match '^a$'"]
    assert check_schema("c", {"enum": ["a", "b"]}) == ["attrs: 'c' is not one of ['a', 'b']"]
    bad = {"format_version": "one", "n_stays": -1}
    problems = check_schema(bad, ROOT_ATTRS_SCHEMA, "attrs.cbstore")
    assert "attrs.cbstore.format_version: 'one' does not match '^\\\\d+\\\\.\\\\d+\\\\.\\\\d+$'" in problems
    assert "attrs.cbstore.n_stays: -1 is less than the minimum of 0" in problems


def test_cli_validate(base, copy):
    out = CliRunner().invoke(validate, [str(base)])
    assert out.exit_code == 0
    assert out.output.strip() == f"OK: {base} is a valid cbstore store (format {FORMAT_VERSION})"
    _bad_label(copy)
    out = CliRunner().invoke(validate, [str(copy)])
    assert out.exit_code == 1
    assert out.output.startswith(f"INVALID: {copy} has 1 problem(s):")
    assert "labels/mortality: values outside 0/1" in out.output


def test_info_summary(copy):
    s = open_store(copy)
    w = s.create_embedding("cxr", "densenet-x", 3, attrs=ATTRS)
    w.write(0, np.zeros((40, 3)), np.ones(40, bool))
    w.finish()
    text = store_summary(open_store(copy))
    present = int(s.cxr_present.sum())
    patients = len(np.unique(s.stays["subject_id"]))
    assert f"Stays: 40    Patients: {patients}    Window: 8 h    Folds: 3" in text
    assert "Cohort flow:" in text and "min_length" in text
    assert f"CXR: {present}/40 ({100 * present / 40:.1f}%) stays with a film" in text
    assert f"mortality       {int(s.labels('mortality').sum())}/40" in text
    assert "Shock" in text and "LoS classes: 2-3d" in text
    assert "cxr/densenet-x: dim 3, fold-independent, weights random-init" in text
    assert "absent by reason:" in text and "films skipped during build: decode_error" in text
    assert "Size on disk:" in text and " MB" in text
    out = CliRunner().invoke(info, [str(copy)])
    assert out.exit_code == 0 and out.output.startswith(f"cbstore store {copy}")
    out = CliRunner().invoke(info, [str(copy) + "-missing"])
    assert out.exit_code == 1 and "no store at" in out.output
