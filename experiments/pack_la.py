"""Pack the LA h5 dataset into one lossless file small enough to travel to a device machine, and unpack it there.

The field's LA images (``<src>/2018LA_Seg_Training Set/<case>/mri_norm2.h5``, ``image`` float32 z-scored, ``label``
uint8) are integer MRI intensities shifted and scaled, so each case holds a few hundred distinct float32 values at
most (38-233 on the 80 cases of train.list). A case is stored as:

- ``values``: its distinct float32 values, a codebook (distinct by bit pattern, so ``-0.0`` / NaN payloads
  survive), sorted by value; the image becomes codes, indices into it, in (Z, Y, X) order;
- with at most 256 values (every LA case), the codes are predicted in raster order from 39 causal neighbours (the
  slices z-1 and z-2 around the voxel, the rows above it and the voxels before it in its row) by a linear predictor
  fitted to the case by least squares, in integers (``weights``: fixed point, 12 fractional bits, so the unpacker
  computes the same predictions bit for bit); the residuals modulo 256 are entropy coded by a static rANS coder,
  1024 interleaved streams (``freq``: the symbol frequencies, ``states``: the streams' final states, ``image``: the
  16-bit words). Unpacking decodes the residuals, then rebuilds the codes front by front (the voxels of one front
  depend only on earlier fronts), vectorised;
- with 257 to 65536 values: uint16 codes, each slice minus the one before it (modulo 65536), bzip2; with more: bzip2
  of the float32 voxels (``raw_cases``);
- ``label``: the bounding box of its non-zero voxels (``meta``) and, inside it, the bit-packed label (0/1 labels) or
  the uint8 label, bzip2; ``meta`` (JSON) also holds the shape, the method and the h5 file attributes.

About 25% smaller than bzip2 of the slice differences of the codes (the previous format). The file is an
uncompressed ``.npz`` (the members are compressed already, so workers code cases in parallel); ``cases`` lists the
case names in train.list order, ``format`` names this layout (an older file is refused: pack it again).

    python experiments/pack_la.py pack --src ../shared/data/LA --dst data/LA_packed.npz --tail 24 --max_mib 50
    python experiments/pack_la.py unpack --src data/LA_packed.npz --dst /tmp/LA [--workers 16] [--compress false]
    python experiments/pack_la.py verify --a ../shared/data/LA --b /tmp/LA

``--head N --tail M`` keep the first N and the last M cases of train.list (the split of the bundle's hold-out
options is taken from the end of train.list, so the report and selection cases stay the same cases); ``--max_mib``
keeps the last ``--tail`` cases and as many of the first ones as fit in that many MiB. ``pack`` decodes every case
it wrote and compares it with the h5 file bit for bit (``--check false`` skips that).
"""

from __future__ import annotations

import bz2
import json
import math
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import h5py
import numpy as np

from diffcl_algo.convert.writers import check_overwrite, write_h5
from diffcl_algo.data.io import LAYOUTS, DataError, read_case_list
from diffcl_algo.utils import write_text

LIST_NAME = "train.list"
FORMAT = "la-pack-3"
KEYS = ("meta", "values", "weights", "freq", "states", "image", "label")
MAX_CODES = 256
MAX_CODES_16 = 65536
#: Causal neighbours of the predictor, ``(dz, dy, dx)``: the code at ``(z - dz, y - dy, x - dx)``.
NEIGHBOURS = (
    *[(1, dy, dx) for dy in (-2, -1, 0, 1, 2) for dx in (-2, -1, 0, 1, 2) if abs(dy) + abs(dx) <= 3],
    *[(2, dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)],
    (0, 0, 1), (0, 1, 0), (0, 1, 1), (0, 1, -1), (0, 0, 2), (0, 2, 0), (0, 1, 2), (0, 1, -2), (0, 2, 1), (0, 2, -1),
    (0, 0, 3),
)  # fmt: skip
SHIFT = 12  # fractional bits of the predictor's weights
FIT_SAMPLES = 300_000  # voxels the least-squares fit reads
PROB_BITS = 15  # rANS: frequencies sum to 2**PROB_BITS
RANS_L = 1 << 16  # rANS: states stay in [RANS_L, RANS_L << 16), renormalised by 16-bit words
LANES = 1024  # interleaved rANS streams


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


# ---------------------------------------------------------------------------------------------------- rANS coder


def rans_frequencies(counts: np.ndarray) -> np.ndarray:
    """Frequencies summing to ``2**PROB_BITS``, at least 1 for every symbol with a count, roughly proportional."""
    counts = np.asarray(counts, dtype=np.int64)
    total = 1 << PROB_BITS
    freq = np.zeros(counts.size, dtype=np.int64)
    present = counts > 0
    freq[present] = np.maximum(1, counts[present] * total // counts.sum())
    freq[np.argmax(freq)] += total - freq.sum()  # the largest absorbs the rounding (it stays far above 1)
    assert freq.sum() == total and (freq[present] >= 1).all()
    return freq


def rans_encode(symbols: np.ndarray, lanes: int = LANES) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Static rANS of uint8 ``symbols`` over ``lanes`` interleaved streams (symbol ``i`` in stream ``i % lanes``).

    Returns:
        ``(freq uint16[256], states uint32[lanes], words uint16[...])``: :func:`rans_decode` reads them back.
    """
    n = symbols.size
    lanes = max(1, min(lanes, n))
    steps = -(-n // lanes)
    padded = np.zeros(steps * lanes, dtype=np.uint8)  # padding: symbol 0, counted in the table
    padded[:n] = symbols.ravel()
    freq = rans_frequencies(np.bincount(padded, minlength=256))
    cum = np.concatenate([[0], np.cumsum(freq)[:-1]]).astype(np.uint64)
    f64 = freq.astype(np.uint64)
    x = np.full(lanes, RANS_L, dtype=np.uint64)
    grid, chunks = padded.reshape(steps, lanes), []
    for t in range(steps - 1, -1, -1):  # rANS is last in, first out: encode backwards
        f, c = f64[grid[t]], cum[grid[t]]
        out = x >= (f << np.uint64(32 - PROB_BITS))  # x_max = ((RANS_L >> PROB_BITS) << 16) * f
        chunks.append((x[out] & np.uint64(0xFFFF)).astype(np.uint16))
        x = np.where(out, x >> np.uint64(16), x)
        x = ((x // f) << np.uint64(PROB_BITS)) + (x % f) + c
    words = np.concatenate(chunks[::-1]) if chunks else np.zeros(0, np.uint16)
    return freq.astype(np.uint16), x.astype(np.uint32), words


def rans_decode(freq: np.ndarray, states: np.ndarray, words: np.ndarray, n: int) -> np.ndarray:
    """Inverse of :func:`rans_encode`: ``n`` uint8 symbols.

    Raises:
        DataError: the streams do not end where the encoder started them (a damaged file).
    """
    lanes = states.size
    steps = -(-n // lanes) if n else 0
    f64 = freq.astype(np.uint64)
    cum = np.concatenate([[0], np.cumsum(f64)[:-1]]).astype(np.uint64)
    lookup = np.repeat(np.arange(freq.size, dtype=np.uint8), freq.astype(np.int64))
    if lookup.size != 1 << PROB_BITS:
        raise DataError(f"rANS frequencies sum to {lookup.size}, not {1 << PROB_BITS}")
    x, words64 = states.astype(np.uint64), words.astype(np.uint64)
    out, ptr, mask = np.empty((steps, lanes), dtype=np.uint8), 0, np.uint64((1 << PROB_BITS) - 1)
    for t in range(steps):
        slot = x & mask
        s = lookup[slot]
        out[t] = s
        x = f64[s] * (x >> np.uint64(PROB_BITS)) + slot - cum[s]
        low = x < RANS_L
        k = int(np.count_nonzero(low))
        if k:
            if ptr + k > words.size:
                raise DataError("rANS streams are damaged (they end early)")
            x[low] = (x[low] << np.uint64(16)) | words64[ptr : ptr + k]
            ptr += k
    if ptr != words.size or (x != RANS_L).any():
        raise DataError("rANS streams are damaged (they do not decode back to their start)")
    return out.ravel()[:n]


# ------------------------------------------------------------------------------------- predictive image coding


def _geometry(shape: Sequence[int]) -> tuple[tuple[int, int, int], np.ndarray, tuple[int, int]]:
    """Padding ``(pz, py, px)``, flat offsets of :data:`NEIGHBOURS` in the padded volume, front slopes ``(a, b)``.

    Voxel ``(z, y, x)`` belongs to front ``a z + b y + x``; every neighbour lies on an earlier front.
    """
    pz = max(dz for dz, _, _ in NEIGHBOURS)
    py = max(abs(dy) for _, dy, _ in NEIGHBOURS)
    px = max(abs(dx) for _, _, dx in NEIGHBOURS)
    _, ny, nx = shape
    sy, sz = nx + 2 * px, (ny + 2 * py) * (nx + 2 * px)
    offsets = np.array([dz * sz + dy * sy + dx for dz, dy, dx in NEIGHBOURS], dtype=np.int64)
    b = max([1] + [math.ceil((1 - dx) / dy) for dz, dy, dx in NEIGHBOURS if dz == 0 and dy > 0])
    a = max([1] + [math.ceil((1 - b * dy - dx) / dz) for dz, dy, dx in NEIGHBOURS if dz > 0])
    assert all(a * dz + b * dy + dx >= 1 for dz, dy, dx in NEIGHBOURS)
    return (pz, py, px), offsets, (a, b)


def _padded(codes: np.ndarray, pad: tuple[int, int, int], fill: int) -> np.ndarray:
    (pz, py, px), (nz, ny, nx) = pad, codes.shape
    out = np.full((nz + pz, ny + 2 * py, nx + 2 * px), fill, dtype=np.int64)
    out[pz:, py : py + ny, px : px + nx] = codes
    return out


def _padded_index(raster: np.ndarray, shape: Sequence[int], pad: tuple[int, int, int]) -> np.ndarray:
    """Flat index in the padded volume of the voxels with flat (Z, Y, X) index ``raster``."""
    (pz, py, px), (_, ny, nx) = pad, shape
    z, rest = np.divmod(raster, ny * nx)
    y, x = np.divmod(rest, nx)
    return ((z + pz) * (ny + 2 * py) + (y + py)) * (nx + 2 * px) + (x + px)


def _zigzag(residual: np.ndarray) -> np.ndarray:
    """int residuals modulo 256 -> uint8 symbols 0, -1, 1, -2, ... -> 0, 1, 2, 3, ..."""
    v = (residual & 255).astype(np.uint8).view(np.int8).astype(np.int16)
    return ((v << 1) ^ (v >> 7)).astype(np.uint8)


def _unzigzag(symbols: np.ndarray) -> np.ndarray:
    s = symbols.astype(np.int64)
    return (s >> 1) ^ -(s & 1)


def encode_codes(codes: np.ndarray, num_codes: int) -> dict[str, Any]:
    """Predictive coding of uint8 ``codes`` (Z, Y, X) with values below ``num_codes`` (at most 256).

    Returns:
        ``weights`` (int64: one per neighbour, then the rounding bias), ``fill`` (the padding code), and the rANS
        ``freq``, ``states``, ``words`` of the residuals.
    """
    pad, offsets, _ = _geometry(codes.shape)
    fill = int(np.round(codes.mean())) if codes.size else 0
    volume = _padded(codes, pad, fill)
    flat, n = volume.ravel(), codes.size
    rng = np.random.default_rng(0)
    sample = np.sort(rng.choice(n, FIT_SAMPLES, replace=False)) if n > FIT_SAMPLES else np.arange(n)
    idx = _padded_index(sample, codes.shape, pad)
    design = np.concatenate([flat[idx[:, None] - offsets[None, :]], np.ones((idx.size, 1), np.int64)], axis=1)
    fit = np.linalg.lstsq(design.astype(np.float64), codes.ravel()[sample].astype(np.float64), rcond=None)[0]
    limit = 1 << (SHIFT + 8)
    weights = np.clip(np.round(fit * (1 << SHIFT)), -limit, limit).astype(np.int64)
    weights[-1] += 1 << (SHIFT - 1)  # round to nearest
    (pz, py, px), (nz, ny, nx) = pad, codes.shape
    acc = np.full(codes.shape, weights[-1], dtype=np.int64)
    for (dz, dy, dx), w in zip(NEIGHBOURS, weights[:-1]):
        if w:
            acc += w * volume[pz - dz : pz - dz + nz, py - dy : py - dy + ny, px - dx : px - dx + nx]
    prediction = np.clip(acc >> SHIFT, 0, num_codes - 1)
    freq, states, words = rans_encode(_zigzag(codes.astype(np.int64) - prediction).ravel())
    return {"weights": weights, "fill": fill, "freq": freq, "states": states, "words": words}


def decode_codes(shape: Sequence[int], num_codes: int, weights: np.ndarray, fill: int, freq: np.ndarray,
                 states: np.ndarray, words: np.ndarray) -> np.ndarray:  # fmt: skip
    """Inverse of :func:`encode_codes`: uint8 codes (Z, Y, X)."""
    shape = tuple(int(s) for s in shape)
    n = int(np.prod(shape))
    residual = _unzigzag(rans_decode(freq, states, words, n))
    pad, offsets, (a, b) = _geometry(shape)
    volume = _padded(np.zeros(shape, np.int64), pad, fill)
    flat = volume.ravel()
    z, y, x = np.unravel_index(np.arange(n, dtype=np.int64), shape)
    front = a * z + b * y + x
    order = np.argsort(front, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(np.bincount(front))])
    positions, residual = _padded_index(order, shape, pad), residual[order]
    w, bias = weights[:-1].astype(np.int64), int(weights[-1])
    for start, stop in zip(bounds[:-1], bounds[1:]):
        if start == stop:
            continue
        i = positions[start:stop]
        prediction = np.clip((flat[i[:, None] - offsets[None, :]] @ w + bias) >> SHIFT, 0, num_codes - 1)
        flat[i] = (prediction + residual[start:stop]) & 255
    return volume[pad[0] :, pad[1] : pad[1] + shape[1], pad[2] : pad[2] + shape[2]].astype(np.uint8)


# ------------------------------------------------------------------------------------------------------- cases


def _empty(dtype: Any) -> np.ndarray:
    return np.zeros(0, dtype=dtype)


def encode_label(label: np.ndarray) -> tuple[dict[str, Any], np.ndarray]:
    """``({"box": [[lo, hi] per axis], "bits": 1 or 8}, bzip2 blob)``: the label's non-zero bounding box, bit-packed
    in (Z, Y, X) order when the label is 0/1."""
    nonzero = np.nonzero(label)
    if nonzero[0].size == 0:
        return {"box": [[0, 0]] * label.ndim, "bits": 1}, _blob(_empty(np.uint8))
    box = [[int(a.min()), int(a.max()) + 1] for a in nonzero]
    inside = np.ascontiguousarray(label[tuple(slice(lo, hi) for lo, hi in box)].T)
    if inside.max() <= 1:
        return {"box": box, "bits": 1}, _blob(np.packbits(inside))
    return {"box": box, "bits": 8}, _blob(inside)


def decode_label(shape: Sequence[int], info: dict[str, Any], blob: np.ndarray) -> np.ndarray:
    label = np.zeros(tuple(shape), dtype=np.uint8)
    box = [slice(lo, hi) for lo, hi in info["box"]]
    size = [s.stop - s.start for s in box]
    if all(size):
        raw = np.frombuffer(bz2.decompress(blob.tobytes()), dtype=np.uint8)
        count = int(np.prod(size))
        inside = np.unpackbits(raw, count=count) if info["bits"] == 1 else raw
        label[tuple(box)] = inside.reshape(size[::-1]).T
    return label


def encode_case(image: np.ndarray, label: np.ndarray, attrs: dict[str, Any]) -> dict[str, np.ndarray]:
    """Members of one case (:data:`KEYS`, without the ``<case>.`` prefix); lossless for any float32 ``image``.

    Args:
        image: float32 (X, Y, Z).
        label: uint8 (X, Y, Z).
        attrs: JSON-serialisable h5 file attributes.
    """
    table, inverse = np.unique(image.view(np.uint32), return_inverse=True)
    label_info, label_blob = encode_label(label)
    meta = {"shape": list(image.shape), "distinct": int(table.size), "label": label_info, "attrs": attrs}
    out = {"values": _empty(np.float32), "weights": _empty(np.int64), "freq": _empty(np.uint16),
           "states": _empty(np.uint32), "label": label_blob}  # fmt: skip
    if table.size > MAX_CODES_16:
        meta["method"], out["image"] = "raw", _blob(image)
    else:
        order = np.argsort(table.view(np.float32), kind="stable")  # codes monotone in value
        rank = np.empty_like(order)
        rank[order] = np.arange(order.size)
        out["values"] = table[order].view(np.float32)
        codes = np.ascontiguousarray(rank[inverse.reshape(image.shape)].T)  # (Z, Y, X)
        if table.size <= MAX_CODES:
            coded = encode_codes(codes.astype(np.uint8), int(table.size))
            meta.update(method="predictive", fill=coded["fill"])
            out.update(weights=coded["weights"], freq=coded["freq"], states=coded["states"], image=coded["words"])
        else:
            meta["method"] = "codes16"
            out["image"] = _blob(np.diff(codes.astype(np.uint16), axis=0, prepend=np.uint16(0)))  # modulo 65536
    out["meta"] = np.asarray(json.dumps(meta))
    return out


def decode_case(members: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Inverse of :func:`encode_case`: ``(image float32 (X, Y, Z), label uint8 (X, Y, Z), attrs)``."""
    meta = json.loads(str(members["meta"]))
    shape = tuple(int(s) for s in meta["shape"])
    values = members["values"]
    if meta["method"] == "raw":
        image = _unblob(members["image"], np.float32, shape)
    elif meta["method"] == "codes16":
        image = values[np.cumsum(_unblob(members["image"], np.uint16, shape[::-1]), axis=0, dtype=np.uint16).T]
    elif meta["method"] == "predictive":
        codes = decode_codes(shape[::-1], values.size, members["weights"], meta["fill"], members["freq"],
                             members["states"], members["image"])  # fmt: skip
        image = values[codes.T]
    else:
        raise DataError(f"unknown image coding {meta['method']!r}")
    return np.ascontiguousarray(image), decode_label(shape, meta["label"], members["label"]), meta["attrs"]


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    """Bit-exact equality: dtype, shape and every byte (``np.array_equal`` alone takes ``-0.0 == 0.0``)."""
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes() and np.array_equal(a, b)


def _pack_one(job: tuple[Path, bool]) -> dict[str, np.ndarray]:
    path, check = job
    image, label, attrs = read_case(path)
    members = encode_case(image, label, attrs)
    if check:
        back = decode_case(members)
        if not (_same(back[0], image) and _same(back[1], label) and back[2] == attrs):
            raise DataError(f"{path}: the packed case does not decode to the original (a packer bug)")
    return members


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


def _size(members: dict[str, np.ndarray]) -> int:
    return sum(v.nbytes for v in members.values())


def _save(out: Path, cases: list[str], encoded: dict[str, dict[str, np.ndarray]]) -> int:
    arrays = {"format": np.asarray(FORMAT), "cases": np.asarray(cases)}
    for case in cases:
        arrays.update({f"{case}.{k}": v for k, v in encoded[case].items()})
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}.npz")
    try:
        np.savez(tmp, **arrays)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out.stat().st_size


def pack(
    src: str,
    dst: str,
    head: int | None = None,
    tail: int | None = None,
    max_mib: float | None = None,
    workers: int = 1,
    overwrite: bool = False,
    check: bool = True,
) -> dict[str, Any]:
    """Pack cases of ``<src>/train.list`` into ``dst`` (``.npz``): all, the first ``head`` and last ``tail``, or
    (``max_mib``) the last ``tail`` and as many of the first cases as fit in ``max_mib`` MiB.

    Returns:
        ``cases``, ``head`` / ``tail`` (cases kept from the start / the end of train.list), ``listed`` (cases in
        train.list), ``mib`` (file size), ``mib_per_case`` (mean, min, max), ``seconds``, ``distinct_min`` /
        ``distinct_max`` (distinct image values per case), ``raw_cases`` (cases with more than 256 values).

    Raises:
        DataError: a case file is missing or malformed, ``check`` found a case that does not decode to itself, or
            the last ``tail`` cases alone exceed ``max_mib``.
    """
    start = time.perf_counter()
    out = Path(dst)
    check_overwrite([out], overwrite)
    listed = read_case_list(Path(src) / LIST_NAME)
    if max_mib is None:
        cases = select_cases(listed, head, tail)
    else:
        tail = int(tail or 0)
        cases = select_cases(listed, len(listed) - tail if head is None else head, tail)
    results = _map(_pack_one, [(_case_path(src, c), bool(check)) for c in cases], workers)
    encoded = dict(zip(cases, results))
    size = _save(out, cases, encoded)
    kept_tail = min(int(tail or 0), len(cases)) if (tail or max_mib is not None) else 0
    if max_mib is not None:
        limit = float(max_mib) * 2**20
        heads = cases[: len(cases) - kept_tail]
        while size > limit and heads:  # drop the last of the first cases until the file fits
            heads = heads[:-1]
            cases = heads + cases[len(cases) - kept_tail :]
            size = _save(out, cases, encoded)
        if size > limit:
            out.unlink()
            raise DataError(f"the last {kept_tail} cases alone take {size / 2**20:.2f} MiB, over --max_mib {max_mib}")
    sizes = [_size(encoded[c]) / 2**20 for c in cases]
    distinct = [int(json.loads(str(encoded[c]["meta"]))["distinct"]) for c in cases]
    return {
        "cases": len(cases),
        "head": len(cases) - kept_tail,
        "tail": kept_tail,
        "listed": len(listed),
        "mib": round(size / 2**20, 2),
        "mib_per_case": [round(float(np.mean(sizes)), 3), round(min(sizes), 3), round(max(sizes), 3)],
        "seconds": round(time.perf_counter() - start, 1),
        "distinct_min": min(distinct),
        "distinct_max": max(distinct),
        "raw_cases": [c for c, n in zip(cases, distinct) if n > MAX_CODES],
    }


def _unpack_one(job: tuple[str, str, dict[str, np.ndarray], bool]) -> None:
    root, case, members, compress = job
    image, label, attrs = decode_case(members)
    write_h5(_case_path(root, case), {"image": image, "label": label}, attrs, compress)


def unpack(src: str, dst: str, workers: int = 1, overwrite: bool = False, compress: bool = True) -> dict[str, Any]:
    """Write the packed cases of ``src`` back as the LA h5 layout under ``dst``, with ``train.list``.

    Args:
        compress: gzip the h5 datasets as the field's files are (False: plain datasets, read faster in training).

    Returns:
        ``cases`` and ``seconds``.

    Raises:
        DataError: ``src`` is not a file written by :func:`pack` in this format.
    """
    start = time.perf_counter()
    try:
        packed = np.load(src, allow_pickle=False)
        cases = [str(c) for c in packed["cases"]]
        found = str(packed["format"]) if "format" in packed.files else "an older format"
    except (OSError, ValueError, KeyError) as err:
        raise DataError(f"{src}: not a packed LA file ({err})") from err
    if found != FORMAT:
        raise DataError(f"{src}: packed in {found}, not {FORMAT}; pack it again with experiments/pack_la.py pack")
    check_overwrite([_case_path(dst, c) for c in cases] + [Path(dst) / LIST_NAME], overwrite)
    jobs = [(str(dst), c, {k: packed[f"{c}.{k}"] for k in KEYS}, bool(compress)) for c in cases]
    _map(_unpack_one, jobs, workers)
    write_text(Path(dst) / LIST_NAME, "".join(f"{c}\n" for c in cases))
    return {"cases": len(cases), "seconds": round(time.perf_counter() - start, 1)}


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
    import fire

    fire.Fire({"pack": pack, "unpack": unpack, "verify": verify})
