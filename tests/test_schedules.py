"""Tests of diffcl_algo.schedules: Gaussian ramp, Table 2 lookup, epoch definition, poly lr."""

from __future__ import annotations

import math

import pytest

from diffcl_algo.schedules import (
    DEFAULT_HYPERPARAMS,
    TABLE2,
    continuous_epoch,
    epoch_length,
    gaussian_ramp,
    resolve_hyperparams,
    table2_params,
)


def test_gaussian_ramp_values():
    assert gaussian_ramp(0) == pytest.approx(2.0 * math.exp(-5.0))
    assert gaussian_ramp(150) == pytest.approx(2.0 * math.exp(-5.0 * 0.25))
    assert gaussian_ramp(300) == pytest.approx(2.0)
    assert gaussian_ramp(1000) == pytest.approx(2.0)  # clipped at t_max
    assert gaussian_ramp(10, t_max=20, peak=1.0) == pytest.approx(math.exp(-5.0 * 0.25))
    values = [gaussian_ramp(t) for t in range(0, 301, 10)]
    assert values == sorted(values)


def test_table2_rows():
    la4 = table2_params("LA", 4)
    assert (la4.mu1, la4.mu2, la4.beta1_c, la4.beta2_c, la4.lambda1, la4.lambda2, la4.eta, la4.hf) == (
        1.0, 1.0, 0.01, 0.01, 1.0, 1.0, 0.7, 0.6
    )  # fmt: skip
    assert table2_params("la", 8).eta == 0.5 and table2_params("LA", 8).hf == 0.7
    assert table2_params("Pancreas", 6).eta == 0.007 and table2_params("Pancreas", 6).hf == 0.8
    assert table2_params("Pancreas", 12).eta == 0.0003 and table2_params("Pancreas", 12).hf == 0.5
    assert table2_params("BraTS", 25).eta == 0.007 and table2_params("brats", 50).eta == 0.003
    assert table2_params("BraTS", 50).beta2_c == 0.1
    assert sum(len(rows) for rows in TABLE2.values()) == 6
    assert la4.beta1(2.0) == pytest.approx(0.02)


def test_table2_unknown_row_lists_known_rows():
    with pytest.raises(ValueError, match=r"known rows: .*\('LA', 4\).*\('BraTS', 50\)"):
        table2_params("LA", 5)
    with pytest.raises(ValueError, match="known rows"):
        table2_params("Spleen", 4)


def test_overrides():
    hp = resolve_hyperparams("LA", 8, eta=0.1, mu1=None)
    assert hp.eta == 0.1 and hp.mu1 == 1.0 and hp.hf == 0.7
    assert resolve_hyperparams() == DEFAULT_HYPERPARAMS
    with pytest.raises(ValueError, match="Unknown hyper-parameter"):
        resolve_hyperparams("LA", 8, gamma=1.0)
    with pytest.raises(ValueError, match="known rows"):
        resolve_hyperparams("LA")


def test_epoch_definition():
    assert epoch_length(76, 2) == 38
    assert epoch_length(75, 2) == 38  # ceil
    assert epoch_length(76, 2, world_size=2) == 19
    assert continuous_epoch(19, 38) == 0.5
    with pytest.raises(ValueError):
        epoch_length(0, 2)
