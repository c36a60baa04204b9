"""Package a bundle with trained weights for sharing, in MONAI model-zoo form (``python -m diffcl_algo package``).

``package(bundle, ckpt_path, output)`` writes ``output`` (a zip) holding one folder ``<name>/``::

    <name>/configs/*.yaml        the bundle's configs (self-contained already), with any ``override`` values set
    <name>/configs/metadata.json, logging.conf
    <name>/models/model.pt       the checkpoint (CS state_dict), checked against the bundle's network_def
    <name>/docs/README.md        the bundle's README, headed by a note on the packaged form
    <name>/LICENSE
    <name>/large_files.yml       model-zoo entry of models/model.pt: path, url, hash_val (its md5), hash_type

The bundle's configs are self-contained (``bundle_root: .``), so packaging copies them and checks the weights; the
packaged copy runs from its own folder (``python -m monai.bundle run inferring --config_file configs/inference.yaml
...``), from anywhere with ``--bundle_root``. It needs the ``diffcl_algo`` package (the configs' ``_target_``s).
The zip is written atomically (temporary file + ``os.replace``) with fixed member timestamps, so the same inputs
give the same bytes.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Optional

import torch
import yaml
from monai.bundle import ConfigParser

from diffcl_algo.utils import atomic_write

__all__ = ["package", "check_checkpoint", "file_md5", "set_values"]

logger = logging.getLogger(__name__)

CONFIG_SUFFIXES = (".yaml", ".yml")
ZIP_DATE = (2022, 5, 30, 0, 0, 0)  # fixed member time (the model zoo's compress_bundle touches files likewise)

README_NOTE = """\
> **Packaged bundle `{name}`**, written by `python -m diffcl_algo package` from `{bundle}`.
> Weights: `models/model.pt` = `{ckpt}`, md5 `{md5}`.
> Run the commands below from this folder with `configs/<file>.yaml` in place of `{bundle}/configs/<file>.yaml`,
> e.g. `python -m monai.bundle run inferring --config_file configs/inference.yaml --dataset_dir <dir> --output_dir
> <dir>` (`--ckpt_path` defaults to `models/model.pt`). The `diffcl_algo` package must be installed.

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


def file_md5(path: str | os.PathLike) -> str:
    """Hex md5 of a file (the ``hash_val`` of a model-zoo ``large_files.yml`` entry with ``hash_type: md5``)."""
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def set_values(text: str, values: dict[str, Any]) -> tuple[str, set[str]]:
    """A YAML config's text with the top-level ``values`` replaced in place (comments kept).

    Returns:
        the new text and the ids it had (ids it lacks are left out).

    Raises:
        ValueError: the edited text does not load as the config with those values (e.g. a multi-line value).
    """
    config = yaml.safe_load(text)
    used = {k for k in values if isinstance(config, dict) and k in config}
    for key in used:
        flow = yaml.safe_dump(values[key], default_flow_style=True, width=10**6).strip()
        flow = flow[: -len("...")].strip() if flow.endswith("...") else flow
        pattern = re.compile(rf"^{re.escape(key)}:[^\n]*?(?=(\s+#\s[^\n]*)?$)", re.MULTILINE)
        text = pattern.sub(f"{key}: {flow}".replace("\\", "\\\\"), text, count=1)
    if yaml.safe_load(text) != {**(config or {}), **{k: values[k] for k in used}}:
        raise ValueError(f"Could not set {sorted(used)} in place (a value spans several lines).")
    return text, used


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
    """Zip ``folder`` as ``<name>/...`` into ``output`` atomically (:func:`diffcl_algo.utils.atomic_write`)."""
    with atomic_write(output) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as archive:
        for file in sorted(p for p in folder.rglob("*") if p.is_file()):
            info = zipfile.ZipInfo(f"{name}/{file.relative_to(folder).as_posix()}", date_time=ZIP_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            with open(file, "rb") as src, archive.open(info, "w") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)


def _yaml_list(value: Any) -> Any:
    """Tuples (fire's parse of ``--x "(1, 2)"``) as lists, so that the configs are plain YAML."""
    if isinstance(value, (list, tuple)):
        return [_yaml_list(v) for v in value]
    return value


def package(
    bundle: str,
    ckpt_path: Optional[str] = None,
    output: Optional[str] = None,
    name: Optional[str] = None,
    url: str = "",
    overwrite: bool = False,
    **override: Any,
) -> str:
    """Write a shareable model-zoo zip of ``bundle`` with the weights ``ckpt_path``. Example::

        python -m diffcl_algo package --bundle bundles/la --ckpt_path runs/la/model.pt --output dist/la_bundle.zip
        python -m diffcl_algo package --bundle bundles/la --output dist/la_bundle.zip    # the shipped weights

    Args:
        bundle: the bundle folder (``configs/metadata.json``, ``configs/inference.yaml``, ``docs/README.md``,
            ``LICENSE``).
        ckpt_path: the CS weights (``model.pt`` of a training run: a state_dict); must load strictly into the
            bundle's ``network_def`` (with ``override``). Default: the weights the bundle ships,
            ``<bundle>/models/model.pt``.
        output: the zip to write (required); refused if it exists unless ``overwrite``.
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
    if not output:
        raise ValueError("package: --output <zip> is required (the file to write).")
    ckpt_path = str(ckpt_path or bundle_dir / "models" / "model.pt")
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
    override = {k: _yaml_list(v) for k, v in override.items()}

    with tempfile.TemporaryDirectory() as tmp:
        stage = Path(tmp) / name
        (stage / "configs").mkdir(parents=True)
        used: set[str] = set()
        for file in sorted((bundle_dir / "configs").iterdir()):
            target = stage / "configs" / file.name
            if file.suffix not in CONFIG_SUFFIXES or not override:
                shutil.copyfile(file, target)
                continue
            text, found = set_values(file.read_text(), override)
            target.write_text(text)
            used |= found
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
