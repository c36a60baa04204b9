"""Sliding-window inference on a real LA volume: ours (MONAI) vs the field's per-window reference loop.

Run by hand (not a test), from the repository root:

    # paper setting (LA: patch 112x112x80, stride 18x18x4), e.g. on a GPU
    python benchmarks/bench_sliding_window.py --device cuda --sw_batch_size 4
    python benchmarks/bench_sliding_window.py --device cuda --sw_batch_size 4 --amp
    # reduced setting for a small CPU (same code paths, fewer windows)
    python benchmarks/bench_sliding_window.py --device cpu --threads 2 --stride 36 36 8 --sw_batch_size 4

Both sides run the SAME network, the CS network ``VNet(3, 1, 2, n_filters=16, hfm_stages=(5,))`` with a seeded
random init (or ``--ckpt`` state_dict), in eval mode under ``torch.no_grad``, on the SAME image
(``mri_norm2.h5['image']`` of an LA case; default the last case of ``train.list``):

* reference: ``test_single_case`` of UA-MT / SSL4MIS, written out below: pad to at least the patch, one window
  per forward in fp32, softmax, accumulate ``score_map`` and ``cnt`` in numpy, divide, argmax;
* ours: ``diffcl_algo.inference.predict.predict_volume`` (MONAI ``SlidingWindowInferer``, stride converted to overlap,
  averaged softmax probabilities), at ``sw_batch_size`` 1 and at ``--sw_batch_size``; on CUDA with ``--amp``
  ours runs under ``torch.autocast`` (the reference stays fp32).

Prints the device, volume shape, number of windows, seconds for each run (after one warm-up forward), the
speed ratios, the Dice between the argmax masks of reference and ours and the max abs difference of the
probabilities; PASS if every Dice >= 0.999, else FAIL and exit status 1.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.nn.functional as F

from diffcl_algo.inference.predict import predict_volume
from diffcl_algo.networks import VNet

LA_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "LA"  # ../shared beside the repository
DICE_MIN = 0.999


def test_single_case(net, image, stride_xy, stride_z, patch_size, num_classes=1, device="cuda"):
    """The field's ``test_single_case`` (UA-MT / SSL4MIS ``test_util.py``), verbatim but for the device.

    ``image``: (w, h, d) numpy float32. Returns ``(label_map, score_map)``: (w, h, d) int and
    (num_classes, w, h, d) float32 averaged softmax probabilities.
    """
    w, h, d = image.shape

    # if the size of image is less than patch_size, then padding it
    add_pad = False
    if w < patch_size[0]:
        w_pad = patch_size[0] - w
        add_pad = True
    else:
        w_pad = 0
    if h < patch_size[1]:
        h_pad = patch_size[1] - h
        add_pad = True
    else:
        h_pad = 0
    if d < patch_size[2]:
        d_pad = patch_size[2] - d
        add_pad = True
    else:
        d_pad = 0
    wl_pad, wr_pad = w_pad // 2, w_pad - w_pad // 2
    hl_pad, hr_pad = h_pad // 2, h_pad - h_pad // 2
    dl_pad, dr_pad = d_pad // 2, d_pad - d_pad // 2
    if add_pad:
        image = np.pad(
            image, [(wl_pad, wr_pad), (hl_pad, hr_pad), (dl_pad, dr_pad)], mode="constant", constant_values=0
        )
    ww, hh, dd = image.shape

    sx = math.ceil((ww - patch_size[0]) / stride_xy) + 1
    sy = math.ceil((hh - patch_size[1]) / stride_xy) + 1
    sz = math.ceil((dd - patch_size[2]) / stride_z) + 1
    score_map = np.zeros((num_classes,) + image.shape).astype(np.float32)
    cnt = np.zeros(image.shape).astype(np.float32)

    for x in range(0, sx):
        xs = min(stride_xy * x, ww - patch_size[0])
        for y in range(0, sy):
            ys = min(stride_xy * y, hh - patch_size[1])
            for z in range(0, sz):
                zs = min(stride_z * z, dd - patch_size[2])
                test_patch = image[xs : xs + patch_size[0], ys : ys + patch_size[1], zs : zs + patch_size[2]]
                test_patch = np.expand_dims(np.expand_dims(test_patch, axis=0), axis=0).astype(np.float32)
                test_patch = torch.from_numpy(test_patch).to(device)
                y1 = net(test_patch)
                y = F.softmax(y1, dim=1)
                y = y.cpu().data.numpy()
                y = y[0, :, :, :, :]
                score_map[:, xs : xs + patch_size[0], ys : ys + patch_size[1], zs : zs + patch_size[2]] = (
                    score_map[:, xs : xs + patch_size[0], ys : ys + patch_size[1], zs : zs + patch_size[2]] + y
                )
                cnt[xs : xs + patch_size[0], ys : ys + patch_size[1], zs : zs + patch_size[2]] = (
                    cnt[xs : xs + patch_size[0], ys : ys + patch_size[1], zs : zs + patch_size[2]] + 1
                )
    score_map = score_map / np.expand_dims(cnt, axis=0)
    label_map = np.argmax(score_map, axis=0)

    if add_pad:
        label_map = label_map[wl_pad : wl_pad + w, hl_pad : hl_pad + h, dl_pad : dl_pad + d]
        score_map = score_map[:, wl_pad : wl_pad + w, hl_pad : hl_pad + h, dl_pad : dl_pad + d]
    return label_map, score_map


def num_windows(shape, patch, stride) -> int:
    padded = [max(s, p) for s, p in zip(shape, patch)]
    return math.prod(math.ceil((s - p) / st) + 1 for s, p, st in zip(padded, patch, stride))


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    denom = a.sum() + b.sum()
    return 1.0 if denom == 0 else float(2.0 * np.logical_and(a, b).sum() / denom)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", default=None, help="LA case id (default: last case of train.list)")
    p.add_argument("--data_root", default=str(LA_ROOT))
    p.add_argument("--patch", type=int, nargs=3, default=[112, 112, 80])
    p.add_argument("--stride", type=int, nargs=3, default=[18, 18, 4], help="x y z (the field: x == y)")
    p.add_argument("--sw_batch_size", type=int, default=4)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--amp", action="store_true", help="ours under torch.autocast (CUDA only)")
    p.add_argument("--amp_dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--ckpt", default=None, help="CS network state_dict (default: seeded random init)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    args = p.parse_args()

    if args.stride[0] != args.stride[1]:
        p.error("the field's test_single_case has one stride_xy: --stride x and y must be equal")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    amp = args.amp and device.type == "cuda"
    if args.amp and not amp:
        print("note: --amp ignored on CPU")

    root = Path(args.data_root)
    case = args.case or [c for c in (root / "train.list").read_text().split() if c][-1]
    with h5py.File(root / "2018LA_Seg_Training Set" / case / "mri_norm2.h5", "r") as f:
        image = f["image"][:].astype(np.float32)

    torch.manual_seed(args.seed)
    net = VNet(3, 1, 2, n_filters=16, hfm_stages=(5,))
    if args.ckpt:
        net.load_state_dict(torch.load(args.ckpt, map_location="cpu"))
    net = net.to(device).eval()

    patch, stride = tuple(args.patch), tuple(args.stride)
    nwin = num_windows(image.shape, patch, stride)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"device: {device} ({where})")
    print(f"case: {case}  volume shape: {tuple(image.shape)}  patch: {patch}  stride: {stride}")
    weights = args.ckpt or f"random init (seed {args.seed})"
    print(f"windows: {nwin}  weights: {weights}  amp (ours): {args.amp_dtype if amp else 'off'}")

    with torch.no_grad():
        # warm-up: one forward per batch size used (allocator, cuDNN autotune, lazy init)
        for b in sorted({1, args.sw_batch_size}):
            with torch.autocast("cuda", dtype=getattr(torch, args.amp_dtype), enabled=amp):
                net(torch.zeros(b, 1, *patch, device=device))
        sync(device)

        t0 = time.perf_counter()
        ref_label, ref_prob = test_single_case(net, image, stride[0], stride[2], patch, num_classes=2, device=device)
        sync(device)
        t_ref = time.perf_counter() - t0
        print(f"reference (test_single_case, 1 window/forward, fp32): {t_ref:8.2f} s")

        results = {}
        for b in dict.fromkeys([1, args.sw_batch_size]):
            sync(device)
            t0 = time.perf_counter()
            with torch.autocast("cuda", dtype=getattr(torch, args.amp_dtype), enabled=amp):
                prob = predict_volume(net, image[None], patch, stride, sw_batch_size=b, device=device)
            prob = prob[0].cpu().numpy()
            sync(device)
            t = time.perf_counter() - t0
            results[b] = (t, prob)
            print(f"ours (predict_volume, sw_batch_size={b}): {t:8.2f} s   speed-up vs reference: {t_ref / t:5.2f}x")

    ok = True
    for b, (_, prob) in results.items():
        d = dice(ref_label == 1, prob.argmax(0) == 1)
        diff = float(np.abs(prob - ref_prob).max())
        mism = int((prob.argmax(0) != ref_label).sum())
        ok &= d >= DICE_MIN
        print(
            f"agreement sw_batch_size={b}: Dice(argmax masks) = {d:.6f}  voxels differing = {mism}  "
            f"max |prob diff| = {diff:.3e}  foreground voxels ref/ours = {int((ref_label == 1).sum())}/"
            f"{int((prob.argmax(0) == 1).sum())}"
        )
    print(f"{'PASS' if ok else 'FAIL'} (Dice >= {DICE_MIN})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
