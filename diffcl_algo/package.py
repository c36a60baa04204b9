"""Package a bundle with trained weights for sharing, in MONAI model-zoo form (``python -m diffcl_algo package``).

``package(bundle, ckpt_path, output)`` writes ``output`` (a zip) holding one folder ``<name>/``::

    <name>/configs/*.yaml        self-contained: the bundles/base sections the bundle pulls with MONAI macros
                                 ("%bundles/base/configs/train.yaml#train") are inlined, bundle_root is "."
    <name>/configs/metadata.json, logging.conf
    <name>/models/model.pt       the checkpoint (CS state_dict), checked against the bundle's network_def
    <name>/docs/README.md        the bundle's README, headed by a note on the packaged form
    <name>/LICENSE
    <name>/large_files.yml       model-zoo entry of models/model.pt: path, url, hash_val (its md5), hash_type

The repository's bundles pull the shared graph from ``bundles/base`` with macros that MONAI resolves relative to
the working directory, so they only run from the repository root; the packaged copy runs from its own folder
(``python -m monai.bundle run inferring --config_file configs/inference.yaml ...``) or with ``--bundle_root``.
It still needs the ``diffcl_algo`` package (the configs' ``_target_`` classes). The zip is written atomically
(temporary file + ``os.replace``) with fixed member timestamps, so the same inputs give the same bytes.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Optional

import torch
import yaml
from monai.bundle import ConfigParser

__all__ = ["package", "resolve_macros", "check_checkpoint", "file_md5"]

logger = logging.getLogger(__name__)

MACRO_KEY = "%"
CONFIG_SUFFIXES = (".yaml", ".yml", ".json")
ZIP_DATE = (2022, 5, 30, 0, 0, 0)  # fixed member time (the model zoo's compress_bundle touches files likewise)
MAX_MACRO_DEPTH = 16

PACKAGED_HEADER = """\
# Self-contained copy of {source}, written by `python -m diffcl_algo package`: the sections it
# pulled from other files with MONAI macros ({bases}) are inlined and bundle_root is ".".
# Run MONAI bundle commands from this bundle's folder (or pass --bundle_root <folder>), e.g.
#   python -m monai.bundle run inferring --config_file configs/inference.yaml --dataset_dir <dir> --output_dir <dir>
# The configs need the diffcl_algo package (its classes are the _target_s); see docs/README.md.
"""

README_NOTE = """\
> **Packaged bundle `{name}`**, written by `python -m diffcl_algo package` from `{bundle}`.
> Weights: `models/model.pt` = `{ckpt}`, md5 `{md5}`.
> Unlike the repository copy described below, the configs here are self-contained (the `bundles/base` sections
> are inlined) and `bundle_root` is `.`: run the commands from this folder with `configs/<file>.yaml` in place of
> `{bundle}/configs/<file>.yaml`, e.g.
> `python -m monai.bundle run inferring --config_file configs/inference.yaml --dataset_dir <dir> --output_dir <dir>`
> (`--ckpt_path` defaults to `models/model.pt`). The `diffcl_algo` package must be installed.

"""

LARGE_FILES = """\
# Large files of this bundle (MONAI model-zoo format: path, url, hash_val, hash_type), written by
# `python -m diffcl_algo package`. models/model.pt is inside this archive; hash_val is its md5.
{url_note}large_files:
- path: models/model.pt
  url: {url}
  hash_val: {md5}
  hash_type: md5
"""

NO_URL_NOTE = """\
# url: none yet (the weights are not published). MONAI's and the model zoo's large-file download skip a present
# file whose hash matches, so this archive verifies as it is; set the url (package --url) once the weights are
# uploaded, so that a bundle without models/model.pt can fetch them.
"""


class _Dumper(yaml.SafeDumper):
    """Block-style YAML, with lists of numbers / booleans / nulls in flow style (``patch_size: [112, 112, 80]``)."""


def _represent_list(dumper: yaml.SafeDumper, data: list) -> yaml.Node:
    flow = all(v is None or isinstance(v, (bool, int, float)) for v in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_Dumper.add_representer(list, _represent_list)


def file_md5(path: str | os.PathLike) -> str:
    """Hex md5 of a file (the ``hash_val`` of a model-zoo ``large_files.yml`` entry with ``hash_type: md5``)."""
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _find_file(path: str, roots: list[Path], macro: str) -> Path:
    """A macro's file: absolute, or relative to the first of ``roots`` that holds it (MONAI: the current dir)."""
    candidates = [Path(path)] if os.path.isabs(path) else [root / path for root in roots]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"Macro {macro!r}: file {path!r} not found (looked in {[str(c) for c in candidates]}).")


def _resolve(value: Any, source: Optional[Path], roots: list[Path], bases: set[str], depth: int) -> Any:
    if isinstance(value, dict):
        return {k: _resolve(v, source, roots, bases, depth) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(v, source, roots, bases, depth) for v in value]
    if not (isinstance(value, str) and value.startswith(MACRO_KEY)):
        return value
    path, ids = ConfigParser.split_path_id(value[len(MACRO_KEY) :])
    if not path and source is None:
        return value  # same-file macro of the packaged config itself: MONAI resolves it there at run time
    if depth >= MAX_MACRO_DEPTH:
        raise ValueError(f"Macro {value!r}: more than {MAX_MACRO_DEPTH} nested macros (a cycle?).")
    file = _find_file(path, roots, value) if path else source
    bases.add(path or str(source))
    content = copy.deepcopy(ConfigParser(config=ConfigParser.load_config_file(str(file)))[ids])
    return _resolve(content, file, roots, bases, depth + 1)  # its own "%#id" macros refer to that file


def resolve_macros(config_file: str | os.PathLike, roots: Optional[list[Path]] = None) -> tuple[dict, list[str]]:
    """Load a bundle config and inline every macro that names another file, as MONAI would resolve it.

    ``"%file#id"`` values are replaced by that section of ``file`` (recursively, so the inlined content's own
    macros are resolved too, ``"%#id"`` in ``file`` meaning ``file#id``); same-file macros (``"%#id"``) of the
    top level are left for MONAI. ``@`` references and ``$`` expressions are kept as they are: they resolve
    against the packaged config's own ids, which is what MONAI does after a macro copy.

    Args:
        config_file: a JSON or YAML bundle config.
        roots: folders where relative macro paths are looked up, in order (default: the current directory).

    Returns:
        the config and the macro files that were inlined.

    Raises:
        FileNotFoundError: a macro's file is missing (the message names the macro and the folders tried).
    """
    bases: set[str] = set()
    config = _resolve(ConfigParser.load_config_file(str(config_file)), None, roots or [Path.cwd()], bases, 0)
    return config, sorted(bases)


def check_checkpoint(
    ckpt_path: str | os.PathLike,
    config_file: str | os.PathLike,
    meta_file: str | os.PathLike,
    config_label: Optional[str] = None,
    **override: Any,
) -> dict[str, torch.Tensor]:
    """Load ``ckpt_path`` (a state_dict) strictly into the config's ``network_def``; return the state_dict.

    Args:
        ckpt_path: the checkpoint.
        config_file, meta_file: the bundle config defining ``network_def`` and its metadata.
        config_label: how messages name the config (default ``config_file``).
        override: config ids and values set before ``network_def`` is built (e.g. ``bundle_root``).

    Raises:
        FileNotFoundError: ``ckpt_path`` does not exist.
        ValueError: it is unreadable, not a state_dict of tensors, or its keys / shapes do not match the network
            (missing, unexpected and mismatched keys are listed); every message names the file.
    """
    path = str(ckpt_path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Checkpoint {path!r} does not exist or is not a file.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"Checkpoint {path!r} is not a readable torch file ({e}).") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        hint = ""
        if isinstance(state, dict) and "cs_network" in state:
            hint = " It looks like a train_state.pt: package the model.pt written next to it."
        raise ValueError(f"Checkpoint {path!r} is not a state_dict (a dict of tensors) of the CS network.{hint}")
    parser = ConfigParser()
    parser.read_config(str(config_file))
    parser.read_meta(str(meta_file))
    for key, value in override.items():
        parser[key] = value
    network = parser.get_parsed_content("network_def")
    expected = network.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or mismatched:

        def some(items: list[str]) -> str:
            return f"{len(items)} {items[:4]}{' ...' if len(items) > 4 else ''}"

        raise ValueError(
            f"Checkpoint {path!r} does not match network_def of {config_label or str(config_file)!r}: "
            f"missing keys {some(missing)}, "
            f"unexpected keys {some(unexpected)}, shape mismatches (checkpoint vs network) {some(mismatched)}. "
            "Was it trained with other network values (n_filters, norm, use_hfm, hfm_stages, num_classes, "
            "in_channels)? Pass them to package as --<id> <value>."
        )
    network.load_state_dict(state)
    return state


def _write_zip(folder: Path, name: str, output: Path) -> None:
    """Zip ``folder`` as ``<name>/...`` into ``output`` atomically (temporary file in its directory, os.replace)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent)
    try:
        with os.fdopen(fd, "wb") as f, zipfile.ZipFile(f, "w", zipfile.ZIP_DEFLATED) as archive:
            for file in sorted(p for p in folder.rglob("*") if p.is_file()):
                info = zipfile.ZipInfo(f"{name}/{file.relative_to(folder).as_posix()}", date_time=ZIP_DATE)
                info.compress_type = zipfile.ZIP_DEFLATED
                info.external_attr = 0o644 << 16
                with open(file, "rb") as src, archive.open(info, "w") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
        os.replace(tmp, output)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _yaml_list(value: Any) -> Any:
    """Tuples (fire's parse of ``--x "(1, 2)"``) as lists, so that the configs are plain YAML."""
    if isinstance(value, (list, tuple)):
        return [_yaml_list(v) for v in value]
    return value


def package(
    bundle: str,
    ckpt_path: str,
    output: str,
    name: Optional[str] = None,
    url: str = "",
    overwrite: bool = False,
    **override: Any,
) -> str:
    """Write a shareable, self-contained model-zoo zip of ``bundle`` with the weights ``ckpt_path``.

    Run from the repository root (where the bundles' macros ``%bundles/base/...`` resolve; the folder two levels
    above ``bundle`` is tried too). Example::

        python -m diffcl_algo package --bundle bundles/la --ckpt_path runs/la/model.pt --output dist/la_bundle.zip

    Args:
        bundle: the bundle folder (``configs/metadata.json``, ``configs/inference.yaml``, ``docs/README.md``,
            ``LICENSE``).
        ckpt_path: the CS weights (``model.pt`` of a training run: a state_dict); must load strictly into the
            bundle's ``network_def`` (with ``override``).
        output: the zip to write; refused if it exists unless ``overwrite``.
        name: the bundle's folder name inside the zip (default ``diffcl_<bundle folder name>``).
        url: download url of the weights for ``large_files.yml`` (default none: see the file's note).
        overwrite: replace an existing ``output``.
        override: values written into every packaged config that has them at top level, for weights trained
            with non-default values, e.g. ``--n_filters 8`` (each must exist in at least one config).

    Returns:
        ``output``.

    Raises:
        FileNotFoundError: the bundle, one of its required files or ``ckpt_path`` is missing.
        FileExistsError: ``output`` exists and ``overwrite`` is false.
        ValueError: the checkpoint does not fit ``network_def``, an override id is unknown, a bad ``name``.
    """
    bundle_dir = Path(bundle)
    for required in ("configs/metadata.json", "configs/inference.yaml", "docs/README.md", "LICENSE"):
        if not (bundle_dir / required).is_file():
            raise FileNotFoundError(f"Bundle {str(bundle_dir)!r}: {required} is missing.")
    if not os.path.isfile(ckpt_path):
        raise FileNotFoundError(f"Checkpoint {str(ckpt_path)!r} does not exist or is not a file.")
    out = Path(output)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{str(out)!r} exists; pass --overwrite to replace it.")
    if out.is_dir():
        raise FileExistsError(f"{str(out)!r} is a directory.")
    name = name or f"diffcl_{bundle_dir.resolve().name}"
    if not name or "/" in name or "\\" in name or name in (".", ".."):
        raise ValueError(f"name must be a plain folder name, got {name!r}.")
    roots = [Path.cwd(), bundle_dir.resolve().parent, bundle_dir.resolve().parent.parent]
    override = {k: _yaml_list(v) for k, v in override.items()}

    with tempfile.TemporaryDirectory() as tmp:
        stage = Path(tmp) / name
        (stage / "configs").mkdir(parents=True)
        used = set()
        for file in sorted((bundle_dir / "configs").iterdir()):
            target = stage / "configs" / file.name
            if file.suffix not in CONFIG_SUFFIXES or file.name == "metadata.json":
                shutil.copyfile(file, target)
                continue
            config, bases = resolve_macros(file, roots)
            original = copy.deepcopy(config)
            if isinstance(config, dict):
                if "bundle_root" in config:
                    config["bundle_root"] = "."
                for key, value in override.items():
                    if key in config:
                        config[key] = value
                        used.add(key)
            if not bases and config == original:  # nothing to inline or change: keep the file (and its comments)
                shutil.copyfile(file, target)
                continue
            if file.suffix == ".json":
                target.write_text(json.dumps(config, indent=4) + "\n")
                continue
            text = yaml.dump(config, Dumper=_Dumper, sort_keys=False, width=120, allow_unicode=True)
            if yaml.safe_load(text) != config:  # the YAML round trip must be exact
                raise ValueError(f"{file}: the resolved config does not survive a YAML round trip.")
            header = PACKAGED_HEADER.format(source=file.as_posix(), bases=", ".join(bases) or "none")
            target.write_text(header + text)
        unknown = sorted(set(override) - used)
        if unknown:
            raise ValueError(f"Unknown config ids {unknown}: no config of {str(bundle_dir)!r} has them at top level.")
        check_checkpoint(
            ckpt_path,
            stage / "configs" / "inference.yaml",
            stage / "configs" / "metadata.json",
            config_label=f"{bundle_dir.as_posix()}/configs/inference.yaml (packaged)",
            bundle_root=str(stage),
        )
        (stage / "models").mkdir()
        shutil.copyfile(ckpt_path, stage / "models" / "model.pt")
        md5 = file_md5(stage / "models" / "model.pt")
        (stage / "docs").mkdir()
        for file in (bundle_dir / "docs").iterdir():
            if file.is_file():
                shutil.copyfile(file, stage / "docs" / file.name)
        readme = stage / "docs" / "README.md"
        note = README_NOTE.format(name=name, bundle=bundle_dir.as_posix(), ckpt=Path(ckpt_path).as_posix(), md5=md5)
        readme.write_text(note + readme.read_text())
        shutil.copyfile(bundle_dir / "LICENSE", stage / "LICENSE")
        (stage / "large_files.yml").write_text(
            LARGE_FILES.format(url_note="" if url else NO_URL_NOTE, url=yaml.safe_dump(url).split("\n")[0], md5=md5)
        )
        out.parent.mkdir(parents=True, exist_ok=True)
        _write_zip(stage, name, out)
    logger.info(f"Packaged {bundle_dir} with {ckpt_path} (md5 {md5}) as {out}")
    return str(out)
