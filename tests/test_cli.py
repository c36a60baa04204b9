"""Command line (diffcl_algo.cli, diffcl_algo.bundle.run): help for every command, checked bundle options, one-line
errors for the bad inputs a user meets first."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from diffcl_algo.bundle.expressions import check_override_ids
from diffcl_algo.bundle.run import default_num_threads
from diffcl_algo.cli import COMMANDS, docstring_args, main
from diffcl_algo.utils import parse_overrides, parse_value

REPO = Path(__file__).resolve().parents[1]
LA = "bundles/la/configs"


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch):
    monkeypatch.chdir(REPO)  # the commands below name the bundles as a user in the repository root does


def _last_line(text: str) -> str:
    return [line for line in text.splitlines() if line.strip()][-1]


def test_values_and_overrides():
    assert parse_value("4") == 4 and parse_value("1e-3") == 0.001 and parse_value("[48, 48, 32]") == [48, 48, 32]
    assert parse_value("true") is True and parse_value("null") is None and parse_value("none") == "none"
    assert parse_value("data/LA") == "data/LA" and parse_value("$@a + 1") == "$@a + 1"
    assert parse_overrides(["--a", "1", "--b=x", "--c#d", "[1]"]) == {"a": 1, "b": "x", "c#d": [1]}
    with pytest.raises(ValueError, match="option --a needs a value"):
        parse_overrides(["--a", "--b", "1"])


def test_docstring_args():
    def f(a: int, b: int = 1, c: int = 2) -> None:
        """Do it.

        Args:
            a: first,
                continued.
            b, c: both.
        """

    assert docstring_args(f) == ("Do it.", {"a": "first, continued.", "b": "both.", "c": "both."})


def test_top_level_help_runs_as_module():
    out = subprocess.run([sys.executable, "-m", "diffcl_algo", "--help"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: python -m diffcl_algo")
    for name in COMMANDS:
        assert f"    {name} " in out.stdout


@pytest.mark.parametrize(
    "command,options",
    [
        ("demo", ["--output_dir", "--iterations", "training iterations per model"]),
        ("prepare", ["dataset", "--src", "--dst", "Other --<name> <value> options are passed on"]),
        ("report", ["--run_dir", "--eval_dir", "--smoothing"]),
        ("package", ["--bundle", "--ckpt_path", "--output"]),
        ("bundles", ["--bundles_dir", "--check", "write nothing; raise if a file differs"]),
        ("run", ["run_id", "--config_file", "--num_threads", "Give --config_file with --help"]),
    ],
)
def test_command_help(command, options, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: python -m diffcl_algo {command}")
    for option in options:
        assert option in out, option


def test_run_help_lists_the_configs_options(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help", "--config_file", f"{LA}/train.yaml"])
    out = capsys.readouterr().out
    assert f"options of {LA}/train.yaml" in out
    assert "--num_labeled 8    # first N training cases keep their label" in out
    assert "  --max_iterations $int(@num_epochs) * @train#epoch_length\n" in out  # MONAI's '#' is not a comment


def test_run_help_shows_whole_values_and_comments(tmp_path, capsys):
    config = tmp_path / "train.yaml"
    config.write_text(
        "steps: $int(@epochs) * @train#epoch_length\n"
        "name: 'a # b'                 # quoted: its '#' is text\n"
        "scale: null                   # first line of the comment (0.0: starts\n"
        "                              #   as the plain one; null: as printed)\n"
        "# a section comment\n"
        "rate: 0.1  # one line\n"
        "                # not this (another column)\n"
        "common:\n"
        "  nested: 1\n"
    )
    with pytest.raises(SystemExit):
        main(["run", "--help", "--config_file", str(config)])
    lines = capsys.readouterr().out.splitlines()
    options = lines[lines.index(f"options of {config} (--<id> <value>):") + 1 :]
    assert options[:4] == [
        "  --steps $int(@epochs) * @train#epoch_length",
        "  --name 'a # b'    # quoted: its '#' is text",
        "  --scale null    # first line of the comment (0.0: starts as the plain one; null: as printed)",
        "  --rate 0.1    # one line",
    ]
    assert not any("nested" in line or "common" in line for line in options)


def test_misspelled_override_stops_at_start(tmp_path, capsys):
    out_dir = tmp_path / "run"
    code = main(
        ["run", "training", "--config_file", f"{LA}/train.yaml", "--num_labled", "4", "--output_dir", str(out_dir)]
    )
    assert code == 1
    assert _last_line(capsys.readouterr().err) == (
        f"error: unknown option --num_labled: {LA}/train.yaml has no id 'num_labled'; did you mean --num_labeled?"
    )
    assert not out_dir.exists()
    with pytest.raises(ValueError, match="has no id 'train#trainr'; did you mean --train#trainer"):
        check_override_ids({"train": {"trainer": {"max_epochs": 1}}}, ["train#trainr#max_epochs"], "x.yaml")
    check_override_ids({"train": {"trainer": {"max_epochs": 1}}}, ["train#trainer#max_epochs"], "x.yaml")


def test_missing_dataset_is_one_line(tmp_path, capsys):
    code = main(
        [
            "run",
            "training",
            "--config_file",
            f"{LA}/train.yaml",
            "--dataset_dir",
            "no/such/LA",
            "--output_dir",
            str(tmp_path / "run"),
        ]
    )
    assert code == 1
    last = _last_line(capsys.readouterr().err)
    assert last.startswith(
        f"error: dataset directory no/such/LA does not exist (looked for {REPO}/no/such/LA); "
        "pass the dataset folder with --dataset_dir <folder>; expected layout: <dataset_dir>/2018LA"
    )


def test_missing_checkpoint_fails_once_without_output(tmp_path):
    """As a user runs it (a fresh process): the message once, as the last line, and no output folder."""
    out_dir = tmp_path / "eval"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "diffcl_algo",
            "run",
            "evaluating",
            "--config_file",
            f"{LA}/evaluate.yaml",
            "--dataset_dir",
            "no/such/LA",
            "--ckpt_path",
            str(tmp_path / "model.pt"),
            "--output_dir",
            str(out_dir),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert out.returncode == 1
    message = (
        f"error: checkpoint {tmp_path / 'model.pt'} does not exist; pass the trained weights with "
        "--ckpt_path <model.pt> (the model.pt that training writes to its output_dir), or --bundle_root <bundle "
        "folder> for the weights a bundle ships in its models/"
    )
    assert _last_line(out.stderr) == message
    assert (out.stdout + out.stderr).count("does not exist") == 1
    assert not out_dir.exists()


def test_default_thread_count(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert default_num_threads() is None  # the user's setting stands
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    for load, threads in ((0.2, 8), (10.4, 6), (15.0, 1), (40.0, 1)):
        monkeypatch.setattr(os, "getloadavg", lambda load=load: (load, load, load))
        assert default_num_threads() == threads, load


def test_undeclared_options_are_keyword_arguments(monkeypatch):
    """Options a command does not declare go to its **kwargs (package's overrides, prepare's extras), even after
    declared ones, and never fill a positional."""
    import diffcl_algo.bundle.package

    seen = {}
    monkeypatch.setattr(
        diffcl_algo.bundle.package,
        "package",
        lambda bundle, ckpt_path, output, **kw: seen.update(bundle=bundle, ckpt_path=ckpt_path, output=output, **kw),
    )
    assert (
        main(
            [
                "package",
                "--bundle",
                "bundles/pancreas",
                "--ckpt_path",
                "m.pt",
                "--output",
                "x.zip",
                "--n_filters",
                "4",
                "--hfm_stages=[4, 5]",
            ]
        )
        == 0
    )
    assert seen == {
        "bundle": "bundles/pancreas",
        "ckpt_path": "m.pt",
        "output": "x.zip",
        "n_filters": 4,
        "hfm_stages": [4, 5],
    }
    with pytest.raises(SystemExit):
        main(["report", "--run_dir", "r", "--no_such_option", "1"])
