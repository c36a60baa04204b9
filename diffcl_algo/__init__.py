"""Diff-CL: semi-supervised 3D medical image segmentation, MONAI-native."""

from __future__ import annotations

__version__ = "0.1.0"
