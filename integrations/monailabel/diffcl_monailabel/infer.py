"""MONAI Label inference task of a diffcl_algo bundle: MONAI Label's own ``BundleInferTask``, made strict.

The task reads the bundle's ``configs/inference.yaml`` and ``configs/metadata.json`` as MONAI Label does for any
bundle (``preprocessing``, ``network_def``, ``inferer`` and ``postprocessing`` of the config: the CS network and
the paper's sliding window, :class:`~diffcl_algo.inference.inferer.DiffCLSlidingWindowInferer`); the
bundle's configs are self-contained, so they load from any directory. Three changes:

* the checkpoint can live outside ``<bundle>/models`` (``ckpt``) and must match the network exactly
  (``load_strict=True``; MONAI Label's default loads whatever keys match and goes on);
* a bundle without a checkpoint or an inference config is an error, not a warning and a missing model;
* a request cannot pick another checkpoint file (MONAI Label's ``model_filename`` option is not offered).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Sequence, Union

from monailabel.tasks.infer.bundle import BundleConstants, BundleInferTask

__all__ = ["DiffCLBundleInferTask"]


class _Constants(BundleConstants):
    """MONAI Label's bundle layout, with the checkpoint at an absolute path (``os.path.join`` keeps it as it is)."""

    def __init__(self, ckpt: Path) -> None:
        self.ckpt = ckpt

    def configs(self) -> Sequence[str]:
        return ["inference.yaml"]

    def model_pytorch(self) -> str:
        return str(self.ckpt)


class DiffCLBundleInferTask(BundleInferTask):
    """Segmentation task of one bundle folder (``bundles/la`` etc.) with its CS checkpoint.

    Args:
        bundle_dir: the bundle folder (``configs/inference.yaml``, ``configs/metadata.json``).
        conf: the MONAI Label app conf (``preload`` etc.).
        ckpt: the CS checkpoint (a ``state_dict``, or a dict holding it under ``"model"``); default
            ``<bundle_dir>/models/model.pt``.
        **kwargs: passed to ``BundleInferTask``.

    Raises:
        FileNotFoundError: the inference config or the checkpoint is missing.
        RuntimeError: MONAI Label did not accept the bundle.
    """

    def __init__(
        self, bundle_dir: Union[str, Path], conf: Dict[str, str], ckpt: Union[str, Path, None] = None, **kwargs: Any
    ) -> None:
        bundle = Path(bundle_dir).resolve()
        model = Path(ckpt).resolve() if ckpt else bundle / "models" / "model.pt"
        for path in (bundle / "configs" / "inference.yaml", bundle / "configs" / "metadata.json", model):
            if not path.is_file():
                raise FileNotFoundError(f"{path} does not exist")
        kwargs.setdefault("load_strict", True)
        super().__init__(str(bundle), conf, const=_Constants(model), **kwargs)
        if not self.is_valid():
            raise RuntimeError(f"MONAI Label did not accept the bundle {bundle} (see its log)")
        self._config.pop("model_filename", None)  # no request-chosen checkpoint files
        self.ckpt = model
