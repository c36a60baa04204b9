"""The LA packer (lossless round trip), the site archive and the paper-scale GPU script, end to end on CPU at toy
size."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from diffcl_algo.convert.synthetic import make_synthetic_dataset
from diffcl_algo.convert.writers import write_h5
from diffcl_algo.data import LAYOUTS, DataError

REPO = Path(__file__).resolve().parents[1]
#: Toy overrides: HF-Mamba fits a 32x32x16 patch; a V-Net of 4 filters.
TOY_SET = "patch_size=[32,32,16] strides=[16,16,8] n_filters=4"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # picklable functions for worker processes
    spec.loader.exec_module(module)
    return module


def _case_file(root: Path, case: str) -> Path:
    return root / LAYOUTS["la"].format(case=case)


def _la_form(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """An image of the field's LA form: integer intensities (8-bit MRI), z-scored, float32."""
    ints = np.clip(np.round(image * 30 + 100 + rng.normal(0, 4, image.shape)), 0, 255)
    return ((ints - ints.mean()) / ints.std()).astype(np.float32)


def _la_like(root: Path, num_cases: int, shape: tuple[int, int, int], codes16: int | None = None,
             raw: int | None = None) -> list[str]:  # fmt: skip
    """Synthetic LA layout of the field's form (z-scored integers, 0/1 labels), except case ``codes16`` (about 1000
    distinct values) and ``raw`` (every voxel distinct, over 65536 of them); case 0 also holds -0.0 and 0.0."""
    make_synthetic_dataset(root, num_cases=num_cases + 1, shape=shape, seed=5, num_test=1)
    os.remove(root / "test.list")  # train.list: the first num_cases
    cases = (root / "train.list").read_text().split()
    rng = np.random.default_rng(3)
    for i, case in enumerate(cases):
        path = _case_file(root, case)
        with h5py.File(path, "r") as f:
            image, label, spacing = f["image"][()], f["label"][()], f.attrs["spacing"]
        if i == codes16:
            image = (np.round(image * 100) / 100).astype(np.float32)
        elif i == raw:
            image, label = rng.standard_normal((50, 48, 30)).astype(np.float32), np.zeros((50, 48, 30), np.uint8)
        else:
            image = _la_form(image, rng)
        if i == 0:
            image.flat[0], image.flat[1] = -0.0, 0.0  # distinct bit patterns, equal values
        write_h5(path, {"image": image, "label": label}, {"spacing": spacing})
    return cases


def test_rans_round_trip_on_skewed_uniform_and_degenerate_streams():
    pack_la = _load("pack_la")
    rng = np.random.default_rng(0)
    skewed = np.clip(np.abs(rng.laplace(0, 3, 50_000)), 0, 255).astype(np.uint8)
    streams = [skewed, rng.integers(0, 256, 3001).astype(np.uint8), np.full(777, 9, np.uint8),
               np.zeros(0, np.uint8), np.array([255], np.uint8)]  # fmt: skip
    for symbols in streams:
        for lanes in (1, 7, 1024) if symbols.size < 5000 else (7, 1024):
            freq, states, words = pack_la.rans_encode(symbols, lanes)
            assert freq.sum() == 1 << pack_la.PROB_BITS and (freq[np.unique(symbols)] >= 1).all()
            assert np.array_equal(pack_la.rans_decode(freq, states, words, symbols.size), symbols)
    freq, states, words = pack_la.rans_encode(skewed)
    entropy = -sum(c * np.log2(c / skewed.size) for c in np.bincount(skewed) if c) / 8
    assert words.nbytes + states.nbytes < 1.02 * entropy + 4 * 1024  # within 2% of the order-0 entropy
    with pytest.raises(DataError, match="damaged"):
        pack_la.rans_decode(freq, states, words[:-1], skewed.size)


def test_predictive_codes_round_trip_on_any_shape_and_range():
    pack_la = _load("pack_la")
    rng = np.random.default_rng(1)
    smooth = np.cumsum(rng.integers(-1, 2, (9, 11, 13)), axis=2) + 100
    volumes = [np.clip(smooth, 0, 255), rng.integers(0, 256, (5, 6, 7)), np.zeros((1, 1, 1), np.int64),
               rng.integers(0, 3, (2, 1, 4)), np.full((3, 4, 5), 7)]  # fmt: skip
    for codes in volumes:
        codes = codes.astype(np.uint8)
        k = int(codes.max()) + 1
        coded = pack_la.encode_codes(codes, k)
        back = pack_la.decode_codes(codes.shape, k, coded["weights"], coded["fill"], coded["freq"],
                                    coded["states"], coded["words"])  # fmt: skip
        assert back.dtype == np.uint8 and np.array_equal(back, codes)


def test_pack_unpack_is_bit_exact_with_every_coding(tmp_path):
    pack_la = _load("pack_la")
    src, dst, packed = tmp_path / "src", tmp_path / "dst", tmp_path / "la.npz"
    cases = _la_like(src, 6, (40, 36, 20), codes16=3, raw=4)
    with h5py.File(_case_file(src, cases[5]), "r+") as f:  # a label of several classes, and an empty one
        label = f["label"][()]
        label[label > 0] = 2
        del f["label"]
        f["label"] = label
    with h5py.File(_case_file(src, cases[2]), "r+") as f:
        f["label"][...] = 0
    stats = pack_la.pack(str(src), str(packed))
    assert stats["cases"] == 6 and stats["head"] == 6 and stats["tail"] == 0
    assert stats["raw_cases"] == [cases[3], cases[4]] and stats["distinct_max"] > 65536
    members = np.load(packed)
    methods = [json.loads(str(members[f"{c}.meta"]))["method"] for c in cases]
    assert methods == ["predictive", "predictive", "predictive", "codes16", "raw", "predictive"]
    assert str(members["format"]) == pack_la.FORMAT
    for compress in (True, False):
        out = dst / str(compress)
        assert pack_la.unpack(str(packed), str(out), workers=2, compress=compress)["cases"] == 6
        assert (out / "train.list").read_text().split() == cases
        assert pack_la.verify(str(src), str(out)) == {"cases": 6, "identical": True}
        for case in cases:
            with h5py.File(_case_file(src, case), "r") as a, h5py.File(_case_file(out, case), "r") as b:
                for name in ("image", "label"):
                    assert a[name][()].tobytes() == b[name][()].tobytes() and a[name].dtype == b[name].dtype
                    assert b[name].compression == ("gzip" if compress else None)
                assert np.array_equal(a.attrs["spacing"], b.attrs["spacing"])
    with h5py.File(_case_file(dst / "True", cases[0]), "r") as f:
        assert np.signbit(f["image"][()].flat[0]) and not np.signbit(f["image"][()].flat[1])
    with pytest.raises(DataError, match="already exist"):
        pack_la.unpack(str(packed), str(dst / "True"))


def test_predictive_packing_beats_bzip2_of_slice_differences(tmp_path):
    import bz2

    pack_la = _load("pack_la")
    src = tmp_path / "src"
    cases = _la_like(src, 1, (64, 56, 32))
    image, label, attrs = pack_la.read_case(_case_file(src, cases[0]))
    members = pack_la.encode_case(image, label, attrs)
    codes = np.unique(image, return_inverse=True)[1].reshape(image.shape).T.astype(np.uint8)
    previous = len(bz2.compress(np.diff(codes, axis=0, prepend=np.uint8(0)).tobytes(), 9))
    assert members["image"].nbytes + members["states"].nbytes < 0.95 * previous


def test_pack_fits_a_size_limit_keeping_the_last_cases(tmp_path):
    pack_la = _load("pack_la")
    src = tmp_path / "src"
    cases = _la_like(src, 7, (24, 24, 12))
    whole = pack_la.pack(str(src), str(tmp_path / "all.npz"), head=4, tail=3, check=False)
    assert whole["head"] == 4 and whole["tail"] == 3
    limit = whole["mib"] * 0.8
    fitted = pack_la.pack(str(src), str(tmp_path / "fit.npz"), tail=3, max_mib=limit)
    assert fitted["tail"] == 3 and 0 < fitted["head"] < 4 and fitted["cases"] == fitted["head"] + 3
    assert (tmp_path / "fit.npz").stat().st_size <= limit * 2**20
    assert [str(c) for c in np.load(tmp_path / "fit.npz")["cases"]] == cases[: fitted["head"]] + cases[-3:]
    assert pack_la.pack(str(src), str(tmp_path / "sub.npz"), head=2, tail=1, check=False)["cases"] == 3
    with pytest.raises(DataError, match="last 3 cases alone"):
        pack_la.pack(str(src), str(tmp_path / "tiny.npz"), tail=3, max_mib=0.001, check=False)
    assert not (tmp_path / "tiny.npz").exists()
    with pytest.raises(ValueError, match="head"):
        pack_la.pack(str(src), str(tmp_path / "bad.npz"), head=5, tail=3)


def test_unpack_and_pack_refuse_bad_input(tmp_path):
    pack_la = _load("pack_la")
    src = tmp_path / "src"
    cases = _la_like(src, 3, (16, 16, 8))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="junk.npz"):
        pack_la.unpack(str(tmp_path / "junk.npz"), str(tmp_path / "x"))
    np.savez(tmp_path / "old.npz", cases=np.asarray(cases))
    with pytest.raises(DataError, match="pack it again"):
        pack_la.unpack(str(tmp_path / "old.npz"), str(tmp_path / "x"))
    pack_la.pack(str(src), str(tmp_path / "la.npz"))
    pack_la.unpack(str(tmp_path / "la.npz"), str(tmp_path / "out"))
    with h5py.File(_case_file(tmp_path / "out", cases[1]), "r+") as f:
        f["label"][0, 0, 0] = 1 - f["label"][0, 0, 0]
    with pytest.raises(DataError, match=cases[1]):
        pack_la.verify(str(src), str(tmp_path / "out"))
    write_h5(_case_file(src, cases[0]), {"image": np.zeros((4, 4, 4)), "label": np.zeros((4, 4, 4), np.uint8)})
    with pytest.raises(DataError, match=f"{cases[0]}.*float32"):
        pack_la.pack(str(src), str(tmp_path / "bad.npz"))


def test_real_la_cases_round_trip_when_the_data_is_at_hand(tmp_path):
    root = REPO.parent / "shared" / "data" / "LA"
    if not (root / "train.list").is_file():
        pytest.skip("the LA data is not at hand")
    pack_la = _load("pack_la")
    case = (root / "train.list").read_text().split()[0]
    image, label, attrs = pack_la.read_case(_case_file(root, case))
    back = pack_la.decode_case(pack_la.encode_case(image, label, attrs))
    assert pack_la._same(back[0], image) and pack_la._same(back[1], label) and back[2] == attrs


def test_time_box_stops_a_process_group(tmp_path):
    script = _load("gpu_paper_scale")
    with open(tmp_path / "progress.log", "w") as log:
        clock = script.Clock(log)
        jobs = {"slow": ([sys.executable, "-c", "import time; print('up', flush=True); time.sleep(60)"],
                         tmp_path / "slow.log"),
                "quick": ([sys.executable, "-c", "print('done')"], tmp_path / "quick.log")}  # fmt: skip
        done = script.run_parallel(jobs, timeout=3.0, clock=clock, env=dict(os.environ), poll=1.0)
    assert done["slow"]["timed_out"] and done["slow"]["rc"] != 0 and done["slow"]["seconds"] < 10
    assert done["quick"] == {"rc": 0, "seconds": done["quick"]["seconds"], "timed_out": False}
    assert "slow: stopped at the time box: up" in (tmp_path / "progress.log").read_text()


def test_sizing_fits_both_rows_and_their_validations_before_the_deadline():
    script = _load("gpu_paper_scale")
    now = time.time()
    spec = {"val_rounds": 4, "train_deadline": now + 400, "safety": 0.9, "min_iterations": 100,
            "max_iterations": 8000, "iterations": 0}  # fmt: skip
    plan = script.plan_iterations(spec, full_rate=8.0, sup_rate=24.0, val_s=5.0, build_s=10.0, now=now)
    n = plan["iterations"]
    assert n % 4 == 0 and plan["val_interval"] == n // 4
    used = n / 8.0 + n / 24.0 + 2 * 4 * 5.0 + 2 * 10.0
    assert 0.85 * 400 < used <= 0.9 * 400  # the planned share of the time, not more
    assert now < plan["full_deadline"] < now + 400
    assert abs((plan["full_deadline"] - now) / 400 - plan["predicted_s"]["full"] / used) < 0.01
    assert script.plan_iterations({**spec, "iterations": 12}, 8.0, 24.0, 5.0, 10.0, now)["iterations"] == 12
    settings = script.speed_settings("auto", cuda=True)
    assert settings == [("fp32", False), ("bf16_cl", False), ("bf16_cl", True)]
    assert script.speed_settings("auto", cuda=False) == script.speed_settings("off", cuda=True) == settings[:2]
    rates = {("fp32", False, "full"): 9.0, ("fp32", False, "sup"): 20.0, ("bf16_cl", False, "full"): 5.0,
             ("bf16_cl", False, "sup"): 15.0, ("bf16_cl", True, "full"): 7.0, ("bf16_cl", True, "sup"): 16.0}
    assert script.choose_speed(settings, rates, "bf16_cl", False) == ("bf16_cl", True)  # the speed options first
    del rates[("bf16_cl", True, "sup")]
    assert script.choose_speed(settings, rates, "bf16_cl", False) == ("bf16_cl", False)  # measured for both rows
    fp32_only = {k: v for k, v in rates.items() if k[0] == "fp32"}
    assert script.choose_speed(settings, fp32_only, "bf16_cl", False) == ("fp32", False)
    assert script.choose_speed(settings, {}, "bf16_cl", True) == ("bf16_cl", True)
    slow = script.plan_iterations(spec, full_rate=0.01, sup_rate=0.01, val_s=5.0, build_s=10.0, now=now)
    assert slow["iterations"] == 100  # min_iterations: the deadline then stops the runs
    assert script.parse_set("patch_size=[32,32,16] amp=false mu1=0.1") == {
        "patch_size": [32, 32, 16], "amp": "false", "mu1": 0.1}  # fmt: skip


def _toy_wheel(folder: Path) -> Path:
    """A pure-Python wheel ``toy_carried`` (module value 7) with a ``tests`` folder, as a carried wheel would be."""
    folder.mkdir()
    path = folder / "toy_carried-0.1-py3-none-any.whl"
    info = "toy_carried-0.1.dist-info"
    files = {
        "toy_carried/__init__.py": "VALUE = 7\n",
        "toy_carried/tests/test_big.py": "DATA = 1\n",
        f"{info}/METADATA": "Metadata-Version: 2.1\nName: toy-carried\nVersion: 0.1\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{info}/RECORD"] = "".join(f"{name},,\n" for name in [*files, f"{info}/RECORD"])
    with zipfile.ZipFile(path, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
    return folder


def test_carried_wheels_and_site_archives_are_installed_and_importable(tmp_path, monkeypatch):
    script, pack_site = _load("gpu_paper_scale"), _load("pack_site")
    monkeypatch.setattr(sys, "path", list(sys.path))
    wheels = _toy_wheel(tmp_path / "wheels")
    archive = pack_site.main(["--wheels", str(wheels), "--dst", str(tmp_path / "data" / "site.tar.xz")])
    assert archive["wheels"] == ["toy_carried-0.1-py3-none-any.whl"] and archive["files"] == 4  # tests left out
    with open(tmp_path / "progress.log", "w") as log:
        clock = script.Clock(log)
        assert script.install_wheels(tmp_path / "absent", tmp_path / "site0", clock) == []
        names = script.install_wheels(wheels, tmp_path / "site", clock)
        assert names == ["toy_carried-0.1-py3-none-any.whl"]
        assert importlib.import_module("toy_carried").VALUE == 7
        sys.modules.pop("toy_carried")
        sys.path.remove(str(tmp_path / "site"))
        assert script.install_wheels(tmp_path / "data/site.tar.xz", tmp_path / "site2", clock) == [
            "toy_carried-0.1.dist-info"]  # fmt: skip
    assert importlib.import_module("toy_carried").__file__.startswith(str(tmp_path / "site2"))
    assert not (tmp_path / "site2/toy_carried/tests").exists()
    sys.modules.pop("toy_carried")


def test_gpu_script_runs_end_to_end_at_toy_size(tmp_path):
    """The device call's code path on CPU: unpacking, throughput, sizing, both trainings, the four evaluations, the
    half-precision weights split into parts, the summary."""
    pack_la = _load("pack_la")
    src = tmp_path / "src"
    cases = _la_like(src, 10, (36, 36, 20))
    pack_la.pack(str(src), str(tmp_path / "la.npz"), tail=4, max_mib=1.0)
    out = tmp_path / "out"
    cmd = [sys.executable, str(REPO / "experiments" / "gpu_paper_scale.py"), "--packed", str(tmp_path / "la.npz"),
           "--wheels", str(tmp_path / "no_site"), "--work", str(tmp_path / "work"), "--out", str(out),
           "--num_labeled", "4", "--num_test_holdout", "2", "--num_val_holdout", "2", "--throughput_iters", "1",
           "--throughput_warmup", "1", "--iterations", "4", "--val_rounds", "2", "--num_workers", "0",
           "--sw_batch_size", "2", "--log_every", "2", "--unpack_workers", "1", "--poll", "5", "--set", TOY_SET,
           "--part_mib", "1.5", "--weights_mib", "4", "--budget_s", "3000", "--eval_s", "600",
           "--cudnn_benchmark", "on"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["errors"] == [], summary["errors"]
    assert summary["split"] == {"labeled": 4, "unlabeled": 2, "selection": 2, "report": 2}
    assert summary["unpack"]["cases"] == 10 and summary["environment"]["mamba_ssm_kernel"] in (True, False)
    measured = ["full_fp32", "sup_fp32", "full_bf16_cl_bench", "sup_bf16_cl_bench"]
    assert [t["name"] for t in summary["throughput"]] == measured
    assert all(t["its_per_s"] > 0 for t in summary["throughput"])
    assert "validation_s" in summary["throughput"][2]
    plan = summary["plan"]
    assert plan["iterations"] == 4 and plan["speed"] == "bf16_cl" and plan["cudnn_benchmark"] is True
    assert plan["validation_s"] == summary["throughput"][2]["validation_s"]
    for row in ("full", "sup"):
        info = summary["rows"][row]
        assert info["train"]["iterations"] == 4 and not info["train"]["stopped_at_deadline"]
        assert info["train"]["selected_iteration"] in (2, 4)
        for kind in ("last", "selected"):
            assert sorted(info[kind]["cases"]) == sorted(cases[-2:]), info[kind]
            assert 0.0 <= info[kind]["mean"]["dice"] <= 1.0
    for kind in ("last", "selected"):
        diffs = [summary["rows"]["full"][kind]["cases"][c]["dice"] - summary["rows"]["sup"][kind]["cases"][c]["dice"]
                 for c in cases[-2:]]  # fmt: skip
        assert summary["comparison"][kind]["dice"]["mean_diff"] == round(sum(diffs) / 2, 4)
    names = sorted(p.name for p in out.iterdir())
    parts = summary["weights"]["files"]
    assert len(names) <= 8 and len(parts) > 1 and set(names) == {
        "summary.json", "summary.md", "progress.log", "logs.tar.gz", *parts}  # fmt: skip
    joined = tmp_path / "weights.pt"
    joined.write_bytes(b"".join((out / p).read_bytes() for p in sorted(parts)))
    weights = torch.load(joined, weights_only=True)
    assert list(weights) == summary["weights"]["keys"] == ["full_selected", "full_last"]  # 2 x 1.8 MiB: no more
    assert summary["weights"]["left_out"] == ["sup_selected", "sup_last"]
    assert all(v.dtype == torch.float16 for sd in weights.values() for v in sd.values() if v.is_floating_point())
    with tarfile.open(out / "logs.tar.gz") as tar:
        logs = set(tar.getnames())
    assert {"worker.log", "full/train.log", "sup/eval_last.log", "full/eval_selected_metrics.csv"} <= logs
    assert "| full | 4 / 4 |" in (out / "summary.md").read_text()
