"""Reliability: checkpoints are untrusted input. Every ``torch.load`` of the package and the bundles uses
``weights_only=True``; a pickled object that would run code is refused, not executed (docs/reliability.md, item 4)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch
from ignite.engine import Engine
from monai.handlers import CheckpointLoader

from diffcl_algo.networks import VNet
from diffcl_algo.training.checkpoint import TRAIN_STATE_KEYS, TrainStateLoader, load_train_state

ROOT = Path(__file__).resolve().parents[1]


def _torch_loads(tree: ast.AST) -> list[ast.Call]:
    """``torch.load(...)`` / ``torch.serialization.load(...)`` / ``load(...)`` imported from torch."""
    from_torch = {
        alias.asname or alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module in ("torch", "torch.serialization")
        for alias in node.names
        if alias.name == "load"
    }
    calls = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = ast.unparse(node.func)
            if name in ("torch.load", "torch.serialization.load") or name in from_torch:
                calls.append(node)
    return calls


def test_every_torch_load_uses_weights_only():
    offenders, found = [], 0
    for path in sorted((ROOT / "diffcl_algo").rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for call in _torch_loads(tree):
            found += 1
            safe = any(
                k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                for k in call.keywords
            )
            if not safe:
                offenders.append(f"{path.relative_to(ROOT)}:{call.lineno}: {ast.unparse(call)}")
        for node in ast.walk(tree):  # raw pickle would bypass weights_only altogether
            if isinstance(node, ast.Call) and ast.unparse(node.func) in ("pickle.load", "pickle.loads"):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
    for path in sorted((ROOT / "bundles").rglob("*.yaml")) if (ROOT / "bundles").is_dir() else ():
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"torch\.load\(", line) and "weights_only=True" not in line:
                offenders.append(f"{path.relative_to(ROOT)}:{lineno}: {line.strip()}")
    assert found >= 1  # checkpoint.load_train_state: the scan does see the package's loads
    assert not offenders, "torch.load without weights_only=True:\n" + "\n".join(offenders)


class _Payload:
    """Unpickling this runs ``open(marker, "w")``: stands for arbitrary code in a crafted checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_malicious_train_state_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "train_state.pt"
    state = {key: 0 for key in TRAIN_STATE_KEYS}
    state["cs_network"] = {"weight": _Payload(marker)}
    torch.save(state, path)
    with pytest.raises(RuntimeError, match=f"train state file {str(path)!r} is unreadable") as info:
        load_train_state(path)
    assert "Weights only load failed" in str(info.value)
    with pytest.raises(RuntimeError, match="unreadable"):
        TrainStateLoader(path).attach(None)  # the resume path (--resume) reads through load_train_state
    assert not marker.exists(), "the payload was executed"


def test_malicious_model_pt_is_refused(tmp_path):
    """The bundles (evaluate / inference) read model.pt with MONAI's CheckpointLoader, which uses weights_only=True."""
    marker = tmp_path / "pwned"
    net = VNet(3, 1, 2, n_filters=4)
    good, bad = tmp_path / "model.pt", tmp_path / "evil.pt"
    torch.save(net.state_dict(), good)
    torch.save({**net.state_dict(), "extra": _Payload(marker)}, bad)
    engine = Engine(lambda e, b: None)
    CheckpointLoader(load_path=str(good), load_dict={"model": net}, map_location="cpu")(engine)  # a real one loads
    with pytest.raises(Exception, match="Weights only load failed"):
        CheckpointLoader(load_path=str(bad), load_dict={"model": net}, map_location="cpu")(engine)
    with pytest.raises(Exception, match="Weights only load failed"):
        torch.load(bad, weights_only=True)
    assert not marker.exists(), "the payload was executed"
