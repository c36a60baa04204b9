"""Deterministic synthetic data for tests and the demo (the real LA / BraTS / Pancreas data are not redistributable).

- :func:`make_synthetic_dataset`: a preprocessed h5 dataset in one of the field's layouts (default LA), with
  blob-shaped foreground on a noisy, smoothly biased background: learnable by a tiny network in a few steps.
- :func:`make_shifted_dataset`: the same cases in the LA layout as a semi-supervised task with a distribution shift:
  the few labeled cases all have a high foreground contrast, the unlabeled, validation and test cases a spread of
  lower ones (the demo's dataset).
- :func:`make_synthetic_brats_raw` / :func:`make_synthetic_pancreas_raw`: raw challenge-form NIfTI inputs for
  :mod:`diffcl_algo.convert.prepare`, scaled-down shapes with realistic dtypes, spacings, intensity ranges and
  label codes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
from monai.config import PathLike
from scipy.ndimage import gaussian_filter

from diffcl_algo.convert.writers import check_overwrite, write_h5, write_text
from diffcl_algo.data.io import LA_SPACING, LAYOUTS, LIST_NAMES

__all__ = [
    "REFERENCE_CONTRAST",
    "make_synthetic_dataset",
    "make_shifted_dataset",
    "make_synthetic_brats_raw",
    "make_synthetic_pancreas_raw",
]

#: Foreground contrast of :func:`make_synthetic_dataset`'s cases: the intensity step of the label before z-scoring.
REFERENCE_CONTRAST = 1.5

def _ellipsoid(shape: Sequence[int], center: Sequence[float], radii: Sequence[float]) -> np.ndarray:
    """Boolean (X, Y, Z) mask of an axis-aligned ellipsoid (voxel units)."""
    grid = np.ogrid[tuple(slice(0, s) for s in shape)]
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, center, radii)) <= 1.0


def _smooth_noise(shape: Sequence[int], rng: np.random.Generator, sigma: float) -> np.ndarray:
    """Gaussian-smoothed white noise rescaled to unit std, float32 (X, Y, Z)."""
    noise = gaussian_filter(rng.standard_normal(shape), sigma)
    return (noise / (noise.std() + 1e-8)).astype(np.float32)


def _blobs(shape: Sequence[int], rng: np.random.Generator) -> np.ndarray:
    """Union of 1-3 ellipsoids around the volume centre: an LA-like foreground (a few % of the volume)."""
    shape = np.asarray(shape, dtype=float)
    mask = np.zeros(tuple(shape.astype(int)), dtype=bool)
    for _ in range(int(rng.integers(1, 4))):
        center = shape / 2 + rng.uniform(-0.12, 0.12, 3) * shape
        radii = rng.uniform(0.1, 0.2, 3) * shape
        mask |= _ellipsoid(mask.shape, center, np.maximum(radii, 2.0))
    return mask


def _synthetic_case(
    shape: Sequence[int], rng: np.random.Generator, contrast: float = REFERENCE_CONTRAST
) -> tuple[np.ndarray, np.ndarray]:
    """``(image float32, label uint8)`` of one synthetic case: ``label`` = :func:`_blobs`, ``image`` = ``contrast *
    label`` + smooth bias field + smooth and white noise, z-scored over the volume."""
    label = _blobs(shape, rng)
    image = contrast * label + 0.5 * _smooth_noise(shape, rng, 6.0) + 0.3 * _smooth_noise(shape, rng, 1.0)
    image += 0.3 * rng.standard_normal(tuple(shape))
    image = (image - image.mean()) / image.std()
    return image.astype(np.float32), label.astype(np.uint8)


def make_synthetic_dataset(
    dst: PathLike,
    num_cases: int = 8,
    shape: Sequence[int] = (48, 48, 32),
    seed: int = 0,
    kind: str = "la",
    num_test: int = 2,
    overwrite: bool = False,
) -> Path:
    """Write a synthetic preprocessed dataset in the layout ``LAYOUTS[kind]`` with its case lists.

    Each case: ``label`` (uint8 0/1) = union of 1-3 random ellipsoids near the centre; ``image`` (float32) =
    ``1.5 * label`` + smooth bias field + smooth and white noise, then z-scored over the volume (like the field's
    LA files). Cases ``synth_<kind>_000...``; the last ``num_test`` go to the test list (for ``brats``: to both
    ``val.txt`` and ``test.txt``), the others to the training list. Deterministic in ``seed``.

    Args:
        dst: dataset root to create.
        num_cases: number of cases.
        shape: volume shape (X, Y, Z).
        seed: random seed.
        kind: ``"la"``, ``"brats"`` or ``"pancreas"`` (layout and list names, see ``LAYOUTS``).
        num_test: held-out cases, at least 1 and fewer than ``num_cases``.
        overwrite: replace existing files.

    Returns:
        ``Path(dst)``.
    """
    if kind not in LAYOUTS:
        raise ValueError(f"kind must be one of {sorted(LAYOUTS)}, got {kind!r}")
    if not 0 < num_test < num_cases:
        raise ValueError(f"need 0 < num_test < num_cases, got num_test={num_test}, num_cases={num_cases}")
    root = Path(dst)
    names = [f"synth_{kind}_{i:03d}" for i in range(num_cases)]
    list_names = LIST_NAMES[kind]
    paths = [root / LAYOUTS[kind].format(case=n) for n in names]
    check_overwrite(paths + [root / n for n in list_names], overwrite)
    spacing = LA_SPACING if kind == "la" else (1.0, 1.0, 1.0)
    rng = np.random.default_rng(seed)
    for path in paths:
        image, label = _synthetic_case(shape, rng)
        write_h5(path, {"image": image, "label": label}, {"spacing": spacing})
    train, test = names[: num_cases - num_test], names[num_cases - num_test :]
    for list_name, cases in zip(list_names, [train] + [test] * (len(list_names) - 1)):
        write_text(root / list_name, "".join(f"{c}\n" for c in cases))
    return root


def _stratified(n: int, low: float, high: float, rng: np.random.Generator) -> np.ndarray:
    """``n`` values spread over ``[low, high]``: one uniform draw in each of ``n`` equal sub-intervals, shuffled."""
    return low + (high - low) * rng.permutation((np.arange(n) + rng.uniform(0.0, 1.0, n)) / n)


def make_shifted_dataset(
    dst: PathLike,
    num_labeled: int = 3,
    num_unlabeled: int = 9,
    num_val: int = 2,
    num_test: int = 4,
    shape: Sequence[int] = (48, 48, 32),
    seed: int = 0,
    contrast_range: Sequence[float] = (0.8, REFERENCE_CONTRAST),
    overwrite: bool = False,
) -> Path:
    """Write a synthetic LA-layout dataset whose few labeled cases do not represent the population: a semi-supervised
    task with a distribution shift that the unlabeled pool and the test set share.

    The cases are :func:`make_synthetic_dataset`'s (blob foreground on a noisy, biased background, z-scored) with one
    difference: the foreground contrast (the intensity step of the label before z-scoring). The labeled cases all
    have ``REFERENCE_CONTRAST``, as when the clearest scans of a collection are the ones annotated first; the
    unlabeled, validation and test cases are drawn from the whole collection, their contrasts spread over
    ``contrast_range`` (stratified within each group: one uniform draw in each of its equal sub-intervals, so every
    group spans the range). A model fitted to the labeled cases alone learns the reference contrast; the unlabeled
    cases show the lower ones that the test cases have. Each case file records its contrast as the h5 attribute
    ``contrast``.

    ``train.list`` = ``num_labeled`` labeled, ``num_unlabeled`` unlabeled, then ``num_val`` validation cases (the
    order :class:`~diffcl_algo.data.splits.CaseSplits` reads with ``num_labeled`` and ``num_val_holdout``);
    ``test.list`` = ``num_test`` test cases. Cases ``synth_la_000...`` in that order. Deterministic in ``seed``.

    Args:
        dst: dataset root to create.
        num_labeled: cases at the reference contrast, first in ``train.list`` (the labeled ones).
        num_unlabeled: cases of the collection after them in ``train.list`` (the unlabeled pool).
        num_val: cases of the collection at the end of ``train.list`` (validation, ``num_val_holdout``).
        num_test: cases of the collection in ``test.list``.
        shape: volume shape (X, Y, Z).
        seed: random seed.
        contrast_range: ``(low, high)`` foreground contrasts of the collection (``REFERENCE_CONTRAST`` is 1.5).
        overwrite: replace existing files.

    Returns:
        ``Path(dst)``.
    """
    counts = {"num_labeled": num_labeled, "num_unlabeled": num_unlabeled, "num_val": num_val, "num_test": num_test}
    bad = {k: v for k, v in counts.items() if int(v) < (0 if k == "num_val" else 1)}
    if bad:
        raise ValueError(f"need num_labeled, num_unlabeled, num_test >= 1 and num_val >= 0, got {bad}")
    low, high = (float(c) for c in contrast_range)
    if not 0.0 < low <= high:
        raise ValueError(f"contrast_range must be (low, high) with 0 < low <= high, got {contrast_range}")
    root = Path(dst)
    groups = [num_labeled, num_unlabeled, num_val, num_test]
    names = [f"synth_la_{i:03d}" for i in range(sum(groups))]
    paths = [root / LAYOUTS["la"].format(case=n) for n in names]
    check_overwrite(paths + [root / n for n in LIST_NAMES["la"]], overwrite)
    rng = np.random.default_rng(seed)
    contrasts = np.concatenate(
        [np.full(num_labeled, REFERENCE_CONTRAST)] + [_stratified(int(n), low, high, rng) for n in groups[1:]]
    )
    for path, contrast in zip(paths, contrasts):
        image, label = _synthetic_case(shape, rng, float(contrast))
        write_h5(path, {"image": image, "label": label}, {"spacing": LA_SPACING, "contrast": float(contrast)})
    num_train = sum(groups[:3])
    for list_name, cases in zip(LIST_NAMES["la"], [names[:num_train], names[num_train:]]):
        write_text(root / list_name, "".join(f"{c}\n" for c in cases))
    return root


def _save_nifti(path: Path, array: np.ndarray, affine: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), str(path))


def make_synthetic_brats_raw(
    dst: PathLike,
    num_cases: int = 2,
    shape: Sequence[int] = (60, 60, 39),
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    seed: int = 0,
) -> list[str]:
    """Write BraTS2019-form raw cases: ``<dst>/{HGG,LGG}/<case>/<case>_{flair,t1,t1ce,t2,seg}.nii.gz``.

    Real BraTS volumes are 240 x 240 x 155 at 1 mm, skull-stripped (background exactly 0), int16 intensities,
    labels uint8 with codes 0 (background), 1 (necrotic core), 2 (edema), 4 (enhancing tumour), affine with
    flipped x / y. Here: ``shape`` (default a quarter of each side), brain = ellipsoid, tumour = nested
    ellipsoids edema (2) > enhancing (4) > core (1); FLAIR brain ~300, edema ~650, core ~450, plus a few hot
    voxels (2500) and smooth noise. The other modalities get different contrasts so a test can tell which one
    was used. Cases alternate HGG / LGG.

    Returns:
        The case names, ``BraTS19_SYN_<i>_1``.
    """
    rng = np.random.default_rng(seed)
    shape = tuple(int(s) for s in shape)
    sx, sy, sz = (float(s) for s in spacing)
    affine = np.array([[-sx, 0, 0, 0], [0, -sy, 0, (shape[1] - 1) * sy], [0, 0, sz, 0], [0, 0, 0, 1]])
    center = np.asarray(shape) / 2
    names = []
    for i in range(num_cases):
        name = f"BraTS19_SYN_{i:03d}_1"
        names.append(name)
        brain = _ellipsoid(shape, center + rng.uniform(-1, 1, 3), center * rng.uniform(0.75, 0.85, 3))
        t_center = center + rng.uniform(-0.15, 0.15, 3) * np.asarray(shape)
        r = rng.uniform(0.14, 0.2) * min(shape)
        edema = _ellipsoid(shape, t_center, (r, r * 0.9, r * 0.8)) & brain
        enhancing = _ellipsoid(shape, t_center, (r * 0.6, r * 0.55, r * 0.5)) & brain
        core = _ellipsoid(shape, t_center, (r * 0.35, r * 0.3, r * 0.3)) & brain
        seg = np.zeros(shape, np.uint8)
        seg[edema], seg[enhancing], seg[core] = 2, 4, 1
        texture = _smooth_noise(shape, rng, 2.0)
        contrasts = {  # brain, edema, enhancing, core
            "flair": (300, 650, 600, 450),
            "t1": (500, 400, 350, 200),
            "t1ce": (500, 420, 900, 150),
            "t2": (400, 800, 700, 900),
        }
        grade = "HGG" if i % 2 == 0 else "LGG"
        for modality, (b, e, en, c) in contrasts.items():
            img = np.where(brain, b + 25.0 * texture, 0.0)
            img[edema], img[enhancing], img[core] = e, en, c
            img[edema] += 25.0 * texture[edema]
            if modality == "flair":
                hot = brain & (rng.random(shape) < 2e-4)
                img[hot] = 2500
            _save_nifti(_brats_path(dst, grade, name, modality), np.round(img).astype(np.int16), affine)
        _save_nifti(_brats_path(dst, grade, name, "seg"), seg, affine)
    return names


def _brats_path(root: PathLike, grade: str, name: str, suffix: str) -> Path:
    """``<root>/<grade>/<name>/<name>_<suffix>.nii.gz``: a BraTS challenge file path."""
    return Path(root) / grade / name / f"{name}_{suffix}.nii.gz"


def make_synthetic_pancreas_raw(
    dst: PathLike,
    num_cases: int = 2,
    shape: Sequence[int] = (96, 96, 48),
    spacing: Sequence[float] | None = None,
    seed: int = 0,
) -> list[str]:
    """Write NIH Pancreas-CT-form raw cases: ``<dst>/images/PANCREAS_<id>.nii.gz``, ``<dst>/labels/label<id>.nii.gz``.

    Real scans are 512 x 512 x 181-466 int16 HU (-1024 air .. 3071 saturation), in-plane 0.66-0.98 mm, slices
    1.5-2.5 mm; labels uint8 0/1. Here: ``shape`` (scaled down), per-case spacing drawn in those ranges
    (in-plane 0.66-0.98 mm, slices 1.0-2.5 mm) unless ``spacing`` is given; air outside an elliptic body,
    fat rim (-100 HU), soft tissue (40 HU), spine bone (700-1200 HU), a few metal voxels (3071 HU), and a small
    pancreas ellipsoid (100 HU) placed off-centre, close to one side of the volume.

    Returns:
        The case ids, ``"0001"``, ``"0002"``, ...
    """
    rng = np.random.default_rng(seed)
    shape = tuple(int(s) for s in shape)
    nx, ny, nz = shape
    ids = []
    for i in range(num_cases):
        case_id = f"{i + 1:04d}"
        ids.append(case_id)
        if spacing is None:
            inplane = rng.uniform(0.66, 0.98)
            vox = (inplane, inplane, float(rng.choice([1.0, 1.5, 2.0, 2.5])))
        else:
            vox = tuple(float(s) for s in spacing)
        body = _ellipsoid(shape, (nx / 2, ny / 2, nz / 2), (0.45 * nx, 0.38 * ny, 10 * nz))
        inner = _ellipsoid(shape, (nx / 2, ny / 2, nz / 2), (0.41 * nx, 0.34 * ny, 10 * nz))
        ct = np.full(shape, -1024.0)
        ct[body] = -100 + 20 * rng.standard_normal(int(body.sum()))
        ct[inner] = 40 + 15 * rng.standard_normal(int(inner.sum()))
        spine = _ellipsoid(shape, (nx / 2, 0.68 * ny, nz / 2), (0.06 * nx, 0.06 * ny, 10 * nz))
        ct[spine] = rng.uniform(700, 1200, int(spine.sum()))
        p_center = (rng.uniform(0.62, 0.7) * nx, rng.uniform(0.4, 0.5) * ny, rng.uniform(0.3, 0.7) * nz)
        pancreas = _ellipsoid(shape, p_center, (0.1 * nx, 0.05 * ny, 0.12 * nz)) & inner
        ct[pancreas] = 100 + 10 * rng.standard_normal(int(pancreas.sum()))
        metal = inner & (rng.random(shape) < 1e-4)
        ct[metal] = 3071
        affine = np.diag([*vox, 1.0])
        ct = np.clip(ct, -1024, 3071).astype(np.int16)
        _save_nifti(Path(dst) / "images" / f"PANCREAS_{case_id}.nii.gz", ct, affine)
        _save_nifti(Path(dst) / "labels" / f"label{case_id}.nii.gz", pancreas.astype(np.uint8), affine)
    return ids
