"""CS-only prediction from Python: a volume in the model's frame (:func:`predict_volume`) or a scan file
(:func:`predict_scan`, the bundles' inference chain of :mod:`diffcl_algo.inference.chains`)."""

from __future__ import annotations

import os
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from monai.config import PathLike
from monai.data import MetaTensor
from torch import nn

from diffcl_algo.inference.chains import scan_postprocessing, scan_preprocessing
from diffcl_algo.inference.inferer import DiffCLSlidingWindowInferer

__all__ = ["predict_scan", "predict_volume"]


@torch.no_grad()
def predict_volume(
    net: nn.Module,
    image: Union[torch.Tensor, np.ndarray, str, os.PathLike],
    patch_size: Sequence[int],
    strides: Union[Sequence[int], int],
    sw_batch_size: int = 1,
    device: Union[torch.device, str, None] = None,
    return_label: bool = False,
    flip_axes: Optional[Sequence[Sequence[int]]] = None,
    **scan_options: Any,
) -> torch.Tensor:
    """CS-only sliding-window prediction of whole volumes (the field's ``test_single_case``).

    Args:
        net: the CS network (put in eval mode here); ``net(x)`` returns logits (B, C, *patch).
        image: (C_in, *S) or (B, C_in, *S) volume(s) already in the model's frame (normalised, at the training
            spacing); any size (padded when smaller than the patch). Or a scan file (NIfTI, NRRD, h5): it goes
            through the bundles' inference chain (:func:`predict_scan`: the dataset's intensity
            normalisation, ``roi``, orientation, resampling to ``model_spacing``) and the result comes back on
            the file's own grid, as a MetaTensor with its affine.
        patch_size: window size.
        strides: window stride (int or per dimension).
        sw_batch_size: windows per forward pass.
        device: where the network runs (default: the network's device).
        return_label: return the argmax label map instead of the probabilities.
        flip_axes: flip test-time augmentation of the inferer (the bundles' ``tta_flip``: ``[[0], [1], [2]]``).
        scan_options: for a file: keyword arguments of :func:`~diffcl_algo.inference.chains.scan_preprocessing`
            (``model_spacing``, ``orientation``, ``roi``, ``normalize``, ``scan_norm``, ``spacing``) and
            ``keep_largest`` (:func:`predict_scan`).

    Returns:
        (B, C, *S) averaged softmax probabilities (float32), or (B, 1, *S) long labels if ``return_label``
        (B = 1 for a file).
    """
    if isinstance(image, (str, os.PathLike)):
        out = predict_scan(
            net, image, patch_size, strides, None, sw_batch_size, device, return_label, flip_axes, **scan_options
        )
        return out[None]
    x = torch.as_tensor(np.asarray(image) if not isinstance(image, torch.Tensor) else image).float()
    if x.ndim == len(patch_size) + 1:
        x = x[None]
    if device is None:
        device = next(net.parameters()).device
    net.eval()
    inferer = DiffCLSlidingWindowInferer(patch_size, strides, sw_batch_size=sw_batch_size, flip_axes=flip_axes)
    probs = inferer(x.to(device), net)
    probs = torch.as_tensor(probs).float()
    return probs.argmax(dim=1, keepdim=True) if return_label else probs


@torch.no_grad()
def predict_scan(
    net: nn.Module,
    path: PathLike,
    patch_size: Sequence[int],
    strides: Union[Sequence[int], int],
    output_dir: PathLike | None = None,
    sw_batch_size: int = 1,
    device: Union[torch.device, str, None] = None,
    return_label: bool = True,
    flip_axes: Optional[Sequence[Sequence[int]]] = None,
    keep_largest: int = 0,
    **preprocessing: Any,
) -> MetaTensor:
    """Segment one scan file with the bundle's inference chain; the mask is on the file's own grid.

    Args:
        net: the CS network (put in eval mode here).
        path: image file (NIfTI, NRRD, h5, ...).
        patch_size, strides, sw_batch_size: the sliding window of
            :class:`~diffcl_algo.inference.inferer.DiffCLSlidingWindowInferer`.
        output_dir: also write ``<output_dir>/<case>.nii.gz``.
        device: where the network runs (default: the network's device).
        return_label: return the label map; False: the class probabilities (nothing is written then).
        flip_axes: flip test-time augmentation of the inferer (the bundles' ``tta_flip``: ``[[0], [1], [2]]``).
        keep_largest: 0, or the number of classes: keep the largest connected component of each foreground class of
            the label map (the bundles' ``keep_largest_component``).
        preprocessing: keyword arguments of :func:`~diffcl_algo.inference.chains.scan_preprocessing`
            (``model_spacing``, ``orientation``, ``roi``, ``normalize``, ``spacing``, ``scan_norm``).

    Returns:
        (1, *S) label map, or (C, *S) probabilities, as a MetaTensor with the input's affine (S: the input's
        spatial shape).
    """
    pre = scan_preprocessing(**preprocessing)
    item = pre({"image": str(path)})
    device = device if device is not None else next(net.parameters()).device
    net.eval()
    inferer = DiffCLSlidingWindowInferer(patch_size, strides, sw_batch_size=sw_batch_size, flip_axes=flip_axes)
    image = item["image"]
    item["pred"] = inferer(image[None].to(device), net)[0].cpu()  # Invertd reads the geometry from item["image"]
    post = scan_postprocessing(
        pre, output_dir if return_label else None, argmax=return_label, keep_largest=keep_largest
    )
    return post(item)["pred"]
