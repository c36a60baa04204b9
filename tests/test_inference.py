"""Tests of diffcl_algo.inference.inferer and .predict: field window placement, softmax averaging, padding."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from diffcl_algo.inference.inferer import DiffCLSlidingWindowInferer, stride_to_overlap
from diffcl_algo.inference.predict import predict_volume


def _field_windows(size, patch, stride):
    """Window starts of the field's test_single_case (UA-MT / SSL4MIS), in the padded frame."""
    padded = [max(s, p) for s, p in zip(size, patch)]
    starts = []
    for s, p, st in zip(padded, patch, stride):
        n = math.ceil((s - p) / st) + 1
        starts.append([min(st * i, s - p) for i in range(n)])
    return set(itertools.product(*starts))


def _field_predict(net, image, patch, stride, num_classes):
    """numpy transcription of the field's test_single_case (pad, windows, softmax sum / count, crop)."""
    pads = [max(p - s, 0) for s, p in zip(image.shape, patch)]
    lo = [p // 2 for p in pads]
    img = np.pad(image, [(a, p - a) for a, p in zip(lo, pads)], mode="constant", constant_values=0)
    ww, hh, dd = img.shape
    score = np.zeros((num_classes,) + img.shape, np.float32)
    cnt = np.zeros(img.shape, np.float32)
    sx, sy, sz = (math.ceil((s - p) / st) + 1 for s, p, st in zip(img.shape, patch, stride))
    for x, y, z in itertools.product(range(sx), range(sy), range(sz)):
        xs, ys, zs = (min(st * i, s - p) for st, i, s, p in zip(stride, (x, y, z), (ww, hh, dd), patch))
        sl = (slice(xs, xs + patch[0]), slice(ys, ys + patch[1]), slice(zs, zs + patch[2]))
        with torch.no_grad():
            out = torch.softmax(net(torch.from_numpy(img[sl][None, None].copy())), 1)[0].numpy()
        score[(slice(None),) + sl] += out
        cnt[sl] += 1
    score /= cnt[None]
    crop = tuple(slice(a, a + s) for a, s in zip(lo, image.shape))
    return score[(slice(None),) + crop]


CASES = [
    ((30, 27, 20), (16, 16, 8), (5, 3, 2)),
    ((149, 117, 93), (112, 112, 80), (18, 18, 4)),  # LA patch / stride, last window flush with the border
    ((10, 40, 9), (16, 16, 16), (16, 7, 3)),  # smaller than the patch on two axes: padded
    ((200, 150, 97), (96, 96, 96), (64, 64, 64)),  # BraTS stride
]


@pytest.mark.parametrize("size,patch,stride", CASES)
def test_window_positions_match_field(size, patch, stride):
    pads = [max(p - s, 0) // 2 for s, p in zip(size, patch)]
    grid = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in size], indexing="ij"))
    image = (grid + 1000.0)[None]  # channel c holds the coordinate along axis c (+1000; padding is 0)
    seen = set()

    def record(x):
        for b in range(x.shape[0]):
            start = []
            for d in range(3):
                v = x[b, d]
                first = torch.nonzero(v)[0]
                start.append(int(v[tuple(first)].item() - 1000 - first[d].item() + pads[d]))
            seen.add(tuple(start))
        return torch.zeros(x.shape[0], 2, *x.shape[2:])

    out = DiffCLSlidingWindowInferer(patch, stride, sw_batch_size=3)(image, record)
    assert out.shape == (1, 2, *size)
    assert seen == _field_windows(size, patch, stride)


def test_predict_volume_equals_field_average():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 2, 3, padding=1))
    image = np.random.default_rng(0).standard_normal((21, 13, 18)).astype(np.float32)
    patch, stride = (16, 16, 8), (4, 3, 5)
    expected = _field_predict(net, image, patch, stride, 2)
    probs = predict_volume(net, image[None], patch, stride, sw_batch_size=4)
    assert probs.shape == (1, 2, 21, 13, 18)
    np.testing.assert_allclose(probs[0].numpy(), expected, atol=1e-5)
    labels = predict_volume(net, image[None], patch, stride, return_label=True)
    assert torch.equal(labels[0, 0], torch.from_numpy(expected.argmax(0)))


def test_stride_to_overlap():
    for roi in (16, 80, 96, 112):
        for s in range(1, roi + 1):
            (o,) = stride_to_overlap([roi], [s])
            assert 0 <= o < 1 and int(roi * (1 - o)) == s
    assert stride_to_overlap((112, 112, 80), 18) == stride_to_overlap((112, 112, 80), (18, 18, 18))
    with pytest.raises(ValueError):
        stride_to_overlap((16,), (17,))


@pytest.mark.parametrize("keep_largest", [0, 2])
def test_evaluation_keeps_the_largest_component_when_asked(tmp_path, keep_largest):
    """``keep_largest_component``: an island apart from the structure leaves the mask; the structure stays whole."""
    from monai.data import MetaTensor

    from diffcl_algo.inference.chains import eval_postprocessing

    probs = torch.zeros(2, 12, 12, 8)
    probs[0] = 1.0
    probs[:, 2:7, 2:7, 2:6] = torch.tensor([0.0, 1.0]).view(2, 1, 1, 1)  # the structure: 5x5x4 voxels
    probs[:, 10:12, 10:12, 6:8] = torch.tensor([0.0, 1.0]).view(2, 1, 1, 1)  # an island: 2x2x2 voxels
    chain = eval_postprocessing(tmp_path, save_predictions=False, keep_largest=keep_largest)
    mask = chain({"pred": MetaTensor(probs)})["pred"]
    assert int(mask[0, 2:7, 2:7, 2:6].sum()) == 100
    assert int(mask.sum()) == (100 if keep_largest else 108)


def test_the_la_bundle_keeps_the_largest_component_and_flips_and_the_graph_and_protocol_do_not():
    from monai.bundle import ConfigParser

    from diffcl_algo.bundle.compose import CONFIG_DIR

    bundles = Path(__file__).resolve().parents[1] / "bundles"
    for workflow in ("evaluate", "inference"):
        la = ConfigParser.load_config_file(str(bundles / "la" / "configs" / f"{workflow}.yaml"))
        assert la["keep_largest_component"] is True and la["tta_flip"] is True
    graph = ConfigParser.load_config_file(str(CONFIG_DIR / "evaluate.yaml"))
    assert graph["keep_largest_component"] is False and graph["tta_flip"] is False
    cpu = ConfigParser.load_config_file(str(bundles / "la" / "configs" / "cpu.yaml"))  # the protocol: one plain pass
    assert cpu["keep_largest_component"] is False and cpu["tta_flip"] is False


def test_flip_tta_averages_the_flipped_passes():
    """flip_axes: the mean of the plain pass and each flipped pass flipped back; a flip-equivariant net is unchanged."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 2, 3, padding=1))
    image = torch.randn(1, 1, 21, 13, 18)
    patch, stride = (16, 16, 8), (4, 3, 5)
    plain = DiffCLSlidingWindowInferer(patch, stride)
    with torch.no_grad():
        base = plain(image, net)
        flipped = torch.flip(plain(torch.flip(image, (2, 4)), net), (2, 4))
        tta = DiffCLSlidingWindowInferer(patch, stride, flip_axes=[[0, 2]])(image, net)
    torch.testing.assert_close(tta, (base + flipped) / 2)
    assert not torch.allclose(base, flipped, atol=1e-3)  # the flip changes this net's output: the test can tell
    mean_net = nn.Sequential(nn.Conv3d(1, 2, 1))  # pointwise: equivariant to flips, sliding window aside
    with torch.no_grad():
        torch.testing.assert_close(
            DiffCLSlidingWindowInferer(patch, patch, flip_axes=[[0], [1], [2]])(image[..., :16, :13, :8], mean_net),
            DiffCLSlidingWindowInferer(patch, patch)(image[..., :16, :13, :8], mean_net),
        )
    for bad in ([[3]], [[]]):
        with pytest.raises(ValueError, match="flip_axes"):
            DiffCLSlidingWindowInferer(patch, stride, flip_axes=bad)
    with pytest.raises(ValueError, match="softmax"):
        DiffCLSlidingWindowInferer(patch, stride, softmax=False, flip_axes=[[0]])


@pytest.mark.parametrize("workflow", ["evaluate", "inference"])
def test_tta_flip_option_reaches_the_inferer(workflow):
    """``tta_flip`` in evaluation and inference: the inferer averages the three single-axis flips (LA's default) or
    runs one pass (``--tta_flip false``, the other bundles' default)."""
    from diffcl_algo.bundle.run import load_bundle

    assert load_bundle("la", workflow, device="cpu").get_parsed_content("inferer").flip_axes == [(0,), (1,), (2,)]
    assert load_bundle("la", workflow, device="cpu", tta_flip=False).get_parsed_content("inferer").flip_axes == []
    assert load_bundle("brats", workflow, device="cpu").get_parsed_content("inferer").flip_axes == []
