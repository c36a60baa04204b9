"""Feedback handlers (diffcl_algo.training.handlers, diffcl_algo.evaluation.handlers): the run-long training bar,
per-case Dice, validation lines."""

from __future__ import annotations

import logging

import pytest
import torch
from ignite.engine import Engine
from monai.data import MetaTensor

from diffcl_algo.evaluation.handlers import CaseProgress
from diffcl_algo.evaluation.metrics import foreground_dice, foreground_mask
from diffcl_algo.training.handlers import IterationProgressBar, ValidationReport


def _mask(*on: int) -> torch.Tensor:
    x = torch.zeros(1, 4, 1, 1)
    x[0, list(on)] = 1
    return x


def test_foreground_dice():
    assert foreground_dice(_mask(0, 1), _mask(1, 2)) == 0.5
    assert foreground_dice(_mask(), _mask()) == 1.0
    one_hot = torch.cat([1 - _mask(0, 1), _mask(0, 1)])  # a 2-channel one-hot map: its foreground is channel 1
    assert foreground_dice(foreground_mask(one_hot[None]), foreground_mask(_mask(0, 1)[None])) == 1.0
    assert foreground_dice(torch.tensor([[0, 1], [1, 1]]), torch.tensor([[0, 1], [0, 0]])) == 0.5  # class maps


def test_training_bar_counts_the_whole_run(capsys):
    trainer = Engine(lambda e, b: {"loss": 0.5, "loss_cs": 0.25})
    IterationProgressBar(max_iterations=12, keys=("loss",)).attach(trainer)
    trainer.run(range(4), max_epochs=3)
    err = capsys.readouterr().err
    assert "12/12" in err and "loss=0.5000" in err
    assert "4/4" not in err  # no per-epoch bar


def _evaluator(cases: list[tuple[str, torch.Tensor, torch.Tensor]]) -> Engine:
    def step(engine: Engine, batch: int) -> list[dict]:
        name, pred, label = cases[batch]
        return [{"pred": MetaTensor(pred, meta={"case": name}), "label": label}]

    return Engine(step)


def test_case_progress_log_lines_and_bar(caplog, capsys):
    cases = [("la_001", _mask(0, 1), _mask(1, 2)), ("la_002", _mask(3), _mask(3))]
    evaluator = _evaluator(cases)
    CaseProgress("validation", progress=False).attach(evaluator)
    with caplog.at_level(logging.INFO, logger="diffcl_algo.progress"):
        evaluator.run(range(2))
    lines = [r.getMessage() for r in caplog.records if r.name == "diffcl_algo.progress"]
    assert lines[0].startswith("validation case 1/2 (la_001: Dice 0.5000) after ")
    assert lines[1].startswith("validation case 2/2 (la_002: Dice 1.0000) after ")

    evaluator = _evaluator(cases)
    CaseProgress("evaluation", progress=True).attach(evaluator)
    evaluator.run(range(2))
    err = capsys.readouterr().err
    assert "evaluation" in err and "2/2" in err and "la_002: Dice 1.0000" in err


def test_validation_log_names_iteration_and_epoch(caplog):
    trainer = Engine(lambda e, b: None)
    trainer.state.iteration, trainer.state.epoch_length = 256, 32
    evaluator = Engine(lambda e, b: None)
    evaluator.state.key_metric_name = "val_mean_dice"
    log = ValidationReport(evaluator)
    log.attach(trainer)
    evaluator.state.metrics = {"val_mean_dice": 0.8123, "val_hd95": 3.5}
    with caplog.at_level(logging.INFO, logger="diffcl_algo.validation"):
        log(evaluator)
        trainer.state.iteration = 288
        evaluator.state.metrics = {"val_mean_dice": 0.7}
        log(evaluator)
    first, second = (r.getMessage() for r in caplog.records if r.name == "diffcl_algo.validation")
    assert first == (
        "validation at iteration 256 (epoch 8.00): val_mean_dice: 0.8123, val_hd95: 3.5000; "
        "best val_mean_dice 0.8123 at iteration 256"
    )
    assert second.endswith("(epoch 9.00): val_mean_dice: 0.7000; best val_mean_dice 0.8123 at iteration 256")


def test_handlers_let_engine_errors_through():
    """ignite swallows an engine's exception once an EXCEPTION_RAISED handler exists: the bars register none."""

    def fail(engine: Engine, batch: int) -> None:
        raise RuntimeError("injected")

    for handler in (CaseProgress("validation", progress=True), IterationProgressBar(4)):
        engine = Engine(fail)
        handler.attach(engine)
        with pytest.raises(RuntimeError, match="injected"):
            engine.run(range(2))
