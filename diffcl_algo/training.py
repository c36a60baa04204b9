"""The bundle runner: a bundle's workflow from Python, as ``python -m monai.bundle run`` runs it.

A bundle is named by ``None`` (the package's graph ``diffcl_algo/configs`` with its default values, e.g. for
Auto3DSeg), a dataset (``"la"``, ``"brats"``, ``"pancreas"``: the graph with ``diffcl_algo/configs/datasets/<name>``)
or a bundle folder (``bundles/la`` or a copy of it: its ``configs/<workflow>.yaml``). Overrides are config ids
(nested ids as ``"a#b"``) and are checked against the bundle's ids, so a typo is an error, not a silent new key.

* :func:`load_bundle`: the ``ConfigParser`` of a workflow with overrides (plus ``multi_gpu_train.yaml`` for training
  under ``torchrun``).
* :func:`run_workflow`: ``monai.bundle.ConfigWorkflow`` initialised, run and finalised (the demo, tests).
* :func:`build_trainer` / :func:`train`: the training graph's ``DiffCLTrainer``, ready to run / run and closed
  (tests, benchmarks, Auto3DSeg).
* :func:`as_bool`, :func:`check_settings`, :func:`resume_path`: what the configs call on their values.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from monai.bundle import ConfigParser, ConfigWorkflow
from monai.bundle.utils import ID_SEP_KEY

from diffcl_algo.bundles import CONFIG_DIR, DATASETS, WORKFLOWS, check_override_ids, dataset_values
from diffcl_algo.engine import DiffCLTrainer

__all__ = [
    "RUN_IDS",
    "as_bool",
    "build_trainer",
    "check_settings",
    "config_error_cause",
    "load_bundle",
    "resume_path",
    "run_workflow",
    "train",
]

#: Workflow -> the run id of its config (``python -m monai.bundle run <run id>``).
RUN_IDS = {"train": "training", "evaluate": "evaluating", "inference": "inferring"}

Bundle = Union[str, os.PathLike, None]

TRUE_STRINGS = ("1", "true", "yes", "on")


def as_bool(value: Any) -> bool:
    """A switch given as a boolean or as a command-line string (``"true"``, ``"1"``, ``"yes"``, ``"on"``: True)."""
    return value if isinstance(value, bool) else str(value).strip().lower() in TRUE_STRINGS


def resume_path(resume: Union[bool, str, os.PathLike, None], default: Union[str, os.PathLike]) -> Optional[Path]:
    """The ``train_state.pt`` to resume from: ``default`` for true-ish values, None for false-ish, else ``resume``.

    Accepts the strings a command line gives (``"true"``, ``"false"``, ``"1"``, ``"0"``, ...) as well as booleans.
    """
    if resume is None or resume is False:
        return None
    if resume is True:
        return Path(default)
    text = str(resume).strip()
    if text.lower() in TRUE_STRINGS:
        return Path(default)
    if text.lower() in ("", "0", "false", "no", "off", "none", "null"):
        return None
    return Path(text)


def check_settings(patch_size: Sequence[int], val_interval: int, factor: int = 16) -> None:
    """Refuse settings that would fail later or silently mean something else (run before any data is read).

    Args:
        patch_size: training patch; every axis must be divisible by ``factor`` (the V-Net halves it 4 times).
        val_interval: iterations between validations; 0 means never, a negative value is an error.
        factor: the network's total downsampling factor.

    Raises:
        ValueError: naming the setting and the rule it breaks.
    """
    if int(val_interval) < 0:
        raise ValueError(f"val_interval must be >= 0 (0: never validate), got {val_interval}.")
    if any(int(p) < factor or int(p) % factor for p in patch_size):
        raise ValueError(
            f"patch_size {tuple(int(p) for p in patch_size)} must be divisible by {factor} (and >= {factor}) on "
            f"every axis: the V-Net downsamples {factor.bit_length() - 1} times by 2."
        )


def _sources(bundle: Bundle, workflow: str) -> tuple[list[str], dict[str, Any], Optional[str]]:
    """``(config files, dataset values, metadata file)`` of a bundle's workflow."""
    if workflow not in WORKFLOWS:
        raise ValueError(f"Unknown workflow {workflow!r}; choose one of {list(WORKFLOWS)}.")
    ddp = workflow == "train" and int(os.environ.get("WORLD_SIZE", "1")) > 1
    if bundle is None or str(bundle) in DATASETS:
        files = [str(CONFIG_DIR / f) for f in WORKFLOWS[workflow]]
        values = {} if bundle is None else dataset_values(str(bundle))
        return files + ([str(CONFIG_DIR / "multi_gpu_train.yaml")] if ddp else []), values, None
    configs = Path(bundle) / "configs"
    files = [configs / f"{workflow}.yaml"] + ([configs / "multi_gpu_train.yaml"] if ddp else [])
    for file in files:
        if not file.is_file():
            raise FileNotFoundError(f"Bundle {str(bundle)!r}: {file} does not exist (bundles: {list(DATASETS)}).")
    return [str(f) for f in files], {}, str(configs / "metadata.json")


def _override(parser: ConfigParser, bundle: Bundle, workflow: str, values: dict, overrides: dict) -> None:
    """Set a dataset's ``values`` and the ``overrides`` (checked: an id the config lacks is a ``ValueError`` naming
    it and the closest id it has, :func:`~diffcl_algo.bundles.check_override_ids`; tuples become lists, paths
    strings, ``device="auto"`` keeps the config's)."""
    check_override_ids(parser.get(), list(overrides), f"the {workflow} config of bundle {str(bundle)!r}")
    checked = {k: _plain(v) for k, v in overrides.items() if not (k == "device" and v == "auto")}
    parser.update({**{k: v for k, v in values.items() if k in parser}, **checked})


def _plain(value: Any) -> Any:
    """Tuples as lists and paths as strings, so that overrides look like YAML values."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value) if isinstance(value, os.PathLike) else value


def load_bundle(bundle: Bundle = None, workflow: str = "train", **overrides: Any) -> ConfigParser:
    """The config of a bundle's workflow with ``overrides``, parsed (nothing instantiated yet).

    Args:
        bundle: None, a dataset name or a bundle folder (see the module docstring).
        workflow: ``"train"``, ``"evaluate"`` or ``"inference"``.
        overrides: config ids and values (``device="auto"`` keeps the config's choice).

    Raises:
        ValueError: an unknown workflow, or an override id the config does not have.
        FileNotFoundError: the bundle folder lacks the workflow's config.
    """
    files, values, _ = _sources(bundle, workflow)
    parser = ConfigParser()
    parser.read_config(files)
    _override(parser, bundle, workflow, values, overrides)
    parser.parse()
    return parser


def run_workflow(bundle: Bundle, workflow: str, **overrides: Any) -> ConfigWorkflow:
    """Run one workflow like ``python -m monai.bundle run <run id> --config_file ... --<id> <value>``.

    Args:
        bundle: None, a dataset name or a bundle folder (see the module docstring).
        workflow: ``"train"``, ``"evaluate"`` or ``"inference"``.
        overrides: config ids and values, checked against the config.

    Returns:
        The finished workflow (``workflow.parser.get_parsed_content(id)`` reads its objects).
    """
    files, values, meta = _sources(bundle, workflow)
    wf = ConfigWorkflow(
        config_file=files,
        meta_file=meta,
        logging_file=str(CONFIG_DIR / "logging.conf"),
        workflow_type="train" if workflow == "train" else "infer",
        run_id=RUN_IDS[workflow],
    )
    _override(wf.parser, bundle, workflow, values, overrides)
    wf.initialize()
    wf.run()
    wf.finalize()
    return wf


def build_trainer(bundle: Bundle = None, **overrides: Any) -> DiffCLTrainer:
    """The ``train#trainer`` of a bundle's training graph, with every handler attached, not yet run.

    The config's ``initialize`` runs first (settings check, seeding; ``torch.distributed`` under ``torchrun``, where
    ``multi_gpu_train.yaml`` is merged), then ``data#check`` (every case is read once), as
    ``python -m monai.bundle run training`` does. Example::

        build_trainer(dataset_dir="data/LA", num_labeled=8, max_iterations=100, output_dir="runs/la")

    Args:
        bundle: None (the package's graph), a dataset name or a bundle folder.
        overrides: config ids and values (``docs/bundles.md``); an id the config lacks is an error.

    Returns:
        The trainer; ``trainer.evaluator`` (or None), ``trainer.model_saver``, ``trainer.train_state_saver``.
    """
    parser = load_bundle(bundle, "train", **overrides)
    try:
        for i in range(len(parser["initialize"])):
            parser.get_parsed_content(f"initialize{ID_SEP_KEY}{i}")
        parser.get_parsed_content("data#check")
        return parser.get_parsed_content("train#trainer")
    except RuntimeError as e:
        raise config_error_cause(e) from None


def config_error_cause(error: BaseException) -> BaseException:
    """The exception a MONAI config wrapped (``"Failed to instantiate ..."`` / ``"Failed to evaluate ..."``).

    MONAI re-raises every error of a config item as a ``RuntimeError`` naming the item; this follows
    ``__cause__`` through those wrappers to the original error (e.g. the ``DataError`` naming a missing file).
    """
    while (
        isinstance(error, RuntimeError)
        and str(error).startswith(("Failed to instantiate", "Failed to evaluate"))
        and error.__cause__ is not None
    ):
        error = error.__cause__
    return error


def train(bundle: Bundle = None, **overrides: Any) -> dict[str, Any]:
    """``build_trainer(bundle, **overrides)``, run to ``max_iterations``, closed; returns a summary.

    Returns:
        ``{"iteration", "best_metric", "best_iteration", "model_path", "train_state_path", "output"}``.
    """
    trainer = build_trainer(bundle, **overrides)
    try:
        trainer.run()
    finally:
        trainer.close()
    best = trainer.model_saver.best_metric
    return {
        "iteration": int(trainer.state.iteration),
        "best_metric": None if math.isinf(best) else best,
        "best_iteration": trainer.model_saver.best_iteration,
        "model_path": str(trainer.model_saver.path),
        "train_state_path": str(trainer.train_state_saver.path),
        "output": trainer.state.output,
    }
