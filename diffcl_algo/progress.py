"""Feedback while a workflow runs: ignite handlers for the training bar, per-case progress and validation lines.

- :class:`IterationProgressBar`: one tqdm bar for the whole training run (``max_iterations``, so its ETA is the
  run's, not an epoch's; ignite's ``ProgressBar`` restarts every epoch), with the loss terms.
- :class:`CaseProgress`: per-case progress of an evaluator (validation, evaluation, inference): a tqdm bar whose
  postfix shows the case just finished and its Dice, or one log line per case when the bar is off.
- :class:`ValidationLog`: one line per validation round, labelled with the trainer's iteration and epoch (MONAI's
  ``StatsHandler`` on an evaluator prints the trainer iteration as ``Epoch[...]`` and the best round's epoch).
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, Mapping, Sequence

import torch
from ignite.engine import Engine, Events
from monai.data import MetaTensor, decollate_batch
from monai.utils import ImageMetaKey
from tqdm import tqdm

from diffcl_algo.evaluation import CASE_META_KEY, case_name

__all__ = ["CaseProgress", "IterationProgressBar", "ValidationLog", "foreground_dice"]

logger = logging.getLogger("diffcl_algo.progress")


def foreground_dice(pred: torch.Tensor, label: torch.Tensor) -> float:
    """Dice of the foreground (``> 0``) of two label maps (1, *S) or one-hot maps (2, *S); 1.0 when both are empty."""
    p = pred[1] > 0.5 if pred.shape[0] == 2 else pred[0] > 0
    g = label[1] > 0.5 if label.shape[0] == 2 else label[0] > 0
    total = int(p.sum()) + int(g.sum())
    return 1.0 if total == 0 else 2.0 * int((p & g).sum()) / total


def _case(item: Mapping[str, Any]) -> str:
    """Case name of one decollated output: its ``case`` entry, the prediction's metadata, else the image path."""
    if item.get("case") is not None:
        return str(item["case"])
    for key in ("pred", "image"):
        x = item.get(key)
        if isinstance(x, MetaTensor):
            if x.meta.get(CASE_META_KEY) is not None:
                return str(x.meta[CASE_META_KEY])
            if x.meta.get(ImageMetaKey.FILENAME_OR_OBJ):
                return case_name(x.meta[ImageMetaKey.FILENAME_OR_OBJ])
    return "?"


class _Bar:
    """A tqdm bar opened by a subclass and closed when its engine completes. No ``EXCEPTION_RAISED`` handler: ignite
    stops re-raising an engine's exceptions once one is registered."""

    bar: tqdm | None = None

    def attach_bar(self, engine: Engine, opened: Any, updated: Any, closed: Any) -> None:
        """Open the bar on ``opened``, call ``self.update`` on ``updated``, close it on ``closed``."""
        engine.add_event_handler(opened, self.open)
        engine.add_event_handler(updated, self.update)
        engine.add_event_handler(closed, self.close)

    def close(self, engine: Engine, *_: Any) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class IterationProgressBar(_Bar):
    """tqdm bar over the training run, ``iteration / max_iterations`` (ETA of the whole run), with the losses.

    Args:
        max_iterations: the run's length (the bar's total).
        keys: keys of ``engine.state.output`` shown after the bar.
    """

    def __init__(self, max_iterations: int, keys: Sequence[str] = ()) -> None:
        self.max_iterations = int(max_iterations)
        self.keys = tuple(keys)

    def attach(self, engine: Engine) -> None:
        """Open on ``STARTED`` (from the resumed iteration), step on ``ITERATION_COMPLETED``, close at the end."""
        self.attach_bar(engine, Events.STARTED, Events.ITERATION_COMPLETED, Events.COMPLETED)

    def open(self, engine: Engine) -> None:
        self.bar = tqdm(
            total=self.max_iterations, initial=int(engine.state.iteration), desc="training", unit="it", leave=True
        )

    def update(self, engine: Engine) -> None:
        if self.bar is None:
            return
        output = engine.state.output if isinstance(engine.state.output, Mapping) else {}
        self.bar.set_postfix({k: f"{float(output[k]):.4f}" for k in self.keys if k in output}, refresh=False)
        self.bar.update(int(engine.state.iteration) - self.bar.n)


class CaseProgress(_Bar):
    """Per-case progress of an evaluator: ``<desc> case i/n (<case>): Dice d`` as each case finishes.

    With ``progress`` a tqdm bar (stderr) counts the cases and shows the last case and its Dice; without it each
    case is one INFO line of the ``diffcl_algo.progress`` logger (so it reaches ``train.log``). The Dice is that of
    the foreground of the post-processed ``pred`` and ``label`` (absent without a label, e.g. inference).

    Args:
        desc: what runs (``"validation"``, ``"evaluation"``, ``"inference"``).
        progress: show a bar instead of log lines; None: a bar when stderr is a terminal.
    """

    def __init__(self, desc: str = "evaluation", progress: bool | None = None) -> None:
        self.desc = desc
        self.progress = sys.stderr.isatty() if progress is None else bool(progress)
        self.done = 0
        self.started = 0.0

    def attach(self, engine: Engine) -> None:
        """Reset on ``EPOCH_STARTED``, report on ``ITERATION_COMPLETED``, close on ``EPOCH_COMPLETED``."""
        self.attach_bar(engine, Events.EPOCH_STARTED, Events.ITERATION_COMPLETED, Events.EPOCH_COMPLETED)

    def open(self, engine: Engine) -> None:
        self.done, self.started = 0, time.perf_counter()
        if self.progress:
            self.bar = tqdm(total=engine.state.epoch_length, desc=self.desc, unit="case", leave=True)

    def update(self, engine: Engine) -> None:
        output = engine.state.output
        items = decollate_batch(output) if isinstance(output, Mapping) else list(output or [])
        for item in items:
            self.done += 1
            case = _case(item)
            text = case
            if item.get("label") is not None and item.get("pred") is not None:
                text += f": Dice {foreground_dice(item['pred'], item['label']):.4f}"
            if self.bar is not None:
                self.bar.set_postfix_str(text, refresh=False)
                self.bar.update(1)
            else:
                total = engine.state.epoch_length
                elapsed = time.perf_counter() - self.started
                logger.info(f"{self.desc} case {self.done}/{total} ({text}) after {elapsed:.1f} s")


class ValidationLog:
    """One INFO line per validation round, in the trainer's units, e.g. ``validation at iteration 256
    (epoch 8.00): val_mean_dice: 0.8123, ...; best val_mean_dice 0.8123 at iteration 256``.

    The best round is the trainer's ``model_saver``'s (``model.pt``) when it has one, so it survives a resume.

    Args:
        trainer: the training engine (its ``state.iteration`` and ``state.epoch_length`` label the round).
        name: logger name (a child of ``diffcl_algo``, whose handler writes ``train.log``).
    """

    def __init__(self, trainer: Engine, name: str = "diffcl_algo.validation") -> None:
        self.trainer = trainer
        self.logger = logging.getLogger(name)
        self.best: tuple[float, int] | None = None

    def attach(self, evaluator: Engine) -> None:
        """Log when the evaluator completes a round."""
        evaluator.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, evaluator: Engine) -> None:
        iteration = int(self.trainer.state.iteration)
        epoch = iteration / max(int(self.trainer.state.epoch_length or 1), 1)
        metrics = evaluator.state.metrics
        text = ", ".join(f"{k}: {float(v):.4f}" for k, v in metrics.items() if isinstance(v, (int, float)))
        key = getattr(evaluator.state, "key_metric_name", None)
        saver = getattr(self.trainer, "model_saver", None)  # model.pt's bookkeeping (survives a resume)
        if saver is not None and getattr(saver, "best_iteration", -1) >= 0:
            self.best = (float(saver.best_metric), int(saver.best_iteration))
        elif key in metrics and (self.best is None or float(metrics[key]) > self.best[0]):
            self.best = (float(metrics[key]), iteration)
        best = f"; best {key} {self.best[0]:.4f} at iteration {self.best[1]}" if self.best else ""
        self.logger.info(f"validation at iteration {iteration} (epoch {epoch:.2f}): {text}{best}")
