"""CS-only sliding-window inference with the field's window placement (Algorithm 1 output: the CS network).

The field's ``test_single_case`` (UA-MT / SSL4MIS) pads a volume smaller than the patch symmetrically with
zeros (``pad // 2`` before, the rest after), places windows at ``min(i * stride, size - patch)`` for
``i = 0 .. ceil((size - patch) / stride)`` (so the last window is flush with the border), sums the softmax
probabilities of all windows, divides by the per-voxel window count and crops the padding away.

MONAI's ``SlidingWindowInferer`` does exactly that when

* ``mode="constant"`` (uniform weights = average of the window outputs), zero ``constant`` padding, and
* its scan interval ``int(roi * (1 - overlap))`` equals the stride: ``stride_to_overlap`` returns
  ``overlap = 1 - (stride + 0.5) / roi`` so that ``roi * (1 - overlap) = stride + 0.5`` whatever the
  floating-point rounding, ``int(.) = stride``; ``stride == roi`` gives overlap 0.

MONAI's window starts are ``min(i * interval, size - roi)`` for ``i`` up to the first window reaching the border,
the same positions. The network output is passed through softmax before averaging (``softmax=True``), so
probabilities, not logits, are averaged as in the field.

Flip test-time augmentation (``flip_axes``, off by default) averages these probabilities over the volume as given and
flipped along each listed set of spatial axes, each flipped back (nnU-Net's mirroring). Written here because MONAI's
``TestTimeAugmentation`` draws random transforms per case for uncertainty, not a fixed set of mirrors to average.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch
from monai.inferers import SlidingWindowInferer
from torch import nn

__all__ = ["stride_to_overlap", "DiffCLSlidingWindowInferer"]


def stride_to_overlap(patch_size: Sequence[int], strides: Union[Sequence[int], int]) -> tuple[float, ...]:
    """Per-dimension MONAI ``overlap`` whose scan interval ``int(roi * (1 - overlap))`` equals ``stride``.

    Args:
        patch_size: window size per spatial dimension.
        strides: window stride per dimension (an int applies to all); ``1 <= stride <= patch``.

    Raises:
        ValueError: a stride outside ``[1, patch]`` (the field's windows would leave gaps).
    """
    patch = [int(p) for p in patch_size]
    stride = [int(strides)] * len(patch) if isinstance(strides, (int, np.integer)) else [int(s) for s in strides]
    if len(stride) != len(patch):
        raise ValueError(f"strides {stride} and patch_size {patch} differ in length.")
    overlaps = []
    for p, s in zip(patch, stride):
        if not 1 <= s <= p:
            raise ValueError(f"Each stride must be in [1, patch], got stride {s} for patch {p}.")
        overlaps.append(0.0 if s == p else 1.0 - (s + 0.5) / p)
    return tuple(overlaps)


class _Softmax(nn.Module):
    def __init__(self, network: Callable[..., torch.Tensor]) -> None:
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return torch.softmax(self.network(x, *args, **kwargs).float(), dim=1)


class DiffCLSlidingWindowInferer(SlidingWindowInferer):
    """``SlidingWindowInferer`` with the paper's patch and stride, averaging softmax probabilities.

    Usable anywhere MONAI expects an inferer (``SupervisedEvaluator(inferer=...)``, bundle configs).

    Args:
        patch_size: window size (LA 112x112x80, Pancreas/BraTS 96^3).
        strides: window stride (LA 18x18x4, Pancreas 16^3, BraTS 64^3); converted by ``stride_to_overlap``.
        sw_batch_size: windows per forward pass.
        softmax: apply softmax to the network output before averaging (True: the field's convention; the
            result is then class probabilities).
        device, sw_device: see ``monai.inferers.SlidingWindowInferer``.
        flip_axes: test-time augmentation: sets of spatial axes (0 = the first spatial dimension), e.g.
            ``[[0], [1], [2]]``; the output is the mean over the unflipped volume and one flipped copy per set,
            each flipped back. Empty / None: one pass, no augmentation. Costs one sliding window per set more.

    Raises:
        ValueError: ``flip_axes`` names an axis outside the spatial dimensions, or is used with ``softmax=False``
            (averaging logits over flips is not the mean of probabilities).
    """

    def __init__(
        self,
        patch_size: Sequence[int],
        strides: Union[Sequence[int], int],
        sw_batch_size: int = 1,
        softmax: bool = True,
        device: Union[torch.device, str, None] = None,
        sw_device: Union[torch.device, str, None] = None,
        flip_axes: Optional[Sequence[Sequence[int]]] = None,
    ) -> None:
        super().__init__(
            roi_size=tuple(int(p) for p in patch_size),
            sw_batch_size=sw_batch_size,
            overlap=stride_to_overlap(patch_size, strides),
            mode="constant",
            padding_mode="constant",
            cval=0.0,
            sw_device=sw_device,
            device=device,
        )
        self.softmax = softmax
        dims = len(self.roi_size)
        self.flip_axes = [tuple(int(a) for a in axes) for axes in (flip_axes or [])]
        for axes in self.flip_axes:
            if not axes or any(not 0 <= a < dims for a in axes):
                raise ValueError(f"flip_axes: each entry must list spatial axes in [0, {dims - 1}], got {list(axes)}.")
        if self.flip_axes and not softmax:
            raise ValueError("flip_axes averages probabilities: it needs softmax=True.")

    def __call__(self, inputs: torch.Tensor, network: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run ``network`` over windows of ``inputs`` (B, C_in, *S) -> (B, C_out, *S) averaged outputs (and over
        the flips of ``flip_axes``)."""
        predictor = _Softmax(network) if self.softmax else network
        out = super().__call__(inputs, predictor, *args, **kwargs)
        for axes in self.flip_axes:
            dims = [a + 2 for a in axes]
            out = out + torch.flip(super().__call__(torch.flip(inputs, dims), predictor, *args, **kwargs), dims)
        return out / (1 + len(self.flip_axes)) if self.flip_axes else out
