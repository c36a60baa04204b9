"""How large HF-Mamba's output is beside the CS features it is added to: ``||F_o|| / ||f||`` at its stage.

The V-Net adds ``F_o`` (eq. 10) to the stage output ``f``; a ratio near 1 means the module rewrites the bottleneck.
Measured on centred patches of real LA cases (per-volume z-score, the CPU protocol's 48x48x32 patch and 8 filters):
for freshly initialised CS networks in training mode (batch statistics, as in the first iterations) and for the
CS of trained runs (a ``train_state.pt`` or a ``model.pt``) in evaluation mode.

    python experiments/hfm_magnitude.py --data data/LA_half \
        --weights "runs/t6/cps_hfm/l4_s0/train_state.pt bundles/la/models/model.pt"
"""

from __future__ import annotations

from pathlib import Path

import fire
import h5py
import torch

from diffcl_algo.data.io import LAYOUTS, read_case_list
from diffcl_algo.networks import VNet

PATCH = (48, 48, 32)


def _patches(data: str, cases: int) -> torch.Tensor:
    out = []
    for case in read_case_list(Path(data) / "train.list")[:cases]:
        with h5py.File(Path(data) / LAYOUTS["la"].format(case=case), "r") as f:
            image = torch.from_numpy(f["image"][:]).float()
        image = (image - image.mean()) / image.std()
        start = [(s - p) // 2 for s, p in zip(image.shape, PATCH)]
        out.append(image[tuple(slice(a, a + p) for a, p in zip(start, PATCH))])
    return torch.stack(out)[:, None]


def ratio(net: VNet, batch: torch.Tensor, train: bool) -> float:
    """``||F_o|| / ||f||`` of the stage-5 HF-Mamba over ``batch`` (B, 1, *PATCH)."""
    seen = {}
    handle = net.hfm["5"].register_forward_hook(lambda m, i, o: seen.update(f=i[0].detach(), fo=o.detach()))
    net.train(train)
    with torch.no_grad():
        net(batch)
    handle.remove()
    return float(seen["fo"].norm() / seen["f"].norm())


def main(data: str = "data/LA_half", weights: str = "", cases: int = 6, inits: int = 3, n_filters: int = 8) -> None:
    batch = _patches(data, cases)
    for seed in range(inits):
        torch.manual_seed(seed)
        for scale in (None, 0.0):
            net = VNet(3, 1, 2, n_filters=n_filters, hfm_stages=(5,), hfm_layer_scale=scale)
            print(f"init seed {seed}, hfm_layer_scale {scale}: ratio {ratio(net, batch, train=True):.3f}")
    for path in str(weights).split():
        loaded = torch.load(path, map_location="cpu", weights_only=True)
        state = loaded.get("cs_network", loaded)
        gamma = state.get("hfm.5.scale.gamma")
        net = VNet(3, 1, 2, n_filters=n_filters, hfm_stages=(5,), hfm_layer_scale=None if gamma is None else 0.0)
        net.load_state_dict(state)
        extra = "" if gamma is None else f", |gamma| mean {gamma.abs().mean():.3f} max {gamma.abs().max():.3f}"
        print(f"{path}: ratio {ratio(net, batch, train=False):.3f}{extra}")


if __name__ == "__main__":
    fire.Fire(main)
