"""Pack the LA h5 dataset into one lossless file small enough to travel to a device machine, and unpack it there.

The field's LA images (``<src>/2018LA_Seg_Training Set/<case>/mri_norm2.h5``, ``image`` float32 z-scored, ``label``
uint8) are integer MRI intensities shifted and scaled, so each case holds at most a few hundred distinct float32
values (38-233 on the 80 cases of train.list). A case is stored as:

- ``<case>.values``: its distinct float32 values (distinct by bit pattern, so ``-0.0`` / NaN payloads survive),
  sorted by value;
- ``<case>.image``: bzip2 of the uint8 codes (index into ``values``) in (Z, Y, X) order, each slice minus the one
  before it modulo 256 (neighbouring slices are alike: about 10% smaller than the codes themselves);
- ``<case>.label``: bzip2 of the uint8 label; ``<case>.shape``; ``<case>.attrs`` (the h5 file attributes as JSON).

A case with more than 256 distinct values (not one in LA) is stored losslessly as bzip2 of its float32 voxels,
with an empty ``values``, and ``pack`` names it in ``raw_cases``. The file is an uncompressed ``.npz`` (the members
are compressed already, so workers can code cases in parallel); ``cases`` lists the case names in train.list order.

    python experiments/pack_la.py pack --src ../shared/data/LA --dst data/LA_packed.npz [--head 30 --tail 24]
    python experiments/pack_la.py unpack --src data/LA_packed.npz --dst /tmp/LA [--workers 16]
    python experiments/pack_la.py verify --a ../shared/data/LA --b /tmp/LA

``--head N --tail M`` keep the first N and the last M cases of train.list (the split of the bundle's hold-out
options is taken from the end of train.list, so the report and selection cases stay the same cases).
"""

from __future__ import annotations

import bz2
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import fire
import h5py
import numpy as np

from diffcl_algo.convert.writers import check_overwrite, write_h5, write_text
from diffcl_algo.data.io import LAYOUTS, DataError, read_case_list

LIST_NAME = "train.list"
MAX_CODES = 256


def _case_path(root: str | os.PathLike, case: str) -> Path:
    return Path(root) / LAYOUTS["la"].format(case=case)


def read_case(path: Path) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Read one LA h5 file: ``image`` float32 (X, Y, Z), ``label`` uint8 (X, Y, Z), the file attributes.

    Raises:
        DataError: the file is missing, or ``image`` / ``label`` are not float32 / uint8 3D arrays of one shape.
    """
    if not path.is_file():
        raise DataError(f"{path}: case file not found")
    with h5py.File(path, "r") as f:
        if "image" not in f or "label" not in f:
            raise DataError(f"{path}: expected datasets 'image' and 'label', found {sorted(f)}")
        image, label = f["image"][()], f["label"][()]
        attrs = {k: np.asarray(v).tolist() for k, v in f.attrs.items()}
    if image.dtype != np.float32 or label.dtype != np.uint8 or image.ndim != 3 or image.shape != label.shape:
        raise DataError(
            f"{path}: expected 3D 'image' float32 and 'label' uint8 of one shape, got image {image.dtype} "
            f"{image.shape}, label {label.dtype} {label.shape}"
        )
    return image, label, attrs


def _blob(array: np.ndarray) -> np.ndarray:
    return np.frombuffer(bz2.compress(np.ascontiguousarray(array).tobytes(), 9), dtype=np.uint8)


def _unblob(blob: np.ndarray, dtype: Any, shape: Sequence[int]) -> np.ndarray:
    return np.frombuffer(bz2.decompress(blob.tobytes()), dtype=dtype).reshape(shape)


def encode_case(image: np.ndarray, label: np.ndarray, attrs: dict[str, Any]) -> dict[str, np.ndarray]:
    """Members of one case (without the ``<case>.`` prefix); lossless for any float32 ``image``.

    Args:
        image: float32 (X, Y, Z).
        label: uint8 (X, Y, Z).
        attrs: JSON-serialisable h5 file attributes.
    """
    bits = image.view(np.uint32)
    table, inverse = np.unique(bits, return_inverse=True)
    out = {"shape": np.asarray(image.shape, dtype=np.int64), "label": _blob(label)}
    out["attrs"] = np.asarray(json.dumps(attrs))
    if table.size > MAX_CODES:
        out["values"], out["image"] = np.zeros(0, np.float32), _blob(image)
        return out
    order = np.argsort(table.view(np.float32), kind="stable")  # codes monotone in value: small slice differences
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    codes = np.ascontiguousarray(rank[inverse.reshape(image.shape)].astype(np.uint8).T)  # (Z, Y, X)
    out["values"] = table[order].view(np.float32)
    out["image"] = _blob(np.diff(codes, axis=0, prepend=np.uint8(0)))  # uint8: modulo 256
    return out


def decode_case(members: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Inverse of :func:`encode_case`: ``(image float32 (X, Y, Z), label uint8 (X, Y, Z), attrs)``."""
    shape = tuple(int(s) for s in members["shape"])
    label = _unblob(members["label"], np.uint8, shape)
    values = members["values"]
    if values.size == 0:
        image = _unblob(members["image"], np.float32, shape)
    else:
        codes = np.cumsum(_unblob(members["image"], np.uint8, shape[::-1]), axis=0, dtype=np.uint8).T
        image = values[codes]
    return image, label, json.loads(str(members["attrs"]))


def _pack_one(path: Path) -> tuple[dict[str, np.ndarray], int]:
    image, label, attrs = read_case(path)
    members = encode_case(image, label, attrs)
    return members, int(members["values"].size or np.unique(image.view(np.uint32)).size)


def _map(fn: Callable, items: Iterable, workers: int) -> list:
    """``[fn(x) for x in items]``, in ``workers`` processes when ``workers > 1``."""
    if workers <= 1:
        return [fn(x) for x in items]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(fn, items))


def select_cases(cases: list[str], head: int | None = None, tail: int | None = None) -> list[str]:
    """The first ``head`` and the last ``tail`` of ``cases``, in order (both ``None``: all)."""
    if head is None and tail is None:
        return list(cases)
    head, tail = int(head or 0), int(tail or 0)
    if head < 0 or tail < 0 or head + tail > len(cases):
        raise ValueError(f"--head {head} --tail {tail}: need 0 <= head + tail <= {len(cases)} (the listed cases)")
    return cases[:head] + cases[len(cases) - tail :]


def pack(
    src: str,
    dst: str,
    head: int | None = None,
    tail: int | None = None,
    workers: int = 1,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Pack the cases of ``<src>/train.list`` (or its first ``head`` and last ``tail``) into ``dst`` (``.npz``).

    Returns:
        ``cases``, ``mib`` (file size), ``seconds``, ``distinct_min`` / ``distinct_max`` (distinct image values per
        case) and ``raw_cases`` (cases with more than 256 values, stored as float32).
    """
    start = time.perf_counter()
    out = Path(dst)
    check_overwrite([out], overwrite)
    cases = select_cases(read_case_list(Path(src) / LIST_NAME), head, tail)
    results = _map(_pack_one, [_case_path(src, c) for c in cases], workers)
    arrays = {"cases": np.asarray(cases)}
    for case, (members, _) in zip(cases, results):
        arrays.update({f"{case}.{k}": v for k, v in members.items()})
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}.npz")
    try:
        np.savez(tmp, **arrays)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    distinct = [n for _, n in results]
    return {
        "cases": len(cases),
        "mib": round(out.stat().st_size / 2**20, 2),
        "seconds": round(time.perf_counter() - start, 1),
        "distinct_min": min(distinct),
        "distinct_max": max(distinct),
        "raw_cases": [c for c, n in zip(cases, distinct) if n > MAX_CODES],
    }


def _unpack_one(job: tuple[str, str, dict[str, np.ndarray]]) -> None:
    root, case, members = job
    image, label, attrs = decode_case(members)
    write_h5(_case_path(root, case), {"image": image, "label": label}, attrs)


def unpack(src: str, dst: str, workers: int = 1, overwrite: bool = False) -> dict[str, Any]:
    """Write the packed cases of ``src`` back as the LA h5 layout under ``dst``, with ``train.list``.

    Returns:
        ``cases`` and ``seconds``.

    Raises:
        DataError: ``src`` is not a file written by :func:`pack`.
    """
    start = time.perf_counter()
    try:
        packed = np.load(src, allow_pickle=False)
        cases = [str(c) for c in packed["cases"]]
    except (OSError, ValueError, KeyError) as err:
        raise DataError(f"{src}: not a packed LA file ({err})") from err
    check_overwrite([_case_path(dst, c) for c in cases] + [Path(dst) / LIST_NAME], overwrite)
    keys = ("shape", "values", "image", "label", "attrs")
    jobs = [(str(dst), c, {k: packed[f"{c}.{k}"] for k in keys}) for c in cases]
    _map(_unpack_one, jobs, workers)
    write_text(Path(dst) / LIST_NAME, "".join(f"{c}\n" for c in cases))
    return {"cases": len(cases), "seconds": round(time.perf_counter() - start, 1)}


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    """Bit-exact equality: dtype, shape and every byte (``np.array_equal`` alone takes ``-0.0 == 0.0``)."""
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes() and np.array_equal(a, b)


def verify(a: str, b: str) -> dict[str, Any]:
    """Check that every case of ``<b>/train.list`` has bit-exact ``image`` and ``label`` in ``a`` and ``b``.

    Raises:
        DataError: naming the first case that differs.
    """
    cases = read_case_list(Path(b) / LIST_NAME)
    for case in cases:
        first, second = read_case(_case_path(a, case)), read_case(_case_path(b, case))
        for name, x, y in zip(("image", "label", "attrs"), first, second):
            if not (x == y if name == "attrs" else _same(x, y)):
                raise DataError(f"{_case_path(b, case)}: '{name}' differs from {_case_path(a, case)}")
    return {"cases": len(cases), "identical": True}


if __name__ == "__main__":
    fire.Fire({"pack": pack, "unpack": unpack, "verify": verify})
