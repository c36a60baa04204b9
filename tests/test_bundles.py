"""Tests of the MONAI bundles (bundles/la, brats, pancreas): the three workflows on tiny synthetic data of each
layout, run from another working directory, MONAI property checks, metadata schema, data errors, CLI overrides,
resume, the LA hold-out split, literal ``python -m monai.bundle run`` command lines from another directory and from a
copied bundle folder (CPU, ~2 minutes)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from monai.bundle import ConfigParser, ConfigWorkflow

from diffcl_algo.convert import make_synthetic_dataset
from diffcl_algo.data import DataError
from diffcl_algo.utils import config_error_cause

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO.parent / "shared" / "reference" / "model-zoo" / "meta_schema_20240725.json"
BUNDLES = ("la", "brats", "pancreas")
RUN_IDS = {"train": "training", "evaluate": "evaluating", "inference": "inferring"}
SHAPE = (36, 34, 20)
SMALL = {"patch_size": [32, 32, 16], "strides": [16, 16, 8], "n_filters": 4, "device": "cpu"}
SMALL_TRAIN = {
    **SMALL,
    "max_iterations": 2,
    "val_interval": 2,
    "progress": False,
    "nets#cs_head_def#out_channels": 16,
    "nets#contrastive_def#num_anchors": 16,
    "nets#contrastive_def#num_unlabeled": 512,
    "nets#contrastive_def#top_k": 32,
    "nets#contrastive_def#samples_per_class": 64,
}
# per bundle: synthetic cases, labeled cases and Table 2 row (None: defaults, the row needs more cases)
SETTINGS = {"la": (8, 4, "LA"), "brats": (6, 2, None), "pancreas": (10, 6, "Pancreas")}


def _workflow(bundle: str, workflow: str, **overrides) -> ConfigWorkflow:
    """An initialised ``ConfigWorkflow`` of ``bundles/<bundle>/configs/<workflow>.yaml``."""
    wf = ConfigWorkflow(
        config_file=str(REPO / "bundles" / bundle / "configs" / f"{workflow}.yaml"),
        workflow_type="train" if workflow == "train" else "infer",
        run_id=RUN_IDS[workflow],
        **overrides,
    )
    wf.initialize()
    return wf


def _run(wf: ConfigWorkflow) -> None:
    wf.run()
    wf.finalize()


@pytest.fixture(autouse=True)
def _elsewhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the bundles load from any working directory


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("bundle_data")
    return {
        name: str(make_synthetic_dataset(root / name, num_cases=SETTINGS[name][0], shape=SHAPE, seed=1, kind=name))
        for name in BUNDLES
    }


@pytest.mark.parametrize("bundle", BUNDLES)
def test_train_evaluate_infer(bundle, datasets, tmp_path):
    _, num_labeled, table2 = SETTINGS[bundle]
    data = datasets[bundle]
    out = tmp_path / "train"
    wf = _workflow(bundle, "train", dataset_dir=data, output_dir=str(out), num_labeled=num_labeled, **SMALL_TRAIN,
                   **({} if table2 else {"dataset_name": None}))  # fmt: skip
    assert wf.check_properties() == []
    trainer = wf.parser.get_parsed_content("train#trainer")
    if table2:
        from diffcl_algo.schedules import table2_params

        assert trainer.hparams.eta == table2_params(table2, num_labeled).eta
    _run(wf)
    assert trainer.state.iteration == 2
    assert {"model.pt", "train_state.pt", "train.log"} <= {p.name for p in out.iterdir()}
    assert list(out.glob("events.out.tfevents.*"))
    cs_state = torch.load(out / "model.pt", weights_only=True)
    assert any(k.startswith("block_one") for k in cs_state)

    common = {"dataset_dir": data, "ckpt_path": str(out / "model.pt"), "num_labeled": num_labeled, **SMALL}
    if not table2:
        common["dataset_name"] = None
    ev = _workflow(bundle, "evaluate", output_dir=str(tmp_path / "eval"), **common)
    assert ev.check_properties() == []
    _run(ev)
    test_cases = ev.parser.get_parsed_content("data#cases")
    assert len(test_cases) == 2
    names = {p.name for p in (tmp_path / "eval").iterdir()}
    assert {"metrics.csv", "metrics_summary.json", "cases.json"} <= names
    assert {f"{c['case']}.nii.gz" for c in test_cases} <= names
    summary = json.loads((tmp_path / "eval" / "metrics_summary.json").read_text())
    assert summary["count"] == 2 and set(summary["metrics"]) == {"dice", "jaccard", "hd95", "asd"}

    inf = _workflow(bundle, "inference", output_dir=str(tmp_path / "infer"), **common)
    assert inf.check_properties() == []
    _run(inf)
    assert {p.name for p in (tmp_path / "infer").iterdir()} == {f"{c['case']}.nii.gz" for c in test_cases}


@pytest.mark.parametrize("bundle", BUNDLES)
def test_metadata_matches_model_zoo_schema(bundle):
    if not SCHEMA.is_file():
        pytest.skip(f"{SCHEMA} not available")
    import jsonschema

    schema = json.loads(SCHEMA.read_text())
    meta = json.loads((REPO / "bundles" / bundle / "configs" / "metadata.json").read_text())
    jsonschema.validate(meta, schema)
    for name in ("train.yaml", "evaluate.yaml", "inference.yaml", "multi_gpu_train.yaml", "logging.conf"):
        assert (REPO / "bundles" / bundle / "configs" / name).is_file()
    for name in ("docs/README.md", "LICENSE", "large_files.yml"):
        assert (REPO / "bundles" / bundle / name).is_file()


def test_missing_dataset_dir_names_path_and_layout(tmp_path):
    missing = tmp_path / "no_such_dir"
    wf = _workflow("la", "train", dataset_dir=str(missing), output_dir=str(tmp_path / "out"), **SMALL_TRAIN)
    with pytest.raises(RuntimeError) as info:
        _run(wf)
    cause = config_error_cause(info.value)
    assert isinstance(cause, DataError)
    assert str(missing) in str(cause) and "2018LA_Seg_Training Set/<case>/mri_norm2.h5" in str(cause)


def test_corrupt_case_is_reported_before_training(datasets, tmp_path):
    import shutil

    data = tmp_path / "la"
    shutil.copytree(datasets["la"], data)
    bad = next((data / "2018LA_Seg_Training Set").iterdir()) / "mri_norm2.h5"
    bad.write_bytes(bad.read_bytes()[:200])  # truncated file
    wf = _workflow("la", "train", dataset_dir=str(data), output_dir=str(tmp_path / "out"), num_labeled=4, **SMALL_TRAIN)
    with pytest.raises(RuntimeError) as info:
        _run(wf)
    cause = config_error_cause(info.value)
    assert isinstance(cause, DataError) and str(bad) in str(cause)
    assert not (tmp_path / "out" / "train_state.pt").exists()


def test_cli_ablation_switches_build_the_ablated_graph(datasets, tmp_path):
    # the strings a command line gives (--use_cps false) as well as booleans
    wf = _workflow("la", "train", dataset_dir=datasets["la"], output_dir=str(tmp_path), num_labeled=2,
                   dataset_name="none", use_cps="false", use_hfm="False", use_cl=False, **SMALL_TRAIN)  # fmt: skip
    trainer = wf.parser.get_parsed_content("train#trainer")
    assert not trainer.use_cps and not trainer.use_cl and trainer.contrastive is None
    from diffcl_algo.schedules import DEFAULT_HYPERPARAMS

    assert trainer.hparams.eta == DEFAULT_HYPERPARAMS.eta  # --dataset_name none: no Table 2 row
    assert len(wf.parser.get_parsed_content("network_def").hfm) == 0
    full = _workflow("la", "train", dataset_dir=datasets["la"], output_dir=str(tmp_path), num_labeled=4, **SMALL_TRAIN)
    trainer = full.parser.get_parsed_content("train#trainer")
    assert trainer.use_cps and trainer.use_cl and trainer.contrastive is not None
    assert list(full.parser.get_parsed_content("network_def").hfm) == ["5"]


def test_la_holdout_split_and_resume(datasets, tmp_path):
    import shutil

    data = tmp_path / "la"
    shutil.copytree(datasets["la"], data)
    (data / "test.list").unlink()  # as in ../shared/data/LA: validate on the last 2 cases of train.list
    train_cases = (data / "train.list").read_text().split()
    common = dict(dataset_dir=str(data), output_dir=str(tmp_path / "out"), num_labeled=2, dataset_name=None,
                  num_val_holdout=2, **SMALL_TRAIN)  # fmt: skip
    wf = _workflow("la", "train", **common)
    assert [c["case"] for c in wf.parser.get_parsed_content("data#validation")] == train_cases[-2:]
    assert [c["case"] for c in wf.parser.get_parsed_content("data#labeled")] == train_cases[:2]
    assert [c["case"] for c in wf.parser.get_parsed_content("data#unlabeled")] == train_cases[2:-2]
    _run(wf)
    resumed = _workflow("la", "train", **{**common, "max_iterations": 3, "resume": "true"})
    _run(resumed)
    assert resumed.parser.get_parsed_content("train#trainer").state.iteration == 3
    ev = _workflow("la", "evaluate", dataset_dir=str(data), output_dir=str(tmp_path / "eval"), num_val_holdout=2,
                   ckpt_path=str(tmp_path / "out" / "model.pt"), dataset_name=None, **SMALL)  # fmt: skip
    assert [c["case"] for c in ev.parser.get_parsed_content("data#cases")] == train_cases[-2:]
    # inference on a JSON list of images (relative to dataset_dir)
    image = f"2018LA_Seg_Training Set/{train_cases[0]}/mri_norm2.h5"
    (tmp_path / "images.json").write_text(json.dumps({"testing": [image]}))
    inf = _workflow("la", "inference", dataset_dir=str(data), datalist=str(tmp_path / "images.json"),
                    output_dir=str(tmp_path / "pred"), ckpt_path=str(tmp_path / "out" / "model.pt"), dataset_name=None,
                    **SMALL)  # fmt: skip
    _run(inf)
    assert [p.name for p in (tmp_path / "pred").iterdir()] == [f"{train_cases[0]}.nii.gz"]


def _cli(args: list, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    proc = subprocess.run([sys.executable, "-m", "monai.bundle", "run", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


TINY_CLI = [
    "--max_iterations", "2", "--val_interval", "2", "--num_labeled", "4",
    "--patch_size", "[32, 32, 16]", "--strides", "[16, 16, 8]", "--n_filters", "4", "--device", "cpu",
    "--progress", "false", "--use_cl", "false",
]  # fmt: skip


def test_cli_training_command_line_from_another_directory(datasets, tmp_path):
    out = tmp_path / "cli"
    config = str(REPO / "bundles/la/configs/train.yaml")
    _cli(["training", "--config_file", config, "--dataset_dir", datasets["la"], "--output_dir", str(out), *TINY_CLI],
         cwd=tmp_path)  # fmt: skip
    assert (out / "model.pt").is_file() and (out / "train_state.pt").is_file() and (out / "train.log").is_file()
    state = torch.load(out / "train_state.pt", weights_only=True)
    assert state["iteration"] == 2 and state["config"]["use_cl"] is False and state["memory_bank"] is None


def test_copied_bundle_trains_and_evaluates_with_its_defaults(datasets, tmp_path):
    """A copy of bundles/la elsewhere runs from its own folder: outputs under its bundle_root (models/, eval/)."""
    bundle = Path(shutil.copytree(REPO / "bundles" / "la", tmp_path / "copy" / "la"))
    data = ["--dataset_dir", datasets["la"]]
    _cli(["training", "--config_file", "configs/train.yaml", *data, *TINY_CLI], cwd=bundle)
    assert (bundle / "models" / "model.pt").is_file() and (bundle / "models" / "train.log").is_file()
    tiny_net = ["--patch_size", "[32, 32, 16]", "--strides", "[16, 16, 8]", "--n_filters", "4", "--device", "cpu"]
    _cli(["evaluating", "--config_file", "configs/evaluate.yaml", *data, *tiny_net], cwd=bundle)
    summary = json.loads((bundle / "eval" / "metrics_summary.json").read_text())
    assert summary["count"] == 2
    _cli(["inferring", "--config_file", str(bundle / "configs/inference.yaml"), "--bundle_root", str(bundle), *data,
          *tiny_net], cwd=tmp_path)  # fmt: skip
    assert len(list((bundle / "infer").glob("*.nii.gz"))) == 2


def test_la_cpu_protocol_layers_over_train_and_evaluate(datasets, tmp_path):
    cpu = str(REPO / "bundles/la/configs/cpu.yaml")
    small = {k: v for k, v in SMALL_TRAIN.items() if k not in ("patch_size", "strides", "n_filters")}
    wf = ConfigWorkflow(
        config_file=[str(REPO / "bundles/la/configs/train.yaml"), cpu],
        workflow_type="train",
        run_id="training",
        **dict(small, dataset_dir=datasets["la"], output_dir=str(tmp_path / "run"), num_labeled=4, dataset_name=None,
               num_test_holdout=1),
    )
    wf.initialize()
    trainer = wf.parser.get_parsed_content("train#trainer")
    assert trainer.unsup_ramp is True and trainer.hparams.mu1 == trainer.hparams.mu2 == 0.1  # and the ramp spans:
    assert trainer.t_max == pytest.approx(trainer.max_iterations / trainer.state.epoch_length)
    assert wf.parser["patch_size"] == [48, 48, 32] and wf.parser["n_filters"] == 8
    _run(wf)
    ev = ConfigWorkflow(
        config_file=[str(REPO / "bundles/la/configs/evaluate.yaml"), cpu],
        workflow_type="infer",
        run_id="evaluating",
        dataset_dir=datasets["la"],
        ckpt_path=str(tmp_path / "run" / "model.pt"),
        output_dir=str(tmp_path / "eval"),
        device="cpu",
    )
    ev.initialize()
    _run(ev)
    summary = json.loads((tmp_path / "eval" / "metrics_summary.json").read_text())
    assert summary["count"] >= 1 and 0.0 <= summary["metrics"]["dice"]["mean"] <= 1.0


def test_la_long_protocol_changes_only_the_budget():
    """``cpu_long.yaml`` over ``cpu.yaml``: more iterations, sparser validation and checkpoints; the split, data,
    network, patch and loss weights stay ``cpu.yaml``'s (and the ramp still spans the run: ``t_max`` is derived)."""
    configs = REPO / "bundles/la/configs"
    cpu = yaml.safe_load((configs / "cpu.yaml").read_text())
    long = yaml.safe_load((configs / "cpu_long.yaml").read_text())
    assert set(long) == {"max_iterations", "val_interval", "ckpt_interval"}
    assert long["max_iterations"] > cpu["max_iterations"] and long["max_iterations"] % long["val_interval"] == 0
    for workflow in ("train", "evaluate"):
        parser = ConfigParser()
        parser.read_config([str(configs / name) for name in (f"{workflow}.yaml", "cpu.yaml", "cpu_long.yaml")])
        for key, value in {**cpu, **long}.items():
            assert parser[key] == value, key
