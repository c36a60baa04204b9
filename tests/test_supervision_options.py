"""Options of the CS supervision and of the honest split: the field's loss form, plain stages and dropout,
per-volume intensity normalisation, the report split (``num_test_holdout``), one V-Net for the supervised row."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.bundle import ConfigParser
from tiny_settings import SMALL_TRAIN

from diffcl_algo.bundle.run import build_trainer
from diffcl_algo.convert.synthetic import make_synthetic_dataset
from diffcl_algo.data.transforms import train_transforms, val_transforms
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


def test_supervised_row_trains_one_vnet_with_the_field_options(data_dir, tmp_path):
    trainer = build_trainer(
        dataset_dir=data_dir, max_iterations=2, output_dir=str(tmp_path), use_cps=False, use_hfm=False, use_cl=False,
        sup_loss="field", residual=False, dropout=0.5, normalize_intensity=True, **dict(SMALL_TRAIN, val_interval=0)
    )
    net = trainer.cs_network
    assert not net.block_two.residual and net.dropout.p == 0.5
    ds_before = [p.detach().clone() for p in trainer.ds_network.parameters()]
    trainer.run()
    trainer.close()
    out = trainer.state.output
    assert out["loss_sup_ds"] == 0.0 and 0 < out["loss_sup_cs"] < 1.5
    assert all(torch.equal(a, b) for a, b in zip(ds_before, trainer.ds_network.parameters()))


def test_unknown_supervised_loss_form_is_refused(data_dir, tmp_path):
    with pytest.raises(ValueError, match="sup_loss must be one of"):
        build_trainer(dataset_dir=data_dir, max_iterations=1, output_dir=str(tmp_path), sup_loss="fild",
                      **dict(SMALL_TRAIN, val_interval=0))


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


def _two_iterations(data_dir, output_dir, **options):
    trainer = build_trainer(dataset_dir=data_dir, max_iterations=2, output_dir=str(output_dir), use_hfm=False,
                            **dict(SMALL_TRAIN, val_interval=0), **options)
    trainer.run()
    trainer.close()
    return trainer


def test_pseudo_label_monitoring_is_logged_and_never_trained_on(data_dir, tmp_path):
    watched = _two_iterations(data_dir, tmp_path / "watched", monitor_pseudo_labels=True)
    plain = _two_iterations(data_dir, tmp_path / "plain", monitor_pseudo_labels=False)
    out = watched.state.output
    assert 0.0 <= out["pseudo_dice_cs"] <= 1.0 and 0.0 <= out["pseudo_dice_ds"] <= 1.0
    assert "pseudo_dice_cs" not in plain.state.output
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


def test_ds_pseudo_labels_sampled_from_noise(data_dir, tmp_path, monkeypatch):
    from diffcl_algo.diffusion import GaussianDiffusion

    calls = []
    original = GaussianDiffusion.ddim_sample

    def counting(self, model, x, num_classes, steps=10, eta=0.0, generator=None):
        calls.append((x.shape[0], steps, torch.is_grad_enabled()))
        return original(self, model, x, num_classes, steps=steps, eta=eta, generator=generator)

    monkeypatch.setattr(GaussianDiffusion, "ddim_sample", counting)
    trainer = build_trainer(dataset_dir=data_dir, max_iterations=2, output_dir=str(tmp_path), use_hfm=False,
                            ds_pseudo_steps=2, monitor_pseudo_labels=True, **dict(SMALL_TRAIN, val_interval=0))
    trainer.run()
    trainer.close()
    assert calls == [(2, 2, False), (2, 2, False)]  # the 2 unlabeled images, every iteration, without gradient
    assert 0.0 <= trainer.state.output["pseudo_dice_ds"] <= 1.0 and trainer.state.output["loss_cps_cs"] > 0
    with pytest.raises(ValueError, match="ds_pseudo_steps must be >= 0"):
        build_trainer(dataset_dir=data_dir, max_iterations=1, output_dir=str(tmp_path / "bad"), ds_pseudo_steps=-1,
                      **dict(SMALL_TRAIN, val_interval=0))


def test_unlabeled_timesteps_drawn_from_the_upper_range(data_dir, tmp_path, monkeypatch):
    from diffcl_algo.diffusion import GaussianDiffusion

    drawn = []
    original = GaussianDiffusion.q_sample

    def recording(self, y0, t, noise=None):
        drawn.append(t.clone())
        return original(self, y0, t, noise)

    monkeypatch.setattr(GaussianDiffusion, "q_sample", recording)
    trainer = build_trainer(dataset_dir=data_dir, max_iterations=3, output_dir=str(tmp_path), use_hfm=False,
                            unlabeled_t_min=0.9, **dict(SMALL_TRAIN, val_interval=0))
    trainer.run()
    trainer.close()
    assert len(drawn) == 3
    for t in drawn:  # 2 labeled then 2 unlabeled images per iteration
        assert bool((t[2:] >= 900).all()) and bool((t >= 1).all()) and bool((t <= 1000).all())
    assert any(bool((t[:2] < 900).any()) for t in drawn)  # the labeled images keep the paper's U{1..T}
    with pytest.raises(ValueError, match="unlabeled_t_min must be in"):
        build_trainer(dataset_dir=data_dir, max_iterations=1, output_dir=str(tmp_path / "bad"), unlabeled_t_min=1.5,
                      **dict(SMALL_TRAIN, val_interval=0))


def test_cross_pseudo_supervision_on_confident_voxels(data_dir, tmp_path, monkeypatch):
    from diffcl_algo.losses import DiceCELoss as Loss

    masks = []
    original = Loss.forward

    def recording(self, logits, target, ce_weight, dice_weight=1.0, mask=None):
        masks.append(mask)
        return original(self, logits, target, ce_weight, dice_weight, mask)

    monkeypatch.setattr(Loss, "forward", recording)
    trainer = build_trainer(dataset_dir=data_dir, max_iterations=1, output_dir=str(tmp_path), use_hfm=False,
                            cps_confidence=0.6, use_cl=False, **dict(SMALL_TRAIN, val_interval=0))
    trainer.run()
    trainer.close()
    sup_cs, sup_ds, cps_cs, cps_ds = masks  # eq. 19, 18, 7, 6 in the engine's order
    assert sup_cs is None and sup_ds is None
    for mask in (cps_cs, cps_ds):
        assert mask.dtype == torch.bool and mask.shape[:2] == (2, 1) and 0 < int(mask.sum()) < mask.numel()
    with pytest.raises(ValueError, match="cps_confidence must be in"):
        build_trainer(dataset_dir=data_dir, max_iterations=1, output_dir=str(tmp_path / "bad"), cps_confidence=1.0,
                      **dict(SMALL_TRAIN, val_interval=0))


def test_ds_recycling_feeds_the_ds_its_own_prediction(data_dir, tmp_path, monkeypatch):
    """With ds_recycling 1 the DS input is the noised DS prediction from pure noise (one extra DS forward at t = T);
    with 0 nothing changes (same random streams, same output as the default)."""
    from diffcl_algo.networks import DiffusionSegNet

    calls = []
    original = DiffusionSegNet.forward

    def recording(self, x, y_t, t, return_features=False):
        calls.append(t.clone())
        return original(self, x, y_t, t, return_features)

    monkeypatch.setattr(DiffusionSegNet, "forward", recording)
    common = dict(dataset_dir=data_dir, max_iterations=1, use_hfm=False, use_cl=False)
    common.update(SMALL_TRAIN, val_interval=0)
    outputs = {}
    for p in (None, 0.0, 1.0):
        calls.clear()
        option = {} if p is None else {"ds_recycling": p}
        trainer = build_trainer(output_dir=str(tmp_path / str(p)), **option, **common)
        trainer.run()
        trainer.close()
        outputs[p] = (trainer.state.output, [c.tolist() for c in calls])
    assert outputs[0.0] == outputs[None] and len(outputs[None][1]) == 1  # the paper's single DS forward
    recycled_t, trained_t = outputs[1.0][1]
    assert recycled_t == [1000] * 4 and trained_t == outputs[None][1][0]  # same training timesteps
    assert outputs[1.0][0]["loss_sup_ds"] != outputs[None][0]["loss_sup_ds"]
    with pytest.raises(ValueError, match="ds_recycling must be in"):
        build_trainer(output_dir=str(tmp_path / "bad"), ds_recycling=1.5, **common)


def test_symmetric_label_signal_reaches_the_ds_input(data_dir, tmp_path, monkeypatch):
    from diffcl_algo.diffusion import GaussianDiffusion

    signals = []
    original = GaussianDiffusion.q_sample
    monkeypatch.setattr(GaussianDiffusion, "q_sample", lambda self, y0, t, noise=None: (signals.append(y0.clone()),
                        original(self, y0, t, noise))[1])  # fmt: skip
    trainer = build_trainer(dataset_dir=data_dir, max_iterations=1, output_dir=str(tmp_path), use_hfm=False,
                            label_signal="symmetric", label_scale=0.5, **dict(SMALL_TRAIN, val_interval=0))
    trainer.run()
    trainer.close()
    assert set(signals[0].unique().tolist()) == {-0.5, 0.5}


def test_copy_paste_mixes_each_unlabeled_slot_with_a_labeled_image():
    """BCP's two directions: slot 0 keeps the labeled image outside a cube, slot 1 inside; labeled slots unchanged."""
    from types import SimpleNamespace

    from diffcl_algo.training.trainer import DiffCLTrainer

    x = torch.stack([torch.full((1, 8, 8, 4), float(v)) for v in (1, 2, 3, 4)])  # 2 labeled, 2 unlabeled
    y = torch.stack([torch.full((1, 8, 8, 4), v) for v in (0, 1)]).long()
    gen = torch.Generator().manual_seed(0)
    mixed, pasted, y_pasted = DiffCLTrainer._copy_paste(SimpleNamespace(copy_paste=0.5), x, y, gen)
    assert torch.equal(mixed[:2], x[:2]) and torch.equal(y_pasted, y)
    assert pasted.shape == (2, 1, 8, 8, 4) and pasted.dtype == torch.bool
    assert int((~pasted[0]).sum()) == 4 * 4 * 2 and int(pasted[1].sum()) == 4 * 4 * 2  # a half-side cube each
    for j in (0, 1):
        assert torch.equal(mixed[2 + j][pasted[j]], x[j][pasted[j]])  # labeled voxels from the paired labeled image
        assert torch.equal(mixed[2 + j][~pasted[j]], x[2 + j][~pasted[j]])  # the rest from the unlabeled image
    cube = (~pasted[0, 0]).nonzero()
    assert (cube.amax(0) - cube.amin(0) + 1).tolist() == [4, 4, 2]  # one box, not scattered voxels


def test_copy_paste_supervises_pasted_voxels_and_pseudo_supervises_the_rest(data_dir, tmp_path, monkeypatch):
    from diffcl_algo.losses import DiceCELoss as Loss

    calls = []
    original = Loss.forward

    def recording(self, logits, target, ce_weight, dice_weight=1.0, mask=None):
        calls.append((target.clone(), mask))
        return original(self, logits, target, ce_weight, dice_weight, mask)

    monkeypatch.setattr(Loss, "forward", recording)
    common = dict(dataset_dir=data_dir, max_iterations=1, use_hfm=False, use_cl=False, monitor_pseudo_labels=True)
    common.update(SMALL_TRAIN, val_interval=0)
    trainer = build_trainer(output_dir=str(tmp_path / "cp"), copy_paste=0.5, **common)
    trainer.run()
    trainer.close()
    (_, sup_cs), (_, sup_ds), (_, pasted_cs), (_, pasted_ds), (_, cps_cs), (_, cps_ds) = calls
    assert sup_cs is None and sup_ds is None
    assert torch.equal(pasted_cs, pasted_ds) and pasted_cs.shape[:2] == (2, 1)
    assert torch.equal(cps_cs, ~pasted_cs) and torch.equal(cps_ds, ~pasted_cs)
    assert 0 < int(pasted_cs.sum()) < pasted_cs.numel()
    assert 0.0 <= trainer.state.output["pseudo_dice_cs"] <= 1.0
    with pytest.raises(ValueError, match="copy_paste must be in"):
        build_trainer(output_dir=str(tmp_path / "bad"), copy_paste=1.0, **common)
    with pytest.raises(ValueError, match="copy_paste needs use_cps"):
        build_trainer(output_dir=str(tmp_path / "bad2"), copy_paste=0.5, **{**common, "use_cps": False})


def test_hfm_layer_scale_reaches_the_cs_from_the_bundle_config(tmp_path):
    root = make_synthetic_dataset(tmp_path / "la", num_cases=6, shape=(20, 20, 16), seed=2, num_test=1)
    files = [LA / "train.yaml", LA / "cpu.yaml"]
    scaled = _parser(files, dataset_dir=str(root), check_data=False, hfm_layer_scale=0.0).get_parsed_content(
        "network_def")
    assert torch.equal(scaled.hfm["5"].scale.gamma, torch.zeros(16 * 8))  # cpu.yaml: n_filters 8
    paper = _parser(files, dataset_dir=str(root), check_data=False).get_parsed_content("network_def")
    assert isinstance(paper.hfm["5"].scale, torch.nn.Identity)


def test_ds_self_condition_feeds_the_ds_its_first_estimate(data_dir, tmp_path, monkeypatch):
    """ds_self_condition: every DS forward gets ``self_cond``; on some iterations it is the DS's own no-gradient first
    estimate from the same Y_t and t (an extra forward with zeros), on the others zeros."""
    from diffcl_algo.networks import DiffusionSegNet

    calls = []
    original = DiffusionSegNet.forward

    def recording(self, x, y_t, t, return_features=False, self_cond=None):
        out = original(self, x, y_t, t, return_features, self_cond)
        calls.append((t.clone(), self_cond, torch.is_grad_enabled(), out))
        return out

    monkeypatch.setattr(DiffusionSegNet, "forward", recording)
    trainer = build_trainer(dataset_dir=data_dir, max_iterations=6, output_dir=str(tmp_path), use_hfm=False,
                            use_cl=False, ds_self_condition=True, **dict(SMALL_TRAIN, val_interval=0))
    assert trainer.ds_self_condition  # the config reaches the DS network
    trainer.run()
    trainer.close()
    assert all(call[1] is not None for call in calls)
    trained = [k for k, call in enumerate(calls) if call[2]]
    estimates = [k for k, call in enumerate(calls) if not call[2]]
    assert len(trained) == 6 and 0 < len(estimates) < 6  # a first estimate on some iterations only
    for k in estimates:  # the estimate pass gets zeros, the training pass right after it gets its softmax
        t_first, zeros, _, logits = calls[k]
        t_train, cond, _, _ = calls[k + 1]
        assert not zeros.any() and torch.equal(t_first, t_train)
        torch.testing.assert_close(cond, logits.float().softmax(1))
    for k in set(trained) - {k + 1 for k in estimates}:
        assert not calls[k][1].any()
