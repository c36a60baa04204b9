"""The device grid of the CPU protocol (``experiments/gpu_grid.py``, docs/gpu.md): job naming and progress parsing,
and the pool's time keeping with stand-in jobs (no GPU, no training)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "experiments"))

import gpu_grid  # noqa: E402
from gpu_paper_scale import Clock  # noqa: E402


def test_jobs_follow_the_plan_and_name_la_cpu_folders():
    jobs = gpu_grid.expand((("sup", 4, (0, 1), 0), ("full", 8, (2,), 1)))
    assert [gpu_grid.job_key(j) for j in jobs] == ["sup/l4_s0", "sup/l4_s1", "full/l8_s2_f1"]
    cmd = gpu_grid.job_command(jobs[2], Path("/r"))
    assert cmd[1].endswith("experiments/la_cpu.py") and cmd[2:4] == ["run", "full"]
    assert cmd[cmd.index("--fold") + 1] == "1" and cmd[cmd.index("--ds_eval_steps") + 1] == "10"
    assert cmd[-1] == "--monitor"  # the full row logs its pseudo-labels (experiments/monitor.yaml)
    dry = gpu_grid.job_command(jobs[0], Path("/r"), "max_iterations=8")
    assert dry[dry.index("--set") + 1] == "max_iterations=8"  # added to the row's own overrides (none for sup)
    assert "--monitor" not in dry


def test_iterations_done_reads_the_last_train_log_line(tmp_path):
    assert gpu_grid.iterations_done(tmp_path) == 0
    (tmp_path / "train.log").write_text(
        "x INFO: Epoch: 1/50, Iter: 26/26 -- loss: 1\ny validation\nz INFO: Epoch: 3/50, Iter: 10/26 -- loss: 0.5\n"
    )
    assert gpu_grid.iterations_done(tmp_path) == 2 * 26 + 10


@pytest.fixture
def stand_in_jobs(monkeypatch):
    """Each job a Python process that sleeps its seed in seconds, then writes ``summary.json`` (a scored run)."""

    def command(job: dict, root: Path, extra: str = "") -> list[str]:
        run_dir = root / gpu_grid.job_key(job)
        script = (f"import time, pathlib; p = pathlib.Path({str(run_dir)!r}); p.mkdir(parents=True, exist_ok=True); "
                  f"time.sleep({job['seed']}); (p / 'summary.json').write_text('{{}}')")  # fmt: skip
        return [sys.executable, "-c", script]

    monkeypatch.setattr(gpu_grid, "job_command", command)


def test_pool_scores_what_fits_and_stops_the_rest_at_the_deadline(tmp_path, stand_in_jobs):
    jobs = gpu_grid.expand((("sup", 4, (1, 30, 2), 0),))  # quick, too slow, quick
    with open(tmp_path / "progress.log", "w") as log:
        clock = Clock(log)
        pool = gpu_grid.Pool(jobs, tmp_path / "runs", slots=2, deadline=time.monotonic() + 8, first_guess=1.0,
                             env=None, clock=clock, logs=tmp_path)  # fmt: skip
        finished = pool.run(poll=1.0)
    status = {k: v["status"] for k, v in finished.items()}
    assert status == {"sup/l4_s1": "scored", "sup/l4_s30": "stopped at the deadline", "sup/l4_s2": "scored"}
    assert list(finished) == ["sup/l4_s1", "sup/l4_s2", "sup/l4_s30"]  # the third started when the first ended
    assert not (tmp_path / "runs" / "sup" / "l4_s30" / "summary.json").exists()
    assert json.loads(json.dumps(finished))  # what the script writes as jobs.json


def test_pool_starts_nothing_that_cannot_end_in_time(tmp_path, stand_in_jobs):
    jobs = gpu_grid.expand((("sup", 4, (1,), 0), ("full", 4, (1,), 0)))
    with open(tmp_path / "progress.log", "w") as log:
        pool = gpu_grid.Pool(jobs, tmp_path / "runs", slots=1, deadline=time.monotonic() + 30, first_guess=60.0,
                             env=None, clock=Clock(log), logs=tmp_path)  # fmt: skip
        finished = pool.run(poll=1.0)
    assert {k: v["status"] for k, v in finished.items()} == {
        "sup/l4_s1": "not started: no time left",
        "full/l4_s1": "not started: no time left",
    }


def test_packed_half_resolution_la_is_unpacked_where_the_protocol_reads(tmp_path):
    import h5py
    import numpy as np
    import pack_la

    from diffcl_algo.convert.synthetic import make_synthetic_dataset

    assert gpu_grid.protocol_dataset_dir() == REPO / "data/LA_half"  # cpu.yaml's dataset_dir
    # synthetic cases have more than 256 distinct values, as the resampled half-resolution ones do
    src = make_synthetic_dataset(tmp_path / "half", num_cases=4, shape=(24, 20, 16), seed=4, num_test=1)
    pack_la.pack(str(src), str(tmp_path / "half.npz"))
    with open(tmp_path / "progress.log", "w") as log:
        gpu_grid.unpack_dataset(tmp_path / "half.npz", tmp_path / "out", Clock(log))
    assert "unpacked 3 cases into" in (tmp_path / "progress.log").read_text()
    assert (tmp_path / "out/train.list").read_text().split() == (src / "train.list").read_text().split()
    for case in (src / "train.list").read_text().split():
        layout = Path("2018LA_Seg_Training Set") / case / "mri_norm2.h5"
        with h5py.File(src / layout) as a, h5py.File(tmp_path / "out" / layout) as b:
            assert np.array_equal(a["image"][:], b["image"][:]) and np.array_equal(a["label"][:], b["label"][:])
