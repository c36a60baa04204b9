"""Tests of diffcl_algo.training.trainer / data.iteration / bundle.run: Algorithm 1 iteration, ablation switches,
exact resume, data flow, TensorBoard tags, and a small overfit run (CPU, tiny synthetic volumes)."""

from __future__ import annotations

import glob

import numpy as np
import pytest
import torch
from ignite.engine import Events
from tiny_settings import SMALL_TRAIN

from diffcl_algo.bundle.run import build_trainer, train
from diffcl_algo.convert.synthetic import make_synthetic_dataset
from diffcl_algo.data.iteration import IterationBatchDataset
from diffcl_algo.data.transforms import train_transforms
from diffcl_algo.networks.hf_mamba import HFMamba
from diffcl_algo.training.trainer import LOSS_KEYS, OUTPUT_KEYS

PATCH = SMALL_TRAIN["patch_size"]
SMALL = dict(SMALL_TRAIN, val_interval=0)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    return str(make_synthetic_dataset(root / "la", num_cases=6, shape=(36, 34, 20), seed=0, num_test=2))


def _params(module):
    return [p.detach().clone() for p in module.parameters()]


def _changed(before, module):
    return any(not torch.equal(a, b) for a, b in zip(before, module.parameters()))


def test_one_iteration_all_terms(data_dir, tmp_path):
    trainer = build_trainer(dataset_dir=data_dir, max_iterations=1, output_dir=str(tmp_path), eta=0.5, **SMALL)
    cl = trainer.contrastive
    modules = {"cs_network": trainer.cs_network, "ds_network": trainer.ds_network, "cs_head": cl.cs_head}
    before = {k: _params(m) for k, m in modules.items()}
    ds_head_before = _params(cl.ds_head)
    trainer.run()
    trainer.close()
    out = trainer.state.output
    assert tuple(out) == OUTPUT_KEYS
    assert all(isinstance(v, float) and np.isfinite(v) for v in out.values())
    assert all(out[k] > 0 for k in ("loss_sup_cs", "loss_sup_ds", "loss_cps_cs", "loss_cps_ds", "loss_cl"))
    hp = trainer.hparams
    assert hp.eta == 0.5
    assert out["loss_ds"] == pytest.approx(out["loss_sup_ds"] + hp.mu1 * out["loss_cps_ds"], rel=1e-5)
    expected_cs = out["loss_sup_cs"] + hp.mu2 * (out["loss_cps_cs"] + hp.eta * out["loss_cl"])
    assert out["loss_cs"] == pytest.approx(expected_cs, rel=1e-5)
    assert out["loss"] == pytest.approx(out["loss_cs"] + out["loss_ds"], rel=1e-5)
    assert out["ramp"] == pytest.approx(2.0 * np.exp(-5.0))  # epoch 0
    for name, params in before.items():
        assert _changed(params, modules[name]), f"{name} was not updated"
    assert not _changed(ds_head_before, cl.ds_head)  # L_cl reaches only the CS side (eq. 17, 22)
    assert int(cl.memory_bank.count.sum()) > 0
    assert any(isinstance(m, HFMamba) for m in trainer.cs_network.modules())


def test_unsup_ramp_scales_unsupervised_terms(data_dir, tmp_path):
    trainer = build_trainer(dataset_dir=data_dir, max_iterations=1, output_dir=str(tmp_path), unsup_ramp=True, **SMALL)
    trainer.run()
    trainer.close()
    out, hp = trainer.state.output, trainer.hparams
    w = np.exp(-5.0)  # lambda(0) / peak
    assert out["loss_cps_cs"] > 0 and out["loss_cl"] > 0
    assert out["loss_ds"] == pytest.approx(out["loss_sup_ds"] + w * hp.mu1 * out["loss_cps_ds"], rel=1e-5)
    expected_cs = out["loss_sup_cs"] + w * hp.mu2 * (out["loss_cps_cs"] + hp.eta * out["loss_cl"])
    assert out["loss_cs"] == pytest.approx(expected_cs, rel=1e-5)


@pytest.mark.parametrize(
    "use_cps,use_hfm,use_cl",
    [(False, False, False), (True, False, False), (True, True, False), (False, False, True)],
    ids=["supervised", "+cps", "+cps+hfm", "sup+cl"],
)
def test_ablation_switches(data_dir, tmp_path, use_cps, use_hfm, use_cl):
    trainer = build_trainer(
        dataset_dir=data_dir, max_iterations=1, output_dir=str(tmp_path), use_cps=use_cps, use_hfm=use_hfm,
        use_cl=use_cl, **SMALL,
    )
    cs_before, ds_before = _params(trainer.cs_network), _params(trainer.ds_network)
    trainer.run()
    trainer.close()
    out = trainer.state.output
    uses_ds = use_cps or use_cl
    assert all(np.isfinite(v) for v in out.values())
    assert out["loss_sup_cs"] > 0 and (out["loss_sup_ds"] > 0) == uses_ds
    assert (out["loss_cps_cs"] == 0.0 and out["loss_cps_ds"] == 0.0) == (not use_cps)
    assert (out["loss_cl"] == 0.0) == (not use_cl)
    assert (trainer.contrastive is None) == (not use_cl)
    assert any(isinstance(m, HFMamba) for m in trainer.cs_network.modules()) == use_hfm
    assert _changed(cs_before, trainer.cs_network)
    assert _changed(ds_before, trainer.ds_network) == uses_ds  # the supervised-only row runs one V-Net


def _full_state(trainer):
    state = trainer.train_state()
    flat = {}
    for key in ("cs_network", "ds_network", "cs_head", "ds_head", "memory_bank"):
        flat.update({f"{key}.{k}": v for k, v in state[key].items()})
    if state["cs_ema"] is not None:
        flat.update({f"cs_ema.{k}": v for k, v in state["cs_ema"].items()})
    for key in ("cs_optimizer", "ds_optimizer"):
        for pid, s in state[key]["state"].items():
            flat[f"{key}.{pid}"] = s["momentum_buffer"]
        flat[f"{key}.lr"] = torch.tensor(state[key]["param_groups"][0]["lr"])
    return flat


@pytest.mark.slow
@pytest.mark.parametrize("options", [{}, {"ema_decay": 0.9}], ids=["cs", "weight_ema"])
def test_resume_is_exact(data_dir, tmp_path, options):
    n = 4
    common = dict(SMALL, max_iterations=n, ckpt_interval=n // 2, seed=3, **options)
    straight = build_trainer(dataset_dir=data_dir, output_dir=str(tmp_path / "straight"), num_workers=2, **common)
    straight.run()
    straight.close()

    first = build_trainer(dataset_dir=data_dir, output_dir=str(tmp_path / "resumed"), **common)
    first.add_event_handler(Events.ITERATION_COMPLETED(once=n // 2), lambda e: e.terminate())  # "crash"
    first.run()
    first.close()
    assert first.state.iteration == n // 2
    second = build_trainer(dataset_dir=data_dir, output_dir=str(tmp_path / "resumed"), resume=True, **common)
    assert second.state.iteration == n // 2
    second.run()
    second.close()
    assert second.state.iteration == n
    assert second.state.output == straight.state.output
    a, b = _full_state(straight), _full_state(second)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_missing_file_names_path(data_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="train_state.pt"):
        build_trainer(dataset_dir=data_dir, max_iterations=2, output_dir=str(tmp_path), resume=True, **SMALL)


def test_iteration_dataset_is_deterministic_and_sharded(data_dir):
    from diffcl_algo.data.io import build_datalists

    labeled, unlabeled = build_datalists(data_dir, num_labeled=2)
    unlabeled = unlabeled * 3  # 6 unlabeled cases
    tl, tu = train_transforms(PATCH), train_transforms(PATCH, labeled=False)
    single = IterationBatchDataset(labeled, unlabeled, tl, tu, 2, 2, seed=5, max_iterations=10)
    a, b = single[3], single[1]
    assert torch.equal(single[3]["image"], a["image"]) and torch.equal(single[1]["label"], b["label"])
    # every pass over the unlabeled cases visits each case once
    seen = [j for i in range(3) for j in single.case_indices(i)[1]]
    assert sorted(seen) == list(range(6))
    # two ranks with half the batch each reproduce the single-process batch exactly
    ranks = [IterationBatchDataset(labeled, unlabeled, tl, tu, 1, 1, 5, 10, rank=r, world_size=2) for r in (0, 1)]
    for i in (0, 4):
        full, parts = single[i], [r[i] for r in ranks]
        assert torch.equal(full["label"], torch.cat([p["label"] for p in parts]))
        assert torch.equal(full["image"][:2], torch.cat([p["image"][:1] for p in parts]))
        assert torch.equal(full["image"][2:], torch.cat([p["image"][1:] for p in parts]))


def test_tensorboard_tags_and_log(data_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    summary = train(dataset_dir=data_dir, max_iterations=2, output_dir=str(tmp_path), **dict(SMALL, val_interval=2))
    assert summary["iteration"] == 2 and summary["best_metric"] is not None
    events = EventAccumulator(glob.glob(str(tmp_path / "events.out.tfevents.*"))[0])
    events.Reload()
    tags = set(events.Tags()["scalars"])
    expected = set(LOSS_KEYS) | {"lr_cs", "lr_ds", "val_mean_dice", "val_jaccard", "val_hd95", "val_asd"}
    assert expected <= tags
    log = (tmp_path / "train.log").read_text()
    assert "loss_cl" in log and "val_mean_dice" in log
    assert (tmp_path / "model.pt").is_file() and (tmp_path / "train_state.pt").is_file()
    cs = torch.load(tmp_path / "model.pt", weights_only=True)
    assert any(k.startswith("block_one") for k in cs)  # CS state_dict alone
    state = torch.load(tmp_path / "train_state.pt", weights_only=True)
    assert state["iteration"] == 2 and state["config"]["n_filters"] == 4


@pytest.mark.slow
def test_overfit_tiny_set(tmp_path):
    from diffcl_algo.data.io import build_datalists
    from diffcl_algo.data.transforms import val_transforms
    from diffcl_algo.evaluation.metrics import case_metrics
    from diffcl_algo.inference.predict import predict_volume

    data = str(make_synthetic_dataset(tmp_path / "la", num_cases=5, shape=(32, 32, 16), seed=1, num_test=1))
    trainer = build_trainer(
        dataset_dir=data,
        output_dir=str(tmp_path / "out"),
        **dict(SMALL, n_filters=8, max_iterations=120, lr=0.1, t_max=5, ema_decay=0.9),
    )  # ~0.25 s / iteration on one free CPU core; a horizon of 10 iterations suits 120 (0.99's 100 does not)
    trainer.run()
    trainer.close()
    labeled, _ = build_datalists(data, num_labeled=2)
    dice = []
    for case in labeled:
        item = val_transforms()(dict(case))
        pred = predict_volume(trainer.cs_ema.module, item["image"], PATCH, (16, 16, 8), return_label=True)  # model.pt
        dice.append(case_metrics(pred[0, 0].numpy(), item["label"][0].numpy())["dice"])
    assert np.mean(dice) > 0.9, dice


def test_bundle_style_config_and_stock_monai_handlers(tmp_path):
    """The trainer builds from a plain (YAML-like) MONAI bundle config and drives stock MONAI handlers."""
    from monai.bundle import ConfigParser

    gen = torch.Generator().manual_seed(0)
    cases = [
        {"image": torch.randn(1, *PATCH, generator=gen), "label": (torch.rand(1, *PATCH, generator=gen) > 0.7).float()}
        for _ in range(4)
    ]
    head = {"_target_": "diffcl_algo.networks.heads.ProjectionHead", "in_channels": 4, "out_channels": 8}
    sgd = {"_target_": "torch.optim.SGD", "lr": 0.01, "momentum": 0.9, "weight_decay": 3e-5}
    flip = {"_target_": "Compose", "transforms": [{"_target_": "RandFlipd", "keys": ["image", "label"], "prob": 0.5}]}
    config = {
        "cases": cases,
        "cs": {"_target_": "diffcl_algo.networks.vnet.VNet", "n_filters": 4},
        "ds": {"_target_": "diffcl_algo.networks.diffusion_seg.DiffusionSegNet", "n_filters": 4},
        "cs_head": head,
        "ds_head": head,
        "bank": {"_target_": "diffcl_algo.contrastive.ClassMemoryBank", "num_classes": 2, "dim": 8, "capacity": 64},
        "cl": {"_target_": "diffcl_algo.contrastive.ContrastiveLabelPropagation", "cs_head": "@cs_head",
               "ds_head": "@ds_head", "memory_bank": "@bank", "num_anchors": 8, "num_unlabeled": 256, "top_k": 16},
        "cs_opt": dict(sgd, params="$list(@cs.parameters()) + list(@cs_head.parameters())"),
        "ds_opt": dict(sgd, params="$list(@ds.parameters()) + list(@ds_head.parameters())"),
        "dataset": {
            "_target_": "diffcl_algo.data.iteration.IterationBatchDataset",
            "labeled": "$@cases[:2]",
            "unlabeled": "$[{'image': c['image']} for c in @cases[2:]]",
            "labeled_transform": flip,
            "unlabeled_transform": dict(flip, transforms=[{"_target_": "RandFlipd", "keys": "image", "prob": 0.5}]),
            "max_iterations": 3,
        },
        "trainer": {
            "_target_": "diffcl_algo.training.trainer.DiffCLTrainer",
            "device": "cpu",
            "max_iterations": 3,
            "train_data_loader": {"_target_": "diffcl_algo.data.iteration.make_iteration_loader",
                                  "dataset": "@dataset"},
            "cs_network": "@cs",
            "ds_network": "@ds",
            "cs_optimizer": "@cs_opt",
            "ds_optimizer": "@ds_opt",
            "epoch_length": 1,
            "contrastive": "@cl",
            "hyperparams": {"_target_": "diffcl_algo.schedules.table2_params", "dataset_name": "LA", "num_labeled": 8},
            "train_handlers": [
                {
                    "_target_": "LrScheduleHandler",
                    "lr_scheduler": {"_target_": "torch.optim.lr_scheduler.StepLR", "optimizer": "@cs_opt",
                                     "step_size": 1, "gamma": 0.5},
                    "epoch_level": False,
                    "print_lr": False,
                },
                {"_target_": "CheckpointSaver", "save_dir": str(tmp_path), "save_dict": {"cs": "@cs"},
                 "save_interval": 1, "epoch_level": False, "n_saved": 1},
                {"_target_": "StatsHandler", "output_transform": "$lambda x: x", "epoch_log": False},
            ],
        },
    }  # fmt: skip
    parser = ConfigParser(config)
    trainer = parser.get_parsed_content("trainer")
    assert trainer.hparams.eta == 0.5  # Table 2 row LA 8/72
    trainer.run()
    assert trainer.state.iteration == 3 and tuple(trainer.state.output) == OUTPUT_KEYS
    assert trainer.cs_optimizer.param_groups[0]["lr"] == pytest.approx(0.01 * 0.5**3)
    assert glob.glob(str(tmp_path / "*.pt"))


def test_amp_is_ignored_on_cpu(data_dir, tmp_path):
    with pytest.warns(UserWarning, match="amp is ignored"):
        trainer = build_trainer(dataset_dir=data_dir, max_iterations=1, output_dir=str(tmp_path), amp=True, **SMALL)
    trainer.close()
    assert not trainer.amp_enabled and trainer.scaler is None


def test_a_variant_overrides_a_hook_named_in_the_config(data_dir, tmp_path, monkeypatch):
    """A small subclass named by ``train#trainer#_target_`` replaces one step (docs/training.md, "Writing a variant"):
    here the CS pseudo-labels that the DS learns from (eq. 6); a random network never calls every voxel foreground."""
    from diffcl_algo.losses import DiceCELoss

    targets, original = [], DiceCELoss.forward

    def recording(self, logits, target, *args):
        targets.append(target)
        return original(self, logits, target, *args)

    monkeypatch.setattr(DiceCELoss, "forward", recording)
    variant = {"max_iterations": 1, "train#trainer#_target_": "tiny_settings.ForegroundPseudoLabelTrainer"}
    trainer = build_trainer(dataset_dir=data_dir, output_dir=str(tmp_path), use_cl=False, **{**SMALL, **variant})
    assert type(trainer).__name__ == "ForegroundPseudoLabelTrainer"
    trainer.run()
    trainer.close()
    assert len(targets) == 4 and bool((targets[3] == 1).all())  # eq. 19, 18, 7, 6: the DS's target (eq. 6)
