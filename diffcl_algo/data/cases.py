"""Case names and prediction files: what names a case through loading, inference and saving.

The field's LA files are all called ``mri_norm2.h5`` (the case is the folder), BraTS's ``<case>.h5``, Pancreas's
``<case>_norm.h5``; a user's scan is named by its file. :func:`case_name` derives the name from a path,
:class:`CaseNamed` puts it into the image's metadata (it travels with the image through sliding-window inference
into the prediction), :func:`item_case_name` reads it back from any item of an engine (batch or output), and
:func:`save_prediction` writes ``<output_dir>/<case>.nii.gz`` named by :func:`case_name_formatter`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Hashable, Mapping

import numpy as np
from monai.config import KeysCollection, PathLike
from monai.data import MetaTensor
from monai.transforms import MapTransform, SaveImaged
from monai.utils import ImageMetaKey

from diffcl_algo.data.io import LAYOUTS

__all__ = ["CASE_META_KEY", "CaseNamed", "case_name", "case_name_formatter", "item_case_name", "save_prediction"]

#: Metadata key holding the case name (set by :class:`CaseNamed`, read by :func:`case_name_formatter`).
CASE_META_KEY = "case"
PREDICTION_EXT = ".nii.gz"


def _layout_regexes() -> list[re.Pattern]:
    """One regex per ``LAYOUTS`` pattern capturing ``{case}`` from the end of a POSIX path."""
    out = []
    for pattern in LAYOUTS.values():
        head, tail = pattern.split("{case}")
        out.append(re.compile(f"(?:^|/){re.escape(head)}([^/]+){re.escape(tail)}$"))
    return out


_LAYOUT_REGEXES = _layout_regexes()
# file names shared by every case of a layout (LA: mri_norm2.h5): the case is the parent folder
_SHARED_FILE_NAMES = {Path(p).name for p in LAYOUTS.values() if "{case}" not in Path(p).name}


def case_name(path: PathLike) -> str:
    """Case name of an image path.

    Rules, first match wins: the ``{case}`` part of a known layout (``LAYOUTS``: LA
    ``.../2018LA_Seg_Training Set/<case>/mri_norm2.h5``, BraTS ``.../data/<case>.h5``, Pancreas
    ``.../Pancreas_h5/<case>_norm.h5``); the parent folder for a file name that every case of a layout shares
    (``mri_norm2.h5``); else the file name without its extension (``.nii.gz`` counts as one).

    Args:
        path: image file path.
    """
    posix = Path(path).as_posix()
    for regex in _LAYOUT_REGEXES:
        match = regex.search(posix)
        if match:
            return match.group(1)
    p = Path(posix)
    if p.name in _SHARED_FILE_NAMES and p.parent.name:
        return p.parent.name
    name = p.name[: -len(".gz")] if p.name.endswith(".gz") else p.name
    return name.rsplit(".", 1)[0] if "." in name else name


class CaseNamed(MapTransform):
    """Set ``data[case_key]`` and the case name in the metadata of ``keys`` (loaded MetaTensors).

    The name is ``data[case_key]`` when the datalist provides it (:func:`~diffcl_algo.data.build_datalists`
    does), else :func:`case_name` of the first key's file (``filename_or_obj`` metadata, or the path itself when
    not loaded yet). The metadata entry :data:`CASE_META_KEY` travels with the image through sliding-window
    inference into the prediction, where :func:`case_name_formatter` reads it.

    Args:
        keys: keys whose MetaTensor metadata receive the case name (the image; its metadata is copied to ``pred``).
        case_key: datalist key of the case name.
        allow_missing_keys: do not raise when a key is absent.
    """

    def __init__(self, keys: KeysCollection = "image", case_key: str = "case", allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.case_key = case_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Return a copy of ``data`` with ``case_key`` set and the name stored in each key's metadata."""
        d = dict(data)
        keys = list(self.key_iterator(d))
        if self.case_key not in d:
            if not keys:
                raise KeyError(f"CaseNamed: no '{self.case_key}' entry and none of {self.keys} to derive it from.")
            first = d[keys[0]]
            path = first.meta.get(ImageMetaKey.FILENAME_OR_OBJ) if isinstance(first, MetaTensor) else first
            if not isinstance(path, (str, Path)):
                raise ValueError(f"CaseNamed: cannot derive a case name from {type(first).__name__} '{keys[0]}'.")
            d[self.case_key] = case_name(path)
        for key in keys:
            if isinstance(d[key], MetaTensor):
                d[key].meta[CASE_META_KEY] = str(d[self.case_key])
        return d



def item_case_name(
    item: Mapping[str, Any], keys: tuple[str, ...] = ("pred", "image"), case_key: str = "case"
) -> str | None:
    """Case name of one item of an engine (a decollated batch or output), None when nothing names it.

    In this order: its ``case_key`` entry; the :data:`CASE_META_KEY` metadata of the first of ``keys`` that is a
    MetaTensor carrying it; :func:`case_name` of the ``filename_or_obj`` of the first that has one.
    """
    if item.get(case_key) is not None:
        return str(item[case_key])
    tensors = [x for x in (item.get(k) for k in keys) if isinstance(x, MetaTensor)]
    for x in tensors:
        if x.meta.get(CASE_META_KEY) is not None:
            return str(x.meta[CASE_META_KEY])
    for x in tensors:
        source = x.meta.get(ImageMetaKey.FILENAME_OR_OBJ)
        if isinstance(source, (str, Path)) and str(source):
            return case_name(source)
    return None

def case_name_formatter(metadict: Mapping[str, Any] | None, saver: Any = None) -> dict[str, Any]:
    """``SaveImage(d)`` ``output_name_formatter`` naming the file after the case (no patch index).

    The case is ``metadict[CASE_META_KEY]`` (set by :class:`CaseNamed`), else :func:`case_name` of
    ``filename_or_obj``. With ``output_postfix=""`` and ``separate_folder=False`` the file is
    ``<output_dir>/<case><output_ext>``; the returned ``subject`` carries a dummy extension so that MONAI's
    extension stripping keeps case names containing dots intact.

    Args:
        metadict: metadata of the tensor being saved.
        saver: the ``SaveImage`` instance (unused; part of MONAI's formatter signature).
    """
    metadict = metadict or {}
    case = metadict.get(CASE_META_KEY)
    if case is None:
        source = metadict.get(ImageMetaKey.FILENAME_OR_OBJ)
        if source is None:
            raise ValueError(
                f"case_name_formatter: the metadata has neither '{CASE_META_KEY}' nor 'filename_or_obj'."
            )
        case = case_name(source)
    return {"subject": f"{case}{PREDICTION_EXT}", "idx": None}

def save_prediction(output_dir: PathLike, key: str = "pred") -> SaveImaged:
    """``SaveImaged`` writing ``data[key]`` as ``<output_dir>/<case>.nii.gz``: a uint8 label map on the tensor's own
    grid and affine (no resampling), its path recorded in the metadata (``saved_to``)."""
    return SaveImaged(
        keys=key,
        output_dir=str(output_dir),
        output_postfix="",
        output_ext=PREDICTION_EXT,
        output_dtype=np.uint8,
        resample=False,
        separate_folder=False,
        print_log=False,
        output_name_formatter=case_name_formatter,
        savepath_in_metadict=True,
    )
