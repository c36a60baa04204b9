"""Running a bundle: from Python (:func:`run_workflow`, :func:`build_trainer`, :func:`train`) and from the command line
(:func:`run`, ``python -m diffcl_algo run``), both as ``python -m monai.bundle run`` runs it.

A bundle is named by ``None`` (the package's graph ``diffcl_algo/configs`` with its default values, e.g. for
Auto3DSeg), a dataset (``"la"``, ``"brats"``, ``"pancreas"``: the graph with ``diffcl_algo/configs/datasets/<name>``)
or a bundle folder (``bundles/la`` or a copy of it: its ``configs/<workflow>.yaml``). Overrides are config ids
(nested ids as ``"a#b"``) and are checked against the bundle's ids, so a typo is an error, not a silent new key.

* :func:`load_bundle`: the ``ConfigParser`` of a workflow with overrides (plus ``multi_gpu_train.yaml`` for training
  under ``torchrun``).
* :func:`run_workflow`: ``monai.bundle.ConfigWorkflow`` initialised, run and finalised (the demo, Auto3DSeg, tests).
* :func:`build_trainer` / :func:`train`: the training graph's ``DiffCLTrainer``, ready to run / run and closed
  (tests, benchmarks, Auto3DSeg).
* :func:`run`: the stock ``python -m monai.bundle run`` with the options checked first, ``--help`` listing a config's
  ids, and the torch thread count set (:func:`default_num_threads`); the command line (:mod:`diffcl_algo.cli`) reports
  a user error (missing data, checkpoint, bad value) in one line.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Sequence, Union

import torch
from monai.bundle import ConfigParser, ConfigWorkflow, scripts
from monai.bundle.utils import ID_SEP_KEY

from diffcl_algo.bundle.compose import CONFIG_DIR, DATASETS, WORKFLOWS, workflow_values
from diffcl_algo.bundle.expressions import check_override_ids, config_files
from diffcl_algo.training.checkpoint import ModelSaver, TrainStateSaver
from diffcl_algo.training.trainer import DiffCLTrainer
from diffcl_algo.utils import config_error_cause

__all__ = [
    "RUN_IDS",
    "build_trainer",
    "default_num_threads",
    "help_epilog",
    "load_bundle",
    "metadata_file",
    "run",
    "run_workflow",
    "train",
]

#: Workflow -> the run id of its config (``python -m monai.bundle run <run id>``).
RUN_IDS = {"train": "training", "evaluate": "evaluating", "inference": "inferring"}

Bundle = Union[str, os.PathLike, None]


#: ``meta_file`` of a config without metadata: none to read (MONAI's default, ``configs/metadata.json`` next to the
#: first config, would log an ``ERROR`` on every run where it is absent, as for the package's graph).
NO_METADATA: list[str] = []


def _sources(bundle: Bundle, workflow: str) -> tuple[list[str], dict[str, Any], Union[str, list[str]]]:
    """``(config files, dataset values, metadata file or NO_METADATA)`` of a bundle's workflow."""
    if workflow not in WORKFLOWS:
        raise ValueError(f"Unknown workflow {workflow!r}; choose one of {list(WORKFLOWS)}.")
    ddp = workflow == "train" and int(os.environ.get("WORLD_SIZE", "1")) > 1
    if bundle is None or str(bundle) in DATASETS:
        files = [str(CONFIG_DIR / f) for f in WORKFLOWS[workflow]]
        values = {} if bundle is None else workflow_values(str(bundle), workflow)
        return files + ([str(CONFIG_DIR / "multi_gpu_train.yaml")] if ddp else []), values, list(NO_METADATA)
    configs = Path(bundle) / "configs"
    files = [configs / f"{workflow}.yaml"] + ([configs / "multi_gpu_train.yaml"] if ddp else [])
    for file in files:
        if not file.is_file():
            raise FileNotFoundError(f"Bundle {str(bundle)!r}: {file} does not exist (bundles: {list(DATASETS)}).")
    meta = configs / "metadata.json"
    return [str(f) for f in files], {}, str(meta) if meta.is_file() else list(NO_METADATA)


def metadata_file(configs: Sequence[str], meta_file: Union[str, Sequence[str], None]) -> Union[str, list[str]]:
    """The ``meta_file`` to run the config files ``configs`` with: the given one(s), else ``metadata.json`` next to
    the first config, else :data:`NO_METADATA` (MONAI logs an ``ERROR`` for a default it cannot find, then runs).

    Raises:
        FileNotFoundError: a given metadata file does not exist.
    """
    if meta_file is None:
        default = Path(configs[0]).parent / "metadata.json"
        return str(default) if default.is_file() else list(NO_METADATA)
    files = config_files(meta_file)
    for f in files:
        if not os.path.isfile(f):
            raise FileNotFoundError(f"metadata file {f} does not exist; pass the bundle's metadata.json (--meta_file)")
    return files[0] if len(files) == 1 else files


def _override(parser: ConfigParser, bundle: Bundle, workflow: str, values: dict, overrides: dict) -> None:
    """Set a dataset's ``values`` and the ``overrides`` (checked: an id the config lacks is a ``ValueError`` naming
    it and the closest id it has, :func:`~diffcl_algo.bundle.expressions.check_override_ids`; tuples become lists,
    paths strings, ``device="auto"`` keeps the config's)."""
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
        The trainer; its handlers (``train#handlers``: validation, savers, logs) are ``trainer.train_handlers``.
    """
    parser = load_bundle(bundle, "train", **overrides)
    try:
        for i in range(len(parser["initialize"])):
            parser.get_parsed_content(f"initialize{ID_SEP_KEY}{i}")
        parser.get_parsed_content("data#check")
        return parser.get_parsed_content("train#trainer")
    except RuntimeError as e:
        raise config_error_cause(e) from None


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
    model_saver = next(h for h in trainer.train_handlers if isinstance(h, ModelSaver))
    state_saver = next(h for h in trainer.train_handlers if isinstance(h, TrainStateSaver))
    best = model_saver.best_metric
    return {
        "iteration": int(trainer.state.iteration),
        "best_metric": None if math.isinf(best) else best,
        "best_iteration": model_saver.best_iteration,
        "model_path": str(model_saver.path),
        "train_state_path": str(state_saver.path),
        "output": trainer.state.output,
    }


def default_num_threads(max_threads: int = 8) -> int | None:
    """Torch CPU threads when none are asked for: ``None`` (torch's own reading) when ``$OMP_NUM_THREADS`` is set,
    else the CPUs this process may use minus the machine's 1-minute load average, between 1 and ``max_threads``.

    On a busy machine every extra thread waits for a core and the run slows down many times over (README,
    "Threads"); on an idle one the threads use the free cores.
    """
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return max(1, min(cpus - round(busy), max_threads))


def default_weights(parser: ConfigParser, config_file: str) -> str:
    """The weights ``inferring`` uses without ``--ckpt_path``: the config's own ``ckpt_path`` (``models/model.pt``
    below ``bundle_root``, the working directory) when that file exists, else the weights the bundle ships
    (``<bundle folder>/models/model.pt``, the folder above the config's ``configs/``), else the config's path (the
    workflow then stops, naming it)."""
    own = str(parser.get_parsed_content("ckpt_path"))
    shipped = Path(config_file).resolve().parent.parent / "models" / "model.pt"
    return own if os.path.isfile(own) or not shipped.is_file() else str(shipped)


def run(
    run_id: str,
    config_file: str | Sequence[str],
    meta_file: str | None = None,
    logging_file: str | None = None,
    num_threads: int | None = None,
    **overrides: Any,
) -> None:
    """Run a bundle workflow like ``python -m monai.bundle run``, refusing unknown options first.

    Example: ``python -m diffcl_algo run training --config_file bundles/la/configs/train.yaml --dataset_dir data/LA``.

    Args:
        run_id: the workflow id: ``training`` (train.yaml), ``evaluating`` (evaluate.yaml), ``inferring``
            (inference.yaml).
        config_file: the bundle config (a list, e.g. "['bundles/la/configs/train.yaml','bundles/la/configs/cpu.yaml']",
            layers later files over earlier ones).
        meta_file: the bundle's metadata.json (default: the one next to the first config, if any).
        logging_file: logging config (default: logging.conf next to the first config).
        num_threads: torch CPU threads (default: $OMP_NUM_THREADS if set, else the idle CPUs, 1 to 8).
        overrides: --<id> <value> for any id of the config (nested ids as --a#b); see --help with --config_file.

    Raises:
        ValueError: an unknown override id (naming the closest valid id), or any error of the workflow.
    """
    files = config_files(config_file)
    parser = ConfigParser()
    parser.read_config(files)
    check_override_ids(parser.get(), list(overrides), " + ".join(files))
    if run_id == "inferring" and not {"ckpt_path", "bundle_root"} & set(overrides):
        overrides["ckpt_path"] = default_weights(parser, files[0])
    threads = num_threads if num_threads is not None else default_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    meta = metadata_file(files, meta_file)
    scripts.run(run_id=run_id, config_file=files, meta_file=meta, logging_file=logging_file, **overrides)


_TOP_LEVEL_VALUE = re.compile(r"^([A-Za-z_]\w*):[ \t]+(\S.*)$")
_COMMENT = re.compile(r"[ \t]#")


def _split_comment(text: str) -> tuple[str, int]:
    """``(value, index of its comment's '#' or -1)`` of the YAML text after a key.

    YAML starts a comment at a ``#`` after whitespace, outside a quoted scalar: MONAI's id separator in
    ``$@train#epoch_length`` and a ``#`` inside quotes are part of the value.
    """
    start = 0
    if text[:1] in ("'", '"'):  # a quoted scalar: skip to its closing quote ('' and \" are escaped quotes)
        quote, i = text[0], 1
        while i < len(text):
            if text[i] == "\\" and quote == '"':
                i += 2
                continue
            if text[i] == quote:
                if quote == "'" and text[i + 1 : i + 2] == "'":
                    i += 2
                    continue
                break
            i += 1
        start = i + 1
    match = _COMMENT.search(text, start)
    return (text[: match.start()].rstrip(), match.start() + 1) if match else (text.rstrip(), -1)


def _value_ids(path: Path) -> list[tuple[str, str, str]]:
    """``(id, value, comment)`` of the top-level values of a YAML config written on their key's line, in file order.

    A value is whole (a ``#`` that does not start a comment stays in it, a plain value continued on indented lines
    is joined); a comment is whole too: its continuation lines are indented ``#`` lines at the comment's column.
    """
    lines = path.read_text().splitlines()
    out = []
    for i, line in enumerate(lines):
        match = _TOP_LEVEL_VALUE.match(line)
        if not match:
            continue
        value, hash_at = _split_comment(match.group(2))
        column = match.start(2) + hash_at if hash_at >= 0 else -1
        comment = [match.group(2)[hash_at + 1 :].strip()] if hash_at >= 0 else []
        values = [value] if value else []
        for following in lines[i + 1 :]:
            stripped = following.strip()
            if not stripped or not following[:1].isspace():
                break
            if stripped.startswith("#"):
                if column < 0 or following.index("#") != column:
                    break
                comment.append(stripped[1:].strip())
            elif not comment:  # a plain value continued on the next line
                more, more_hash = _split_comment(stripped)
                values.append(more)
                if more_hash >= 0:
                    column = len(following) - len(following.lstrip()) + more_hash
                    comment.append(stripped[more_hash + 1 :].strip())
            else:
                break
        value = " ".join(values)
        if value and not value.startswith(("'%", '"%', "%")):
            out.append((match.group(1), value, " ".join(c for c in comment if c)))
    return out


def help_epilog(argv: Sequence[str]) -> str:
    """Extra ``--help`` text: the value ids of the ``--config_file`` on the command line, if any."""
    files: list[str] = []
    for i, arg in enumerate(argv):
        if arg == "--config_file" and i + 1 < len(argv):
            files = config_files(argv[i + 1])
        elif arg.startswith("--config_file="):
            files = config_files(arg.split("=", 1)[1])
    if not files:
        return "Give --config_file with --help to list that config's options."
    lines = []
    for f in files:
        path = Path(f)
        if not path.is_file():
            return f"config file {f} does not exist."
        lines.append(f"options of {f} (--<id> <value>):")
        lines += [f"  --{k} {v}" + (f"    # {c}" if c else "") for k, v, c in _value_ids(path)]
    return "\n".join(lines)


run.help_epilog = help_epilog  # type: ignore[attr-defined]
