"""The ``diffcl`` Auto3DSeg template's configuration: data analysis, template filling, config loading.

* :func:`analyze_data`: MONAI's ``DataAnalyzer`` on the labeled entries of a semi-supervised datalist (the
  analyzer loads ``image`` and ``label`` of every entry and stops at the first entry without a label).
* :func:`template_values` / :func:`fill_hyper_parameters`: what ``DiffclAlgo.fill_template_config`` writes into
  ``configs/hyper_parameters.yaml`` from the ``DataAnalyzer`` report and the input config (``datalist``,
  ``dataroot``): classes, channels, patch size clipped to the data, sliding-window strides.
* :func:`skip_reason`: data the template cannot train on (``DiffclAlgo.pre_check_skip_algo``).
* :func:`load_config`: ``hyper_parameters.yaml`` plus the command-line overrides of ``scripts/*.py``.
"""

from __future__ import annotations

import os
from copy import deepcopy
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import yaml
from monai.apps.auto3dseg import DataAnalyzer
from monai.bundle import ConfigParser
from monai.bundle.utils import ID_SEP_KEY
from monai.config import PathLike

from diffcl_algo.networks.vnet import DOWNSAMPLING_FACTOR

__all__ = [
    "TEMPLATES_DIR",
    "TEMPLATE_KEYS",
    "CONFIG_NAME",
    "labeled_datalist",
    "analyze_data",
    "patch_from_shape",
    "template_values",
    "skip_reason",
    "fill_hyper_parameters",
    "load_config",
]

TEMPLATES_DIR = Path(__file__).resolve().parent / "templates"
"""The ``templates_path_or_url`` of ``BundleGen`` / ``AutoRunner`` (holds the ``diffcl`` template)."""

CONFIG_NAME = "hyper_parameters.yaml"

TEMPLATE_KEYS = (
    "bundle_root",
    "data_file_base_dir",
    "data_list_file_path",
    "fold",
    "ckpt_path",
    "in_channels",
    "infer",
    "validate",
)
"""Keys of ``hyper_parameters.yaml`` that are not ids of the training graph (``build_trainer`` overrides)."""


def labeled_datalist(datalist: Union[PathLike, Mapping[str, Any]], key: str = "training") -> dict[str, Any]:
    """The datalist (JSON file or dict) with only the ``key`` entries that have a ``"label"``."""
    data = deepcopy(dict(datalist)) if isinstance(datalist, Mapping) else ConfigParser.load_config_file(datalist)
    data[key] = [d for d in data.get(key, []) if isinstance(d, Mapping) and "label" in d]
    if not data[key]:
        raise ValueError(f"The datalist has no '{key}' entry with a 'label' to analyze.")
    return data


def analyze_data(
    datalist: Union[PathLike, Mapping[str, Any]], dataroot: PathLike, output_path: PathLike, **kwargs: Any
) -> dict[str, Any]:
    """Run ``monai.apps.auto3dseg.DataAnalyzer`` on the labeled ``training`` entries and write its report.

    Args:
        datalist: Decathlon-style datalist (file or dict); entries without ``"label"`` are left out.
        dataroot: base folder of the datalist's relative paths.
        output_path: the report (``datastats.yaml``: ``BundleGen(data_stats_filename=...)``; AutoRunner reads
            ``<work_dir>/datastats.yaml``); its folder is created.
        kwargs: other ``DataAnalyzer`` arguments (default ``device="cpu"``, ``worker=0``, ``do_ccp=False``).

    Returns:
        The report (``DataAnalyzer.get_all_case_stats()``).
    """
    options = {"device": "cpu", "worker": 0, "do_ccp": False, **kwargs}
    Path(output_path).parent.mkdir(parents=True, exist_ok=True)
    analyzer = DataAnalyzer(labeled_datalist(datalist), str(dataroot), output_path=str(output_path), **options)
    return analyzer.get_all_case_stats()


def patch_from_shape(
    max_shape: Sequence[float], patch_size: Sequence[int], factor: int = DOWNSAMPLING_FACTOR
) -> list[int]:
    """``patch_size`` with each axis clipped to the largest image, rounded down to a multiple of ``factor``.

    Axes of images smaller than ``factor`` get ``factor`` (the training transforms pad the volume).
    """
    return [int(min(int(p), max(factor, int(s) // factor * factor))) for p, s in zip(patch_size, max_shape)]


def _parser(path_or_config: Union[PathLike, Mapping[str, Any], None]) -> ConfigParser:
    parser = ConfigParser(globals=False)
    if isinstance(path_or_config, Mapping):
        parser.update(dict(path_or_config))
    elif path_or_config is not None and os.path.isfile(str(path_or_config)):
        parser.read_config(str(path_or_config))
    return parser


def template_values(
    data_stats: Union[PathLike, Mapping[str, Any]],
    data_src_cfg: Union[PathLike, Mapping[str, Any], None],
    patch_size: Sequence[int],
) -> dict[str, Any]:
    """The values of ``hyper_parameters.yaml`` that come from the data.

    Args:
        data_stats: ``DataAnalyzer`` report (file or dict).
        data_src_cfg: Auto3DSeg input config (file or dict) with ``datalist`` and ``dataroot``.
        patch_size: the template's patch size, the upper bound of the filled one.

    Returns:
        ``data_file_base_dir`` and ``data_list_file_path`` (absolute), ``in_channels`` (largest image channel
        count), ``num_classes`` (largest label value + 1), ``patch_size`` (:func:`patch_from_shape` of the largest
        image shape) and ``strides`` (half the patch).
    """
    stats, src = _parser(data_stats), _parser(data_src_cfg)
    values: dict[str, Any] = {}
    for key, name in (("dataroot", "data_file_base_dir"), ("datalist", "data_list_file_path")):
        if src.get(key) is not None:
            values[name] = os.path.abspath(str(src[key]))
    summary = "stats_summary#"
    patch = patch_from_shape(stats[f"{summary}image_stats#shape#max"], patch_size)
    values.update(
        in_channels=int(stats[f"{summary}image_stats#channels#max"]),
        num_classes=int(max(float(v) for v in stats[f"{summary}label_stats#labels"])) + 1,
        patch_size=patch,
        strides=[max(1, p // 2) for p in patch],
    )
    return values


def skip_reason(data_stats: Union[PathLike, Mapping[str, Any], None]) -> Optional[str]:
    """Why the template cannot train on the analyzed data (None: it can).

    The data pipeline (``diffcl_algo.data.validate_cases``) reads single-channel 3D volumes.
    """
    if data_stats is None:
        return None
    stats = _parser(data_stats)
    channels = stats.get("stats_summary#image_stats#channels#max")
    if channels is not None and int(channels) > 1:
        return f"the images have {int(channels)} channels; Diff-CL's data pipeline reads single-channel 3D volumes."
    return None


def fill_hyper_parameters(
    output_path: PathLike,
    data_stats: Union[PathLike, Mapping[str, Any], None],
    data_src_cfg: Union[PathLike, Mapping[str, Any], None],
    fill_records: Optional[Mapping[str, Any]] = None,
    fill_with_datastats: bool = True,
    **kwargs: Any,
) -> dict[str, dict[str, Any]]:
    """Fill ``<output_path>/configs/hyper_parameters.yaml`` (``BundleAlgo.fill_template_config``).

    Args:
        output_path: the generated algo folder (becomes ``bundle_root``).
        data_stats: ``DataAnalyzer`` report; None (with ``fill_with_datastats``): only ``bundle_root`` and
            ``kwargs`` are written.
        data_src_cfg: Auto3DSeg input config (``datalist``, ``dataroot``).
        fill_records: the records of an earlier filling, reused when ``fill_with_datastats`` is False (HPO copies).
        fill_with_datastats: compute the values from ``data_stats`` (else reuse ``fill_records``).
        kwargs: values written last, e.g. ``fold`` (``BundleGen.generate``) or any hyper-parameter;
            ``gpu_customization`` / ``gpu_customization_specs`` are not supported and ignored.

    Returns:
        ``{"hyper_parameters.yaml": {key: value written}}``.
    """
    kwargs.pop("gpu_customization", None)
    kwargs.pop("gpu_customization_specs", None)
    file_path = Path(output_path) / "configs" / CONFIG_NAME
    parser = ConfigParser(globals=False)
    parser.read_config(str(file_path))
    if fill_with_datastats:
        values = {} if data_stats is None else template_values(data_stats, data_src_cfg, parser["patch_size"])
    else:
        values = dict((fill_records or {}).get(CONFIG_NAME, {}))
    values["bundle_root"] = os.path.abspath(str(output_path))
    values.update(kwargs)
    for key, value in values.items():
        parser[key] = deepcopy(value)
    ConfigParser.export_config_file(parser.get(), str(file_path), fmt="yaml", default_flow_style=None)
    return {CONFIG_NAME: values}


def _coerce(value: Any, default: Any) -> Any:
    """A command-line override in the config's type: MONAI passes a list as ``'a,b,c'``, fire a tuple as a tuple."""
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, str) and (isinstance(default, list) or (default is None and "," in value)):
        return [yaml.safe_load(v) for v in value.split(",") if v.strip()]
    return value


def load_config(
    config_file: Union[PathLike, Sequence[PathLike]],
    override: Optional[Mapping[str, Any]] = None,
    known_only: bool = False,
) -> dict[str, Any]:
    """The parsed configs (``scripts/*.py run --config_file a.yaml,b.yaml --key value``).

    Args:
        config_file: one file, a list, or comma-separated files (merged in order).
        override: ``{id: value}`` set before parsing (``"infer#save_mask"`` reaches into sections); list values
            given as comma-separated strings are split.
        known_only: ignore overrides of ids the configs do not have (the AutoRunner ensemble passes its own keys).

    Returns:
        ``{top-level key: parsed value}``, plus the overrides of nested graph ids that the configs do not hold
        (``"nets#contrastive_def#tau"``), as given: the graph checks them when the trainer is built.
    """
    parser = ConfigParser()
    parser.read_config([str(f) for f in config_file] if isinstance(config_file, (list, tuple)) else str(config_file))
    nested = {}
    for key, value in (override or {}).items():
        known = key in parser
        if known_only and not known:
            continue
        if not known and any(sep in str(key) for sep in ("#", ID_SEP_KEY)):
            nested[key] = _coerce(value, None)
            continue
        parser[key] = _coerce(value, parser[key] if known else None)
    parsed = {key: parser.get_parsed_content(key) for key in parser.get() if key != ConfigParser.meta_key}
    return {**parsed, **nested}
