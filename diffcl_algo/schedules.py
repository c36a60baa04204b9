"""Loss-weight schedules and the paper's Table 2 hyper-parameters.

* ``gaussian_ramp``: the Gaussian warm-up ``lambda(t) = peak * exp(-5 (1 - t / t_max)^2)`` (section 5.1).
* ``TABLE2``: Table 2 of the paper as data, ``dataset -> num_labeled -> DiffCLHyperParams``; the CE weights of
  the supervised losses are ``beta = c * lambda(t)`` (eq. 18-19), every other weight is a constant.
* Epochs are defined in iterations (the paper never says what an epoch is):
  ``epoch_length = ceil(num_unlabeled / (unlabeled_batch_size * world_size))``, i.e. one pass over the
  unlabeled cases, and the ramp reads the *continuous* epoch ``iteration / epoch_length``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, replace
from typing import Any

from diffcl_algo.utils import is_null

__all__ = [
    "DiffCLHyperParams",
    "TABLE2",
    "DEFAULT_HYPERPARAMS",
    "gaussian_ramp",
    "table2_params",
    "nearest_table2_row",
    "resolve_hyperparams",
    "epoch_length",
    "continuous_epoch",
]


logger = logging.getLogger(__name__)


def gaussian_ramp(epoch: float, t_max: float = 300.0, peak: float = 2.0) -> float:
    """Gaussian warm-up ``lambda(t) = peak * exp(-5 (1 - t / t_max)^2)`` (paper section 5.1).

    Args:
        epoch: current (continuous) epoch ``t >= 0``; clipped to ``t_max`` so the weight stays at ``peak``
            once the warm-up is over.
        t_max: epoch at which the ramp reaches ``peak`` (paper: 300).
        peak: value at ``t >= t_max`` (paper: 2.0).

    Returns:
        ``lambda(t)`` as a Python float; ``peak * exp(-5)`` at ``t = 0``.
    """
    if t_max <= 0:
        return float(peak)
    t = min(max(float(epoch), 0.0), float(t_max))
    return float(peak) * math.exp(-5.0 * (1.0 - t / float(t_max)) ** 2)


@dataclass(frozen=True)
class DiffCLHyperParams:
    """One row of Table 2.

    Attributes:
        mu1: weight of the DS cross pseudo-supervision loss ``L_p^d`` in ``L^d`` (eq. 16).
        mu2: weight of the CS unsupervised loss ``L_u^c`` in ``L^c`` (eq. 17).
        beta1_c: ``beta1 = beta1_c * lambda(t)``, CE weight of the DS supervised loss (eq. 18).
        beta2_c: ``beta2 = beta2_c * lambda(t)``, CE weight of the CS supervised loss (eq. 19).
        lambda1: CE weight of ``L_p^d`` (eq. 6).
        lambda2: CE weight of ``L_p^c`` (eq. 7).
        eta: weight of ``L_cl`` in ``L_u^c`` (eq. 22).
        hf: high-frequency fraction of the HF-Mamba high-pass filter (eq. 10).
    """

    mu1: float
    mu2: float
    beta1_c: float
    beta2_c: float
    lambda1: float
    lambda2: float
    eta: float
    hf: float

    def beta1(self, ramp: float) -> float:
        """``beta1 = beta1_c * lambda(t)`` for a ramp value ``lambda(t)``."""
        return self.beta1_c * ramp

    def beta2(self, ramp: float) -> float:
        """``beta2 = beta2_c * lambda(t)`` for a ramp value ``lambda(t)``."""
        return self.beta2_c * ramp

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def _row(beta_c: float, eta: float, hf: float) -> DiffCLHyperParams:
    return DiffCLHyperParams(mu1=1.0, mu2=1.0, beta1_c=beta_c, beta2_c=beta_c, lambda1=1.0, lambda2=1.0, eta=eta, hf=hf)


#: Table 2 of the paper: dataset -> number of labeled training cases -> hyper-parameters (batch 4 = 2 + 2).
TABLE2: dict[str, dict[int, DiffCLHyperParams]] = {
    "Pancreas": {6: _row(0.1, 0.007, 0.8), 12: _row(0.1, 0.0003, 0.5)},
    "LA": {4: _row(0.01, 0.7, 0.6), 8: _row(0.01, 0.5, 0.7)},
    "BraTS": {25: _row(0.1, 0.007, 0.5), 50: _row(0.1, 0.003, 0.5)},
}

#: Used when no Table 2 row is named (e.g. the synthetic demo): the most common values of Table 2.
DEFAULT_HYPERPARAMS = DiffCLHyperParams(
    mu1=1.0, mu2=1.0, beta1_c=0.1, beta2_c=0.1, lambda1=1.0, lambda2=1.0, eta=0.1, hf=0.7
)


def table2_name(dataset_name: str | None) -> str | None:
    """The Table 2 dataset named by a config value: None for a null value (:func:`~diffcl_algo.utils.is_null`:
    None, ``""``, ``"none"``, ``"null"``, what a command line gives), else the name as given."""
    if is_null(dataset_name):
        return None
    return str(dataset_name)


def table2_params(dataset_name: str, num_labeled: int) -> DiffCLHyperParams:
    """Look up one row of Table 2.

    Args:
        dataset_name: ``"LA"``, ``"Pancreas"`` or ``"BraTS"`` (case-insensitive).
        num_labeled: number of labeled training cases (LA 4/8, Pancreas 6/12, BraTS 25/50).

    Raises:
        ValueError: for an unknown ``(dataset_name, num_labeled)``; the message lists the known rows.
    """
    names = {name.lower(): name for name in TABLE2}
    name = names.get(str(dataset_name).lower())
    if name is None or int(num_labeled) not in TABLE2[name]:
        known = ", ".join(f"({d!r}, {n})" for d, rows in TABLE2.items() for n in rows)
        raise ValueError(
            f"No Table 2 row for dataset_name={dataset_name!r}, num_labeled={num_labeled!r}; known rows: {known}. "
            "For another dataset pass dataset_name=None (bundles: --dataset_name none) and the weights explicitly."
        )
    return TABLE2[name][int(num_labeled)]


def nearest_table2_row(dataset_name: str, num_labeled: int) -> tuple[str, int]:
    """``(dataset_name, num_labeled)`` of the Table 2 row used for a labeled count: the exact row when it exists, else
    the row of the nearest labeled count (ties: the larger count).

    Raises:
        ValueError: an unknown dataset (the message lists the known rows).
    """
    names = {name.lower(): name for name in TABLE2}
    name = names.get(str(dataset_name).lower())
    if name is None:
        table2_params(dataset_name, num_labeled)  # raises, listing the known rows
    counts = sorted(TABLE2[name])
    return name, min(counts, key=lambda n: (abs(n - int(num_labeled)), -n))


def resolve_hyperparams(
    dataset_name: str | None = None, num_labeled: int | None = None, **overrides: Any
) -> DiffCLHyperParams:
    """Table 2 row (or ``DEFAULT_HYPERPARAMS`` when no dataset is named, see :func:`table2_name`) with explicit
    overrides applied.

    Any labeled count works: without an exact row, the row of the nearest count is used
    (:func:`nearest_table2_row`); the log names the row either way.

    Args:
        dataset_name: Table 2 dataset name or None.
        num_labeled: the number of labeled cases (required with ``dataset_name``; ignored without).
        overrides: any ``DiffCLHyperParams`` field; ``None`` values mean "keep the table value".

    Raises:
        ValueError: unknown dataset, missing ``num_labeled`` or unknown override name.
    """
    name = table2_name(dataset_name)
    if name is None:
        base = DEFAULT_HYPERPARAMS
    elif num_labeled is None:
        base = table2_params(name, -1)  # raises: a dataset needs num_labeled to pick its row (lists the rows)
    else:
        name, row = nearest_table2_row(name, num_labeled)
        base = table2_params(name, row)
        if row == int(num_labeled):
            logger.info(f"Table 2 row: {name}, {row} labeled.")
        else:
            logger.warning(
                f"Table 2 has no {name} row for {int(num_labeled)} labeled cases; using the nearest row, {name} "
                f"{row} labeled ({', '.join(f'{k}={v:g}' for k, v in base.as_dict().items())})."
            )
    unknown = set(overrides) - set(DiffCLHyperParams.__dataclass_fields__)
    if unknown:
        raise ValueError(f"Unknown hyper-parameter(s) {sorted(unknown)}; valid: {list(base.as_dict())}.")
    return replace(base, **{k: float(v) for k, v in overrides.items() if v is not None})


def epoch_length(num_unlabeled: int, unlabeled_batch_size: int, world_size: int = 1) -> int:
    """Iterations per epoch: one pass over the unlabeled cases, ``ceil(N_u / (b_u * world_size))``.

    Args:
        num_unlabeled: number of unlabeled training cases.
        unlabeled_batch_size: unlabeled cases per iteration on one rank.
        world_size: number of data-parallel ranks (each consumes its own slice of the global batch).
    """
    if num_unlabeled < 1 or unlabeled_batch_size < 1 or world_size < 1:
        raise ValueError(
            f"epoch_length needs positive sizes, got num_unlabeled={num_unlabeled}, "
            f"unlabeled_batch_size={unlabeled_batch_size}, world_size={world_size}."
        )
    return math.ceil(num_unlabeled / (unlabeled_batch_size * world_size))


def continuous_epoch(iteration: int, iterations_per_epoch: int) -> float:
    """Continuous epoch ``t = iteration / epoch_length`` read by the ramp (``iteration`` = completed iterations)."""
    return float(iteration) / float(iterations_per_epoch)
