"""Reliability: bad configuration fails at start with an error naming the setting, before any training step and
without writing ``model.pt`` / ``train_state.pt`` (docs/reliability.md, item 3)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from tiny_settings import TINY_TRAIN

from diffcl_algo.bundle.run import train
from diffcl_algo.convert import make_synthetic_dataset
from diffcl_algo.schedules import resolve_hyperparams, table2_params
from diffcl_algo.training.handlers import GuardedValidationHandler

TINY = TINY_TRAIN


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(make_synthetic_dataset(tmp_path_factory.mktemp("cfg") / "la", num_cases=5, shape=(20, 20, 18)))


def _fails(data_dir: str, out: Path, error: type, match: str, **overrides) -> str:
    with pytest.raises(error, match=match) as info:
        train(dataset_dir=data_dir, output_dir=str(out), **{**TINY, **overrides})
    for name in ("model.pt", "train_state.pt"):
        assert not (out / name).exists(), f"{name} written despite a bad config"
    return str(info.value)


def test_any_labeled_count_uses_the_nearest_table2_row(caplog):
    with caplog.at_level(logging.INFO, logger="diffcl_algo.schedules"):
        assert resolve_hyperparams("LA", 2) == table2_params("LA", 4)
        assert resolve_hyperparams("la", 6) == table2_params("LA", 8)  # a tie goes to the larger count
        assert resolve_hyperparams("Pancreas", 40) == table2_params("Pancreas", 12)
        assert resolve_hyperparams("LA", 8) == table2_params("LA", 8)
    messages = [r.getMessage() for r in caplog.records if r.name == "diffcl_algo.schedules"]
    assert messages[0].startswith("Table 2 has no LA row for 2 labeled cases; using the nearest row, LA 4 labeled (")
    assert "eta=0.7" in messages[0] and messages[-1] == "Table 2 row: LA, 8 labeled."
    known = "('Pancreas', 6), ('Pancreas', 12), ('LA', 4), ('LA', 8), ('BraTS', 25), ('BraTS', 50)"
    with pytest.raises(ValueError, match="No Table 2 row for dataset_name='Prostate'") as info:
        resolve_hyperparams("Prostate", 8)
    assert f"known rows: {known}" in str(info.value) and "--dataset_name none" in str(info.value)


@pytest.mark.parametrize(
    "setting,value,match",
    [
        ("max_iterations", 0, "max_iterations must be >= 1, got 0"),
        ("max_iterations", -5, "max_iterations must be >= 1, got -5"),
        ("ckpt_interval", 0, r"ckpt_interval \(TrainStateSaver interval\) must be >= 1 iteration, got 0"),
        ("ckpt_interval", -1, r"ckpt_interval \(TrainStateSaver interval\) must be >= 1 iteration, got -1"),
        ("labeled_batch_size", 0, "labeled_batch_size must be >= 1, got 0"),
        ("unlabeled_batch_size", 0, "needs positive sizes, got num_unlabeled=1, unlabeled_batch_size=0"),
    ],
)
def test_non_positive_settings(data_dir, tmp_path, setting, value, match):
    _fails(data_dir, tmp_path, ValueError, match, **{setting: value})


def test_negative_val_interval(data_dir, tmp_path):
    """0 means "never validate" (documented); a negative interval is an error."""
    with pytest.raises(ValueError, match="validation interval must be >= 1, got -1"):
        GuardedValidationHandler(interval=-1)
    _fails(data_dir, tmp_path, ValueError, "val_interval", val_interval=-1)


@pytest.mark.parametrize("patch", [(24, 32, 16), (16, 16, 8)])
def test_patch_not_divisible_by_16(data_dir, tmp_path, patch, monkeypatch):
    """Raised by ``check_settings`` in the config's ``initialize`` step, before any data is read or step taken."""
    steps = []
    monkeypatch.setattr(torch.optim.SGD, "step", lambda *a, **k: steps.append(a))
    message = _fails(data_dir, tmp_path, ValueError, "divisible by 16", patch_size=patch)
    assert str(patch) in message
    assert not steps


def test_patch_too_small_for_hf_mamba(data_dir, tmp_path):
    """HF-Mamba at stage 5 sees patch / 16 voxels; its instance norm needs more than one in training."""
    message = _fails(
        data_dir, tmp_path, ValueError, "HF-Mamba at encoder stage 5 needs more than one voxel", use_hfm=True
    )
    assert "input (16, 16, 16) gives (1, 1, 1); use at least 32 voxels along one axis" in message
