"""MONAI Label's FastAPI app behind :class:`~.guards.RequestGuard`: serve it with
``monailabel start_server ... --uvicorn_app diffcl_monailabel.asgi:app``.

The body limit is ``--conf max_upload_mb <MB>`` of ``start_server`` (``start_server`` sets the app conf before uvicorn
imports this module), else the environment variable ``DIFFCL_MONAILABEL_MAX_UPLOAD_MB``, else
:data:`~.guards.DEFAULT_MAX_BODY_MB`.
"""

from __future__ import annotations

import os
from typing import Mapping, Optional

from monailabel.app import app as monailabel_app
from monailabel.config import settings

from .guards import DEFAULT_MAX_BODY_MB, RequestGuard

__all__ = ["app", "max_body_bytes"]


def max_body_bytes(conf: Optional[Mapping[str, str]] = None) -> int:
    """The request body limit in bytes from the app conf (``max_upload_mb``), the environment or the default."""
    conf = settings.MONAI_LABEL_APP_CONF if conf is None else conf
    value = conf.get("max_upload_mb") or os.environ.get("DIFFCL_MONAILABEL_MAX_UPLOAD_MB") or DEFAULT_MAX_BODY_MB
    megabytes = float(value)
    if not megabytes > 0:
        raise ValueError(f"max_upload_mb must be > 0, got {value}")
    return int(megabytes * 1024 * 1024)


app = RequestGuard(monailabel_app, max_body_bytes())
