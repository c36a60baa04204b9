"""The bundles' configs: one graph in the package, a few values per dataset, self-contained files written from them.

The graph is ``diffcl_algo/configs/train.yaml``; ``evaluate.yaml`` and ``inference.yaml`` are overrides of it
(model-zoo style: merged after it, ``+imports`` extends a list, ``a#b`` keys reach into sections) and
``multi_gpu_train.yaml`` is the DDP override. ``diffcl_algo/configs/datasets/<dataset>.yaml`` holds what a dataset
changes (its first comment lines describe the dataset; its ``shipped_model`` section, the network and input of the
weights the bundle ships in ``models/model.pt``, applies to the inference workflow only). :func:`compose` merges them
as MONAI's ``--config_file "[...]"`` would; :func:`write_bundles` (``python -m diffcl_algo bundles``) writes each
``bundles/<dataset>/configs/{train,evaluate,inference}.yaml`` as one self-contained file, so a bundle folder has no
macro, loads from any working directory and can be copied elsewhere; ``--check`` reports files that differ from what
would be written. The written files keep the graph's comments (the value of a top-level line, the section headers).
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Optional, Union

import yaml
from monai.bundle import ConfigParser
from monai.bundle.utils import MERGE_KEY

__all__ = [
    "SHIPPED_MODEL",
    "CONFIG_DIR",
    "DATASETS",
    "WORKFLOWS",
    "compose",
    "dataset_values",
    "render",
    "workflow_values",
    "write_bundles",
]

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
"""The graph (``train.yaml`` and its overrides) and ``datasets/<dataset>.yaml``."""

DATASETS = ("la", "brats", "pancreas")

WORKFLOWS = {
    "train": ("train.yaml",),
    "evaluate": ("train.yaml", "evaluate.yaml"),
    "inference": ("train.yaml", "evaluate.yaml", "inference.yaml"),
}
"""Workflow -> the graph files merged, in order, into ``bundles/<dataset>/configs/<workflow>.yaml``."""

SHIPPED_MODEL = "shipped_model"
"""Section of ``datasets/<dataset>.yaml``: the values of the shipped weights, merged into the inference workflow last
(so that ``inferring`` without ``--ckpt_path`` runs ``models/model.pt`` as trained; train / evaluate keep the rest)."""

COPIED = ("multi_gpu_train.yaml", "logging.conf")
"""Files every bundle carries unchanged (the DDP override is merged by the user after train.yaml)."""

RUN_COMMANDS = {
    "train": "python -m monai.bundle run training --config_file bundles/{name}/configs/train.yaml --dataset_dir <dir>",
    "evaluate": "python -m monai.bundle run evaluating --config_file bundles/{name}/configs/evaluate.yaml \\\n"
    "#           --dataset_dir <dir> --ckpt_path <model.pt> --output_dir <dir>",
    "inference": "python -m monai.bundle run inferring --config_file bundles/{name}/configs/inference.yaml \\\n"
    "#           --dataset_dir <dir> --ckpt_path <model.pt> --output_dir <dir>",
}

HEADER = """\
{description}
# Run:  {command}
# Any value: --<id> <value>. Written by `python -m diffcl_algo bundles` (docs/bundles.md) from the package's graph
#   {sources}
# and the values of {dataset_file}: edit those and rerun it.
"""

_KEY_LINE = re.compile(r"^(?P<key>[+\w#]+):(?P<value>.*?)(?P<comment>\s+#\s.*)?$")
_COMMENT_COLUMN = 30
_CONTINUATION = " " * _COMMENT_COLUMN + "#"  # a trailing comment's next line


class _Dumper(yaml.SafeDumper):
    """Block-style YAML, with lists of numbers / booleans / nulls in flow style (``patch_size: [112, 112, 80]``)."""


def _scalars(values: list) -> bool:
    """Whether a list holds only numbers, booleans and nulls (written in flow style, a plain value)."""
    return all(v is None or isinstance(v, (bool, int, float)) for v in values)


def _represent_list(dumper: yaml.SafeDumper, data: list) -> yaml.Node:
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=_scalars(data))


_Dumper.add_representer(list, _represent_list)


def dataset_values(dataset: str) -> dict[str, Any]:
    """The values ``datasets/<dataset>.yaml`` sets.

    Raises:
        ValueError: an unknown dataset (the message lists the known ones).
    """
    if dataset not in DATASETS:
        raise ValueError(f"Unknown dataset {dataset!r}; the bundles are {list(DATASETS)}.")
    return dict(ConfigParser.load_config_file(str(CONFIG_DIR / "datasets" / f"{dataset}.yaml")))


def workflow_values(dataset: str, workflow: str) -> dict[str, Any]:
    """The values ``dataset`` sets in ``workflow``: ``datasets/<dataset>.yaml``, with its ``shipped_model`` section
    over them for the inference workflow."""
    values = dataset_values(dataset)
    shipped = values.pop(SHIPPED_MODEL, None) or {}
    return {**values, **shipped} if workflow == "inference" else values


def compose(workflow: str, dataset: Optional[str] = None) -> dict[str, Any]:
    """The merged config of ``workflow`` (``WORKFLOWS``), with the values of ``dataset`` (None: the graph's).

    Raises:
        ValueError: an unknown workflow or dataset, or a dataset value no workflow config has (a typo).
    """
    if workflow not in WORKFLOWS:
        raise ValueError(f"Unknown workflow {workflow!r}; choose one of {list(WORKFLOWS)}.")
    config = ConfigParser.load_config_files([str(CONFIG_DIR / f) for f in WORKFLOWS[workflow]])
    if dataset is not None:
        known = set().union(*(_workflow_keys(w) for w in WORKFLOWS))
        unknown = sorted(set().union(*(workflow_values(dataset, w) for w in WORKFLOWS)) - known)
        if unknown:
            raise ValueError(f"{CONFIG_DIR / 'datasets' / f'{dataset}.yaml'}: {unknown} are no ids of the graph.")
        config.update({k: v for k, v in workflow_values(dataset, workflow).items() if k in config})
    return config


def _workflow_keys(workflow: str) -> set[str]:
    return set(ConfigParser.load_config_files([str(CONFIG_DIR / f) for f in WORKFLOWS[workflow]]))


def _comments(path: Path) -> dict[str, tuple[list[str], str]]:
    """``{top-level key: (the comment lines just above it, its line's trailing comment or "")}`` of a YAML file
    (the file's opening comment is not a key's). A trailing comment keeps its continuation lines (comment lines
    indented to the comment column just below it)."""
    found: dict[str, tuple[list[str], str]] = {}
    above: list[str] = []
    key = None
    for line in path.read_text().splitlines():
        match = _KEY_LINE.match(line)
        if key and line.startswith(_CONTINUATION):
            found[key] = (found[key][0], f"{found[key][1]}\n{line}")
            continue
        key = None
        if line.startswith("#"):
            above.append(line)
        elif match:
            key = match["key"].lstrip(MERGE_KEY)
            found[key] = (above if found else [], (match["comment"] or "").strip())
            above = []
        elif not line.strip() or not line.startswith((" ", "-")):
            above = []
    return found


def _description(dataset: str) -> str:
    lines = (CONFIG_DIR / "datasets" / f"{dataset}.yaml").read_text().splitlines()
    return "\n".join(line for line in lines[: next(i for i, x in enumerate(lines) if not x.startswith("#"))])


def _order(config: dict[str, Any], base: list[str]) -> list[str]:
    """Keys in the graph's order; values an override or dataset adds go at the end of the values block (before
    ``common``)."""
    new = [k for k in config if k not in base]
    plain = [k for k in new if _is_value(config[k])]
    at = base.index("common") if "common" in base else len(base)
    rest = [k for k in new if k not in plain]
    return [k for k in base[:at] if k in config] + plain + [k for k in base[at:] if k in config] + rest


def _is_value(value: Any) -> bool:
    """A plain value (a number, string, switch or list of numbers), not a section, list of items or expression."""
    if isinstance(value, list):
        return _scalars(value)
    return not isinstance(value, dict) and str(value)[:1] not in "$@%"


def render(workflow: str, dataset: str) -> str:
    """The text of ``bundles/<dataset>/configs/<workflow>.yaml``: header, then the composed config with comments."""
    config = compose(workflow, dataset)
    sources = [CONFIG_DIR / f for f in WORKFLOWS[workflow]]
    above = {k: lines for k, (lines, _) in _comments(sources[0]).items()}
    inline: dict[str, str] = {}
    for source in sources:  # an override's line replaces the graph's comment, a dataset value keeps it
        inline.update({k: comment for k, (_, comment) in _comments(source).items()})
    dataset_file = CONFIG_DIR / "datasets" / f"{dataset}.yaml"
    inline.update({k: comment for k, (_, comment) in _comments(dataset_file).items() if comment})
    base = list(ConfigParser.load_config_file(str(sources[0])))
    header = HEADER.format(
        description=_description(dataset),
        command=RUN_COMMANDS[workflow].format(name=dataset),
        sources=" + ".join(f"diffcl_algo/configs/{f}" for f in WORKFLOWS[workflow]),
        dataset_file=f"diffcl_algo/configs/datasets/{dataset}.yaml",
    )
    out = [header]
    for key in _order(config, base):
        if above.get(key):
            out.append(("\n" if above[key][0].startswith("# ----") else "") + "\n".join(above[key]))
        text = yaml.dump({key: config[key]}, Dumper=_Dumper, sort_keys=False, width=120, allow_unicode=True)
        if inline.get(key) and text.count("\n") == 1:
            text = f"{text.rstrip().ljust(_COMMENT_COLUMN - 1)} {inline[key]}\n"
        out.append(text.rstrip("\n"))
    body = "\n".join(out) + "\n"
    if yaml.safe_load(body) != config:  # the YAML round trip must be exact
        raise ValueError(f"bundles/{dataset}/configs/{workflow}.yaml: the composed config does not survive YAML.")
    return body


def write_bundles(bundles_dir: Union[str, Path] = "bundles", check: bool = False) -> list[str]:
    """Write (or, with ``check``, compare) every bundle's generated configs.

    ``python -m diffcl_algo bundles [--bundles_dir bundles] [--check]``.

    Args:
        bundles_dir: the folder of the dataset bundles (each must exist with its ``configs/``).
        check: write nothing; raise if a file differs from what would be written.

    Returns:
        The files written (or found up to date with ``check``).

    Raises:
        FileNotFoundError: a bundle folder is missing.
        ValueError: ``check`` found stale files (the message names them and shows the first differences).
    """
    done, stale = [], []
    for dataset in DATASETS:
        configs = Path(bundles_dir) / dataset / "configs"
        if not configs.is_dir():
            raise FileNotFoundError(f"Bundle folder {configs} does not exist.")
        wanted = {f"{w}.yaml": render(w, dataset) for w in WORKFLOWS}
        wanted.update({name: (CONFIG_DIR / name).read_text() for name in COPIED})
        for name, text in wanted.items():
            target = configs / name
            current = target.read_text() if target.is_file() else ""
            if current != text:
                stale.append((target, current, text))
                if not check:
                    target.write_text(text)
            done.append(str(target))
    if check and stale:
        target, current, text = stale[0]
        diff = "".join(list(difflib.unified_diff(current.splitlines(True), text.splitlines(True), str(target)))[:20])
        names = ", ".join(str(s[0]) for s in stale)
        raise ValueError(f"Generated bundle configs are stale: {names}; run `python -m diffcl_algo bundles`.\n{diff}")
    return done
