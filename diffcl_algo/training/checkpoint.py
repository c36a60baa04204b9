"""Checkpointing: atomic writes, ``model.pt`` (CS weights), ``train_state.pt`` (everything to resume).

* ``atomic_save``: ``torch.save`` through :func:`diffcl_algo.utils.atomic_write`: a crash or a failing write never
  leaves a truncated checkpoint and never touches the previous file.
* ``ModelSaver`` (ignite handler): ``model.pt`` = the CS ``state_dict`` alone (what inference needs), written
  whenever the validation key metric (mean Dice) improves, or at the end of training when no validation ran.
* ``TrainStateSaver`` (ignite handler): ``train_state.pt`` every ``interval`` iterations and at the end:
  CS, DS, both heads, both optimizers, memory bank, AMP scaler, iteration, epoch, best metric, seed and a
  config summary. Everything in it is a tensor or a primitive container, so ``torch.load(weights_only=True)``
  reads it.
* ``TrainStateLoader`` (ignite handler): loads ``train_state.pt`` into a trainer (and the best-metric bookkeeping of a
  ``ModelSaver``).
  Because every random choice of the trainer is a function of ``(seed, iteration)``, this is an exact resume.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Optional

import torch
from ignite.engine import Engine, Events
from torch import nn

from diffcl_algo.utils import atomic_write, is_main_process

__all__ = [
    "ModelSaver",
    "TrainStateLoader",
    "TrainStateSaver",
    "atomic_save",
    "load_train_state",
    "require_checkpoint",
    "unwrap",
    "validated_cs_weights",
]

logger = logging.getLogger(__name__)

TRAIN_STATE_KEYS = ("cs_network", "ds_network", "cs_optimizer", "ds_optimizer", "iteration", "seed")


def unwrap(module: nn.Module) -> nn.Module:
    """The wrapped module of a ``DistributedDataParallel``/``DataParallel`` wrapper, else the module itself."""
    return module.module if hasattr(module, "module") and isinstance(module.module, nn.Module) else module


def require_checkpoint(path: str | os.PathLike) -> None:
    """Stop an evaluation or inference before it starts (no output folder, no engine) when the weights are missing.

    Raises:
        FileNotFoundError: ``path`` is not a file; the message names it and the option that sets it.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(
            f"checkpoint {path} does not exist; pass the trained weights with --ckpt_path <model.pt> "
            "(the model.pt that training writes to its output_dir), or --bundle_root <bundle folder> for the weights "
            "a bundle ships in its models/"
        )


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` atomically (:func:`diffcl_algo.utils.atomic_write`): a crash or a failing write
    never leaves a truncated checkpoint and never touches the previous file.

    Args:
        obj: what to save (state dicts, tensors, primitives).
        path: destination file; its directory is created if missing.
    """
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)


def load_train_state(path: str | os.PathLike) -> dict[str, Any]:
    """Read ``train_state.pt`` with ``torch.load(weights_only=True)`` on CPU.

    Raises:
        FileNotFoundError: ``path`` does not exist (the message names it).
        RuntimeError: the file cannot be read or lacks required entries (the message names it).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Cannot resume: train state file {str(path)!r} does not exist.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise RuntimeError(f"Cannot resume: train state file {str(path)!r} is unreadable ({e}).") from e
    missing = [k for k in TRAIN_STATE_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise RuntimeError(f"Cannot resume: train state file {str(path)!r} lacks {missing}.")
    return state


def validated_cs_weights(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The CS weights that validation scores and ``model.pt`` holds, from a ``train_state.pt`` dict: the average of
    the CS weights (``cs_ema``, an ``AveragedModel`` state dict whose ``module.`` entries are the network's) when the
    run kept one (``ema_decay`` > 0), else ``cs_network``."""
    if not state.get("cs_ema"):
        return state["cs_network"]
    return {k.removeprefix("module."): v for k, v in state["cs_ema"].items() if k.startswith("module.")}


class ModelSaver:
    """Write ``model.pt`` = the CS network's ``state_dict`` (DDP wrapper removed), rank 0 only.

    Attached to the trainer, it saves whenever ``evaluator.state.metrics[metric_name]`` beats the best so far
    (higher is better, e.g. mean Dice). At the end of training the last weights are saved if no validation
    ever produced a best model (``evaluator=None`` included).

    Args:
        network: the CS network.
        output_dir: directory of ``model.pt``.
        filename: file name (default ``model.pt``).
        metric_name: evaluator metric to maximise; default the evaluator's key metric.
        evaluator: the validation evaluator whose rounds select the model (None: the last weights).
    """

    def __init__(
        self,
        network: nn.Module,
        output_dir: str,
        filename: str = "model.pt",
        metric_name: Optional[str] = None,
        evaluator: Optional[Engine] = None,
    ) -> None:
        self.network = network
        self.evaluator = evaluator
        self.path = Path(output_dir) / filename
        self.metric_name = metric_name
        self.best_metric = float("-inf")
        self.best_iteration = -1
        self.trainer: Optional[Engine] = None

    def save(self) -> None:
        if is_main_process():
            atomic_save(unwrap(self.network).state_dict(), self.path)

    def attach(self, trainer: Engine) -> None:
        """Listen to the evaluator's rounds and to the end of training."""
        self.trainer = trainer
        if self.evaluator is not None:
            self.evaluator.add_event_handler(Events.EPOCH_COMPLETED, self._on_validation)
        trainer.add_event_handler(Events.COMPLETED, self._on_completed)

    def _on_validation(self, evaluator: Engine) -> None:
        name = self.metric_name or getattr(evaluator.state, "key_metric_name", None)
        if name is None or name not in evaluator.state.metrics:
            raise KeyError(f"ModelSaver: metric {name!r} not in evaluator metrics {list(evaluator.state.metrics)}.")
        value = float(evaluator.state.metrics[name])
        if value > self.best_metric:
            self.best_metric = value
            self.best_iteration = int(self.trainer.state.iteration) if self.trainer is not None else -1
            self.save()
            logger.info(f"New best {name}={value:.4f} at iteration {self.best_iteration}: saved {self.path}")

    def _on_completed(self, trainer: Engine) -> None:
        if self.best_iteration < 0:
            self.save()
            logger.info(f"No validated best model: saved the last CS weights to {self.path}")


class TrainStateSaver:
    """Write ``train_state.pt`` every ``interval`` iterations and when training completes (rank 0 only).

    The trainer must provide ``train_state() -> dict`` (see ``DiffCLTrainer.train_state``). Attach it after the
    ``ValidationHandler`` so a checkpoint written at a validation iteration already holds that validation's best.

    Args:
        output_dir: directory of ``train_state.pt``.
        interval: iterations between saves (``>= 1``; a run that saves only at the end could not be resumed after a
            crash: use ``interval = max_iterations`` for that on purpose).
        filename: file name (default ``train_state.pt``).
        model_saver: its best metric / iteration are stored too and restored by ``TrainStateLoader``.
        config: plain config summary (primitives only) stored under ``"config"``.
    """

    def __init__(
        self,
        output_dir: str,
        interval: int = 1000,
        filename: str = "train_state.pt",
        model_saver: Optional[ModelSaver] = None,
        config: Optional[dict[str, Any]] = None,
    ) -> None:
        if int(interval) < 1:
            raise ValueError(f"ckpt_interval (TrainStateSaver interval) must be >= 1 iteration, got {interval}.")
        self.path = Path(output_dir) / filename
        self.interval = int(interval)
        self.model_saver = model_saver
        self.config = dict(config or {})
        self._last_saved: Optional[tuple] = None

    def attach(self, trainer: Engine) -> None:
        trainer.add_event_handler(Events.ITERATION_COMPLETED(every=self.interval), self.save)
        trainer.add_event_handler(Events.COMPLETED, self.save)

    def save(self, trainer: Engine) -> None:
        best = (self.model_saver.best_metric, self.model_saver.best_iteration) if self.model_saver else None
        if self._last_saved == (trainer.state.iteration, best) or not is_main_process():
            return  # already saved this exact state (e.g. a final iteration that is a multiple of interval)
        state = trainer.train_state()
        if best is not None:
            state["best_metric"], state["best_iteration"] = float(best[0]), int(best[1])
        state["config"] = self.config
        atomic_save(state, self.path)
        self._last_saved = (trainer.state.iteration, best)


class TrainStateLoader:
    """Resume a trainer (and a ``ModelSaver``'s best metric) from ``train_state.pt`` when attached.

    The last of the bundle's ``train#handlers`` (disabled unless ``--resume``): attaching happens at the end of the
    trainer's construction, so the next ``run()`` continues at the saved iteration. Because every random choice of
    the trainer is a function of ``(seed, iteration)``, this is an exact resume.

    Args:
        path: the ``train_state.pt`` file.
        model_saver: optional; receives ``best_metric`` / ``best_iteration``.

    Raises:
        FileNotFoundError / RuntimeError: missing or unreadable file (message names the path), at attach.
    """

    def __init__(self, path: str | os.PathLike, model_saver: Optional[ModelSaver] = None) -> None:
        self.path = Path(path)
        self.model_saver = model_saver

    def attach(self, trainer: Engine) -> None:
        """Load the state into ``trainer`` (a ``DiffCLTrainer``: ``load_train_state``) and the saver."""
        state = load_train_state(self.path)
        trainer.load_train_state(state)
        if self.model_saver is not None:
            self.model_saver.best_metric = float(state.get("best_metric", float("-inf")))
            self.model_saver.best_iteration = int(state.get("best_iteration", -1))
        logger.info(f"Resumed from {self.path} at iteration {int(state['iteration'])}")
