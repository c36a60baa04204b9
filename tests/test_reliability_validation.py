"""Reliability: a validation round that raises during a long run is logged with the case name, then either skipped
(``val_error="continue"``) or stops training (``"raise"``); the best ``model.pt`` is never lost or replaced by a worse
one (docs/reliability.md, item 6)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from ignite.engine import Events
from monai.handlers import ValidationHandler
from tiny_settings import TINY_TRAIN, handler_of

from diffcl_algo.bundle.run import build_trainer
from diffcl_algo.convert import make_synthetic_dataset
from diffcl_algo.training.checkpoint import ModelSaver, load_train_state, validated_cs_weights
from diffcl_algo.training.handlers import GuardedValidationHandler

TINY = dict(TINY_TRAIN, max_iterations=6, val_interval=2, ckpt_interval=2)
VAL_CASES = ["synth_la_004", "synth_la_005"]  # make_synthetic_dataset's test list (num_test=2)


@pytest.fixture
def data_dir(tmp_path):
    return make_synthetic_dataset(tmp_path / "la", num_cases=6, shape=(20, 20, 18), seed=0, num_test=2)


def _guarded_trainer(data_dir: Path, out: Path, val_error: str):
    """``build_trainer`` with ``val_error``; the bundle graph attaches exactly one ``GuardedValidationHandler``."""
    trainer = build_trainer(dataset_dir=str(data_dir), output_dir=str(out), val_error=val_error, **TINY)
    found = []
    for handler, _, _ in trainer._event_handlers[Events.ITERATION_COMPLETED]:
        handler = handler._parent() if hasattr(handler, "_parent") else handler
        if isinstance(handler, ValidationHandler):
            found.append(handler)
    assert len(found) == 1 and isinstance(found[0], GuardedValidationHandler)
    assert found[0].val_error == val_error
    saves = []
    save = handler_of(trainer, ModelSaver).save
    handler_of(trainer, ModelSaver).save = lambda: (saves.append(trainer.state.iteration), save())
    return trainer, saves


def _fail_in_round(evaluator, round_index: int, case_index: int) -> list[int]:
    """Make validation round ``round_index`` (1-based) raise after scoring ``case_index`` cases."""
    rounds = []
    evaluator.add_event_handler(Events.EPOCH_STARTED, lambda e: rounds.append(0))

    def fail(engine):
        if len(rounds) == round_index and engine.state.iteration == case_index + 1:
            raise RuntimeError("injected evaluator failure")

    evaluator.add_event_handler(Events.ITERATION_COMPLETED, fail)
    return rounds


def test_continue_skips_the_failed_round(data_dir, tmp_path, caplog):
    out = tmp_path / "run"
    trainer, saves = _guarded_trainer(data_dir, out, "continue")
    validator = handler_of(trainer, GuardedValidationHandler).validator
    rounds = _fail_in_round(validator, round_index=2, case_index=1)  # 2nd case of the round at iteration 4
    with caplog.at_level(logging.ERROR, logger="diffcl_algo.training.handlers"):
        trainer.run()
    trainer.close()
    assert trainer.state.iteration == 6 and len(rounds) == 3  # training and the later round went on
    expected = f"Validation at iteration 4 failed on case(s) ['{VAL_CASES[1]}']: RuntimeError: injected evaluator "
    expected += "failure"
    assert expected in caplog.text and "round skipped, training continues" in caplog.text
    assert expected in (out / "train.log").read_text()
    assert 4 not in saves  # the partial metrics of the failed round were never compared with the best
    assert saves[0] == 2 and handler_of(trainer, ModelSaver).best_iteration in (2, 6)
    assert load_train_state(out / "train_state.pt")["best_iteration"] == handler_of(trainer, ModelSaver).best_iteration


def test_raise_stops_training_and_keeps_the_best_model(data_dir, tmp_path):
    out = tmp_path / "run"
    trainer, saves = _guarded_trainer(data_dir, out, "raise")
    _fail_in_round(handler_of(trainer, GuardedValidationHandler).validator, round_index=2, case_index=0)
    with pytest.raises(RuntimeError, match=rf"Validation at iteration 4 failed on case\(s\) \['{VAL_CASES[0]}'\]"):
        trainer.run()
    trainer.close()
    assert saves == [2]
    best = torch.load(out / "model.pt", weights_only=True)
    state = load_train_state(out / "train_state.pt")  # the last periodic save, before the failed round
    assert (state["iteration"], state["best_iteration"]) == (2, 2)
    validated = validated_cs_weights(state)  # the CS (or its average) that the rounds scored
    assert best.keys() == validated.keys()
    for key, value in best.items():  # model.pt is still the model of the best round (iteration 2)
        assert torch.equal(value, validated[key])


def test_corrupt_validation_file_found_during_training(data_dir, tmp_path, caplog):
    """A validation file corrupted after the up-front check: every round fails at loading, naming the case; with
    "continue" training completes and model.pt falls back to the last weights (no round ever completed)."""
    out = tmp_path / "run"
    trainer, saves = _guarded_trainer(data_dir, out, "continue")
    bad = Path(data_dir) / "2018LA_Seg_Training Set" / VAL_CASES[1] / "mri_norm2.h5"
    good = bad.read_bytes()
    bad.write_bytes(good[:300])  # after build_trainer's up-front check (data#check) passed
    with caplog.at_level(logging.ERROR, logger="diffcl_algo.training.handlers"):
        trainer.run()
    trainer.close()
    for iteration in (2, 4, 6):
        assert f"Validation at iteration {iteration} failed on case(s) ['{VAL_CASES[1]}']" in caplog.text
    assert "<- caused by OSError: Unable to synchronously open file (truncated file" in caplog.text
    assert saves == [6] and handler_of(trainer, ModelSaver).best_iteration == -1

    bad.write_bytes(good)  # restore it for the up-front check of the next build, then break it again
    trainer, _ = _guarded_trainer(data_dir, tmp_path / "run2", "raise")
    bad.write_bytes(good[:300])
    with pytest.raises(RuntimeError, match=rf"Validation at iteration 2 failed on case\(s\) \['{VAL_CASES[1]}'\]"):
        trainer.run()
    trainer.close()
    assert not (tmp_path / "run2" / "model.pt").exists()


def test_val_error_is_checked():
    with pytest.raises(ValueError, match=r"val_error must be one of \('raise', 'continue'\), got 'ignore'"):
        GuardedValidationHandler(interval=2, val_error="ignore")
