"""The exponential moving average of the CS weights (``ema_decay``), the mean teacher that makes the CS pseudo-labels:
the average itself, what validation and ``model.pt`` use, the pseudo-labels' source and the refused settings (exact
resume with them: ``test_engine.test_resume_is_exact``)."""

from __future__ import annotations

import pytest
import torch
from tiny_settings import SMALL_TRAIN, TINY_TRAIN

from diffcl_algo.bundle.run import build_trainer
from diffcl_algo.convert.synthetic import make_synthetic_dataset
from diffcl_algo.networks import VNet
from diffcl_algo.training.checkpoint import validated_cs_weights
from diffcl_algo.training.ema import weight_ema

SMALL = dict(SMALL_TRAIN, val_interval=0, use_hfm=False)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    return str(make_synthetic_dataset(root / "la", num_cases=6, shape=(36, 34, 20), seed=0, num_test=2))


UNIFORM, DECAYED = (1.0 + 2.0 + 4.0) / 3, 0.5 * (0.5 * 1.0 + 0.5 * 2.0) + 0.5 * 4.0


@pytest.mark.parametrize("decay, expected", [(0.9, UNIFORM), (0.5, DECAYED)])
def test_weight_ema_averages_parameters_and_copies_batch_norm_statistics(decay, expected):
    """The first update copies; then ``d = min(decay, 1 - 1 / (n + 1))``: a uniform average while ``n`` is small
    (0.9: every value so far), ``decay`` after; buffers are the network's own."""
    net = VNet(spatial_dims=3, in_channels=1, out_channels=2, n_filters=2)
    assert weight_ema(net, 0.0) is None
    ema = weight_ema(net, decay)
    for value in (1.0, 2.0, 4.0):
        with torch.no_grad():
            for t in (*net.parameters(), *(b for b in net.buffers() if b.is_floating_point())):
                t.fill_(value)
        ema.update_parameters(net)
    for t in ema.module.parameters():
        assert torch.allclose(t, torch.full_like(t, expected)), t.shape
    running_mean = ema.module.block_one.conv[1].running_mean
    assert torch.equal(running_mean, torch.full_like(running_mean, 4.0))
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="ema_decay must be in"):
            weight_ema(net, bad)


def test_validation_and_model_pt_use_the_average(data_dir, tmp_path):
    trainer = build_trainer(dataset_dir=data_dir, max_iterations=3, output_dir=str(tmp_path), ema_decay=0.5,
                            **dict(SMALL, val_interval=3))  # fmt: skip
    evaluator = next(h for h in trainer.train_handlers if hasattr(h, "validator")).validator
    assert evaluator.network is trainer.cs_ema.module
    trainer.run()
    trainer.close()
    saved = torch.load(tmp_path / "model.pt", weights_only=True)
    state = torch.load(tmp_path / "train_state.pt", weights_only=True)
    assert int(state["cs_ema"]["n_averaged"]) == 3
    average = {k.removeprefix("module."): v for k, v in state["cs_ema"].items() if k.startswith("module.")}
    assert saved.keys() == state["cs_network"].keys() == average.keys()
    assert all(torch.equal(saved[k], average[k]) for k in saved)
    assert any(not torch.equal(saved[k], state["cs_network"][k]) for k in saved)


def _ds_targets(monkeypatch) -> list[torch.Tensor]:
    """The targets of eq. 6 (the DS's cross pseudo-supervision: the CS pseudo-labels) of every iteration."""
    from diffcl_algo.losses import DiceCELoss as Loss

    targets = []
    original = Loss.forward

    def recording(self, logits, target, ce_weight, dice_weight=1.0):
        targets.append(target.clone())
        return original(self, logits, target, ce_weight, dice_weight)

    monkeypatch.setattr(Loss, "forward", recording)
    return targets


@pytest.mark.parametrize("ema_decay", [0.0, 0.99], ids=["the_cs_itself", "the_mean_teacher"])
def test_pseudo_labels_come_from_the_mean_teacher_when_there_is_one(data_dir, tmp_path, monkeypatch, ema_decay):
    """One network is made to call every voxel foreground: the teacher with ``ema_decay``, else the CS; only that
    network's labels reach the DS (eq. 6); with a teacher, the untouched CS's (a random net's) do not."""
    targets = _ds_targets(monkeypatch)
    trainer = build_trainer(dataset_dir=data_dir, max_iterations=1, output_dir=str(tmp_path), use_cl=False,
                            ema_decay=ema_decay, **SMALL)  # fmt: skip
    labeller = trainer.cs_network if trainer.cs_ema is None else trainer.cs_ema.module
    assert (trainer.cs_ema is None) == (ema_decay == 0.0)
    with torch.no_grad():
        labeller.out_conv.weight.zero_()
        labeller.out_conv.bias.copy_(torch.tensor([-5.0, 5.0]))
    trainer.run()
    trainer.close()
    pseudo_cs = targets[3]  # eq. 19, 18, 7, 6 in the engine's order
    assert bool((pseudo_cs == 1).all())


def test_mean_teacher_uses_batch_statistics(data_dir, tmp_path):
    """The teacher labels in train mode (batch statistics, as the CS's own forward), not with running statistics."""
    trainer = build_trainer(dataset_dir=data_dir, max_iterations=2, output_dir=str(tmp_path), use_cl=False,
                            ema_decay=0.99, **SMALL)  # fmt: skip
    modes = []
    trainer.cs_ema.module.register_forward_pre_hook(lambda module, args: modes.append(module.training))
    trainer.run()
    trainer.close()
    assert modes == [True, True]


def test_a_teacher_batch_too_small_for_batch_norm_names_the_option(data_dir, tmp_path):
    trainer = build_trainer(dataset_dir=data_dir, output_dir=str(tmp_path),
                            **dict(TINY_TRAIN, ema_decay=0.99))  # fmt: skip
    with pytest.raises(ValueError, match=r"ema_decay: .* one patch of \[16, 16, 16\] leaves one value"):
        trainer.run()
    trainer.close()


def test_refused_settings_name_the_option(data_dir, tmp_path):
    with pytest.raises(Exception, match="ema_decay must be in"):
        build_trainer(dataset_dir=data_dir, max_iterations=1, output_dir=str(tmp_path), ema_decay=1.5, **SMALL)
    state = {"cs_ema": None}
    trainer = build_trainer(dataset_dir=data_dir, max_iterations=1, output_dir=str(tmp_path), ema_decay=0.9, **SMALL)
    state.update({k: v for k, v in trainer.train_state().items() if k != "cs_ema"})
    with pytest.raises(ValueError, match="holds no EMA"):
        trainer.load_train_state(state)


def test_validated_cs_weights_are_the_average_when_kept():
    net = VNet(spatial_dims=3, in_channels=1, out_channels=2, n_filters=2)
    ema = weight_ema(net, 0.9)
    ema.update_parameters(net)
    with torch.no_grad():
        ema.module.out_conv.bias.fill_(7.0)
    plain = {"cs_network": net.state_dict(), "cs_ema": None}
    assert validated_cs_weights(plain) is plain["cs_network"]
    averaged = validated_cs_weights({"cs_network": net.state_dict(), "cs_ema": ema.state_dict()})
    assert averaged.keys() == net.state_dict().keys()  # no n_averaged, no "module." prefix
    assert torch.equal(averaged["out_conv.bias"], torch.full((2,), 7.0))


def test_a_horizon_over_a_tenth_of_the_run_warns(caplog):
    net = VNet(spatial_dims=3, in_channels=1, out_channels=2, n_filters=2)
    with caplog.at_level("WARNING", logger="diffcl_algo.training.ema"):
        weight_ema(net, 0.99, max_iterations=1280)
        assert not caplog.records
        weight_ema(net, 0.99, max_iterations=300)
    assert "ema_decay 0.99 averages about the last 100 iterations" in caplog.text
