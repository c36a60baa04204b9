"""Readers and datalists: the field's preprocessed h5 layouts and Decathlon-style NIfTI datalists.

The semi-supervised 3D segmentation literature (UA-MT, SSL4MIS, MC-Net, CAML, Diff-CL) ships its data as one
h5 file per case holding two 3D datasets, ``image`` (float32, already normalised) and ``label`` (uint8), plus
plain-text case lists. The directory layouts (``LAYOUTS``):

- ``la``: ``<dataset_dir>/2018LA_Seg_Training Set/<case>/mri_norm2.h5``, lists ``train.list`` / ``test.list``
  (UA-MT ``code/dataloaders/la_heart.py``; 0.625 mm isotropic voxels).
- ``brats``: ``<dataset_dir>/data/<case>.h5``, lists ``train.txt`` / ``val.txt`` / ``test.txt``
  (SSL4MIS ``code/dataloaders/brats2019.py``).
- ``pancreas``: ``<dataset_dir>/Pancreas_h5/<case>_norm.h5``, lists ``train.list`` / ``test.list``
  (MC-Net ``code/dataloaders/dataset.py``).

The first ``num_labeled`` cases of a list are the labeled ones (``num=labelnum`` in all of these code bases);
the rest are used without their labels.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Hashable, Mapping, Sequence

import h5py
import numpy as np
from monai.config import DtypeLike, KeysCollection, PathLike
from monai.data import ImageReader, load_decathlon_datalist
from monai.data.utils import is_supported_format
from monai.transforms import LoadImage, MapTransform
from monai.utils import ensure_tuple, ensure_tuple_rep
from monai.utils.enums import MetaKeys, SpaceKeys

__all__ = [
    "DataError",
    "H5Reader",
    "LoadH5d",
    "LAYOUTS",
    "LIST_NAMES",
    "LA_SPACING",
    "read_case_list",
    "h5_datalist",
    "la_datalist",
    "decathlon_datalists",
    "detect_layout",
    "build_datalists",
]

LA_SPACING = (0.625, 0.625, 0.625)
"""Voxel size (mm) of the field's LA h5 volumes, which carry no spacing attribute (Xiong et al., MedIA 2021)."""

LAYOUTS = {
    "la": "2018LA_Seg_Training Set/{case}/mri_norm2.h5",
    "brats": "data/{case}.h5",
    "pancreas": "Pancreas_h5/{case}_norm.h5",
}
"""Per-case h5 path, relative to the dataset directory, of each known layout."""

LIST_NAMES = {
    "la": ("train.list", "test.list"),
    "brats": ("train.txt", "val.txt", "test.txt"),
    "pancreas": ("train.list", "test.list"),
}
"""Case-list file names of each known layout, training list first."""

H5_SUFFIXES = ("h5", "hdf5")

class DataError(ValueError):
    """A dataset on disk does not have the expected layout or content; the message names the path."""


def layout_help(layout: str, labels: bool = True) -> str:
    """Human-readable description of a layout, appended to every ``DataError`` about it.

    Args:
        layout: a ``LAYOUTS`` key or a ``{case}`` pattern.
        labels: the cases need their labels (training, evaluation); False: images to segment (inference).
    """
    pattern = LAYOUTS.get(layout, layout).replace("{case}", "<case>")
    lists = " / ".join(LIST_NAMES.get(layout, ("<list file>",)))
    content = "3D datasets 'image' float32 and 'label' uint8 of the same shape" if labels else "a 3D dataset 'image'"
    return (
        f"expected layout: <dataset_dir>/{pattern} (h5 with {content}) and case lists {lists} in <dataset_dir>, one "
        "case name per line"
    )


def missing_dataset_dir(root: Path, labels: bool = True) -> str:
    """Message for a dataset directory that does not exist: where it was looked for and how to give another (with
    ``labels=False``, for inference: also how to name the images to segment)."""
    where = f" (looked for {root.resolve()})" if not root.is_absolute() else ""
    if labels:
        return f"dataset directory {root} does not exist{where}; pass the dataset folder with --dataset_dir <folder>"
    return (
        f"dataset directory {root} does not exist{where}; pass the folder of the images to segment with --dataset_dir "
        "<folder>, or the image files (NIfTI, NRRD or h5) with --images \"['<scan>.nii.gz', ...]\""
    )


class H5Reader(ImageReader):
    """MONAI ``ImageReader`` for one dataset of the field's per-case h5 files.

    MONAI has no HDF5 reader; this one plugs h5 files into ``LoadImage`` so the result is a regular MetaTensor
    (affine, spatial shape, filename) and the rest of the MONAI pipeline applies unchanged.

    Args:
        dataset: name of the h5 dataset to read (``"image"`` or ``"label"`` in the field's files).
        spacing: voxel size in mm used for the affine ``diag(spacing, 1)``. ``None``: the file's ``spacing``
            attribute (written by :mod:`diffcl_algo.convert.prepare`) when present, else ``LA_SPACING`` (the field's
            LA files carry no attributes).
    """

    def __init__(self, dataset: str = "image", spacing: float | Sequence[float] | None = None) -> None:
        super().__init__()
        self.dataset = dataset
        self.spacing = spacing

    def verify_suffix(self, filename: Sequence[PathLike] | PathLike) -> bool:
        """Whether all ``filename`` end with ``.h5`` or ``.hdf5``."""
        return is_supported_format(filename, H5_SUFFIXES)

    def read(self, data: Sequence[PathLike] | PathLike, **kwargs: Any) -> list[tuple[np.ndarray, tuple]]:
        """Read ``self.dataset`` from each file; returns a list of ``(array, spacing)``."""
        out = []
        for name in ensure_tuple(data):
            with h5py.File(name, "r") as f:
                if self.dataset not in f:
                    raise DataError(f"{name}: no dataset '{self.dataset}' (found {sorted(f.keys())})")
                array = f[self.dataset][()]
                spacing = self.spacing if self.spacing is not None else f.attrs.get("spacing", LA_SPACING)
            out.append((array, ensure_tuple_rep(tuple(np.ravel(spacing).tolist()), array.ndim)))
        return out

    def get_data(self, img: list[tuple[np.ndarray, tuple]]) -> tuple[np.ndarray, dict]:
        """Array (files stacked on a new first axis when several) and metadata of the first file.

        Shapes: one file -> (*spatial) with ``original_channel_dim`` NaN (no channel); n files -> (n, *spatial).
        """
        arrays = [a for a, _ in img]
        spacing = img[0][1]
        affine = np.diag([*map(float, spacing), 1.0])
        meta = {
            MetaKeys.AFFINE: affine,
            MetaKeys.ORIGINAL_AFFINE: affine.copy(),
            MetaKeys.SPATIAL_SHAPE: np.asarray(arrays[0].shape),
            MetaKeys.SPACE: SpaceKeys.RAS,
            "dataset": self.dataset,
        }
        if len(arrays) == 1:
            meta[MetaKeys.ORIGINAL_CHANNEL_DIM] = float("nan")
            return arrays[0], meta
        meta[MetaKeys.ORIGINAL_CHANNEL_DIM] = 0
        return np.stack(arrays), meta


class LoadH5d(MapTransform):
    """Load each key's file into a channel-first MetaTensor; h5 via :class:`H5Reader`, anything else via ``LoadImage``.

    For an h5 path, key ``k`` reads the h5 dataset ``datasets[k]`` (by default the key name itself, so
    ``{"image": f, "label": f}`` reads both datasets of the same file). Other paths (NIfTI, ...) go to MONAI's
    ``LoadImage`` with its default suffix-based reader selection, so one chain serves both the field's h5 files
    and Decathlon-style NIfTI datalists.

    Args:
        keys: keys of the data dict holding file paths.
        datasets: h5 dataset name per key; defaults to the key names.
        spacing: see :class:`H5Reader` (ignored for non-h5 files, whose header gives the affine).
        dtype: output dtype, one for all keys or one per key.
        ensure_channel_first: add the channel dim, giving (1, *spatial).
        allow_missing_keys: do not raise when a key is absent (e.g. unlabeled entries without ``label``).
    """

    def __init__(
        self,
        keys: KeysCollection = ("image", "label"),
        datasets: Sequence[str] | None = None,
        spacing: float | Sequence[float] | None = None,
        dtype: DtypeLike | Sequence[DtypeLike] = np.float32,
        ensure_channel_first: bool = True,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        names = tuple(str(k) for k in self.keys) if datasets is None else ensure_tuple(datasets)
        if len(names) != len(self.keys):
            raise ValueError(f"datasets {names} must have one name per key {self.keys}")
        dtypes = dtype if isinstance(dtype, (list, tuple)) else ensure_tuple_rep(dtype, len(self.keys))
        self.readers = {k: H5Reader(dataset=n, spacing=spacing) for k, n in zip(self.keys, names)}
        self.loaders = {
            k: LoadImage(image_only=True, dtype=dt, ensure_channel_first=ensure_channel_first)
            for k, dt in zip(self.keys, dtypes)
        }

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Replace each key's path by the loaded MetaTensor of shape (1, *spatial)."""
        d = dict(data)
        for key in self.key_iterator(d):
            reader = self.readers[key]
            d[key] = self.loaders[key](d[key], reader=reader if reader.verify_suffix(d[key]) else None)
        return d


def read_case_list(path: PathLike) -> list[str]:
    """Case names of a list file: one per line, blank lines skipped, text after a comma ignored (SSL4MIS lists).

    Raises:
        DataError: the file is missing or names a case twice.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"case list {path} does not exist")
    names = [line.split(",")[0].strip() for line in path.read_text().splitlines()]
    names = [n for n in names if n]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise DataError(f"case list {path} names these cases more than once: {duplicates}")
    return names


def _split_labeled(entries: list[dict], num_labeled: int | None, source: PathLike) -> tuple[list[dict], list[dict]]:
    """The first ``num_labeled`` entries having a label keep it, all others are unlabeled (``None``: all kept)."""
    with_label = [i for i, e in enumerate(entries) if "label" in e]
    n = len(with_label) if num_labeled is None else num_labeled
    if not 0 <= n <= len(with_label):
        raise DataError(f"{source}: num_labeled={num_labeled} but only {len(with_label)} cases have a label")
    keep = set(with_label[:n])
    labeled = [e for i, e in enumerate(entries) if i in keep]
    unlabeled = [{k: v for k, v in e.items() if k != "label"} for i, e in enumerate(entries) if i not in keep]
    return labeled, unlabeled


def h5_datalist(
    dataset_dir: PathLike,
    list_name: str = "train.list",
    num_labeled: int | None = None,
    layout: str = "la",
    labels: bool = True,
) -> tuple[list[dict], list[dict]]:
    """MONAI datalists of an h5 layout from one case list.

    Args:
        dataset_dir: dataset root holding the list file and the case files.
        list_name: case-list file name inside ``dataset_dir``.
        num_labeled: the first ``num_labeled`` cases are labeled, the rest unlabeled; ``None``: all labeled.
        layout: a key of ``LAYOUTS`` or a relative path pattern containing ``{case}``.
        labels: what the errors describe: labeled cases (training, evaluation), or images to segment (False).

    Returns:
        ``(labeled, unlabeled)``: dicts ``{"image": h5, "label": h5, "case": name}``; unlabeled ones have no
        ``"label"`` key.

    Raises:
        DataError: missing dataset directory, list file, case folder or case file (all missing ones listed).
    """
    pattern = LAYOUTS.get(layout, layout)
    if "{case}" not in pattern:
        raise ValueError(f"layout must be one of {sorted(LAYOUTS)} or a pattern containing '{{case}}', got {layout!r}")
    root = Path(dataset_dir)
    expected = layout_help(layout, labels)
    if not root.is_dir():
        raise DataError(f"{missing_dataset_dir(root, labels)}; {expected}")
    list_path = root / list_name
    if not list_path.is_file():
        raise DataError(f"case list {list_path} does not exist; {expected}")
    entries, missing = [], []
    for case in read_case_list(list_path):
        path = root / pattern.format(case=case)
        if not path.is_file():
            folder = path.parent
            what = f"case folder {folder}" if folder != root and not folder.is_dir() else f"case file {path}"
            missing.append(f"{what} is missing (case {case!r})")
        entries.append({"image": str(path), "label": str(path), "case": case})
    if missing:
        raise DataError(
            f"{len(missing)} of {len(entries)} cases listed in {list_path} are missing:\n  "
            + ";\n  ".join(missing[:20])
            + (";\n  ..." if len(missing) > 20 else "")
            + f";\n{expected}"
        )
    if not entries:
        raise DataError(f"case list {list_path} is empty")
    return _split_labeled(entries, num_labeled, list_path)


def la_datalist(
    dataset_dir: PathLike, list_name: str = "train.list", num_labeled: int | None = None
) -> tuple[list[dict], list[dict]]:
    """:func:`h5_datalist` for the LA layout ``<dataset_dir>/2018LA_Seg_Training Set/<case>/mri_norm2.h5``."""
    return h5_datalist(dataset_dir, list_name, num_labeled, layout="la")


def decathlon_datalists(
    datalist: PathLike,
    dataset_dir: PathLike | None = None,
    data_list_key: str = "training",
    num_labeled: int | None = None,
) -> tuple[list[dict], list[dict]]:
    """``(labeled, unlabeled)`` from a Decathlon-style JSON datalist (MONAI ``load_decathlon_datalist``).

    Entries without ``"label"`` are unlabeled. With ``num_labeled``, only the first ``num_labeled`` entries that
    have a label keep it. Each entry gets a ``"case"`` key (its own, else the image file name without suffix).

    Raises:
        DataError: missing/unreadable JSON, missing ``data_list_key``, too few labeled entries.
    """
    try:
        entries = load_decathlon_datalist(datalist, True, data_list_key, dataset_dir)
    except (ValueError, OSError, TypeError) as e:
        raise DataError(f"datalist {datalist}: {e}") from e
    if not entries:
        raise DataError(f"datalist {datalist}: '{data_list_key}' is empty")
    for e in entries:
        if "case" not in e:
            e["case"] = Path(ensure_tuple(e["image"])[0]).name.split(".")[0]
    return _split_labeled(entries, num_labeled, datalist)


def detect_layout(dataset_dir: PathLike, labels: bool = True) -> str:
    """The ``LAYOUTS`` key whose case folder exists under ``dataset_dir``.

    Args:
        dataset_dir: the dataset root.
        labels: what a missing folder's error describes: a dataset (True) or images to segment (inference).

    Raises:
        DataError: none or several match.
    """
    root = Path(dataset_dir)
    if not root.is_dir():
        raise DataError(missing_dataset_dir(root, labels))
    found = [name for name, pattern in LAYOUTS.items() if (root / Path(pattern).parts[0]).is_dir()]
    if len(found) != 1:
        options = "; ".join(f"{k}: <dataset_dir>/{v}" for k, v in LAYOUTS.items())
        raise DataError(f"{root}: cannot tell the dataset layout (matches {found}); known layouts: {options}")
    return found[0]


def build_datalists(
    dataset_dir: PathLike | None,
    datalist: PathLike | None = None,
    list_name: str | None = None,
    num_labeled: int | None = None,
    layout: str | None = None,
    labels: bool = True,
) -> tuple[list[dict], list[dict]]:
    """Single entry point: ``(labeled, unlabeled)`` datalists from an h5 layout or a Decathlon JSON datalist.

    Args:
        dataset_dir: dataset root (h5 layouts) or base directory of relative JSON paths (``None``: the JSON's
            folder).
        datalist: Decathlon-style JSON file; when given, the h5 layout is not used.
        list_name: h5 layouts: list file name (default: the layout's training list, e.g. ``train.list``);
            JSON: the data-list key (default ``"training"``).
        num_labeled: how many of the first cases keep their label (``None``: all that have one).
        layout: a ``LAYOUTS`` key or ``{case}`` pattern; ``None``: :func:`detect_layout`.
        labels: what the errors describe: labeled cases (training, evaluation), or images to segment (False:
            inference, whose cases may also be image files given with ``--images``).
    """
    if datalist is not None:
        return decathlon_datalists(datalist, dataset_dir, list_name or "training", num_labeled)
    if dataset_dir is None:
        if labels:
            raise DataError("build_datalists needs dataset_dir (h5 layout) or datalist (Decathlon JSON)")
        raise DataError(
            "no images to segment: pass the image files (NIfTI, NRRD or h5) with --images \"['<scan>.nii.gz', ...]\", "
            "a Decathlon JSON with --datalist, or a dataset folder with --dataset_dir"
        )
    layout = layout or detect_layout(dataset_dir, labels)
    list_name = list_name or LIST_NAMES.get(layout, ("train.list",))[0]
    return h5_datalist(dataset_dir, list_name, num_labeled, layout, labels)


def is_h5(path: PathLike) -> bool:
    """Whether ``path`` has an h5 suffix."""
    return os.fspath(path).lower().endswith(tuple(f".{s}" for s in H5_SUFFIXES))
