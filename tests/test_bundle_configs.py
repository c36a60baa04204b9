"""The bundles' configs: written from the package's graph and each dataset's few values, and nothing else.

Regenerating leaves no diff; each dataset's resolved configs differ from the graph's exactly by the values of
``diffcl_algo/configs/datasets/<dataset>.yaml``; evaluate / inference / multi-GPU are overrides of the one training
graph (one ``network_def``, ``check_settings`` in every workflow); bundle overrides are checked against the ids.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from monai.bundle import ConfigParser

from diffcl_algo.bundle.compose import (
    CONFIG_DIR,
    DATASETS,
    SHIPPED_MODEL,
    WORKFLOWS,
    compose,
    dataset_values,
    write_bundles,
)
from diffcl_algo.bundle.expressions import check_command_line_ids
from diffcl_algo.bundle.run import NO_METADATA, build_trainer, load_bundle, metadata_file, run_workflow
from diffcl_algo.utils import config_error_cause

REPO = Path(__file__).resolve().parents[1]


def test_regenerating_the_bundles_leaves_no_diff():
    written = write_bundles(REPO / "bundles", check=True)
    assert len(written) == len(DATASETS) * (len(WORKFLOWS) + 2)


def test_written_configs_keep_multi_line_comments():
    graph = (CONFIG_DIR / "train.yaml").read_text().splitlines()
    at = next(i for i, line in enumerate(graph) if line.startswith("ema_decay:"))
    for dataset in DATASETS:
        written = (REPO / "bundles" / dataset / "configs" / "train.yaml").read_text()
        assert "\n".join(graph[at : at + 3]) in written


def test_check_names_a_stale_file(tmp_path):
    for dataset in DATASETS:
        (tmp_path / dataset / "configs").mkdir(parents=True)
    write_bundles(tmp_path)
    stale = tmp_path / "brats" / "configs" / "evaluate.yaml"
    stale.write_text(stale.read_text().replace("num_labeled: 25", "num_labeled: 50"))
    with pytest.raises(ValueError, match=rf"(?s)stale: {re.escape(str(stale))};.*-num_labeled: 50"):
        write_bundles(tmp_path, check=True)


@pytest.mark.parametrize("dataset", DATASETS)
@pytest.mark.parametrize("workflow", WORKFLOWS)
def test_a_dataset_differs_from_the_graph_by_its_values_only(dataset, workflow):
    bundle = ConfigParser.load_config_file(str(REPO / "bundles" / dataset / "configs" / f"{workflow}.yaml"))
    graph = compose(workflow)
    values = dataset_values(dataset)
    shipped = values.pop(SHIPPED_MODEL, None) or {}  # the shipped weights' values: inference only
    expected = {k: v for k, v in values.items() if k in graph}
    if workflow == "inference":
        expected.update(shipped)
    differences = {k: v for k, v in bundle.items() if graph.get(k, KeyError) != v}
    assert set(bundle) == set(graph)
    assert differences == expected
    assert all(graph[k] != v for k, v in expected.items())  # every stated value is a real difference


@pytest.mark.parametrize("dataset", DATASETS)
def test_each_value_is_stated_once_per_dataset(dataset):
    text = (CONFIG_DIR / "datasets" / f"{dataset}.yaml").read_text()
    keys = re.findall(r"^(\w+):", text, flags=re.MULTILINE)
    values = dataset_values(dataset)
    assert len(keys) == len(set(keys)) and set(keys) == set(values)
    shipped = values.pop(SHIPPED_MODEL, None) or {}
    assert set(values) | set(shipped) <= set().union(*(compose(w) for w in WORKFLOWS))


def test_one_graph_one_network_and_the_settings_check_in_every_workflow():
    defining = [f for f in sorted(CONFIG_DIR.glob("*.yaml")) if "network_def" in ConfigParser.load_config_file(str(f))]
    assert defining == [CONFIG_DIR / "train.yaml"]
    ddp = ConfigParser.load_config_files([str(CONFIG_DIR / "train.yaml"), str(CONFIG_DIR / "multi_gpu_train.yaml")])
    for config in [compose(w, "la") for w in WORKFLOWS] + [ddp]:
        assert config["initialize"][:2] == ["$check_command_line_ids()", "$check_settings(@patch_size, @val_interval)"]
    assert "init_process_group" in ddp["initialize"][3] and "destroy_process_group" in ddp["finalize"][-1]
    for dataset in DATASETS:
        for file in (REPO / "bundles" / dataset / "configs").glob("*.yaml"):
            text = file.read_text()
            assert not re.search(r"['\"]%[^#'\"]", text), f"{file}: a macro naming another file"
            assert "bundle_root: .\n" in text or file.name in ("multi_gpu_train.yaml", "cpu.yaml", "cpu_long.yaml")


def test_overrides_are_checked_against_the_bundle_ids(tmp_path):
    message = r"--n_filter: the train config of bundle 'la' has no id 'n_filter'; did you mean --n_filters\?"
    with pytest.raises(ValueError, match=message):
        build_trainer("la", dataset_dir=str(tmp_path), n_filter=4)
    with pytest.raises(ValueError, match=r"has no id 'validate#evaluater'; did you mean --validate#evaluator\?"):
        load_bundle(None, "evaluate", **{"validate#evaluater#amp": True})
    with pytest.raises(FileNotFoundError, match="inference.yaml"):
        load_bundle(tmp_path, "inference")
    parser = load_bundle(REPO / "bundles" / "brats", "inference", n_filters=4, device="auto")
    assert parser["n_filters"] == 4 and parser["patch_size"] == [96, 96, 96]
    assert load_bundle("pancreas", "train")["strides"] == [16, 16, 16]


def _stock(tmp_path, *options):
    """``python -m monai.bundle run training`` on the LA bundle, from an empty folder."""
    cmd = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file",
           str(REPO / "bundles/la/configs/train.yaml"), "--dataset_dir", str(tmp_path / "no_data"),
           "--output_dir", str(tmp_path / "out"), *options]  # fmt: skip
    return subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)


def _last_line(text: str) -> str:
    return [line for line in text.splitlines() if line.strip()][-1]


def test_stock_command_refuses_an_unknown_id_before_anything_runs(tmp_path):
    done = _stock(tmp_path, "--num_labled", "4")
    assert done.returncode != 0
    # the cause is the last line, not MONAI's "RuntimeError: Failed to evaluate ConfigExpression ..." around it
    assert _last_line(done.stderr) == (
        f"error: unknown option --num_labled: {REPO / 'bundles/la/configs/train.yaml'} has no id 'num_labled'; "
        "did you mean --num_labeled?"
    )
    assert "does not exist" not in done.stderr  # stopped before the data were looked at
    assert not (tmp_path / "out").exists()


def test_stock_command_accepts_known_ids_and_its_own_options(tmp_path):
    meta = str(REPO / "bundles/la/configs/metadata.json")
    done = _stock(tmp_path, "--num_labeled", "4", "--train#trainer#seed=1", "--meta_file", meta)
    assert done.returncode != 0 and "unknown option" not in done.stderr
    # the next check: the data; its cause is the last line, not MONAI's wrapper ("$__local_refs['data::splits']...")
    assert _last_line(done.stderr).startswith(f"error: dataset directory {tmp_path / 'no_data'} does not exist; ")


def test_command_line_check_reads_the_stock_command_only():
    monai_main = "/env/lib/python3.11/site-packages/monai/bundle/__main__.py"
    train = str(REPO / "bundles/la/configs/train.yaml")
    with pytest.raises(ValueError, match="did you mean --n_filters"):
        check_command_line_ids([monai_main, "run", "training", "--config_file", train, "--n_filter", "4"])
    check_command_line_ids([monai_main, "run", "training", f"--config_file={train}", "--n_filters=4", "--resume"])
    check_command_line_ids(["-m", "pytest", "--n_filter", "4"])  # not the stock command: its caller checks


def test_evaluation_network_choice_is_checked(tmp_path):
    with pytest.raises(RuntimeError) as info:  # MONAI wraps it; the command line prints the cause in one line
        run_workflow("la", "evaluate", eval_network="dss", dataset_dir=str(tmp_path), output_dir=str(tmp_path / "e"))
    assert str(config_error_cause(info.value)) == "eval_network must be one of ['cs', 'ds'], got 'dss'."
    assert not (tmp_path / "e").exists()


_TINY_RUNS = """
import sys
from diffcl_algo.bundle.run import run_workflow
from diffcl_algo.convert import make_synthetic_dataset
root = sys.argv[1]
data = str(make_synthetic_dataset(root + "/LA", num_cases=12, shape=(24, 24, 16), seed=1, kind="la"))
net = dict(patch_size=[16, 16, 16], strides=[8, 8, 8], n_filters=4, use_hfm=False, device="cpu")
run_workflow("la", "train", dataset_dir=data, output_dir=root + "/run", num_labeled=2, dataset_name=None,
             max_iterations=2, val_interval=0, progress=False, ema_decay=0.0, labeled_batch_size=1,
             unlabeled_batch_size=1, **net)
run_workflow("la", "evaluate", dataset_dir=data, output_dir=root + "/eval", ckpt_path=root + "/run/model.pt", **net)
"""


def test_package_graph_runs_log_no_error(tmp_path):
    """The demo's runs (the package's graph, which has no metadata.json) log no ERROR line."""
    done = subprocess.run([sys.executable, "-c", _TINY_RUNS, str(tmp_path)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-3000:]
    assert (tmp_path / "eval" / "metrics_summary.json").is_file()
    assert "Cannot find the metadata config file" not in log
    assert not [line for line in log.splitlines() if " - ERROR - " in line]


def test_metadata_file_of_a_config(tmp_path):
    train = tmp_path / "configs" / "train.yaml"
    train.parent.mkdir()
    train.write_text("run: []\n")
    assert metadata_file([str(train)], None) == NO_METADATA  # none next to the config: run without, no ERROR
    (train.parent / "metadata.json").write_text("{}")
    assert metadata_file([str(train)], None) == str(train.parent / "metadata.json")
    with pytest.raises(FileNotFoundError, match=f"metadata file {tmp_path / 'nope.json'} does not exist"):
        metadata_file([str(train)], str(tmp_path / "nope.json"))
