"""Reliability: a training process killed at an arbitrary point resumes to the same model; a kill or a failure while
a checkpoint is being written never leaves a truncated ``train_state.pt`` (docs/reliability.md, items 1.1-1.3)."""

from __future__ import annotations

import io
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tiny_settings import TINY_TRAIN

from diffcl_algo.convert import make_synthetic_dataset
from diffcl_algo.training.checkpoint import TrainStateLoader, atomic_save, load_train_state

TRAIN = (
    "import json, sys, torch; torch.set_num_threads(1); "
    "from diffcl_algo.bundle.run import train; train(**json.loads(sys.argv[1]))"
)
TINY = dict(  # HF-Mamba on (it needs 32 voxels along one axis), so the resume covers its Mamba state too
    TINY_TRAIN,
    patch_size=[32, 32, 16],
    strides=[16, 16, 8],
    use_hfm=True,
    num_workers=0,
    seed=0,
    max_iterations=10,
    val_interval=4,
    ckpt_interval=2,
)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _start(kwargs: dict, log: Path) -> subprocess.Popen:
    with open(log, "ab") as f:
        return subprocess.Popen([sys.executable, "-c", TRAIN, json.dumps(kwargs)], stdout=f, stderr=f, env=ENV)


def _finish(proc: subprocess.Popen, log: Path) -> None:
    assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]


def _state_dict(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _assert_equal_tensors(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for key in a:
        assert torch.equal(a[key], b[key]), f"{what}: {key} differs"


def test_sigkill_then_resume_equals_uninterrupted_run(tmp_path):
    """SIGKILL at a random moment after the first train_state.pt, then resume=True: model.pt is bitwise equal."""
    data = make_synthetic_dataset(tmp_path / "la", num_cases=6, shape=(34, 34, 18), seed=0, num_test=2)
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    log = tmp_path / "log.txt"
    _finish(_start({**TINY, "dataset_dir": str(data), "output_dir": str(ref)}, log), log)

    kwargs = {**TINY, "dataset_dir": str(data), "output_dir": str(cut)}
    proc = _start(kwargs, log)
    deadline = time.monotonic() + 240
    while not (cut / "train_state.pt").exists():
        assert proc.poll() is None, f"training ended before its first checkpoint:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, "no train_state.pt after 240 s"
        time.sleep(0.01)
    delay = random.uniform(0.0, 0.6)  # an arbitrary point: during an iteration, a validation or a checkpoint write
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    returncode = proc.wait(timeout=60)
    assert returncode == -signal.SIGKILL, f"training finished before the kill (delay {delay:.2f} s); make it longer"
    killed_at = int(load_train_state(cut / "train_state.pt")["iteration"])  # never truncated: it loads
    assert 2 <= killed_at <= TINY["max_iterations"]

    _finish(_start({**kwargs, "resume": True}, log), log)
    _assert_equal_tensors(_state_dict(ref / "model.pt"), _state_dict(cut / "model.pt"), f"model.pt (delay {delay})")
    final_ref, final_cut = load_train_state(ref / "train_state.pt"), load_train_state(cut / "train_state.pt")
    for key in ("cs_network", "ds_network", "cs_head", "memory_bank"):
        _assert_equal_tensors(final_ref[key], final_cut[key], f"train_state[{key!r}] (delay {delay})")
    for key in ("iteration", "best_iteration", "best_metric"):
        assert final_cut[key] == final_ref[key], key
    assert not list(cut.glob(".*.tmp")), "temporary files of interrupted writes were not cleaned up"


def _write_state(path: Path, iteration: int) -> None:
    net = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    atomic_save(
        {
            "cs_network": net.state_dict(),
            "ds_network": net.state_dict(),
            "cs_optimizer": opt.state_dict(),
            "ds_optimizer": opt.state_dict(),
            "iteration": iteration,
            "seed": 0,
        },
        path,
    )


KILL_MID_WRITE = """
import io, os, signal, sys, torch
from diffcl_algo.training.checkpoint import atomic_save
real_save = torch.save

def half_then_die(obj, f, *args, **kwargs):
    buffer = io.BytesIO()
    real_save(obj, buffer)
    f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    f.flush()
    os.fsync(f.fileno())
    os.kill(os.getpid(), signal.SIGKILL)

torch.save = half_then_die
atomic_save({"iteration": 4, "seed": 0, "cs_network": {}, "ds_network": {}, "cs_optimizer": {}, "ds_optimizer": {}},
            sys.argv[1])
"""


def test_sigkill_during_checkpoint_write_keeps_previous_train_state(tmp_path):
    """A process killed halfway through writing train_state.pt leaves the previous file, loadable, in place."""
    path = tmp_path / "train_state.pt"
    _write_state(path, iteration=2)
    proc = subprocess.run([sys.executable, "-c", KILL_MID_WRITE, str(path)], env=ENV, capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    leftovers = list(tmp_path.glob(".train_state.pt.*.tmp"))
    assert len(leftovers) == 1  # the half-written temporary: the kill happened mid-write
    with pytest.raises(RuntimeError):  # truncated zip archive
        torch.load(leftovers[0], weights_only=True)
    assert load_train_state(path)["iteration"] == 2  # resume reads the intact previous state, never the temporary
    recorder = _Recorder()
    TrainStateLoader(path).attach(recorder)
    assert recorder.state["iteration"] == 2
    _write_state(path, iteration=6)  # the next successful save removes the leftover
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train_state.pt"]
    assert load_train_state(path)["iteration"] == 6


class _Recorder:
    """Stands in for a trainer: records what ``TrainStateLoader`` loads into it."""

    def load_train_state(self, state: dict) -> None:
        self.state = state


def test_failing_checkpoint_write_keeps_previous_train_state(tmp_path, monkeypatch):
    """torch.save writing half of the file then failing (disk full): the old file stays, no temporary remains."""
    path = tmp_path / "train_state.pt"
    _write_state(path, iteration=2)
    real_save = torch.save

    def half_then_fail(obj, f, *args, **kwargs):
        buffer = io.BytesIO()
        real_save(obj, buffer)
        f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        raise OSError(28, "No space left on device (simulated)")

    monkeypatch.setattr(torch, "save", half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        _write_state(path, iteration=4)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train_state.pt"]
    assert load_train_state(path)["iteration"] == 2
