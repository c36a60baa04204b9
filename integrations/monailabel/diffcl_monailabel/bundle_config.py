"""Make a bundle config independent of the working directory.

The repository's bundles pull the shared graph in with file macros relative to the repository root
(``"%bundles/base/configs/inference.yaml#network_def"``), which MONAI resolves against the working directory; a MONAI
Label server runs wherever it was started. :func:`absolutize_macros` rewrites each relative file macro to the
absolute path of the first ancestor of the bundle folder (the folder itself included) under which the file exists,
so the config parses from any directory. A self-contained bundle (no file macros, e.g. one packaged with its base
sections inlined) passes through unchanged.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Union

from monai.bundle import ConfigParser
from monai.bundle.utils import ID_SEP_KEY, MACRO_KEY

__all__ = ["absolutize_macros", "resolve_macro_file"]


def resolve_macro_file(rel_path: str, bundle_dir: Union[str, Path]) -> Path:
    """Absolute path of a macro's config file: ``<ancestor>/<rel_path>`` for the nearest ancestor of ``bundle_dir``.

    Raises:
        FileNotFoundError: no ancestor of ``bundle_dir`` holds ``rel_path``.
    """
    start = Path(bundle_dir).resolve()
    for base in (start, *start.parents):
        candidate = base / rel_path
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"config macro file '{rel_path}' found under no ancestor of {start}")


def absolutize_macros(config: Any, bundle_dir: Union[str, Path]) -> Any:
    """Copy of ``config`` (nested dicts / lists) with relative file macros made absolute (:func:`resolve_macro_file`).

    Same-file macros (``"%#id"``) and absolute paths are kept as they are.
    """
    if isinstance(config, dict):
        return {k: absolutize_macros(v, bundle_dir) for k, v in config.items()}
    if isinstance(config, list):
        return [absolutize_macros(v, bundle_dir) for v in config]
    if isinstance(config, str) and config.startswith(MACRO_KEY):
        path, ids = ConfigParser.split_path_id(config[len(MACRO_KEY) :])
        if path and not os.path.isabs(path):
            target = resolve_macro_file(path, bundle_dir)
            return f"{MACRO_KEY}{target}{ID_SEP_KEY}{ids}" if ids else f"{MACRO_KEY}{target}"
    return config
