"""A user's own scans through the inference pipeline (diffcl_algo.inference.chains and .predict, the bundles'
inference graph).

One synthetic scan (z-scored, 0.625 mm) and copies of it stored as raw int16 intensities, with a flipped axis, with an
oblique affine, as NRRD, and resampled to another spacing: through the LA bundle's ``preprocessing`` they reach the
network as the same input (up to interpolation for the other spacing), and the ``inferring`` workflow writes each
mask on its input's own grid and affine. The network is a 1x1x1 convolution scoring foreground = normalised intensity
> 0, so the expected mask of every copy is known on its own grid.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Spacing
from scipy.ndimage import gaussian_filter

from diffcl_algo.bundle.run import load_bundle, run_workflow
from diffcl_algo.convert import make_synthetic_dataset
from diffcl_algo.data import ScanNormalized
from diffcl_algo.inference.chains import check_roi, scan_preprocessing
from diffcl_algo.inference.inferer import DiffCLSlidingWindowInferer
from diffcl_algo.inference.predict import predict_volume

SHAPE = (40, 36, 20)
SPACING = 0.625
PATCH, STRIDES = [16, 16, 16], [8, 8, 8]
LA_BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "la"
#: The LA inference graph resampled to the scans' own 0.625 mm (its default is the shipped weights' 1.25 mm), so the
#: threshold network's expected mask is known voxel by voxel.
#: the LA inference at the scans' own spacing, keeping every component: these tests check the geometry with a
#: threshold network, whose mask has many components (the largest-component step is tested in test_inference.py)
AT_SCAN_SPACING = {"model_spacing": [SPACING] * 3, "keep_largest_component": False}


def _affine(origin=(10.0, -5.0, 3.0)) -> np.ndarray:
    affine = np.diag([SPACING, SPACING, SPACING, 1.0])
    affine[:3, 3] = origin
    return affine


def _rotation(theta: float) -> np.ndarray:
    rot = np.eye(4)
    rot[:2, :2] = [[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]]
    return rot


@pytest.fixture(scope="module")
def scans(tmp_path_factory) -> dict[str, Path]:
    """The reference scan and its copies (file name -> path)."""
    root = tmp_path_factory.mktemp("scans")
    rng = np.random.default_rng(0)
    x = gaussian_filter(rng.standard_normal(SHAPE), 2.0)
    x = ((x - x.mean()) / x.std()).astype(np.float32)
    affine = _affine()
    out = {}

    def save(name: str, array: np.ndarray, aff: np.ndarray) -> None:
        out[name] = root / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(array, aff), out[name])

    save("reference", x, affine)
    save("raw", np.round(x * 180 + 400).astype(np.int16), affine)  # raw scanner values: same anatomy
    flip = np.diag([-1.0, 1.0, 1.0, 1.0])
    flip[0, 3] = SHAPE[0] - 1  # voxel i of the copy is voxel SHAPE[0] - 1 - i of the reference: same place
    save("flipped", np.ascontiguousarray(x[::-1]), affine @ flip)
    save("oblique", x, _rotation(0.3) @ affine)  # acquired on a rotated grid: same voxels, rotated world position
    coarse = Spacing(pixdim=(1.0, 1.0, 1.25), mode="bilinear")(MetaTensor(torch.as_tensor(x)[None], affine=affine))
    save("spacing", coarse[0].numpy(), coarse.affine.numpy())
    return out


@pytest.fixture(scope="module")
def nrrd_scan(scans) -> Path:
    """The reference scan as NRRD (needs pynrrd, part of the test extra: pip install -e ".[test]")."""
    nrrd = pytest.importorskip("nrrd")
    reference = nib.load(scans["reference"])
    path = scans["reference"].parent / "nrrd.nrrd"  # NRRD's LPS world: x, y axes negated with respect to RAS
    lps = np.diag([-1.0, -1.0, 1.0]) @ reference.affine[:3, :3]
    header = {"space": "left-posterior-superior", "space directions": lps.T, "space origin": [-10.0, 5.0, 3.0]}
    nrrd.write(str(path), np.asarray(reference.dataobj), header)
    return path


def _la_preprocessing(**overrides) -> object:
    return load_bundle(LA_BUNDLE, "inference", **{**AT_SCAN_SPACING, **overrides}).get_parsed_content("preprocessing")


def test_copies_reach_the_network_as_the_same_input(scans, nrrd_scan):
    pre = _la_preprocessing()
    reference = pre({"image": str(scans["reference"])})["image"]
    assert tuple(reference.shape) == (1, *SHAPE)
    for name, atol in (("raw", 0.01), ("flipped", 1e-5), ("oblique", 1e-5), ("nrrd", 1e-5)):
        image = pre({"image": str(nrrd_scan if name == "nrrd" else scans[name])})["image"]
        assert tuple(image.shape) == (1, *SHAPE), name
        assert torch.allclose(image.as_tensor(), reference.as_tensor(), atol=atol), name
    resampled = pre({"image": str(scans["spacing"])})["image"]  # 1.0 x 1.0 x 1.25 mm back to 0.625 mm
    overlap = tuple(min(a, b) for a, b in zip(resampled.shape[1:], SHAPE))
    a = resampled[0][tuple(slice(2, n - 2) for n in overlap)].flatten()
    b = reference[0][tuple(slice(2, n - 2) for n in overlap)].flatten()
    assert all(abs(r - s) <= 2 for r, s in zip(resampled.shape[1:], SHAPE))
    assert float(torch.corrcoef(torch.stack([a, b]))[0, 1]) > 0.9


def test_entries_beside_the_image_pass_through(scans):
    """MONAI Label puts the file's path beside the image (``image_path``): resampling a NIfTI keeps it as it is."""
    path = str(scans["spacing"])
    out = _la_preprocessing()({"image": path, "image_path": path})
    assert out["image_path"] == path and out["image"].shape[0] == 1


def test_raw_scan_normalisation_and_h5_passthrough(tmp_path):
    root = make_synthetic_dataset(tmp_path / "la", num_cases=2, shape=(24, 24, 16), num_test=1)
    h5 = next(root.rglob("*.h5"))
    pre = scan_preprocessing(model_spacing=[SPACING] * 3)
    stored = pre({"image": str(h5)})["image"]
    with h5py.File(h5) as f:
        np.testing.assert_allclose(stored[0].numpy(), f["image"][()], atol=1e-6)  # h5: already normalised
    raw = tmp_path / "raw.nii.gz"
    values = (np.arange(24 * 24 * 16).reshape(24, 24, 16) % 97 * 7 + 300).astype(np.int16)
    nib.save(nib.Nifti1Image(values, _affine()), raw)
    image = pre({"image": str(raw)})["image"]
    assert abs(float(image.mean())) < 1e-4 and abs(float(image.std(unbiased=False)) - 1) < 1e-4
    with pytest.raises(ValueError, match="scan_norm must be one of"):
        ScanNormalized("image", "percentile")


def _threshold_net(tmp_path: Path) -> Path:
    """Checkpoint of a 1x1x1 convolution: class-1 logit = intensity, class-0 logit = 0 (mask = image > 0)."""
    net = torch.nn.Conv3d(1, 2, 1)
    with torch.no_grad():
        net.weight.zero_()
        net.bias.zero_()
        net.weight[1, 0] = 1.0
    path = tmp_path / "model.pt"
    torch.save(net.state_dict(), path)
    return path


NET = {"_target_": "torch.nn.Conv3d", "in_channels": 1, "out_channels": 2, "kernel_size": 1}


def _expected_mask(path: Path) -> np.ndarray:
    image = nib.load(path)
    x = np.asarray(image.dataobj, dtype=np.float64)
    return (x - x.mean()) / x.std() > 0


def test_inferring_writes_masks_on_each_inputs_grid(scans, tmp_path):
    names = ["reference", "raw", "flipped", "oblique", "spacing"]
    run_workflow(
        LA_BUNDLE,
        "inference",
        images=[str(scans[n]) for n in names],
        ckpt_path=str(_threshold_net(tmp_path)),
        output_dir=str(tmp_path / "out"),
        network_def=NET,
        patch_size=PATCH,
        strides=STRIDES,
        **AT_SCAN_SPACING,
    )
    for name in names:
        source, mask = nib.load(scans[name]), nib.load(tmp_path / "out" / f"{name}.nii.gz")
        assert mask.shape == source.shape, name
        np.testing.assert_allclose(mask.affine, source.affine, atol=1e-5, err_msg=name)
        assert mask.get_data_dtype() == np.uint8
        agreement = (np.asarray(mask.dataobj) > 0) == _expected_mask(scans[name])
        assert agreement.mean() > (0.93 if name == "spacing" else 0.999), (name, agreement.mean())
    # the same anatomy gives the same mask: the flipped copy's mask is the reference's, flipped
    reference = np.asarray(nib.load(tmp_path / "out" / "reference.nii.gz").dataobj)
    flipped = np.asarray(nib.load(tmp_path / "out" / "flipped.nii.gz").dataobj)
    assert 0 < reference.mean() < 1
    np.testing.assert_array_equal(flipped[::-1], reference)


def test_nrrd_input_and_predict_volume_on_a_file(scans, nrrd_scan, tmp_path):
    ckpt = _threshold_net(tmp_path)
    run_workflow(
        LA_BUNDLE,
        "inference",
        images=str(nrrd_scan),
        ckpt_path=str(ckpt),
        output_dir=str(tmp_path / "out"),
        network_def=NET,
        patch_size=PATCH,
        strides=STRIDES,
        **AT_SCAN_SPACING,
    )
    mask = nib.load(tmp_path / "out" / "nrrd.nii.gz")
    reference = nib.load(scans["reference"])
    np.testing.assert_allclose(mask.affine, reference.affine, atol=1e-5)  # NRRD's LPS header read into RAS
    np.testing.assert_array_equal(np.asarray(mask.dataobj) > 0, _expected_mask(scans["reference"]))

    net = torch.nn.Conv3d(1, 2, 1)
    net.load_state_dict(torch.load(ckpt))
    labels = predict_volume(net, scans["oblique"], PATCH, STRIDES, return_label=True, model_spacing=[SPACING] * 3)
    assert tuple(labels.shape) == (1, 1, *SHAPE)
    np.testing.assert_allclose(labels.affine.numpy(), nib.load(scans["oblique"]).affine, atol=1e-5)
    np.testing.assert_array_equal(labels[0, 0].numpy() > 0, _expected_mask(scans["oblique"]))


def test_roi_segments_only_the_box_and_keeps_the_grid(scans, tmp_path):
    roi = [5, 6, 2, 30, 28, 18]
    net = torch.nn.Conv3d(1, 2, 1)
    net.load_state_dict(torch.load(_threshold_net(tmp_path)))
    labels = predict_volume(net, scans["raw"], PATCH, STRIDES, return_label=True, roi=roi, model_spacing=[SPACING] * 3)
    mask = labels[0, 0].numpy() > 0
    assert mask.shape == SHAPE
    box = tuple(slice(a, b) for a, b in zip(roi[:3], roi[3:]))
    outside = np.ones(SHAPE, bool)
    outside[box] = False
    assert not mask[outside].any()
    np.testing.assert_array_equal(mask[box], _expected_mask(scans["raw"])[box])  # whole-scan z-score, then the box
    with pytest.raises(ValueError, match="roi must be 6 voxel indices"):
        check_roi([0, 0, 0, 10, 10])


def test_monailabel_path_uses_the_bundle_graph(scans, tmp_path):
    """MONAI Label's BundleInferTask runs the config's preprocessing, inferer and postprocessing (without
    SaveImaged, it writes the result itself): the same chain gives the mask on the input grid."""
    from monai.transforms import Compose, SaveImaged

    parser = load_bundle(LA_BUNDLE, "inference", output_dir=str(tmp_path / "unused"), patch_size=PATCH, strides=STRIDES,
                         **AT_SCAN_SPACING)  # fmt: skip
    pre, inferer = parser.get_parsed_content("preprocessing"), parser.get_parsed_content("inferer")
    post = [t for t in parser.get_parsed_content("postprocessing").transforms if not isinstance(t, SaveImaged)]
    net = torch.nn.Conv3d(1, 2, 1)
    net.load_state_dict(torch.load(_threshold_net(tmp_path)))
    data = pre({"image": str(scans["flipped"])})
    data["pred"] = inferer(data["image"][None], net)[0]  # Invertd takes the geometry from data["image"]
    out = Compose(post)(data)["pred"]
    assert tuple(out.shape) == (1, *SHAPE)
    np.testing.assert_allclose(out.affine.numpy(), nib.load(scans["flipped"]).affine, atol=1e-5)
    np.testing.assert_array_equal(out[0].numpy() > 0, _expected_mask(scans["flipped"]))
    assert not (tmp_path / "unused").exists()


def test_predict_volume_takes_the_bundles_flip_tta_and_largest_component(scans, tmp_path):
    """``flip_axes`` and ``keep_largest`` of a file's prediction (the bundles' ``tta_flip`` and
    ``keep_largest_component``): the flips reach the inferer (a net that is not flip-equivariant gives other
    probabilities, those of the inferer with the same flips for an array); with the largest component an island apart
    from the structure leaves the mask and the structure stays whole."""
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(1, 2, 3, padding=1)  # a 3x3x3 kernel of random weights: not flip-equivariant
    flips = [[0], [1], [2]]
    plain = predict_volume(conv, scans["raw"], PATCH, STRIDES, model_spacing=[SPACING] * 3)
    flipped = predict_volume(conv, scans["raw"], PATCH, STRIDES, flip_axes=flips, model_spacing=[SPACING] * 3)
    assert plain.shape == flipped.shape and not torch.allclose(plain, flipped, atol=1e-3)
    array = torch.randn(1, 1, *SHAPE)
    with torch.no_grad():
        reference = DiffCLSlidingWindowInferer(PATCH, STRIDES, flip_axes=flips)(array, conv.eval())
    torch.testing.assert_close(predict_volume(conv, array, PATCH, STRIDES, flip_axes=flips), reference)

    net = torch.nn.Conv3d(1, 2, 1)
    net.load_state_dict(torch.load(_threshold_net(tmp_path)))
    x = np.full(SHAPE, -1.0, np.float32)
    x[2:10, 2:10, 2:8] = 3.0  # the structure: 8x8x6 voxels
    x[20:23, 20:23, 12:14] = 3.0  # an island: 3x3x2 voxels
    nib.save(nib.Nifti1Image(x, _affine()), tmp_path / "island.nii.gz")
    for keep_largest, voxels in ((0, 8 * 8 * 6 + 3 * 3 * 2), (2, 8 * 8 * 6)):
        mask = predict_volume(net, tmp_path / "island.nii.gz", PATCH, STRIDES, return_label=True,
                              model_spacing=[SPACING] * 3, keep_largest=keep_largest)  # fmt: skip
        assert int(mask[0, 0, 2:10, 2:10, 2:8].sum()) == 8 * 8 * 6 and int(mask.sum()) == voxels
