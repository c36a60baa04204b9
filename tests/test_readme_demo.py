"""The README's demo figures are the demo's: its table is the one ``demo_table`` prints, and (``demo``-marked, run by
``.ci/run``; deselected by default, about 4 minutes on 2 cores) a fresh full-size demo prints exactly that table."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from diffcl_algo.demo import demo, demo_table

README = Path(__file__).resolve().parents[1] / "README.md"
ROW = re.compile(r"^(.+?)\s+(\d\.\d{4})\s+(\d\.\d{4})\s+(\d+\.\d{2})\s+(\d+\.\d{2})$")


def readme_table() -> str:
    """The code block of the README that holds the demo's printed table."""
    blocks = re.findall(r"```\n(model .*?)\n```", README.read_text(), flags=re.S)
    assert len(blocks) == 1, "the README should quote the demo's table exactly once"
    return blocks[0]


def test_readme_table_is_the_demo_format():
    header, *rows = readme_table().splitlines()
    num_test = int(re.search(r"\((?:synthetic test set), (\d+) cases\)", header).group(1))
    models = {}
    for row in rows:
        name, dice, jaccard, hd95, asd = ROW.match(row).groups()
        models[name] = {"dice": float(dice), "jaccard": float(jaccard), "hd95": float(hd95), "asd": float(asd)}
    assert list(models) == ["Diff-CL", "Supervised only"]
    assert demo_table(models, num_test) == readme_table()


@pytest.mark.demo
def test_readme_figures_are_a_fresh_demo_run(tmp_path, capsys):
    demo(output_dir=str(tmp_path / "demo"))
    printed = capsys.readouterr().out
    assert readme_table() in printed, f"README table differs from this demo run:\n{printed}"
