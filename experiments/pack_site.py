"""Turn the wheels a device machine lacks into one small site-packages archive (``.tar.xz``), to carry instead.

The device image lacks monai, pytorch-ignite, nibabel, fire and termcolor: 5.2 MiB of wheels. Their files, without
the packages' own test suites (``tests`` folders: most of nibabel's size), xz-compressed, take 1.3 MiB; the rest of
the 64 MiB that travels is left to data. ``experiments/gpu_paper_scale.py --wheels <archive>`` extracts it into its
site folder (no pip run: also faster), exactly what ``pip install --no-deps --target`` would put there for these
pure-Python wheels, apart from the tests and the ``.data`` scripts / headers folders (none in these).

    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl monai==1.6.1 pytorch-ignite==0.5.5 nibabel==5.4.2 fire==0.7.1 termcolor==3.3.0
    python experiments/pack_site.py --wheels .whl --dst data/site.tar.xz
"""

from __future__ import annotations

import argparse
import io
import json
import lzma
import tarfile
import zipfile
from pathlib import Path
from typing import Any, Sequence

#: Folder names left out of the archive (the packages' test suites).
DROP = ("tests",)


def _target(name: str) -> str | None:
    """Where a wheel member goes in site-packages (None: left out)."""
    parts = name.split("/")
    if name.endswith("/") or any(p in DROP for p in parts[:-1]):
        return None
    if parts[0].endswith(".data"):  # <dist>.data/purelib|platlib/... go to site-packages; scripts, headers do not
        return "/".join(parts[2:]) if len(parts) > 2 and parts[1] in ("purelib", "platlib") else None
    return name


def pack_site(wheels: str, dst: str, preset: int = 9) -> dict[str, Any]:
    """Write the files of ``wheels/*.whl`` (less :data:`DROP`) as ``dst``, an xz tar of a site-packages folder.

    Returns:
        ``wheels`` (file names), ``files``, ``mib`` (archive size), ``wheel_mib`` (the wheels' size).

    Raises:
        FileNotFoundError: no wheel in ``wheels``.
    """
    found = sorted(Path(wheels).glob("*.whl"))
    if not found:
        raise FileNotFoundError(f"no .whl file in {wheels}")
    members: dict[str, bytes] = {}
    for wheel in found:
        with zipfile.ZipFile(wheel) as z:
            for name in z.namelist():
                target = _target(name)
                if target:
                    members[target] = z.read(name)
    out = Path(dst)
    out.parent.mkdir(parents=True, exist_ok=True)
    with lzma.open(out, "wb", preset=preset | lzma.PRESET_EXTREME) as xz, tarfile.open(fileobj=xz, mode="w") as tar:
        for name in sorted(members):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(members[name]), 0o644, 0
            tar.addfile(info, io.BytesIO(members[name]))
    return {
        "wheels": [w.name for w in found],
        "files": len(members),
        "mib": round(out.stat().st_size / 2**20, 2),
        "wheel_mib": round(sum(w.stat().st_size for w in found) / 2**20, 2),
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--wheels", default=".whl", help="folder of the wheels")
    p.add_argument("--dst", default="data/site.tar.xz", help="archive to write (under an ignored folder)")
    args = p.parse_args(argv)
    result = pack_site(args.wheels, args.dst)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
