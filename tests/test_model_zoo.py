"""Model-zoo sharing of the bundles (docs/bundles.md, "Sharing on the model zoo").

The checks of model-zoo's ``ci/verify_bundle.py -m full`` through the MONAI functions it calls: metadata against
the offline model-zoo schema (``verify_metadata``, no download), network input / output (``verify_net_in_out``),
TorchScript export of ``models/model.pt`` (``ckpt_export``, which scripts the CS with HF-Mamba's portable
selective scan) giving the eager network's output; and ``python -m diffcl_algo package``: a zip that verifies,
exports and segments from another directory, and clear errors for bad inputs. Everything runs outside the repository.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from monai.bundle import ConfigParser, ConfigWorkflow, ckpt_export, verify_metadata, verify_net_in_out

from diffcl_algo.bundle.package import file_md5, package
from diffcl_algo.convert import make_synthetic_dataset
from diffcl_algo.networks import Mamba, VNet

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO.parent / "shared" / "reference" / "model-zoo" / "meta_schema_20240725.json"
BUNDLES = ("la", "brats", "pancreas")
LA = REPO / "bundles" / "la"
TINY = {"n_filters": 4}  # network values of the tiny checkpoints
SMALL_INPUT = {"_meta_#network_data_format#inputs#image#spatial_shape": [32, 32, 32]}
ZIP_FILES = {
    "LICENSE",
    "large_files.yml",
    "docs/README.md",
    "models/model.pt",
    "configs/metadata.json",
    "configs/logging.conf",
    "configs/train.yaml",
    "configs/evaluate.yaml",
    "configs/inference.yaml",
    "configs/multi_gpu_train.yaml",
}


@pytest.fixture(autouse=True)
def _elsewhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the bundles are self-contained: no working directory is needed


def _files(bundle: str) -> dict[str, str]:
    root = str(REPO / "bundles" / bundle)
    return {
        "meta_file": f"{root}/configs/metadata.json",
        "config_file": f"{root}/configs/inference.yaml",
        "bundle_root": root,
    }


def _network(config_file: str, meta_file: str, **override) -> torch.nn.Module:
    parser = ConfigParser()
    parser.read_config(config_file)
    parser.read_meta(meta_file)
    for key, value in override.items():
        parser[key] = value
    return parser.get_parsed_content("network_def")


def _tiny_ckpt(bundle: str, path: Path, seed: int = 0) -> Path:
    """Random-initialised CS weights of ``network_def`` with ``TINY`` values (as a training run writes them)."""
    files = _files(bundle)
    torch.manual_seed(seed)
    torch.save(_network(files["config_file"], files["meta_file"], **TINY).state_dict(), path)
    return path


def _file_macros(value: Any) -> list[str]:
    """Macros of a config that name another file (``"%file#id"``; ``"%#id"`` names the config itself)."""
    if isinstance(value, dict):
        return [m for v in value.values() for m in _file_macros(v)]
    if isinstance(value, list):
        return [m for v in value for m in _file_macros(v)]
    return [value] if isinstance(value, str) and value.startswith("%") and not value.startswith("%#") else []


def _schema(tmp_path: Path) -> tuple[str, str]:
    if not SCHEMA.is_file():
        pytest.skip(f"{SCHEMA} not available")
    local = tmp_path / "schema.json"
    shutil.copyfile(SCHEMA, local)
    return str(local), hashlib.md5(SCHEMA.read_bytes()).hexdigest()


# ------------------------------------------------------------------ repository bundles


@pytest.mark.parametrize("bundle", BUNDLES)
def test_metadata_verifies_against_the_offline_schema(bundle, tmp_path):
    schema, md5 = _schema(tmp_path)
    meta = _files(bundle)["meta_file"]
    # an existing file whose md5 matches is used as it is: nothing is downloaded
    verify_metadata(meta_file=meta, filepath=schema, hash_val=md5, hash_type="md5")

    broken = ConfigParser.load_config_file(meta)
    del broken["network_data_format"]
    ConfigParser.export_config_file(broken, str(tmp_path / "metadata.json"))
    with pytest.raises(ValueError, match="network_data_format"):
        verify_metadata(meta_file=str(tmp_path / "metadata.json"), filepath=schema, hash_val=md5, hash_type="md5")


def test_verify_net_in_out_at_the_metadata_shape():
    """The LA network as configured (n_filters 16, HF-Mamba) on the metadata's 112x112x80 patch (~10 s on CPU)."""
    verify_net_in_out(net_id="network_def", device="cpu", **_files("la"))


@pytest.mark.parametrize("bundle", ("brats", "pancreas"))
def test_verify_net_in_out_small(bundle):
    verify_net_in_out(net_id="network_def", device="cpu", **_files(bundle), **TINY, **SMALL_INPUT)
    with pytest.raises(ValueError, match="output channel number"):  # the check fails when the network disagrees
        verify_net_in_out(net_id="network_def", device="cpu", **_files(bundle), **TINY, **SMALL_INPUT, num_classes=3)


def test_ckpt_export_torchscript_equals_eager(tmp_path):
    files = _files("la")
    ckpt = _tiny_ckpt("la", tmp_path / "model.pt")
    ckpt_export(net_id="network_def", filepath=str(tmp_path / "model.ts"), ckpt_file=str(ckpt), **files, **TINY)

    extra = {"metadata.json": "", "inference.json": ""}
    scripted = torch.jit.load(str(tmp_path / "model.ts"), _extra_files=extra)
    assert ConfigParser.load_config_file(files["meta_file"])["version"] in extra["metadata.json"].decode()
    assert "network_def" in extra["inference.json"].decode()
    eager = _network(files["config_file"], files["meta_file"], **TINY)
    eager.load_state_dict(torch.load(ckpt, weights_only=True))
    eager.eval()
    assert len(eager.hfm) == 1  # the export includes HF-Mamba and its selective scan
    gen = torch.Generator().manual_seed(0)
    for shape in ((1, 1, 32, 32, 32), (2, 1, 64, 32, 16)):  # scripting is not specialised to one shape
        x = torch.rand(shape, generator=gen)
        with torch.no_grad():
            expected, got = eager(x), scripted(x)
        assert got.shape == (shape[0], 2, *shape[2:])
        assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ TorchScript of the networks


def test_scripted_vnet_matches_eager_and_keeps_input_checks():
    torch.manual_seed(0)
    net = VNet(n_filters=4, hfm_stages=(3, 5)).eval()
    scripted = torch.jit.script(net)
    x = torch.randn(1, 1, 32, 32, 48)
    with torch.no_grad():
        assert torch.allclose(scripted(x), net(x), rtol=1e-5, atol=1e-6)
        logits, features = scripted(x, return_features=True)
        ref_logits, ref_features = net(x, return_features=True)
    assert torch.allclose(logits, ref_logits, rtol=1e-5, atol=1e-6)
    assert torch.allclose(features, ref_features, rtol=1e-5, atol=1e-6)
    with pytest.raises(Exception, match=r"divisible by 16.*\(33, 32, 48\)"), torch.no_grad():
        scripted(torch.randn(1, 1, 33, 32, 48))


@pytest.mark.parametrize("length", (1, 10))  # one step; 3 chunks of 4 with 2 padded steps
def test_scripted_mamba_matches_eager_with_gradients(length):
    torch.manual_seed(0)
    mamba = Mamba(d_model=8)
    scripted = torch.jit.script(mamba)
    x = torch.randn(2, length, 8)
    with torch.no_grad():
        assert torch.allclose(scripted(x), mamba(x), rtol=1e-5, atol=1e-6)
    # with gradients TorchScript uses the autograd form of the scan; the eager one has a hand-written backward
    grads = []
    for module in (mamba, scripted):
        mamba.zero_grad()
        x_grad = x.clone().requires_grad_()
        module(x_grad).square().sum().backward()
        # (a parameter without effect, A_log when length is 1, gets None from autograd and zeros from the eager scan)
        grads.append(
            [x_grad.grad] + [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in mamba.parameters()]
        )
    for eager_grad, scripted_grad in zip(*grads):
        assert torch.allclose(scripted_grad, eager_grad, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------ package


def test_package_round_trip(tmp_path, monkeypatch):
    ckpt = _tiny_ckpt("la", tmp_path / "model.pt")
    out = tmp_path / "dist" / "la_bundle.zip"
    assert package(str(LA), str(ckpt), str(out), **TINY) == str(out)

    with zipfile.ZipFile(out) as archive:
        names = set(archive.namelist())
        assert ZIP_FILES <= {n.removeprefix("diffcl_la/") for n in names}
        assert all(n.startswith("diffcl_la/") for n in names)
        assert archive.read("diffcl_la/models/model.pt") == ckpt.read_bytes()
        archive.extractall(tmp_path / "elsewhere")
    bundle = tmp_path / "elsewhere" / "diffcl_la"
    for config in [*(bundle / "configs").glob("*.yaml"), *(LA / "configs").glob("*.yaml")]:
        assert _file_macros(yaml.safe_load(config.read_text())) == [], config
    inference = yaml.safe_load((bundle / "configs" / "inference.yaml").read_text())
    assert inference["bundle_root"] == "." and inference["n_filters"] == 4 and "network_def" in inference
    large = yaml.safe_load((bundle / "large_files.yml").read_text())["large_files"]
    assert large == [{"path": "models/model.pt", "url": "", "hash_val": file_md5(ckpt), "hash_type": "md5"}]

    # same inputs, same bytes (fixed member times); --overwrite replaces
    first = out.read_bytes()
    package(str(LA), str(ckpt), str(out), overwrite=True, **TINY)
    assert out.read_bytes() == first

    monkeypatch.chdir(bundle)
    from monai.bundle import download_large_files

    download_large_files(bundle_path=".")  # md5 of the present models/model.pt checked, nothing downloaded
    files = {"meta_file": "configs/metadata.json", "config_file": "configs/inference.yaml", "bundle_root": "."}
    if SCHEMA.is_file():
        schema, md5 = _schema(tmp_path)
        verify_metadata(meta_file=files["meta_file"], filepath=schema, hash_val=md5, hash_type="md5")
    verify_net_in_out(net_id="network_def", device="cpu", **files, **SMALL_INPUT)
    ckpt_export(net_id="network_def", **files)  # default paths: models/model.pt -> models/model.ts
    scripted = torch.jit.load("models/model.ts")
    eager = _network(files["config_file"], files["meta_file"])
    eager.load_state_dict(torch.load("models/model.pt", weights_only=True))
    x = torch.rand(1, 1, 32, 32, 32)
    with torch.no_grad():
        assert torch.allclose(scripted(x), eager.eval()(x), rtol=1e-5, atol=1e-6)

    data = make_synthetic_dataset(tmp_path / "data", num_cases=4, shape=(36, 34, 20), seed=1, kind="la")
    workflow = ConfigWorkflow(
        config_file="configs/inference.yaml",
        workflow_type="infer",
        run_id="inferring",
        dataset_dir=str(data),
        output_dir=str(tmp_path / "pred"),
        patch_size=[32, 32, 16],
        strides=[16, 16, 8],
        device="cpu",
    )
    workflow.initialize()
    assert workflow.check_properties() == []
    workflow.run()
    workflow.finalize()
    cases = [line for line in (data / "test.list").read_text().split() if line]
    assert sorted(p.name for p in (tmp_path / "pred").iterdir()) == sorted(f"{c}.nii.gz" for c in cases)


def _no_output(out: Path) -> None:
    assert not out.exists()
    assert not out.parent.exists() or not list(out.parent.glob(f".{out.name}.*"))  # no temporary left behind


def test_package_errors(tmp_path):
    out = tmp_path / "dist" / "bundle.zip"
    missing = tmp_path / "runs" / "model.pt"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        package(str(LA), str(missing), str(out))
    with pytest.raises(FileNotFoundError, match=r"bundles/nope.*metadata\.json"):
        package(str(REPO / "bundles" / "nope"), str(missing), str(out))

    tiny = _tiny_ckpt("la", tmp_path / "tiny.pt")
    with pytest.raises(ValueError, match=rf"{re.escape(str(tiny))}.*does not match network_def.*shape mism") as error:
        package(str(LA), str(tiny), str(out))  # trained with n_filters 4, packaged with the default 16
    assert "n_filters" in str(error.value)
    _no_output(out)

    state = torch.load(tiny, weights_only=True)
    torch.save({k: v for k, v in state.items() if not k.startswith("hfm.")}, tmp_path / "no_hfm.pt")
    with pytest.raises(ValueError, match=r"no_hfm\.pt.*missing keys [1-9]\d* \['hfm\.5\."):
        package(str(LA), str(tmp_path / "no_hfm.pt"), str(out), **TINY)
    torch.save({"cs_network": state, "iteration": 3}, tmp_path / "train_state.pt")
    with pytest.raises(ValueError, match=r"train_state\.pt.*train_state"):
        package(str(LA), str(tmp_path / "train_state.pt"), str(out), **TINY)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"junk\.pt.*not a readable torch file"):
        package(str(LA), str(tmp_path / "junk.pt"), str(out), **TINY)
    with pytest.raises(ValueError, match=r"Unknown config ids \['n_filter'\]"):
        package(str(LA), str(tiny), str(out), n_filter=4)
    _no_output(out)

    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(b"previous")
    with pytest.raises(FileExistsError, match="--overwrite"):
        package(str(LA), str(tiny), str(out), **TINY)
    assert out.read_bytes() == b"previous"


def test_package_command_line(tmp_path):
    ckpt = _tiny_ckpt("pancreas", tmp_path / "model.pt")
    out = tmp_path / "pancreas_bundle.zip"
    command = [sys.executable, "-m", "diffcl_algo", "package", "--bundle", str(REPO / "bundles" / "pancreas")]
    command += ["--ckpt_path", str(ckpt), "--output", str(out), "--name", "pancreas_diffcl", "--n_filters", "4"]
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    with zipfile.ZipFile(out) as archive:
        assert ZIP_FILES <= {n.removeprefix("pancreas_diffcl/") for n in archive.namelist()}
