"""The CS supervision and the honest split: the field's loss form and plain stages (the reference recipe's),
per-volume intensity normalisation, the report split (``num_test_holdout``), one V-Net for the supervised row, the
pseudo-label monitor (``experiments/monitor.yaml``) and channels-last training."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from monai.bundle import ConfigParser
from tiny_settings import SMALL_TRAIN

from diffcl_algo.bundle.run import build_trainer
from diffcl_algo.convert.synthetic import make_synthetic_dataset
from diffcl_algo.data.transforms import train_transforms, val_transforms
from diffcl_algo.evaluation.metrics import foreground_dice
from diffcl_algo.losses import DiceCELoss
from diffcl_algo.networks import VNet

REPO = Path(__file__).resolve().parents[1]
LA = REPO / "bundles" / "la" / "configs"


def _field_dice_loss(score: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The field's ``dice_loss`` (UA-MT / SSL4MIS ``utils/losses.py``), copied from its published form."""
    smooth = 1e-5
    intersect = torch.sum(score * target)
    y_sum = torch.sum(target * target)
    z_sum = torch.sum(score * score)
    return 1 - (2 * intersect + smooth) / (z_sum + y_sum + smooth)


def test_field_loss_form_matches_the_field():
    torch.manual_seed(0)
    logits = torch.randn(2, 2, 8, 8, 4)
    label = (torch.rand(2, 1, 8, 8, 4) > 0.6).long()
    ours = DiceCELoss(include_background=False, squared_pred=True)(logits, label, ce_weight=0.5, dice_weight=0.5)
    soft = F.softmax(logits, dim=1)
    field = 0.5 * (F.cross_entropy(logits, label[:, 0]) + _field_dice_loss(soft[:, 1], (label[:, 0] == 1).float()))
    assert ours.item() == pytest.approx(field.item(), rel=1e-5)
    paper = DiceCELoss()(logits, label, ce_weight=0.02)
    assert paper.item() != pytest.approx(field.item(), rel=1e-2)


def test_normalize_intensity_z_scores_each_volume(tmp_path):
    root = make_synthetic_dataset(tmp_path / "la", num_cases=3, shape=(36, 34, 20), seed=1)
    case = next(p for p in sorted(root.rglob("*.h5")))
    item = {"image": str(case), "label": str(case)}
    raw = val_transforms()(dict(item))["image"]
    scaled = raw * 180 + 400  # the same anatomy at another intensity scale
    z = val_transforms(normalize=True)(dict(item))["image"]
    assert float(z.mean()) == pytest.approx(0.0, abs=1e-4) and float(z.std(unbiased=False)) == pytest.approx(1.0, 1e-3)
    expected = (scaled - scaled.mean()) / scaled.std(unbiased=False)
    assert torch.allclose(z.as_tensor(), expected.as_tensor(), atol=1e-3)
    patch = train_transforms((16, 16, 16), normalize=True)(dict(item))["image"]
    assert patch.shape == (1, 16, 16, 16) and float(patch.abs().max()) < 20


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    return str(make_synthetic_dataset(root / "la", num_cases=6, shape=(36, 34, 20), seed=0, num_test=2))


def test_supervised_row_trains_one_vnet(data_dir, tmp_path):
    trainer = build_trainer(
        dataset_dir=data_dir, max_iterations=2, output_dir=str(tmp_path), use_cps=False, use_hfm=False, use_cl=False,
        normalize_intensity=True, **dict(SMALL_TRAIN, val_interval=0)
    )
    ds_before = [p.detach().clone() for p in trainer.ds_network.parameters()]
    trainer.run()
    trainer.close()
    out = trainer.state.output
    assert out["loss_sup_ds"] == 0.0 and 0 < out["loss_sup_cs"] < 1.5
    assert all(torch.equal(a, b) for a, b in zip(ds_before, trainer.ds_network.parameters()))


def _parser(files, **overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(f) for f in files])
    parser.update(overrides)
    return parser


def test_report_split_is_never_trained_or_selected_on(tmp_path):
    root = make_synthetic_dataset(tmp_path / "la", num_cases=30, shape=(20, 20, 16), seed=2, num_test=1)
    os.remove(root / "test.list")  # as in the CPU protocol's copy of LA: the split comes from train.list alone
    names = (root / "train.list").read_text().split()
    train = _parser([LA / "train.yaml", LA / "cpu.yaml"], dataset_dir=str(root), num_labeled=4, check_data=False)
    labeled, unlabeled = train.get_parsed_content("data#labeled"), train.get_parsed_content("data#unlabeled")
    validation = train.get_parsed_content("data#validation")
    evaluate = _parser([LA / "evaluate.yaml", LA / "cpu.yaml"], dataset_dir=str(root), check_data=False)
    report = evaluate.get_parsed_content("data#cases")

    def case(d):
        return Path(d["image"]).parent.name

    assert [case(d) for d in report] == names[-16:]
    assert [case(d) for d in validation] == names[-24:-16]
    assert [case(d) for d in labeled] == names[:4]
    assert [case(d) for d in unlabeled] == names[4:-24]


@pytest.mark.parametrize("residual", [True, False])
def test_plain_and_residual_stages_load_each_other(residual):
    a = VNet(3, 1, 2, n_filters=4, residual=residual, dropout=0.5)
    b = VNet(3, 1, 2, n_filters=4, residual=not residual)
    b.load_state_dict(a.state_dict())  # same parameters: only the forward differs
    x = torch.randn(1, 1, 16, 16, 16)
    a.eval(), b.eval()
    assert not np.allclose(a(x).detach().numpy(), b(x).detach().numpy())


def _two_iterations(data_dir, output_dir, bundle=None, **options):
    trainer = build_trainer(bundle, dataset_dir=data_dir, max_iterations=2, output_dir=str(output_dir),
                            use_hfm=False, **dict(SMALL_TRAIN, val_interval=0), **options)  # fmt: skip
    trainer.run()
    trainer.close()
    return trainer


def test_pseudo_label_monitor_overlay_logs_and_never_trains_on_hidden_labels(data_dir, tmp_path, monkeypatch):
    """``experiments/monitor.yaml`` keeps the unlabeled cases' labels and attaches ``PseudoLabelMonitor``: its values
    are the Dice of this iteration's ``(Y^u, Y~u)`` against them, and the weights are those of a run without it."""
    recorded = []
    original = foreground_dice

    def recording(pred, label):
        recorded.append((pred.clone(), label.clone()))
        return original(pred, label)

    monkeypatch.setattr("diffcl_algo.training.handlers.foreground_dice", recording)
    overlay = [REPO / "diffcl_algo/configs/train.yaml", REPO / "experiments/monitor.yaml"]
    bundle = tmp_path / "monitored"  # a bundle folder whose train.yaml is the graph with the overlay merged
    (bundle / "configs").mkdir(parents=True)
    merged = yaml.safe_dump(dict(ConfigParser.load_config_files(overlay)), sort_keys=False)  # the graph's order
    (bundle / "configs" / "train.yaml").write_text(merged)
    watched = _two_iterations(data_dir, tmp_path / "watched", bundle=bundle)
    plain = _two_iterations(data_dir, tmp_path / "plain")
    metrics = watched.state.metrics
    assert 0.0 <= metrics["pseudo_dice_cs"] <= 1.0 and 0.0 <= metrics["pseudo_dice_ds"] <= 1.0
    assert "pseudo_dice_cs" not in plain.state.metrics
    assert len(recorded) == 4  # two iterations x (CS, DS)
    pseudo_cs, pseudo_ds = watched.state.pseudo_labels
    assert torch.equal(recorded[-2][0], pseudo_cs) and torch.equal(recorded[-1][0], pseudo_ds)
    hidden = recorded[-1][1]
    assert hidden.shape == pseudo_cs.shape and set(hidden.unique().tolist()) <= {0.0, 1.0} and hidden.sum() > 0
    for name in ("cs_network", "ds_network"):
        for a, b in zip(getattr(watched, name).state_dict().values(), getattr(plain, name).state_dict().values()):
            assert torch.equal(a, b)


def test_channels_last_training_is_the_same_math(data_dir, tmp_path):
    last = _two_iterations(data_dir, tmp_path / "last", channels_last=True)
    plain = _two_iterations(data_dir, tmp_path / "plain", channels_last=False)
    conv = last.cs_network.block_two.conv[0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last_3d) and not conv.is_contiguous()
    for key in ("loss_sup_cs", "loss_sup_ds", "loss_cps_cs", "loss_cps_ds"):
        assert last.state.output[key] == pytest.approx(plain.state.output[key], rel=1e-3, abs=1e-4)
