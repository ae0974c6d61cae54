"""What a fit does to the process: settings put back, no umask change, one fit per process.

A fit seeds the global torch generator, sets the torch thread count and deterministic algorithms
while it runs and restores all three when it ends, normally or not. It never touches Python's or
NumPy's global generators, and the run writer never changes the umask. Two fits in two processes
at once give the same predictions as one after the other.
"""

import os
import pathlib
import random
import stat
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

from fusion.trainer import Trainer
from support import GrowingNet, toy_sources


def _process_state():
    return {"threads": torch.get_num_threads(),
            "deterministic": torch.are_deterministic_algorithms_enabled(),
            "torch_rng": torch.get_rng_state(), "numpy_rng": np.random.get_state(),
            "python_rng": random.getstate(), "cublas": os.environ.get("CUBLAS_WORKSPACE_CONFIG")}


def _assert_unchanged(before, after):
    assert after["threads"] == before["threads"]
    assert after["deterministic"] == before["deterministic"]
    assert torch.equal(after["torch_rng"], before["torch_rng"]), "global torch generator moved"
    assert after["python_rng"] == before["python_rng"]
    assert after["cublas"] == before["cublas"]
    for a, b in zip(after["numpy_rng"], before["numpy_rng"]):
        assert np.array_equal(a, b)


@pytest.fixture
def busy_process():
    """Settings a caller might have: 2 threads, no deterministic mode, seeded generators."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(False)
    torch.manual_seed(123)
    np.random.seed(5)
    random.seed(7)
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)


def _fit(module):
    train, val = toy_sources()
    return Trainer("mortality", lr=0.05, batch_size=16, max_epochs=3, seed=1, device="cpu",
                   num_threads=1).fit(module, train, val)


def test_a_fit_restores_what_it_sets_process_wide(busy_process):
    seen = {}

    class Probe(GrowingNet):
        def on_fit_start(self, ctx, train):
            seen.update(threads=torch.get_num_threads(),
                        deterministic=torch.are_deterministic_algorithms_enabled())

    module = Probe()  # built by the caller, with the caller's generator
    before = _process_state()
    _fit(module)
    assert seen == {"threads": 1, "deterministic": True}, "the fit's own settings while it runs"
    _assert_unchanged(before, _process_state())


def test_a_failing_fit_restores_them_too(busy_process):
    class Failing(GrowingNet):
        def on_train_epoch_end(self, ctx):
            raise RuntimeError("hook failed")

    module = Failing()
    before = _process_state()
    with pytest.raises(RuntimeError, match="hook failed"):
        _fit(module)
    _assert_unchanged(before, _process_state())


def test_the_fit_does_not_depend_on_the_callers_generator(busy_process):
    torch.manual_seed(0)
    first = GrowingNet()
    torch.manual_seed(0)
    second = GrowingNet()
    torch.manual_seed(99)  # the caller's generator state differs between the two fits
    _fit(first)
    torch.manual_seed(5)
    _fit(second)
    for key, value in first.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, second.state_dict()[key]), key


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    from support import make_fusion_store

    path = tmp_path_factory.mktemp("process") / "store.zarr"
    make_fusion_store(path, n_stays=60)
    return str(path)


FUSE = ["--method", "latefusion", "--n-boot", "10", "--no-progress", "--ehr-encoder", "ehr-test",
        "--set", "max_epochs=3", "--set", "hidden=8", "--set", "patience=3"]


def test_a_method_fit_save_and_load_leave_the_process_as_it_was(busy_process, store_path, tmp_path):
    from cbstore.store.reader import open_store
    from fusion.data import load_fusion_data
    from fusion.registry import get_method, load_method

    data = load_fusion_data(open_store(store_path), "mortality", 0, features="cached",
                            ehr_encoder="ehr-test")
    cls = get_method("latefusion")
    before = _process_state()
    method = cls(seed=0, **cls.test_hyperparameters).fit(data, device="cpu")
    method.save(tmp_path / "saved")
    load_method(tmp_path / "saved")
    _assert_unchanged(before, _process_state())


def _umask() -> int:
    """The process umask, read without changing it (Linux)."""
    status = pathlib.Path("/proc/self/status")
    if not status.is_file():
        pytest.skip("needs /proc/self/status to read the umask")
    line = next(x for x in status.read_text().splitlines() if x.startswith("Umask:"))
    return int(line.split()[1], 8)


def test_a_run_never_changes_the_umask(store_path, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from cli.fuse_cmd import fuse

    def no_umask(mask):
        raise AssertionError("the process umask must not be changed")
    monkeypatch.setattr(os, "umask", no_umask)
    result = CliRunner().invoke(fuse, [store_path, "--out", str(tmp_path), *FUSE],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    (folder,) = tmp_path.iterdir()
    assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~_umask()
    assert stat.S_IMODE((folder / "config.json").stat().st_mode) == 0o666 & ~_umask()


FIT_AND_PREDICT = """
import sys, numpy as np, torch
from fusion.trainer import Trainer
from support import GrowingNet, toy_sources

seed, out = int(sys.argv[1]), sys.argv[2]
torch.manual_seed(seed)
module = GrowingNet()
train, val = toy_sources()
trainer = Trainer("mortality", lr=0.05, batch_size=16, max_epochs=3, seed=seed, device="cpu",
                  num_threads=1)
trainer.fit(module, train, val)
np.save(out, trainer.predict(module, val)["prob"])
"""


def test_two_fits_in_two_processes_at_once_equal_one_after_the_other(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    jobs = [subprocess.Popen([sys.executable, "-c", FIT_AND_PREDICT, str(seed),
                              str(tmp_path / f"{seed}.npy")], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True) for seed in (0, 1)]
    outputs = [job.communicate(timeout=300)[0] for job in jobs]
    assert [job.returncode for job in jobs] == [0, 0], outputs
    for seed in (0, 1):  # the same fits, one after the other in this process
        torch.manual_seed(seed)
        module = GrowingNet()
        train, val = toy_sources()
        trainer = Trainer("mortality", lr=0.05, batch_size=16, max_epochs=3, seed=seed,
                          device="cpu", num_threads=1)
        trainer.fit(module, train, val)
        np.testing.assert_array_equal(np.load(tmp_path / f"{seed}.npy"),
                                      trainer.predict(module, val)["prob"])
    assert not np.array_equal(np.load(tmp_path / "0.npy"), np.load(tmp_path / "1.npy"))


def test_a_second_process_with_the_same_run_waits_for_the_first(tmp_path):
    from fusion.runs import _run_lock

    lock = tmp_path / ".abc.lock"
    order = []
    waited = threading.Event()
    with _run_lock(lock, lambda: None):
        def second():
            with _run_lock(lock, waited.set):
                order.append("second")
        thread = threading.Thread(target=second)
        thread.start()
        assert waited.wait(timeout=30), "the second holder must wait"
        order.append("first")
    thread.join(timeout=30)
    assert order == ["first", "second"]
    assert not lock.exists(), "the lock file is removed when released"
