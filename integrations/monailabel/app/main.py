"""MONAI Label app serving diffcl_algo bundles (docs/monailabel.md).

    monailabel start_server --app integrations/monailabel/app --studies <images> --host 127.0.0.1 --port 8000 \
        --uvicorn_app diffcl_monailabel.asgi:app --conf bundles bundles/la

App conf (``--conf KEY VALUE``):

* ``bundles``: comma-separated bundle folders (default: this repository's ``bundles/la``); each is served as model
  ``diffcl_<folder name>`` (``diffcl_la``; a folder already named ``diffcl_...`` keeps its name) by
  :class:`~diffcl_monailabel.infer.DiffCLBundleInferTask`;
* ``ckpt``: the checkpoint, with a single bundle only (default ``<bundle>/models/model.pt``: the LA bundle ships
  trained weights there, so the server segments without a training step);
* ``max_upload_mb``: request body limit of :mod:`diffcl_monailabel.asgi` (default 256);
* MONAI Label's own keys (``preload`` ...).

Inference requests are checked by :func:`~diffcl_monailabel.guards.check_image_request` (an image is a datastore id,
an upload or a session's image; 400 / 404 otherwise), then the image itself by the bundles' data check
(:func:`diffcl_algo.data.validate_cases`: a readable NIfTI / NRRD / h5 file, a 3D volume, finite values, not
constant; 422 with the file and the problem in one line otherwise), so a malformed upload never reaches the network
and the server goes on serving. Training is not offered (train with the bundle's ``train.yaml``).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any, Dict, Optional

from diffcl_monailabel.guards import GuardError, check_image_request, is_safe_id
from diffcl_monailabel.infer import DiffCLBundleInferTask
from fastapi import HTTPException
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.infer_v2 import InferTask

from diffcl_algo.data import DataError, validate_cases

logger = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[3]


class DiffCLApp(MONAILabelApp):
    """Diff-CL segmentation (CS network, sliding window) of the bundles in ``conf["bundles"]``."""

    def __init__(self, app_dir: str, studies: str, conf: Dict[str, str]) -> None:
        names = conf.get("bundles") or str(REPO / "bundles" / "la")
        self.bundle_dirs = [Path(b.strip()).resolve() for b in names.split(",") if b.strip()]
        if conf.get("ckpt") and len(self.bundle_dirs) != 1:
            raise ValueError("conf 'ckpt' needs exactly one bundle in conf 'bundles'")
        if "diffcl_monailabel.asgi" not in sys.modules:
            logger.warning(
                "diffcl_monailabel.asgi is not loaded: no request size limit and no path checks on datastore "
                "endpoints; start the server with --uvicorn_app diffcl_monailabel.asgi:app"
            )
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="Diff-CL segmentation (diffcl_algo)",
            description="Diff-CL CS network with sliding-window inference, from diffcl_algo bundles",
            version="0.1.0",
        )

    def init_infers(self) -> Dict[str, InferTask]:
        """One :class:`DiffCLBundleInferTask` per bundle, named ``diffcl_<bundle folder>`` (a packaged bundle's folder
        ``diffcl_la`` keeps its name)."""
        infers: Dict[str, InferTask] = {}
        for bundle in self.bundle_dirs:
            name = bundle.name if bundle.name.startswith("diffcl_") else f"diffcl_{bundle.name}"
            infers[name] = DiffCLBundleInferTask(bundle, self.conf, ckpt=self.conf.get("ckpt"))
            logger.info(f"+++ Adding Inferer:: {name} => {bundle} ({infers[name].ckpt})")
        return infers

    def infer(self, request: Dict[str, Any], datastore: Optional[Datastore] = None) -> Any:
        """MONAI Label's ``infer`` after :func:`check_image_request` (400 / 404 as ``HTTPException``)."""
        store = datastore if datastore else self.datastore()
        try:
            sessions = self.sessions()
            check_image_request(
                request,
                known_image=lambda image_id: bool(store.get_image_uri(image_id)),
                trusted_dirs=[sessions.store_path] if sessions else [],
            )
        except GuardError as e:
            raise HTTPException(status_code=e.status, detail=e.detail) from e
        image = request["image"]
        if is_safe_id(image) and os.path.exists(image):
            # MONAI Label reads any existing path as the image: a datastore id that is also a file name in the
            # server's working directory goes to the datastore's file instead
            request = {**request, "image": store.get_image_uri(image)}
        path = request["image"] if os.path.isfile(str(request["image"])) else store.get_image_uri(request["image"])
        try:
            validate_cases([{"image": str(path)}])
        except DataError as e:
            problem = " ".join(str(e).split()).split("; expected")[0].replace("1 of 1 cases failed validation: ", "")
            raise HTTPException(status_code=422, detail=f"the image is not a valid scan: {problem}") from e
        return super().infer(request, datastore)
