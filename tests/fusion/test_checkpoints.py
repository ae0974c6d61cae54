"""Epoch checkpoints: a fit interrupted after some epochs resumes and ends bit-identical on CPU.

Failures are injected by making an epoch raise (in process) or by ending the process with
``os._exit`` (no clean-up runs, as when a job is killed); the rerun with the same settings must give
the same weights, history and predictions as a fit that was never interrupted.
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from fusion import trainer as trainer_module
from fusion.trainer import CheckpointError, Trainer
from support import (BankNet, GrowingNet, Interrupted, StagedNet, TwoOptimiserNet, interrupt_during,
                     toy_sources)

torch.set_num_threads(1)

TOYS = {"growing": lambda: GrowingNet(grow_at=(2, 3)), "staged": StagedNet,
        "two-optimisers": TwoOptimiserNet, "bank": BankNet}


def _trainer():
    return Trainer("mortality", lr=0.05, batch_size=16, max_epochs=5, patience=5, seed=3,
                   device="cpu", num_threads=1)


def _fit(name, checkpoint=None):
    torch.manual_seed(0)
    module = TOYS[name]()
    train, val = toy_sources()
    trainer = _trainer()
    history = trainer.fit(module, train, val, checkpoint=checkpoint)
    return module, history, trainer.predict(module, val)["prob"]


def _assert_same_fit(a, b):
    (module_a, history_a, prob_a), (module_b, history_b, prob_b) = a, b
    state_a, state_b = module_a.state_dict(), module_b.state_dict()
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        if isinstance(state_a[key], torch.Tensor):
            assert torch.equal(state_a[key], state_b[key]), key
    np.testing.assert_array_equal(prob_a, prob_b)
    strip = lambda h: {k: v for k, v in h.items() if k != "resumed"}  # noqa: E731
    assert strip(history_a) == strip(history_b)


@pytest.mark.parametrize("name,stage,epoch", [("growing", 0, 4), ("staged", 1, 2),
                                              ("two-optimisers", 0, 3), ("bank", 0, 2)])
def test_an_interrupted_fit_resumes_bit_identical(name, stage, epoch, tmp_path, monkeypatch):
    uninterrupted = _fit(name)
    _assert_same_fit(uninterrupted, _fit(name, tmp_path / "other.pt"))  # writing changes nothing

    path = tmp_path / "checkpoint.pt"
    with monkeypatch.context() as patch:
        interrupt_during(patch, epoch, stage)
        with pytest.raises(Interrupted):
            _fit(name, path)
    assert path.is_file() and not path.with_name("checkpoint.pt.tmp").exists()
    resumed = _fit(name, path)
    assert resumed[1]["resumed"] == [{"stage": resumed[1]["stages"][stage]["name"],
                                      "epoch": epoch - 1}]
    _assert_same_fit(uninterrupted, resumed)


def test_a_finished_fit_resumes_to_its_end_without_training(tmp_path, monkeypatch):
    # e.g. a run killed while it wrote its predictions, after the fit
    path = tmp_path / "checkpoint.pt"
    first = _fit("growing", path)

    def no_training(fit):
        raise AssertionError("a finished fit trains no epoch when resumed")
    monkeypatch.setattr(trainer_module._Fit, "_train_epoch", no_training)
    again = _fit("growing", path)
    _assert_same_fit(first, again)
    assert again[1]["resumed"] == [{"stage": "fit", "epoch": 5}]


HARD_KILL = textwrap.dedent("""
    import os, sys, torch
    from fusion import trainer as trainer_module
    from fusion.trainer import Trainer
    from support import GrowingNet, toy_sources

    original = trainer_module._Fit._train_epoch

    def train_epoch(fit):
        if fit.ctx.epoch == 4:
            os._exit(3)  # no exception handler, no finally block runs
        return original(fit)

    trainer_module._Fit._train_epoch = train_epoch
    torch.manual_seed(0)
    train, val = toy_sources()
    Trainer("mortality", lr=0.05, batch_size=16, max_epochs=5, patience=5, seed=3, device="cpu",
            num_threads=1).fit(GrowingNet(grow_at=(2, 3)), train, val, checkpoint=sys.argv[1])
""")


def test_a_killed_process_resumes_bit_identical(tmp_path):
    path = tmp_path / "checkpoint.pt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", HARD_KILL, str(path)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 3, done.stderr
    resumed = _fit("growing", path)
    assert resumed[1]["resumed"] == [{"stage": "fit", "epoch": 3}]
    _assert_same_fit(_fit("growing"), resumed)


def test_an_unreadable_checkpoint_is_named(tmp_path):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"checkpoint.pt: cannot read the epoch checkpoint.*"
                                              r"delete the file"):
        _fit("growing", path)
    torch.save({"format": 99}, path)
    with pytest.raises(CheckpointError, match="not an epoch checkpoint of format 1"):
        _fit("growing", path)


def test_a_checkpoint_of_other_settings_is_refused(tmp_path):
    path = tmp_path / "checkpoint.pt"
    _fit("growing", path)
    train, val = toy_sources()
    other = Trainer("mortality", lr=0.1, batch_size=16, max_epochs=5, patience=5, seed=3,
                    device="cpu", num_threads=1)
    with pytest.raises(CheckpointError, match=r"other settings \(lr: 0.05 -> 0.1\)"):
        other.fit(GrowingNet(grow_at=(2, 3)), train, val, checkpoint=path)
    with pytest.raises(CheckpointError, match="module: 'GrowingNet' -> 'BankNet'"):
        _trainer().fit(BankNet(), train, val, checkpoint=path)


# ----- a whole run: the work folder keeps the checkpoint, the rerun resumes -------------------
@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    from support import make_fusion_store

    path = tmp_path_factory.mktemp("resume") / "store.zarr"
    make_fusion_store(path, n_stays=60)
    return str(path)


def _fuse(store_path, out, *extra):
    from cli.fuse_cmd import fuse
    from support import EHR_ID

    args = [store_path, "--method", "latefusion", "--out", str(out), "--n-boot", "10",
            "--no-progress", "--ehr-encoder", EHR_ID, "--set", "max_epochs=4", "--set", "hidden=8",
            "--set", "patience=4", "--set", "batch_size=16", *extra]
    return CliRunner().invoke(fuse, args, catch_exceptions=False)


def test_a_run_interrupted_in_training_resumes_from_its_work_folder(store_path, tmp_path,
                                                                     monkeypatch):
    from fusion.runs import CHECKPOINT_FILE

    assert _fuse(store_path, tmp_path / "once").exit_code == 0
    (reference,) = (tmp_path / "once").iterdir()

    out = tmp_path / "twice"
    with monkeypatch.context() as patch:
        interrupt_during(patch, 3)
        with pytest.raises(Interrupted):
            _fuse(store_path, out)
    (work,) = out.iterdir()
    assert work.name == f".{reference.name}.partial" and (work / CHECKPOINT_FILE).is_file()

    result = _fuse(store_path, out)
    assert result.exit_code == 0 and "resuming from the epoch checkpoint" in result.output
    (folder,) = out.iterdir()
    assert folder.name == reference.name and not (folder / CHECKPOINT_FILE).exists()
    history = json.loads((folder / "run.json").read_text())["history"]
    assert history["resumed"] == [{"stage": "fit", "epoch": 2}]
    pd.testing.assert_frame_equal(pd.read_parquet(folder / "predictions.parquet"),
                                  pd.read_parquet(reference / "predictions.parquet"))


def test_overwrite_discards_the_checkpoint(store_path, tmp_path, monkeypatch):
    with monkeypatch.context() as patch:
        interrupt_during(patch, 2)
        with pytest.raises(Interrupted):
            _fuse(store_path, tmp_path)
    result = _fuse(store_path, tmp_path, "--overwrite")
    assert result.exit_code == 0 and "resuming" not in result.output
    (folder,) = tmp_path.iterdir()
    assert "resumed" not in json.loads((folder / "run.json").read_text())["history"]


def test_a_run_failing_before_any_checkpoint_leaves_nothing(store_path, tmp_path, monkeypatch):
    with monkeypatch.context() as patch:
        interrupt_during(patch, 1)
        with pytest.raises(Interrupted):
            _fuse(store_path, tmp_path)
    assert list(tmp_path.iterdir()) == []
