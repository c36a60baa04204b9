"""The LA packer (lossless round trip) and the paper-scale GPU script, end to end on CPU at toy size."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest

from diffcl_algo.convert.synthetic import make_synthetic_dataset
from diffcl_algo.convert.writers import write_h5
from diffcl_algo.data import LAYOUTS, DataError

REPO = Path(__file__).resolve().parents[1]
#: Toy overrides: HF-Mamba fits a 32x32x16 patch; everything else as small as the bundle allows.
TOY_SET = ("patch_size=[32,32,16] strides=[16,16,8] n_filters=4 amp=false cl_num_anchors=16 cl_num_unlabeled=512 "
           "cl_top_k=32 bank_samples_per_class=64 head_dim=16")


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # picklable functions for worker processes
    spec.loader.exec_module(module)
    return module


def _case_file(root: Path, case: str) -> Path:
    return root / LAYOUTS["la"].format(case=case)


def _quantised_la(root: Path, num_cases: int, shape: tuple[int, int, int], keep_raw: int | None = None) -> list[str]:
    """Synthetic LA layout whose images have at most 256 values (steps of 1/16), except case ``keep_raw``."""
    make_synthetic_dataset(root, num_cases=num_cases + 1, shape=shape, seed=5, num_test=1)
    os.remove(root / "test.list")  # train.list: the first num_cases
    cases = (root / "train.list").read_text().split()
    for i, case in enumerate(cases):
        path = _case_file(root, case)
        with h5py.File(path, "r") as f:
            image, label, spacing = f["image"][()], f["label"][()], f.attrs["spacing"]
        if i != keep_raw:
            image = (np.clip(np.round(image * 16), -127, 128) / 16).astype(np.float32)
            image.flat[0], image.flat[1] = -0.0, 0.0  # distinct bit patterns, equal values
        write_h5(path, {"image": image, "label": label}, {"spacing": spacing})
    return cases


def test_pack_unpack_is_bit_exact_and_keeps_cases_over_256_values(tmp_path):
    pack_la = _load("pack_la")
    src, dst, packed = tmp_path / "src", tmp_path / "dst", tmp_path / "la.npz"
    cases = _quantised_la(src, 5, (20, 18, 12), keep_raw=3)
    stats = pack_la.pack(str(src), str(packed))
    assert stats["cases"] == 5 and stats["raw_cases"] == [cases[3]] and stats["distinct_max"] > 256
    assert stats["distinct_min"] <= 256
    assert pack_la.unpack(str(packed), str(dst), workers=2)["cases"] == 5
    assert (dst / "train.list").read_text().split() == cases
    assert pack_la.verify(str(src), str(dst)) == {"cases": 5, "identical": True}
    for case in cases:
        with h5py.File(_case_file(src, case), "r") as a, h5py.File(_case_file(dst, case), "r") as b:
            for name in ("image", "label"):
                assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape
                assert np.array_equal(a[name][()], b[name][()])
            assert np.array_equal(a.attrs["spacing"], b.attrs["spacing"])
    with h5py.File(_case_file(dst, cases[0]), "r") as f:
        assert np.signbit(f["image"][()].flat[0]) and not np.signbit(f["image"][()].flat[1])
    with pytest.raises(DataError, match="already exist"):
        pack_la.unpack(str(packed), str(dst))


def test_pack_selects_head_and_tail_and_refuses_bad_input(tmp_path):
    pack_la = _load("pack_la")
    src = tmp_path / "src"
    cases = _quantised_la(src, 6, (16, 16, 8))
    assert pack_la.pack(str(src), str(tmp_path / "sub.npz"), head=2, tail=1)["cases"] == 3
    pack_la.unpack(str(tmp_path / "sub.npz"), str(tmp_path / "sub"))
    assert (tmp_path / "sub" / "train.list").read_text().split() == cases[:2] + cases[-1:]
    with pytest.raises(ValueError, match="head"):
        pack_la.pack(str(src), str(tmp_path / "bad.npz"), head=5, tail=2)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="junk.npz"):
        pack_la.unpack(str(tmp_path / "junk.npz"), str(tmp_path / "x"))
    with h5py.File(_case_file(tmp_path / "sub", cases[1]), "r+") as f:
        f["label"][0, 0, 0] = 1 - f["label"][0, 0, 0]
    with pytest.raises(DataError, match=cases[1]):
        pack_la.verify(str(src), str(tmp_path / "sub"))
    write_h5(_case_file(src, cases[0]), {"image": np.zeros((4, 4, 4)), "label": np.zeros((4, 4, 4), np.uint8)})
    with pytest.raises(DataError, match=f"{cases[0]}.*float32"):
        pack_la.pack(str(src), str(tmp_path / "bad.npz"))


def test_time_box_stops_a_process_group(tmp_path):
    script = _load("gpu_paper_scale")
    with open(tmp_path / "progress.log", "w") as log:
        clock = script.Clock(log)
        jobs = {"slow": ([sys.executable, "-c", "import time; print('up', flush=True); time.sleep(60)"],
                         tmp_path / "slow.log"),
                "quick": ([sys.executable, "-c", "print('done')"], tmp_path / "quick.log")}
        done = script.run_parallel(jobs, timeout=3.0, clock=clock, env=dict(os.environ), poll=1.0)
    assert done["slow"]["timed_out"] and done["slow"]["rc"] != 0 and done["slow"]["seconds"] < 10
    assert done["quick"] == {"rc": 0, "seconds": done["quick"]["seconds"], "timed_out": False}
    assert "slow: stopped at the time box: up" in (tmp_path / "progress.log").read_text()


def test_gpu_script_runs_end_to_end_at_toy_size(tmp_path):
    pack_la = _load("pack_la")
    src = tmp_path / "src"
    cases = _quantised_la(src, 12, (36, 36, 20))
    pack_la.pack(str(src), str(tmp_path / "la.npz"))
    out = tmp_path / "out"
    cmd = [sys.executable, str(REPO / "experiments" / "gpu_paper_scale.py"), "--packed", str(tmp_path / "la.npz"),
           "--wheels", str(tmp_path / "no_wheels"), "--work", str(tmp_path / "work"), "--out", str(out),
           "--full_iters", "2", "--sup_iters", "2", "--val_interval", "1", "--num_labeled", "4",
           "--num_test_holdout", "4", "--num_val_holdout", "2", "--num_workers", "0", "--sw_batch_size", "1",
           "--log_every", "1", "--unpack_workers", "1", "--poll", "5", "--set", TOY_SET, "--seeds", "0,1", "--no-mps",
           "--budget_s", "3000", "--train_timeout", "1200", "--eval_timeout", "1200"]  # no time box on a busy CPU
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["split"] == {"labeled": 4, "unlabeled": 2, "selection": 2, "report": 4}
    assert summary["wheels"] == [] and summary["environment"]["mamba_ssm_kernel"] in (True, False)
    assert summary["overrides"]["normalize_intensity"] == "true" and summary["overrides"]["num_test_holdout"] == "4"
    assert sorted(summary["rows"]) == ["full_s0", "full_s1", "sup_s0", "sup_s1"]
    for name, info in summary["rows"].items():
        assert name == f"{info['row']}_s{info['seed']}"
        assert info["iterations"] == 2 and info["selected_iteration"] in (1, 2) and not info["train"]["timed_out"]
        for kind in ("last", "selected"):
            assert sorted(info[kind]["cases"]) == sorted(cases[-4:]), info[kind]
            assert 0.0 <= info[kind]["mean"]["dice"] <= 1.0
    text = (out / "summary.md").read_text()
    assert "| full_s1 | 2 / 2 |" in text and "| sup_s0 | 2 / 2 |" in text
    for seed in (0, 1):  # full against supervised-only, case by case, on each seed and weights
        for kind in ("last", "selected"):
            full, sup = summary["rows"][f"full_s{seed}"][kind]["cases"], summary["rows"][f"sup_s{seed}"][kind]["cases"]
            diffs = [full[c]["dice"] - sup[c]["dice"] for c in full]
            better, worse = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
            assert f"| {seed} | {kind} | {sum(diffs) / len(diffs):+.4f} | {better} / {worse} |" in text
    assert {p.name for p in out.iterdir()} == {"summary.json", "summary.md", "progress.log", "logs.tar.gz"}
    with tarfile.open(out / "logs.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"sup_s0/train.log", "full_s1/train.log", "full_s1/eval_last.log", "sup_s0/eval_selected.log"} <= names


def _toy_wheel(folder: Path) -> Path:
    """A pure-Python wheel ``toy_carried`` (module value 7), as a carried wheel would be."""
    folder.mkdir()
    path = folder / "toy_carried-0.1-py3-none-any.whl"
    info = "toy_carried-0.1.dist-info"
    files = {
        "toy_carried/__init__.py": "VALUE = 7\n",
        f"{info}/METADATA": "Metadata-Version: 2.1\nName: toy-carried\nVersion: 0.1\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{info}/RECORD"] = "".join(f"{name},,\n" for name in [*files, f"{info}/RECORD"])
    with zipfile.ZipFile(path, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
    return folder


def test_carried_wheels_are_installed_and_importable(tmp_path, monkeypatch):
    script = _load("gpu_paper_scale")
    monkeypatch.setattr(sys, "path", list(sys.path))
    with open(tmp_path / "progress.log", "w") as log:
        clock = script.Clock(log)
        assert script.install_wheels(tmp_path / "absent", tmp_path / "site0", clock) == []
        names = script.install_wheels(_toy_wheel(tmp_path / "wheels"), tmp_path / "site", clock)
    assert names == ["toy_carried-0.1-py3-none-any.whl"]
    assert importlib.import_module("toy_carried").VALUE == 7
    sys.modules.pop("toy_carried")
