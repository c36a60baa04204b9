"""Tests of diffcl_algo.training.checkpoint: atomic writes, clear resume errors, the ignite savers."""

from __future__ import annotations

import os

import pytest
import torch
from ignite.engine import Engine, Events
from torch import nn

from diffcl_algo.training.checkpoint import ModelSaver, TrainStateSaver, atomic_save, load_train_state


class _Unpicklable:
    def __reduce__(self):
        raise RuntimeError("disk full (simulated)")


def test_atomic_save_failure_keeps_old_file(tmp_path):
    path = tmp_path / "model.pt"
    atomic_save({"w": torch.ones(3)}, path)
    with pytest.raises(RuntimeError, match="simulated"):
        atomic_save({"w": torch.zeros(3), "bad": _Unpicklable()}, path)
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.ones(3))
    assert os.listdir(tmp_path) == ["model.pt"]  # no temporary file left behind


def test_atomic_save_replaces(tmp_path):
    path = tmp_path / "sub" / "x.pt"
    atomic_save({"a": 1}, path)
    atomic_save({"a": 2}, path)
    assert torch.load(path, weights_only=True) == {"a": 2}


def test_atomic_save_uses_umask_permissions(tmp_path):
    umask = os.umask(0)
    os.umask(umask)
    atomic_save({"a": torch.ones(1)}, tmp_path / "model.pt")
    assert (tmp_path / "model.pt").stat().st_mode & 0o777 == 0o666 & ~umask


def test_load_train_state_errors_name_the_path(tmp_path):
    missing = tmp_path / "train_state.pt"
    with pytest.raises(FileNotFoundError, match="train_state.pt"):
        load_train_state(missing)
    missing.write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="unreadable") as info:
        load_train_state(missing)
    assert str(missing) in str(info.value)
    atomic_save({"iteration": 3}, missing)
    with pytest.raises(RuntimeError, match="lacks"):
        load_train_state(missing)


class _FakeTrainer(Engine):
    def __init__(self, net: nn.Module) -> None:
        super().__init__(lambda e, b: None)
        self.net = net

    def train_state(self) -> dict:
        return {
            "cs_network": self.net.state_dict(),
            "ds_network": {},
            "cs_optimizer": {},
            "ds_optimizer": {},
            "iteration": int(self.state.iteration),
            "seed": 0,
        }


def test_savers(tmp_path):
    net = nn.Linear(2, 2)
    trainer = _FakeTrainer(net)
    evaluator = Engine(lambda e, b: None)
    scores = iter([0.5, 0.3, 0.7])

    @evaluator.on(Events.EPOCH_COMPLETED)
    def _metric(engine):
        engine.state.metrics["val_mean_dice"] = next(scores)

    saver = ModelSaver(net, str(tmp_path), metric_name="val_mean_dice", evaluator=evaluator)
    saver.attach(trainer)
    state_saver = TrainStateSaver(str(tmp_path), interval=2, model_saver=saver, config={"seed": 0})
    state_saver.attach(trainer)
    saved = []

    @trainer.on(Events.ITERATION_COMPLETED(every=2))
    def _validate(engine):
        with torch.no_grad():
            net.weight.fill_(float(engine.state.iteration))
        evaluator.run([0])
        saved.append(torch.load(tmp_path / "model.pt", weights_only=True)["weight"][0, 0].item())

    trainer.run(range(6), max_epochs=1)
    assert saved == [2.0, 2.0, 6.0]  # best 0.5 at it. 2, 0.3 ignored, 0.7 at it. 6
    assert saver.best_metric == 0.7 and saver.best_iteration == 6
    state = load_train_state(tmp_path / "train_state.pt")
    assert state["iteration"] == 6 and state["best_metric"] == 0.7 and state["config"] == {"seed": 0}


def test_model_saver_without_validation_saves_last(tmp_path):
    net = nn.Linear(2, 2)
    trainer = _FakeTrainer(net)
    ModelSaver(net, str(tmp_path)).attach(trainer)
    trainer.run(range(2), max_epochs=1)
    sd = torch.load(tmp_path / "model.pt", weights_only=True)
    assert torch.equal(sd["weight"], net.weight.detach())
