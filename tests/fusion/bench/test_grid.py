"""``cbstore bench``: experiment files, grid expansion, Dask vs serial, resume, failed cells."""

import json

import pandas as pd
import pytest
import yaml
from click.testing import CliRunner

from cli.bench_cmd import bench
from fusion.bench import ExperimentError, expand_grid, load_experiment, run_grid, status_lines
from fusion.bench.experiment import parse_experiment, shipped_experiments
from fusion.bench.grid import GridError, failed_path
from fusion.config import RunConfig
from fusion.methods.lgbm import LGBMEarly, LGBMEHR
from fusion.registry import FUSION_METHODS, register
from fusion.runs import COMPLETE_MARKER, run_fusion
from support import CXR_ID, EHR_ID, make_fusion_store

FAST_LGBM = {"n_estimators": 10, "min_child_samples": 2, "num_leaves": 4}
FAST_NN = {"max_epochs": 2, "hidden": 8, "patience": 1}


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("grid") / "store.zarr"
    make_fusion_store(path, n_stays=80)
    return str(path)


def _doc(**changes) -> dict:
    doc = {"methods": [{"name": "lgbm-early", "hyperparameters": FAST_LGBM}],
           "tasks": ["mortality"], "folds": [0], "seeds": [0], "n_boot": 10,
           "encoders": {"ehr": EHR_ID, "cxr": CXR_ID}}
    doc.update(changes)
    return doc


def _write(tmp_path, doc, name="exp.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc))
    return path


def _grid(store_path, out, doc, name="exp"):
    return expand_grid(parse_experiment(doc, name), store=store_path, out=out, name=name)


def _bench(path, store_path, out, *args):
    return CliRunner().invoke(bench, [str(path), "--store", store_path, "--out", str(out), *args],
                              catch_exceptions=False)


@pytest.fixture
def registered():
    """Register test methods for one test, and remove them afterwards."""
    names = []

    def add(name, cls):
        register(name)(cls)
        names.append(name)
        return cls

    yield add
    for name in names:
        FUSION_METHODS.pop(name, None)


# ----- grid expansion -----------------------------------------------------------------------------
def test_product_and_run_ids_match_cbstore_fuse(store_path, tmp_path):
    doc = _doc(seeds=[0, 1], cohorts=["full", "matched"],
               missing=[{"rates": [0.0, 0.5], "at": ["test", "train"]},
                        {"rates": [0.0, 0.3], "at": ["train", "val"], "cohorts": ["matched"]}])
    grid = _grid(store_path, tmp_path, doc)
    # full: rates 0, 0.5; matched: 0, 0.5, 0.3 (rate 0 of the second entry is the same cell)
    assert len(grid.cells) == 2 * (2 + 3) and not grid.excluded
    assert len({c.run_id for c in grid.cells}) == len(grid.cells)
    masked = [c for c in grid.cells if c.rate == 0.5]
    assert {c.at for c in masked} == {("train", "test")}, "parts in canonical order"

    # a cell's run id is the id `cbstore fuse` gives the same settings: the grid reuses that run
    cell = next(c for c in grid.cells if c.cohort == "matched" and c.rate == 0.3 and c.seed == 1)
    result = run_fusion(RunConfig(store=store_path, method="lgbm-early", seed=1, cohort="matched",
                                  cxr_missing_rate=0.3, missing_at=("val", "train"),
                                  ehr_encoder=EHR_ID, hyperparameters=FAST_LGBM, n_boot=10,
                                  out=str(tmp_path), progress=False))
    assert result.run_id == cell.run_id and grid.is_complete(cell)
    assert len(grid.pending()) == len(grid.cells) - 1


def test_methods_all_picks_up_a_registered_method(store_path, tmp_path, registered):
    registered("grid-test-extra", type("GridTestExtra", (LGBMEHR,), {}))
    grid = _grid(store_path, tmp_path, _doc(methods="all"))
    methods = {c.method for c in grid.cells}
    assert "grid-test-extra" in methods and {"lgbm-early", "latefusion", "lstm"} <= methods
    # `all` next to a named entry: the named entry keeps its own hyperparameters, once
    grid = _grid(store_path, tmp_path, _doc(methods=["all", {"name": "lgbm-early",
                                                             "hyperparameters": FAST_LGBM}]))
    early = [c for c in grid.cells if c.method == "lgbm-early"]
    assert len(early) == 1 and early[0].options["hyperparameters"] == FAST_LGBM


def test_cells_a_method_cannot_run_are_listed_with_the_reason(store_path, tmp_path):
    doc = _doc(methods=["lgbm-cxr", "lgbm-ehr"],
               missing=[{"rates": [1.0], "at": ["train", "val"]}, {"rates": [1.0], "at": ["test"]}])
    grid = _grid(store_path, tmp_path, doc)
    (cell, reason), = grid.excluded
    assert cell.method == "lgbm-cxr" and cell.at == ("train", "val")
    assert "X-ray-only" in reason
    assert {(c.method, c.at) for c in grid.cells} == {
        ("lgbm-cxr", ("test",)), ("lgbm-ehr", ("train", "val")), ("lgbm-ehr", ("test",))}

    raw = _grid(store_path, tmp_path, _doc(methods=["lgbm-early", "latefusion"], features="raw"))
    assert [c.method for c in raw.cells] == ["latefusion"]
    assert "does not support raw features" in raw.excluded[0][1]
    lines = "\n".join(status_lines(raw, 1))
    assert "1 cells (1 excluded)" in lines and "lgbm-early: does not support raw" in lines


def test_config_hyperparameters_and_file_overrides(store_path, tmp_path):
    (tmp_path / "preset.yaml").write_text(yaml.safe_dump(
        {"method": "lgbm-early", "hyperparameters": {"num_leaves": 8, "n_estimators": 12}}))
    path = _write(tmp_path, _doc(methods=[{"name": "lgbm-early", "config": "preset.yaml",
                                           "hyperparameters": {"n_estimators": 5}}]))
    exp, source = load_experiment(str(path))
    grid = expand_grid(exp, store=store_path, out=tmp_path / "runs", name="exp", source=source)
    assert grid.cells[0].options["hyperparameters"] == {"num_leaves": 8, "n_estimators": 5}

    path = _write(tmp_path, _doc(methods=[{"name": "lgbm-ehr", "config": "preset.yaml"}]))
    exp, source = load_experiment(str(path))
    with pytest.raises(ExperimentError, match=r"key methods\[0\]\.config: got 'preset.yaml'.*not 'lgbm-early'"):
        expand_grid(exp, store=store_path, out=tmp_path / "runs", name="exp", source=source)


def test_named_preset_gives_the_run_id_of_cbstore_fuse_preset(store_path, tmp_path, monkeypatch):
    from cbstore.store.reader import open_store
    from fusion.config import make_config
    import fusion.presets as presets
    from fusion.runs import resolve, run_id_of

    folder = tmp_path / "presets"
    folder.mkdir()
    (folder / "lgbm-early.yaml").write_text(yaml.safe_dump({"carebench": {
        "description": "test", "tuned_on_test": True, "all": {"num_leaves": 6},
        "tasks": {"mortality": {"matched": {"num_leaves": 9}}}}}))
    monkeypatch.setattr(presets, "PRESET_DIR", folder)
    path = _write(tmp_path, _doc(methods=[{"name": "lgbm-early", "preset": "carebench",
                                           "hyperparameters": {"n_estimators": 5}}],
                                 cohorts=["full", "matched"]))
    exp, source = load_experiment(str(path))
    grid = expand_grid(exp, store=store_path, out=tmp_path / "runs", name="exp", source=source)
    store = open_store(store_path)
    for cell in grid.cells:
        assert cell.options["preset"] == "carebench"
        cfg = make_config(options={k: v for k, v in cell.options.items() if k != "hyperparameters"},
                          set_pairs=["n_estimators=5"])
        resolved = resolve(cfg, store)
        assert run_id_of(resolved) == cell.run_id
        assert resolved["hyperparameters"]["num_leaves"] == (9 if cell.cohort == "matched" else 6)
        assert resolved["preset"] == {"name": "carebench", "tuned_on_test": True}
    path = _write(tmp_path, _doc(methods=[{"name": "lgbm-early", "preset": "tuned"}]))
    exp, source = load_experiment(str(path))
    with pytest.raises(ExperimentError, match=r"key methods\[0\]\.preset: got 'tuned'.*no preset 'tuned'"):
        expand_grid(exp, store=store_path, out=tmp_path / "runs", name="exp", source=source)


# ----- bad experiment files -------------------------------------------------------------------------
@pytest.mark.parametrize("change, key, value, allowed", [
    ({"colour": "red"}, "colour", "'red'", "one of the keys description, store, methods"),
    ({"tasks": ["mortalty"]}, "tasks[0]", "'mortalty'", "'mortality', 'mortality_hosp'"),
    ({"methods": 3}, "methods", "3", "'all' or a list of method names"),
    ({"methods": [{"name": "lgbm-early", "lr": 1}]}, "methods[0].lr", "1",
     "one of the keys name, preset, config, hyperparameters"),
    ({"seeds": [0, 0]}, "seeds", "[0, 0]", "seed 0 is listed twice"),
    ({"folds": [-1]}, "folds", "[-1]", "must be >= 0"),
    ({"missing": [{"rates": [0.5, 1.2]}]}, "missing[0].rates", "[0.5, 1.2]", "in [0, 1]"),
    ({"missing": [{"rates": [0.5], "at": ["tset"]}]}, "missing[0].at[0]", "'tset'", "'train'"),
    ({"features": "raw-ish"}, "features", "'raw-ish'", "one of raw, cached"),
    ({"n_boot": -1}, "n_boot", "-1", "an integer >= 0"),
    ({"methods": ["late-fusion"]}, "methods[0].name", "'late-fusion'", "a registered method"),
    ({"methods": [{"name": "lgbm-early", "hyperparameters": {"n_trees": 3}}]},
     "methods[0].hyperparameters", "{'n_trees': 3}", "valid hyperparameters"),
    ({"folds": [0, 7]}, "folds[1]", "7", "folds of store"),
])
def test_bad_experiment_file_names_key_value_and_allowed(store_path, tmp_path, change, key, value,
                                                         allowed):
    path = _write(tmp_path, _doc(**change))
    result = _bench(path, store_path, tmp_path / "runs", "--dry-run")
    assert result.exit_code != 0
    assert f"{path}: key {key}: got {value}; allowed: " in result.output, result.output
    assert allowed in result.output, result.output
    assert not (tmp_path / "runs").exists()


def test_unknown_experiment_name_and_missing_store(store_path, tmp_path):
    result = _bench("carebenhc", store_path, tmp_path)
    assert result.exit_code != 0 and "carebench, demo" in result.output
    result = CliRunner().invoke(bench, [str(_write(tmp_path, _doc())), "--out", str(tmp_path)])
    assert result.exit_code != 0 and "pass --store" in result.output
    # an embedding the store cannot resolve names the cell
    with pytest.raises(GridError, match=r"cell lgbm-early mortality full f0 s0: .*several ehr"):
        _grid(store_path, tmp_path, _doc(encoders={}))


def test_shipped_experiments_are_valid():
    shipped = {"carebench", "demo", "missing_part1", "missing_part2", "missing_part2_cpu"}
    assert shipped <= set(shipped_experiments())
    for name in shipped_experiments():
        load_experiment(name)  # every shipped file fits the model
    care, _ = load_experiment("carebench")
    assert care.all_methods() and care.tasks == ["mortality", "phenotype", "los"]
    assert care.cohorts == ["full", "matched"] and care.folds == [0, 1, 2, 3, 4]
    assert care.seeds == [42, 123, 1234]
    sweeps = {tuple(m.at): m.rates for m in care.missing if m.cohorts == ["matched"]}
    assert sweeps[("train", "val")] == sweeps[("train", "val", "test")] == [
        pytest.approx(r / 10) for r in range(1, 10)]
    demo, _ = load_experiment("demo")
    assert [m.name for m in demo.methods] == ["lgbm-early", "latefusion"]
    part1, _ = load_experiment("missing_part1")
    assert [m.name for m in part1.methods] == ["lgbm-early", "latefusion", "medfuse", "drfuse",
                                               "m3care", "smil"]
    assert part1.missing[0].rates == [0.0, 0.5, 0.9] and part1.missing[0].at == ["train", "test"]


# ----- running: Dask vs serial, resume, failures --------------------------------------------------------
def _predictions(grid):
    return {c.run_id: pd.read_parquet(grid.out / c.run_id / "predictions.parquet")
            for c in grid.cells}


def test_two_worker_grid_matches_serial_bit_for_bit(store_path, tmp_path):
    doc = _doc(methods=[{"name": "lgbm-early", "hyperparameters": FAST_LGBM},
                        {"name": "latefusion", "hyperparameters": FAST_NN}],
               missing=[{"rates": [0.0, 0.5], "at": ["train", "test"]}])
    serial = _grid(store_path, tmp_path / "serial", doc)
    outcome = run_grid(serial, workers=0, echo=lambda line: None)
    assert outcome.ok and outcome.ran == 4
    lines = []
    dask = _grid(store_path, tmp_path / "dask", doc)
    outcome = run_grid(dask, workers=2, echo=lines.append)
    assert outcome.ok and outcome.ran == 4, lines
    assert "2 worker process(es), 1 thread each" in lines[0]
    assert "[done 4 / failed 0 / total 4, ETA" in lines[-1]
    a, b = _predictions(serial), _predictions(dask)
    assert a.keys() == b.keys()
    for run_id in a:
        pd.testing.assert_frame_equal(a[run_id], b[run_id], check_exact=True)


def test_rerun_completes_only_the_missing_cells(store_path, tmp_path):
    out = tmp_path / "runs"
    first = _write(tmp_path, _doc(seeds=[0]), "first.yaml")
    assert _bench(first, store_path, out, "--workers", "0").exit_code == 0
    (done,) = _grid(store_path, out, _doc(seeds=[0])).cells
    stamp = (out / done.run_id / COMPLETE_MARKER).stat().st_mtime_ns

    # the grid grows (a seed, a method); a cell was killed before it completed
    doc = _doc(seeds=[0, 1, 2], methods=[{"name": "lgbm-early", "hyperparameters": FAST_LGBM},
                                         {"name": "lgbm-ehr", "hyperparameters": FAST_LGBM}])
    grid = _grid(store_path, out, doc)
    killed = next(c for c in grid.cells if c.method == "lgbm-ehr" and c.seed == 0)
    run_grid(_grid(store_path, out, _doc(seeds=[0], methods=doc["methods"][1:])), workers=0,
             echo=print)
    (out / killed.run_id / COMPLETE_MARKER).unlink()

    dry = _bench(_write(tmp_path, doc), store_path, out, "--dry-run", "--workers", "2")
    assert "6 cells (0 excluded), 1 complete, 0 failed, 5 to run" in dry.output, dry.output
    assert "lgbm-early: 2 to run, " in dry.output and " s per cell from 1 finished" in dry.output
    assert "lgbm-ehr: 3 to run, no finished cell" in dry.output
    result = _bench(_write(tmp_path, doc), store_path, out, "--workers", "0")
    assert result.exit_code == 0, result.output
    assert "6 of 6 cells complete, 0 failed, 5 run now" in result.output
    assert (out / done.run_id / COMPLETE_MARKER).stat().st_mtime_ns == stamp, "complete cell rerun"
    manifest = json.loads((out / "exp.grid.json").read_text())
    assert sorted(c["run_id"] for c in manifest["cells"]) == sorted(c.run_id for c in grid.cells)
    again = _bench(_write(tmp_path, doc), store_path, out, "--workers", "2")
    assert again.exit_code == 0 and "0 run now" in again.output


class _Failing(LGBMEarly):
    """lgbm-early that raises in fit while ``broken`` is set."""

    broken = True

    def fit(self, data, **kwargs):
        if type(self).broken:
            raise RuntimeError("fit exploded on purpose")
        return super().fit(data, **kwargs)


def test_failing_cell_does_not_stop_the_grid_and_is_retried(store_path, tmp_path, registered,
                                                            monkeypatch):
    registered("grid-test-failing", type("GridTestFailing", (_Failing,), {}))
    doc = _doc(methods=[{"name": name, "hyperparameters": FAST_LGBM}
                        for name in ("grid-test-failing", "lgbm-early")], seeds=[0, 1])
    path, out = _write(tmp_path, doc), tmp_path / "runs"
    result = _bench(path, store_path, out, "--workers", "0")
    assert result.exit_code == 1
    assert "2 of 4 cells complete, 2 failed" in result.output
    assert "FAILED (RuntimeError: fit exploded on purpose)" in result.output
    grid = _grid(store_path, out, doc)
    failing = [c for c in grid.cells if c.method == "grid-test-failing"]
    for cell in grid.cells:
        assert grid.is_failed(cell) == (cell in failing)
        assert grid.is_complete(cell) == (cell not in failing)
    record = json.loads(failed_path(out, failing[0].run_id).read_text())
    assert record["error"] == "RuntimeError: fit exploded on purpose"
    assert "in fit" in record["traceback"] and record["options"]["method"] == "grid-test-failing"
    assert not list(out.glob(".*partial*")), "no half-written run folder"
    dry = _bench(path, store_path, out, "--dry-run")
    assert "2 complete, 2 failed, 2 to run" in dry.output
    assert f"failed: {failing[0].run_id}" in dry.output

    monkeypatch.setattr(_Failing, "broken", False)
    result = _bench(path, store_path, out, "--workers", "0")
    assert result.exit_code == 0, result.output
    assert "4 of 4 cells complete, 0 failed, 2 run now" in result.output
    assert not list(out.glob("*.failed.json")), "the record goes once the cell completes"


class _RecordingClient:
    """Stands in for a dask Client: declares worker resources, records submissions."""

    def __init__(self, resources):
        self.resources, self.submitted = resources, []

    def scheduler_info(self):
        return {"workers": {"tcp://w1": {"resources": self.resources}}}

    def submit(self, fn, *args, **kwargs):
        self.submitted.append(kwargs)
        return len(self.submitted)


@pytest.mark.parametrize("resources, wanted", [({"GPU": 1}, {"GPU": 1}), ({}, None)])
def test_raw_cells_ask_for_a_gpu_only_where_workers_declare_one(store_path, tmp_path, resources,
                                                                wanted):
    from fusion.bench.runner import submit_cells

    grid = _grid(store_path, tmp_path, _doc(methods=["latefusion", "lstm"], features="raw"))
    cached = _grid(store_path, tmp_path, _doc())
    client = _RecordingClient(resources)
    futures = submit_cells(grid.cells + cached.cells, client)
    assert list(futures.values()) == grid.cells + cached.cells
    assert [k["resources"] for k in client.submitted] == [wanted, wanted, None]
    assert client.submitted[0]["key"] == f"cell-{grid.cells[0].run_id}"


def test_bad_resources_option(store_path, tmp_path):
    result = _bench(_write(tmp_path, _doc()), store_path, tmp_path / "runs", "--resources", "GPU")
    assert result.exit_code == 2 and "expected NAME=AMOUNT" in result.output
    assert "cells" not in result.output, "checked before the grid is expanded"


def test_existing_scheduler(store_path, tmp_path):
    from distributed import LocalCluster

    path, out = _write(tmp_path, _doc(seeds=[0, 1])), tmp_path / "runs"
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                      dashboard_address=":0") as cluster:
        result = _bench(path, store_path, out, "--scheduler", cluster.scheduler_address)
    assert result.exit_code == 0, result.output
    assert "2 of 2 cells complete, 0 failed, 2 run now" in result.output
    assert "local Dask cluster" not in result.output

    result = _bench(path, store_path, tmp_path / "other", "--scheduler", "nonsense://host")
    assert result.exit_code == 1
    assert "--scheduler nonsense://host: no Dask scheduler answers" in result.output
