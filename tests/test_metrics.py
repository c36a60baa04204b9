"""Tests of diffcl_algo.evaluation.metrics / .handlers against medpy.metric.binary (the test-only oracle)."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from medpy.metric import binary as medpy_binary
from scipy import ndimage as ndi

from diffcl_algo.evaluation import metrics
from diffcl_algo.evaluation.metrics import (
    BOTH_EMPTY_VALUES,
    METRIC_NAMES,
    ONE_EMPTY_OVERLAP,
    MedpyMetric,
    case_metrics,
    summarize,
    volume_diagonal,
)

LA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "LA"
LA_CASES = 2
ANISO_3D = (0.8, 0.625, 1.5)
RTOL = 1e-9


def medpy_metrics(pred: np.ndarray, label: np.ndarray, spacing=None) -> dict[str, float]:
    return {
        "dice": medpy_binary.dc(pred, label),
        "jaccard": medpy_binary.jc(pred, label),
        "hd95": medpy_binary.hd95(pred, label, voxelspacing=spacing),
        "asd": medpy_binary.asd(pred, label, voxelspacing=spacing),
    }


# Forced nearest-border strategies of diffcl_algo.evaluation.metrics (module constants); "auto" keeps the defaults.
STRATEGIES = {
    "auto": {},
    "kdtree": {"_KDTREE_MAX_BORDER_FRACTION": np.inf, "_KDTREE_RADIUS_VOXELS": np.inf},
    "kdtree_far_kdtree": {
        "_KDTREE_MAX_BORDER_FRACTION": np.inf,
        "_KDTREE_RADIUS_VOXELS": 1.5,
        "_KDTREE_FAR_VISITS_PER_VOXEL": np.inf,
    },
    "kdtree_far_ft": {
        "_KDTREE_MAX_BORDER_FRACTION": np.inf,
        "_KDTREE_RADIUS_VOXELS": 1.5,
        "_KDTREE_FAR_VISITS_PER_VOXEL": 0.0,
    },
    "ft": {"_KDTREE_MAX_BORDER_FRACTION": 0.0},
}


@pytest.fixture(params=sorted(STRATEGIES))
def strategy(request, monkeypatch) -> str:
    """Run a test under every nearest-border strategy (k-d tree, feature transform and their mixes)."""
    for name, value in STRATEGIES[request.param].items():
        monkeypatch.setattr(metrics, name, value)
    return request.param


def assert_same(ours: dict[str, float], ref: dict[str, float]) -> None:
    assert list(ours) == list(METRIC_NAMES)
    for key in METRIC_NAMES:
        assert type(ours[key]) is float
        np.testing.assert_allclose(ours[key], ref[key], rtol=RTOL, atol=0, err_msg=key)


def shift(mask: np.ndarray, offset: tuple[int, ...]) -> np.ndarray:
    """Translate with zero fill (no wrap-around)."""
    out = np.zeros_like(mask)
    src = tuple(slice(max(-o, 0), n - max(o, 0)) for o, n in zip(offset, mask.shape))
    dst = tuple(slice(max(o, 0), n - max(-o, 0)) for o, n in zip(offset, mask.shape))
    out[dst] = mask[src]
    return out


def add_blobs(mask: np.ndarray, rng: np.random.Generator, count: int = 4, radius: int = 3) -> np.ndarray:
    """Add balls of ``radius`` at random centres (some may touch the volume edge)."""
    out = mask.copy()
    grid = np.ogrid[tuple(slice(0, n) for n in mask.shape)]
    for _ in range(count):
        centre = [rng.integers(0, n) for n in mask.shape]
        out |= sum((g - c) ** 2 for g, c in zip(grid, centre)) <= radius**2
    return out


def remove_components(mask: np.ndarray) -> np.ndarray:
    """Cut two slabs out of the mask and keep only its largest connected component."""
    cut = mask.copy()
    z = np.flatnonzero(cut.any(axis=(0, 1)))
    third = (z[-1] - z[0]) // 3
    cut[..., z[0] + third : z[0] + third + 3] = False
    cut[..., z[0] + 2 * third : z[0] + 2 * third + 3] = False
    labels, n = ndi.label(cut)
    assert n >= 2
    sizes = np.bincount(labels.ravel())[1:]
    return labels == (1 + int(np.argmax(sizes)))


PERTURBATIONS = {
    "erosion": lambda m, rng: ndi.binary_erosion(m, iterations=2),
    "dilation": lambda m, rng: ndi.binary_dilation(m, iterations=2),
    "shift": lambda m, rng: shift(m, (3, -2, 1)),
    "blobs": lambda m, rng: add_blobs(m, rng),
    "removed_components": lambda m, rng: remove_components(m),
    "dilation_shift_blobs": lambda m, rng: add_blobs(shift(ndi.binary_dilation(m), (2, 0, -2)), rng, count=2),
}


@pytest.fixture(scope="module")
def la_labels() -> list[np.ndarray]:
    if not LA_DIR.is_dir():
        pytest.skip(f"LA data not found at {LA_DIR}")
    names = (LA_DIR / "train.list").read_text().split()[:LA_CASES]
    out = []
    for name in names:
        with h5py.File(LA_DIR / "2018LA_Seg_Training Set" / name / "mri_norm2.h5", "r") as f:
            out.append(f["label"][:] > 0)
    return out


@pytest.mark.parametrize("spacing", [None, ANISO_3D], ids=["voxel", "aniso"])
@pytest.mark.parametrize("perturbation", sorted(PERTURBATIONS))
def test_equal_to_medpy_on_la_labels(la_labels, perturbation, spacing, monkeypatch):
    rng = np.random.default_rng(0)
    label = la_labels[sorted(PERTURBATIONS).index(perturbation) % len(la_labels)]  # spread perturbations over cases
    pred = PERTURBATIONS[perturbation](label, rng)
    ref = medpy_metrics(pred, label, spacing)
    for key in ("auto", "kdtree_far_kdtree", "kdtree_far_ft", "ft"):  # plain "kdtree" is covered on synthetic data
        with monkeypatch.context() as patch:
            for name, value in STRATEGIES[key].items():
                patch.setattr(metrics, name, value)
            assert_same(case_metrics(pred, label, spacing), ref)
    assert_same(case_metrics(pred.astype(np.uint8) * 3, label.astype(np.float32), spacing), ref)


def test_la_label_against_itself(la_labels):
    assert case_metrics(la_labels[0], la_labels[0]) == {"dice": 1.0, "jaccard": 1.0, "hd95": 0.0, "asd": 0.0}


def random_masks(rng: np.random.Generator, shape: tuple[int, ...], density: float) -> tuple[np.ndarray, np.ndarray]:
    """Smoothed random masks; low density gives blobs, high density touches the borders."""
    pred = ndi.uniform_filter(rng.random(shape), size=3) < density
    label = ndi.uniform_filter(rng.random(shape), size=3) < density
    return pred, label


@pytest.mark.parametrize("density", [0.3, 0.45, 0.6])
@pytest.mark.parametrize(
    ("shape", "spacing"),
    [((40, 33), None), ((40, 33), (0.7, 1.3)), ((20, 17, 15), None), ((20, 17, 15), ANISO_3D)],
)
def test_equal_to_medpy_synthetic(strategy, shape, spacing, density):
    rng = np.random.default_rng(len(shape) * 100 + int(density * 10))
    for _ in range(3):
        pred, label = random_masks(rng, shape, density)
        if pred.any() and label.any():
            assert_same(case_metrics(pred, label, spacing), medpy_metrics(pred, label, spacing))


def test_masks_touching_volume_border(strategy):
    full = np.ones((12, 10, 9), bool)
    corner = np.zeros_like(full)
    corner[:5, :4, :3] = True
    far_corner = np.zeros_like(full)
    far_corner[-3:, -2:, -4:] = True
    slab = np.zeros_like(full)
    slab[:, :, 0] = True
    for pred, label in [(full, corner), (corner, full), (corner, far_corner), (slab, corner), (full, full)]:
        for spacing in (None, (1.5, 0.5, 2.0)):
            assert_same(case_metrics(pred, label, spacing), medpy_metrics(pred, label, spacing))


def test_other_ndims_and_single_voxels(strategy):
    rng = np.random.default_rng(3)
    line_pred, line_label = np.zeros(30, bool), np.zeros(30, bool)
    line_pred[[0, 5, 6, 7, 20]] = True
    line_label[[3, 4, 29]] = True
    cases = [(line_pred, line_label, None), (line_pred, line_label, 0.5)]
    pred4, label4 = random_masks(rng, (7, 6, 5, 6), 0.45)
    cases += [(pred4, label4, None), (pred4, label4, (1.0, 2.0, 0.5, 1.5))]
    dot_a, dot_b = np.zeros((9, 9, 9), bool), np.zeros((9, 9, 9), bool)
    dot_a[0, 0, 0] = dot_b[8, 3, 5] = True
    cases += [(dot_a, dot_b, None), (dot_a, dot_b, (0.3, 1.0, 2.0)), (dot_a, dot_a, None)]
    for pred, label, spacing in cases:
        assert_same(case_metrics(pred, label, spacing), medpy_metrics(pred, label, spacing))


def test_empty_cases():
    shape, spacing = (10, 20, 4), (1.0, 2.0, 3.0)
    empty = np.zeros(shape, np.uint8)
    mask = np.zeros(shape, np.uint8)
    mask[2:5, 3:9, 1:3] = 1
    assert case_metrics(empty, empty, spacing) == dict(BOTH_EMPTY_VALUES)
    diagonal = np.sqrt(10.0**2 + 40.0**2 + 12.0**2)
    assert volume_diagonal(shape, spacing) == pytest.approx(diagonal, rel=1e-15)
    assert volume_diagonal(shape) == pytest.approx(np.sqrt(100 + 400 + 16), rel=1e-15)
    for pred, label in [(empty, mask), (mask, empty)]:
        out = case_metrics(pred, label, spacing)
        assert out["dice"] == out["jaccard"] == ONE_EMPTY_OVERLAP == 0.0
        assert out["hd95"] == out["asd"] == pytest.approx(diagonal, rel=1e-15)
        assert all(np.isfinite(v) for v in out.values())
    # medpy agrees where it defines a finite value (its dc(empty, empty) is NaN under NumPy 2)
    assert medpy_binary.jc(empty, empty) == BOTH_EMPTY_VALUES["jaccard"]
    assert medpy_binary.dc(empty, mask) == medpy_binary.jc(mask, empty) == ONE_EMPTY_OVERLAP


def test_input_validation():
    with pytest.raises(ValueError, match=r"\(4, 5\).*\(4, 6\)"):
        case_metrics(np.ones((4, 5)), np.ones((4, 6)))
    with pytest.raises(ValueError, match="one value per axis"):
        case_metrics(np.ones((4, 5)), np.ones((4, 5)), spacing=(1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="positive"):
        case_metrics(np.ones((4, 5)), np.ones((4, 5)), spacing=(1.0, 0.0))
    out = case_metrics(np.ones((4, 5)), np.ones((4, 5)), spacing=2.0)  # scalar spacing: isotropic
    assert out == {"dice": 1.0, "jaccard": 1.0, "hd95": 0.0, "asd": 0.0}


def test_summarize():
    rows = [{"dice": 0.5, "hd95": 2.0}, {"dice": 1.0, "hd95": 4.0}]
    out = summarize(rows)
    assert out == {"dice": {"mean": 0.75, "std": 0.25}, "hd95": {"mean": 3.0, "std": 1.0}}
    with pytest.raises(ValueError, match="non-finite"):
        summarize([{"dice": float("nan")}, {"dice": 1.0}])
    with pytest.raises(ValueError, match="keys"):
        summarize([{"dice": 1.0}, {"hd95": 1.0}])
    with pytest.raises(ValueError, match="at least one"):
        summarize([])


def batch_case(rng: np.random.Generator, batch: int = 3, shape=(16, 14, 12)) -> tuple[np.ndarray, np.ndarray]:
    preds, labels = [], []
    for _ in range(batch):
        pred, label = random_masks(rng, shape, 0.4)
        preds.append(pred)
        labels.append(label)
    preds[-1][:] = False  # one case with an empty prediction
    return np.stack(preds), np.stack(labels)


def one_hot(mask: np.ndarray) -> torch.Tensor:
    t = torch.as_tensor(mask).long()
    return torch.stack([1 - t, t], dim=1).float()


def test_medpy_metric_inputs_and_aggregate():
    rng = np.random.default_rng(7)
    spacing = (1.0, 0.5, 2.0)
    preds, labels = batch_case(rng)
    rows = [case_metrics(p, t, spacing) for p, t in zip(preds, labels)]
    expected = torch.tensor([[r[k] for k in METRIC_NAMES] for r in rows], dtype=torch.float64)

    metric = MedpyMetric("all", spacing=spacing)
    out = metric(y_pred=one_hot(preds), y=torch.as_tensor(labels[:, None]).float())  # one-hot vs label map
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    torch.testing.assert_close(metric.aggregate(), expected.mean(0), rtol=0, atol=0)

    hd95 = MedpyMetric("hd95")
    hd95(y_pred=[one_hot(p[None])[0] for p in preds], y=[one_hot(t[None])[0] for t in labels], spacing=spacing)
    hd95(y_pred=torch.as_tensor(preds[:1, None]), y=torch.as_tensor(labels[:1, None]))
    voxel_hd95 = case_metrics(preds[0], labels[0])["hd95"]
    mean = (expected[:, 2].sum() + voxel_hd95) / 4
    agg = hd95.aggregate()
    assert agg.ndim == 0
    torch.testing.assert_close(agg, mean, rtol=1e-15, atol=0)
    hd95.reset()
    with pytest.raises(ValueError):
        hd95.aggregate()


def test_medpy_metric_errors():
    with pytest.raises(ValueError, match="metric_name"):
        MedpyMetric("hd")
    metric = MedpyMetric("dice")
    with pytest.raises(ValueError, match="channels"):
        metric(y_pred=torch.zeros(1, 3, 4, 4), y=torch.zeros(1, 1, 4, 4))
    with pytest.raises(ValueError, match="same batch and spatial shape"):
        metric(y_pred=torch.zeros(1, 1, 4, 4), y=torch.zeros(1, 1, 4, 5))


@pytest.mark.parametrize("name", ["MedpyDice", "MedpyJaccard", "MedpyHD95", "MedpyASD"])
def test_handlers_with_ignite_engine(name):
    from ignite.engine import Engine
    from monai.bundle import ConfigParser

    metric_key = {"MedpyDice": "dice", "MedpyJaccard": "jaccard", "MedpyHD95": "hd95", "MedpyASD": "asd"}[name]
    spacing = (0.5, 1.0, 1.5)
    config = {
        "_target_": f"diffcl_algo.evaluation.handlers.{name}",
        "output_transform": "$lambda x: (x['pred'], x['label'])",
    }
    if metric_key in ("hd95", "asd"):
        config["spacing"] = list(spacing)
    handler = ConfigParser({"handler": config}).get_parsed_content("handler")

    rng = np.random.default_rng(11)
    batches = [batch_case(rng, batch=2), batch_case(rng, batch=1)]
    data = [{"pred": one_hot(p), "label": torch.as_tensor(t[:, None]).float()} for p, t in batches]
    engine = Engine(lambda engine, batch: batch)
    handler.attach(engine, "val")
    engine.run(data, max_epochs=1)

    used_spacing = spacing if metric_key in ("hd95", "asd") else None
    values = [case_metrics(p, t, used_spacing)[metric_key] for b in batches for p, t in zip(*b)]
    assert engine.state.metrics["val"] == pytest.approx(np.mean(values), rel=1e-12)
    details = engine.state.metric_details["val"]
    assert tuple(details.shape) == (3, 1)
    np.testing.assert_allclose(details[:, 0].numpy(), values, rtol=0, atol=0)


def test_handler_rejects_all():
    from diffcl_algo.evaluation.handlers import MedpyMetricHandler

    with pytest.raises(ValueError, match="metric_name"):
        MedpyMetricHandler("all")
