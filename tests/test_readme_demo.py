"""The README's demo figures are the demo's: its tables are in the form ``demo_table`` prints, and (``demo``-marked, run
by ``.ci/run``; deselected by default, about 4 minutes on 2 cores) a fresh full-size demo prints exactly one of them.
The README records one table per kind of CPU that printed it: the last digits depend on the CPU's vector kernels."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from diffcl_algo.demo import demo, demo_table

README = Path(__file__).resolve().parents[1] / "README.md"
ROW = re.compile(r"^(.+?)\s+(\d\.\d{4})\s+(\d\.\d{4})\s+(\d+\.\d{2})\s+(\d+\.\d{2})$")


def readme_tables() -> list[str]:
    """The code blocks of the README that hold the demo's printed table (one per kind of CPU measured)."""
    blocks = re.findall(r"```\n(model .*?)\n```", README.read_text(), flags=re.S)
    assert 1 <= len(blocks) <= 2, "the README should quote the demo's table once per kind of CPU measured"
    return blocks


def test_readme_tables_are_the_demo_format():
    for table in readme_tables():
        header, *rows = table.splitlines()
        num_test = int(re.search(r"\((?:synthetic test set), (\d+) cases\)", header).group(1))
        models = {}
        for row in rows:
            name, dice, jaccard, hd95, asd = ROW.match(row).groups()
            models[name] = {"dice": float(dice), "jaccard": float(jaccard), "hd95": float(hd95), "asd": float(asd)}
        assert list(models) == ["Diff-CL", "Supervised only"]
        assert demo_table(models, num_test) == table


@pytest.mark.demo
def test_readme_figures_are_a_fresh_demo_run(tmp_path, capsys):
    demo(output_dir=str(tmp_path / "demo"))
    printed = capsys.readouterr().out
    assert any(table in printed for table in readme_tables()), f"no README table is this demo run's:\n{printed}"
