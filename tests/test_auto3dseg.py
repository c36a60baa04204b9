"""The ``diffcl`` Auto3DSeg template through MONAI's own tools, on a tiny synthetic NIfTI dataset.

DataAnalyzer -> BundleGen(algos=["diffcl"]) -> BundleAlgo.train (a ``scripts/train.py`` subprocess, 2 iterations)
-> get_score -> predict, and the same through AutoRunner (training, scoring, ensemble inference).
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
import torch
from monai.apps.auto3dseg import AutoRunner, BundleGen
from monai.apps.auto3dseg.utils import import_bundle_algo_history
from monai.auto3dseg import algo_to_json
from monai.bundle import ConfigParser
from monai.utils.enums import AlgoKeys

from diffcl_algo.auto3dseg import (
    TEMPLATES_DIR,
    InferClass,
    analyze_data,
    fill_hyper_parameters,
    fold_split,
    patch_from_shape,
    skip_reason,
    train,
    training_arguments,
    validate,
)
from diffcl_algo.convert import make_synthetic_dataset
from diffcl_algo.convert.writers import write_h5
from diffcl_algo.data import DataError
from tests.tiny_settings import TINY_TRAIN

SHAPE = (24, 24, 20)
AFFINE = np.diag([0.625, 0.625, 0.625, 1.0])
NUM_LABELED = 4  # of 6 training cases; case 6 is the "testing" image
# TINY_TRAIN without the values the template fills from the data (patch, strides) or derives (num_labeled);
# validation at every iteration so the score is the best of two rounds
TRAIN_PARAMS = {
    **{k: v for k, v in TINY_TRAIN.items() if k not in ("patch_size", "strides", "num_labeled")},
    "val_interval": 1,
}
DEVICE_SETTING = {"CUDA_VISIBLE_DEVICES": "", "CMD_PREFIX": sys.executable}


@pytest.fixture(scope="module")
def nifti_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """7 synthetic cases as NIfTI: 4 labeled + 2 unlabeled training entries (folds 0/1), 1 testing image."""
    tmp = tmp_path_factory.mktemp("auto3dseg_data")
    h5_root = make_synthetic_dataset(tmp / "h5", num_cases=7, shape=SHAPE, num_test=1)
    root = tmp / "nifti"
    root.mkdir()
    training = []
    for i, path in enumerate(sorted(h5_root.glob("*/*/mri_norm2.h5"))):
        with h5py.File(path) as f:
            image, label = f["image"][()], f["label"][()]
        nib.save(nib.Nifti1Image(image, AFFINE), root / f"img{i}.nii.gz")
        nib.save(nib.Nifti1Image(label, AFFINE), root / f"lab{i}.nii.gz")
        entry = {"image": f"img{i}.nii.gz", "fold": i % 2}
        if i < NUM_LABELED:
            entry["label"] = f"lab{i}.nii.gz"
        training.append(entry)
    datalist = {"training": training[:6], "testing": [{"image": "img6.nii.gz"}]}
    (root / "datalist.json").write_text(json.dumps(datalist))
    return {"modality": "mri", "datalist": str(root / "datalist.json"), "dataroot": str(root)}


@pytest.fixture(autouse=True)
def _isolated_imports(monkeypatch: pytest.MonkeyPatch):
    """BundleGen appends the copied templates to ``sys.path`` and imports ``diffcl.scripts.algo``; undo both.
    The training subprocess runs one thread like the tests."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    yield
    for name in [m for m in sys.modules if m in ("diffcl", "InferClass") or m.startswith("diffcl.")]:
        del sys.modules[name]


def test_fold_split(nifti_data: dict[str, str]) -> None:
    training, validation = fold_split(nifti_data["datalist"], nifti_data["dataroot"], fold=0)
    names = lambda entries: sorted(Path(e["image"]).name for e in entries)  # noqa: E731
    assert names(validation) == ["img0.nii.gz", "img2.nii.gz"]  # labeled entries of fold 0
    # labeled cases of the other fold, then every unlabeled case (img4 is in fold 0 but has no label)
    assert names(training) == ["img1.nii.gz", "img3.nii.gz", "img4.nii.gz", "img5.nii.gz"]
    assert [("label" in e) for e in training] == [True, True, False, False]
    assert all(Path(e["image"]).is_absolute() and "fold" not in e for e in training + validation)
    with pytest.raises(DataError, match="fold"):
        fold_split(nifti_data["datalist"], nifti_data["dataroot"], fold=2)


def test_training_arguments_rules() -> None:
    config = {"bundle_root": ".", "fold": 0, "num_labeled": None, "val_interval": 200, "max_iterations": 5}
    split = [{"image": "a", "label": "a"}, {"image": "b", "label": "b"}, {"image": "c"}]
    kwargs = training_arguments(config, split)
    assert kwargs["num_labeled"] == 2 and kwargs["val_interval"] == 5 and "fold" not in kwargs
    assert training_arguments({**config, "num_labeled": 1}, split[:2])["num_labeled"] == 1  # b trains unlabeled
    with pytest.raises(ValueError, match="no unlabeled case"):
        training_arguments(config, split[:2])
    with pytest.raises(ValueError, match="val_interval"):
        training_arguments({**config, "val_interval": 0}, split)
    with pytest.raises(ValueError, match="num_labeled=3"):
        training_arguments({**config, "num_labeled": 3}, split)


def test_fill_and_skip_rules(tmp_path: Path) -> None:
    assert patch_from_shape([200, 40, 8], [96, 96, 96]) == [96, 32, 16]
    stats = {"image_stats": {"channels": {"max": 1}, "shape": {"max": [200, 40, 8]}}, "label_stats": {"labels": [0, 2]}}
    assert skip_reason({"stats_summary": stats}) is None
    assert "4 channels" in skip_reason({"stats_summary": {"image_stats": {"channels": {"max": 4}}}})

    algo_dir = tmp_path / "diffcl_1"
    shutil.copytree(TEMPLATES_DIR / "diffcl", algo_dir)
    source = {"datalist": "d.json", "dataroot": "."}
    records = fill_hyper_parameters(algo_dir, {"stats_summary": stats}, source, fold=1, lr=0.02)
    written = ConfigParser.load_config_file(str(algo_dir / "configs" / "hyper_parameters.yaml"))
    expected = {"patch_size": [96, 32, 16], "strides": [48, 16, 8], "num_classes": 3, "in_channels": 1, "fold": 1}
    assert {k: written[k] for k in expected} == expected and written["lr"] == 0.02
    assert written["bundle_root"] == str(algo_dir) and written["data_list_file_path"] == str(Path("d.json").resolve())
    assert records["hyper_parameters.yaml"]["patch_size"] == [96, 32, 16]
    # an HPO copy (NNIGen): the earlier records, no report, its own bundle_root
    copy_dir = tmp_path / "copy"
    shutil.copytree(TEMPLATES_DIR / "diffcl", copy_dir)
    fill_hyper_parameters(copy_dir, None, None, records, fill_with_datastats=False, bundle_root="/elsewhere")
    copied = ConfigParser.load_config_file(str(copy_dir / "configs" / "hyper_parameters.yaml"))
    assert {k: copied[k] for k in expected} == expected and copied["bundle_root"] == "/elsewhere"


def _log_dice(log: Path) -> list[float]:
    return [float(v) for v in re.findall(r"val_mean_dice: ([0-9.]+)", log.read_text())]


def test_bundlegen_train_score_predict(nifti_data: dict[str, str], tmp_path: Path) -> None:
    work = tmp_path / "work"
    analyze_data(nifti_data["datalist"], nifti_data["dataroot"], work / "datastats.yaml")
    ConfigParser.export_config_file(nifti_data, str(work / "input.yaml"), fmt="yaml")
    gen = BundleGen(
        algo_path=str(work),
        templates_path_or_url=str(TEMPLATES_DIR),
        algos=["diffcl"],
        data_stats_filename=str(work / "datastats.yaml"),
        data_src_cfg_name=str(work / "input.yaml"),
    )
    gen.generate(str(work), num_fold=1)
    (entry,) = gen.get_history()
    algo = entry[AlgoKeys.ALGO]
    assert type(algo).__name__ == "DiffclAlgo" and entry[AlgoKeys.ID] == "diffcl_0"

    filled = ConfigParser.load_config_file(str(work / "diffcl_0" / "configs" / "hyper_parameters.yaml"))
    assert filled["patch_size"] == [16, 16, 16] and filled["strides"] == [8, 8, 8]  # 24x24x20 images
    assert (filled["num_classes"], filled["in_channels"], filled["fold"]) == (2, 1, 0)
    assert filled["data_list_file_path"] == nifti_data["datalist"]

    algo.train(TRAIN_PARAMS, DEVICE_SETTING)
    run_dir = work / "diffcl_0" / "model"
    score = algo.get_score()
    state = torch.load(run_dir / "train_state.pt", map_location="cpu", weights_only=True)
    assert int(state["iteration"]) == 2
    assert isinstance(score, float) and 0.0 <= score <= 1.0
    assert score == pytest.approx(float(state["best_metric"]))
    assert score == pytest.approx(max(_log_dice(run_dir / "train.log")), abs=1e-4)
    assert len(_log_dice(run_dir / "train.log")) == 2  # validated at both iterations
    # scripts/validate.py's function: model.pt on the fold's validation cases gives the score again
    summary = validate(str(work / "diffcl_0" / "configs" / "hyper_parameters.yaml"))
    assert summary["count"] == 2 and summary["metrics"]["dice"]["mean"] == pytest.approx(score)

    # MONAI's serialization, as AutoRunner does after training
    algo_to_json(algo, template_path=algo.template_path, **{str(AlgoKeys.SCORE): score})
    (trained,) = import_bundle_algo_history(str(work), only_trained=True)
    assert trained[AlgoKeys.SCORE] == pytest.approx(score)
    algo = trained[AlgoKeys.ALGO]

    image = str(Path(nifti_data["dataroot"]) / "img6.nii.gz")
    (probs,) = algo.predict([{"image": image}])
    assert probs.shape == (2, *SHAPE)
    assert torch.allclose(probs.sum(0), torch.ones(SHAPE), atol=1e-5)
    assert np.allclose(probs.affine.numpy(), AFFINE)
    (labels,) = algo.predict([image], {"infer#save_mask": True})
    assert labels.shape == (1, *SHAPE)
    assert set(labels.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(labels[0].long(), probs.argmax(0))
    saved = Path(labels.meta["saved_to"])
    assert saved == work / "diffcl_0" / "prediction_testing" / "img6.nii.gz"
    assert np.array_equal(np.asarray(nib.load(saved).dataobj), labels[0].numpy().astype(np.uint8))


def test_autorunner(nifti_data: dict[str, str], tmp_path: Path) -> None:
    work = tmp_path / "work"
    # DataAnalyzer stops at entries without a label: analyze the labeled ones into <work_dir>/datastats.yaml
    analyze_data(nifti_data["datalist"], nifti_data["dataroot"], work / "datastats.yaml")
    runner = AutoRunner(
        work_dir=str(work),
        input=dict(nifti_data),
        algos=["diffcl"],
        templates_path_or_url=str(TEMPLATES_DIR),
        analyze=False,
    )
    runner.set_num_fold(1)
    runner.set_device_info(cuda_visible_devices="", cmd_prefix=sys.executable)
    runner.set_training_params(TRAIN_PARAMS)
    runner.run()

    (trained,) = import_bundle_algo_history(str(work), only_trained=True)
    progress = ConfigParser.load_config_file(str(work / "diffcl_0" / "model" / "progress.yaml"))
    assert 0.0 <= trained[AlgoKeys.SCORE] <= 1.0
    assert trained[AlgoKeys.SCORE] == pytest.approx(progress[-1]["best_avg_dice_score"])
    (output,) = (work / "ensemble_output").glob("*.nii.gz")
    assert output.name == "img6_ensemble.nii.gz"
    label = np.asarray(nib.load(output).dataobj)
    assert label.shape == SHAPE and set(np.unique(label).tolist()) <= {0, 1}


def test_normalize_intensity_reaches_validation_and_inference(nifti_data: dict[str, str], tmp_path: Path) -> None:
    """A fold trained with ``normalize_intensity: true`` validates and infers on z-scored volumes, as it trained.

    The images are h5 files (the field's format, which no raw-scan normalisation touches) on a raw scale."""
    root = tmp_path / "raw"
    datalist = json.loads(Path(nifti_data["datalist"]).read_text())
    for entry in datalist["training"] + datalist["testing"]:
        for key in ("image", "label"):
            if key in entry:
                data = np.asarray(nib.load(Path(nifti_data["dataroot"]) / entry[key]).dataobj, dtype=np.float32)
                entry[key] = entry[key].replace(".nii.gz", ".h5")
                write_h5(root / entry[key], {"image" if key == "image" else "label": data * 40 + 300 if key == "image"
                                             else data.astype(np.uint8)})  # fmt: skip
    for entry in datalist["training"]:  # one h5 file per case holds both datasets, as in the field's layout
        if "label" in entry:
            with h5py.File(root / entry["label"]) as f:
                label = f["label"][()]
            with h5py.File(root / entry["image"], "a") as f:
                f.create_dataset("label", data=label)
            entry["label"] = entry["image"]
    (root / "datalist.json").write_text(json.dumps(datalist))
    config = ConfigParser.load_config_file(str(TEMPLATES_DIR / "diffcl" / "configs" / "hyper_parameters.yaml"))
    nested = {k: v for k, v in TRAIN_PARAMS.items() if "#" in k}  # graph ids below the top level: overrides
    config.update(bundle_root=str(tmp_path / "algo"), data_file_base_dir=str(root), patch_size=[16, 16, 16],
                  data_list_file_path=str(root / "datalist.json"), strides=[8, 8, 8], normalize_intensity=True,
                  **{k: v for k, v in TRAIN_PARAMS.items() if k not in nested})  # fmt: skip
    config_file = tmp_path / "hyper_parameters.yaml"
    ConfigParser.export_config_file(config, str(config_file), fmt="yaml")

    summary = train(str(config_file), **nested)
    test_image = {"image": str(root / "img6.h5")}
    image = InferClass(str(config_file)).preprocessing(test_image)["image"]
    assert abs(float(image.mean())) < 1e-4 and float(image.std()) == pytest.approx(1.0, abs=1e-3)
    raw = InferClass(str(config_file), normalize_intensity=False).preprocessing(test_image)["image"]
    assert float(raw.mean()) > 100  # the value reaches the chain: the check above can fail
    assert InferClass(str(config_file)).infer(test_image).shape == (2, *SHAPE)
    validated = validate(str(config_file))
    assert validated["metrics"]["dice"]["mean"] == pytest.approx(summary["best_metric"])  # the same volumes
