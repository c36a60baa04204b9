"""Training handlers (ignite), attached by the bundle's ``train#handlers`` list like MONAI's own.

* :class:`GuardedValidationHandler`: MONAI's ``ValidationHandler`` plus a policy for a validation round that raises.
* :class:`ValidationReport`: one line per validation round in the trainer's units (iteration, epoch, best round)
  and the round's metrics in TensorBoard at the trainer's iteration.
* :class:`RunLog`: the run's ``train.log`` (the package's loggers, INFO) and the closing of its TensorBoard writer.
* :class:`IterationProgressBar`: one tqdm bar over the whole run (``max_iterations``) with the loss terms.
* :class:`PseudoLabelMonitor`: a research diagnostic, the Dice of each iteration's pseudo-labels against the unlabeled
  cases' hidden labels (attached by ``experiments/monitor.yaml``; nothing is trained on them).

The checkpoint handlers (``model.pt``, ``train_state.pt``) are in :mod:`diffcl_algo.training.checkpoint`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

from ignite.engine import Engine, Events
from monai.data import decollate_batch
from monai.handlers import ValidationHandler
from tqdm import tqdm

from diffcl_algo.data.cases import item_case_name
from diffcl_algo.data.transforms import HIDDEN_LABEL
from diffcl_algo.evaluation.handlers import BarHandler
from diffcl_algo.evaluation.metrics import foreground_dice
from diffcl_algo.utils import is_main_process

__all__ = [
    "LOG_NAMES",
    "VAL_ERROR_MODES",
    "GuardedValidationHandler",
    "IterationProgressBar",
    "PseudoLabelMonitor",
    "RunLog",
    "ValidationReport",
]

logger = logging.getLogger(__name__)


#: ``GuardedValidationHandler(val_error=...)`` choices.
VAL_ERROR_MODES = ("raise", "continue")


def _failing_cases(evaluator: Engine) -> list[str]:
    """Names of the case(s) an evaluator was processing when it raised.

    From the batch when it was loaded (:func:`~diffcl_algo.data.cases.item_case_name`); when loading itself failed,
    the dataset entries of the batch being read (sequential loader: ``state.iteration`` batches were read before).
    """
    batch = evaluator.state.batch
    if isinstance(batch, Mapping):  # collated: one item per case
        batch = decollate_batch(batch)
    names = [item_case_name(item, keys=("image",)) for item in batch or () if isinstance(item, Mapping)]
    if any(names):
        return [n for n in names if n]
    loader = getattr(evaluator, "data_loader", None)
    data = getattr(getattr(loader, "dataset", None), "data", None)
    if batch is None and isinstance(data, Sequence):
        size = getattr(loader, "batch_size", None) or 1
        start = int(evaluator.state.iteration) * size
        entries = data[start : start + size]
        return [str(e.get("case", e.get("image"))) if isinstance(e, Mapping) else str(e) for e in entries]
    return []


def _describe(error: BaseException) -> str:
    """``Type: message`` of an exception and of its causes (MONAI wraps reader errors in "applying transform")."""
    parts, seen = [], set()
    while error is not None and id(error) not in seen and len(parts) < 4:
        seen.add(id(error))
        parts.append(f"{type(error).__name__}: {error}")
        error = error.__cause__ or error.__context__
    return " <- caused by ".join(parts)


class GuardedValidationHandler(ValidationHandler):
    """MONAI ``ValidationHandler`` with a policy for a validation round that raises.

    A long run can meet a validation failure that the up-front data check could not see (a file corrupted or
    removed after training started, a transform or an evaluator handler raising). The failure is logged on
    ``diffcl_algo.training.handlers`` (so in ``train.log``) with the training iteration, the case(s) being validated
    and the error, then, per ``val_error``:

    * ``"raise"``: training stops; a ``RuntimeError`` naming the iteration and the case(s), chained to the
      original exception, propagates out of ``trainer.run()`` (``train_state.pt`` holds the last periodic save).
    * ``"continue"``: the round is skipped (no metric, nothing saved) and training goes on; the next round runs
      normally.

    In both modes ``model.pt`` is untouched by the failed round: ``checkpoint.ModelSaver`` reacts only to a
    completed round (evaluator ``EPOCH_COMPLETED``), so the partial metrics of a failed round are never compared
    with the best, and it only ever replaces ``model.pt`` by a better model.

    Under DDP every rank validates its share of the cases and the metrics are gathered: a failure on one rank
    leaves the others waiting in that gather, so use ``"raise"`` there (torchrun then stops the other ranks).

    Args:
        interval, validator, epoch_level, exec_at_start: as ``monai.handlers.ValidationHandler``.
        val_error: ``"raise"`` (default) or ``"continue"``.
    """

    def __init__(
        self,
        interval: int,
        validator: Optional[Any] = None,
        epoch_level: bool = True,
        exec_at_start: bool = False,
        val_error: str = "raise",
    ) -> None:
        if val_error not in VAL_ERROR_MODES:
            raise ValueError(f"val_error must be one of {VAL_ERROR_MODES}, got {val_error!r}.")
        if int(interval) < 1:
            raise ValueError(f"validation interval must be >= 1, got {interval}.")
        super().__init__(interval, validator, epoch_level, exec_at_start)
        self.val_error = val_error

    def __call__(self, engine: Engine) -> None:
        if self.validator is None:
            raise RuntimeError("GuardedValidationHandler: set the validator before training.")
        try:
            super().__call__(engine)
        except Exception as e:
            # ignite keeps the dead run generator of a run that raised, so the evaluator's next run() would return
            # at once without validating; forget it so the next round runs
            self.validator._internal_run_generator = None
            cases = _failing_cases(self.validator)
            what = f"Validation at iteration {engine.state.iteration} failed on case(s) {cases or 'unknown'}"
            what += f": {_describe(e)}"
            action = "training stops" if self.val_error == "raise" else "round skipped, training continues"
            logger.error(f"{what} ({action}; val_error={self.val_error!r})")
            if self.val_error == "raise":
                raise RuntimeError(what) from e


# MONAI's StatsHandler loggers do not propagate, so the log file is attached to each of them
LOG_NAMES = ("diffcl_algo", "diffcl_algo.train", "diffcl_algo.val")


class RunLog:
    """The run's ``<output_dir>/train.log`` (the :data:`LOG_NAMES` loggers, INFO) on the main process, and the
    run's TensorBoard writer, both closed by :meth:`close` (the bundle's ``finalize``; ``DiffCLTrainer.close``).

    Args:
        output_dir: the run folder (created if missing).
        summary_writer: the run's TensorBoard writer (None: none, e.g. on ranks other than 0).
    """

    def __init__(self, output_dir: Union[str, os.PathLike], summary_writer: Optional[Any] = None) -> None:
        self.output_dir = Path(output_dir)
        self.summary_writer = summary_writer
        self.handler: Optional[logging.Handler] = None

    def attach(self, engine: Engine) -> None:
        """Start appending to ``train.log`` (main process only)."""
        if self.handler is not None or not is_main_process():
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.handler = logging.FileHandler(self.output_dir / "train.log")
        self.handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
        for name in LOG_NAMES:
            log = logging.getLogger(name)
            log.setLevel(logging.INFO)
            log.addHandler(self.handler)

    def close(self) -> None:
        """Detach and close ``train.log``, close the TensorBoard writer (idempotent)."""
        if self.handler is not None:
            for name in LOG_NAMES:
                logging.getLogger(name).removeHandler(self.handler)
            self.handler.close()
            self.handler = None
        if self.summary_writer is not None:
            self.summary_writer.close()


class IterationProgressBar(BarHandler):
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


class ValidationReport:
    """After each validation round: one INFO line in the trainer's units, e.g. ``validation at iteration 256
    (epoch 8.00): val_mean_dice: 0.8123, ...; best val_mean_dice 0.8123 at iteration 256``, and the round's metrics
    in TensorBoard at the trainer's iteration.

    Attached to the trainer (``train#handlers``); it listens to the evaluator's ``EPOCH_COMPLETED``. The best round
    is ``model_saver``'s (``model.pt``) when given, so it survives a resume.

    Args:
        evaluator: the validation evaluator.
        summary_writer: TensorBoard writer (None: log lines only).
        model_saver: ``ModelSaver`` whose best metric and iteration the line names.
        name: logger name (a child of ``diffcl_algo``, whose handler writes ``train.log``).
    """

    def __init__(
        self,
        evaluator: Engine,
        summary_writer: Optional[Any] = None,
        model_saver: Optional[Any] = None,
        name: str = "diffcl_algo.validation",
    ) -> None:
        self.evaluator, self.summary_writer, self.model_saver = evaluator, summary_writer, model_saver
        self.logger = logging.getLogger(name)
        self.best: tuple[float, int] | None = None
        self.trainer: Optional[Engine] = None

    def attach(self, trainer: Engine) -> None:
        """Report when the evaluator completes a round of this trainer (main process only)."""
        self.trainer = trainer
        if is_main_process():
            self.evaluator.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, evaluator: Engine) -> None:
        iteration = int(self.trainer.state.iteration)
        epoch = iteration / max(int(self.trainer.state.epoch_length or 1), 1)
        metrics = {k: float(v) for k, v in evaluator.state.metrics.items() if isinstance(v, (int, float))}
        text = ", ".join(f"{k}: {v:.4f}" for k, v in metrics.items())
        key = getattr(evaluator.state, "key_metric_name", None)
        saver = self.model_saver
        if saver is not None and saver.best_iteration >= 0:
            self.best = (float(saver.best_metric), int(saver.best_iteration))
        elif key in metrics and (self.best is None or metrics[key] > self.best[0]):
            self.best = (metrics[key], iteration)
        best = f"; best {key} {self.best[0]:.4f} at iteration {self.best[1]}" if self.best else ""
        self.logger.info(f"validation at iteration {iteration} (epoch {epoch:.2f}): {text}{best}")
        if self.summary_writer is not None:
            for name, value in metrics.items():
                self.summary_writer.add_scalar(name, value, iteration)


class PseudoLabelMonitor:
    """Dice of the CS / DS pseudo-labels ``(Y^u, Y~u)`` of each iteration against the unlabeled patches' hidden labels.

    A research diagnostic: the batch must carry ``"hidden_label"`` (``CaseSplits(hidden_labels=True)`` and the
    unlabeled transform's keys, as ``experiments/monitor.yaml`` sets them) and the trainer must run cross
    pseudo-supervision (it leaves ``engine.state.pseudo_labels``); otherwise it records nothing. Each value goes to
    ``engine.state.metrics`` (``pseudo_dice_cs``, ``pseudo_dice_ds``) and to TensorBoard at the iteration.

    Args:
        summary_writer: the run's TensorBoard writer (None: none, e.g. on ranks other than 0).
    """

    KEYS = ("pseudo_dice_cs", "pseudo_dice_ds")

    def __init__(self, summary_writer: Optional[Any] = None) -> None:
        self.summary_writer = summary_writer

    def attach(self, engine: Engine) -> None:
        """Record after every iteration."""
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        pseudo = getattr(engine.state, "pseudo_labels", None)
        batch = engine.state.batch
        if pseudo is None or not isinstance(batch, Mapping) or HIDDEN_LABEL not in batch:
            return
        hidden = batch[HIDDEN_LABEL]
        for key, labels in zip(self.KEYS, pseudo):
            engine.state.metrics[key] = foreground_dice(labels, hidden.to(labels.device))
            if self.summary_writer is not None:
                self.summary_writer.add_scalar(key, engine.state.metrics[key], engine.state.iteration)
