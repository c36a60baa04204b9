#!/usr/bin/env bash
# Build the MONAI Label environment of diffcl_algo: a virtual environment with MONAI Label 0.8.5, NumPy < 2, a
# matching torch/torchvision pair, this repository's diffcl_algo (editable) and integrations/monailabel on its path.
# MONAI Label 0.8.5 needs NumPy 1.x and a working torchvision, which the main environment (NumPy 2, CPU-only torch
# without torchvision) lacks, so it gets its own. The pins are in constraints.txt beside this script.
#
# Usage:  bash integrations/monailabel/setup_env.sh [VENV_DIR]
#   VENV_DIR                     default: $DIFFCL_MONAILABEL_VENV, else <repo>/.venv-monailabel
#   DIFFCL_MONAILABEL_PYTHON     interpreter that creates the venv (default: python3.11, else python3)
#   DIFFCL_MONAILABEL_REBUILD=1  rebuild even when the venv is up to date
#   DIFFCL_MONAILABEL_TORCH      cpu | cuda | auto (default auto: cuda when `nvidia-smi -L` lists a GPU, else cpu
#                                when PyTorch's CPU index answers, else cuda: the only build the package registries have)
#   DIFFCL_MONAILABEL_CPU_INDEX  the CPU build's index (default https://download.pytorch.org/whl/cpu)
#   --print-torch-source         print the torch build that would be installed (cpu / cuda) and its pip options, exit
# A venv built from the same pins and torch build is reused (only re-pointed at this checkout, seconds); a new one
# takes about 4.5 minutes and 8.2 GB with the CUDA build (docs/monailabel.md); on a machine without CUDA the CPU build
# comes from PyTorch's CPU index, without the nvidia packages. The last line printed is the venv's python.
set -euo pipefail
BUILD_REV=2  # bump when the build steps below change
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"

cpu_index="${DIFFCL_MONAILABEL_CPU_INDEX:-https://download.pytorch.org/whl/cpu}"
# whether the CPU index lists torch (a 10 s look, nothing downloaded)
cpu_index_answers() {
    python3 -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1].rstrip("/") + "/torch", timeout=10)' \
        "$cpu_index" > /dev/null 2>&1
}
# torch build: cuda (PyPI's default wheels, with the nvidia packages) or cpu (PyTorch's CPU index)
torch_build() {
    case "${DIFFCL_MONAILABEL_TORCH:-auto}" in
        cpu | cuda) echo "$DIFFCL_MONAILABEL_TORCH" ;;
        auto) if command -v nvidia-smi > /dev/null 2>&1 && nvidia-smi -L 2> /dev/null | grep -q "^GPU"; then
                  echo cuda
              elif cpu_index_answers; then
                  echo cpu
              else
                  echo "setup_env.sh: no GPU, but $cpu_index does not answer: installing the default (CUDA) build" >&2
                  echo cuda
              fi ;;
        *) echo "setup_env.sh: DIFFCL_MONAILABEL_TORCH must be cpu, cuda or auto, got '$DIFFCL_MONAILABEL_TORCH'" >&2
           exit 2 ;;
    esac
}
build="$(torch_build)"
torch_pip_options=()
if [ "$build" = cpu ]; then torch_pip_options=(--index-url "$cpu_index"); fi
if [ "${1:-}" = --print-torch-source ]; then
    echo "$build ${torch_pip_options[*]}"
    exit 0
fi
venv="${1:-${DIFFCL_MONAILABEL_VENV:-$root/.venv-monailabel}}"
constraints="$here/constraints.txt"
export PIP_DISABLE_PIP_VERSION_CHECK=1

vpy() { (cd / && "$venv/bin/python" "$@"); }  # never import this checkout through the working directory
smoke() {
    vpy - "$root" <<'EOF'
import os, sys
import monai, monailabel, numpy, torch, torchvision
import diffcl_algo.inference.predict, diffcl_algo.networks, diffcl_monailabel.guards
from monailabel.interfaces.app import MONAILabelApp
assert int(numpy.__version__.split(".")[0]) < 2, numpy.__version__
torchvision.ops.nms(torch.zeros(0, 4), torch.zeros(0), 0.5)  # torchvision's C++ operators load beside this torch
for mod in (diffcl_algo, diffcl_monailabel.guards):
    if not os.path.realpath(mod.__file__).startswith(os.path.realpath(sys.argv[1]) + os.sep):
        sys.exit(f"{mod.__name__} is imported from {mod.__file__}, not from {sys.argv[1]}")
print(f"monailabel {monailabel.__version__}, monai {monai.__version__}, torch {torch.__version__}, "
      f"torchvision {torchvision.__version__}, numpy {numpy.__version__}")
EOF
}
# point the venv at this checkout: diffcl_algo (editable) and integrations/monailabel (diffcl_monailabel)
link() {
    site="$(vpy -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    echo "$here" > "$site/diffcl_monailabel.pth"
    if ! vpy -c 'import os, sys, diffcl_algo
sys.exit(os.path.realpath(diffcl_algo.__file__) != os.path.realpath(sys.argv[1]))' "$root/diffcl_algo/__init__.py" 2>/dev/null; then
        echo "pointing $venv at $root"
        "$venv/bin/python" -m pip install -q --no-deps --no-build-isolation -e "$root"
    fi
}

want="rev $BUILD_REV torch-$build $(sha256sum < "$constraints" | cut -d' ' -f1)"
if [ "${DIFFCL_MONAILABEL_REBUILD:-0}" != 1 ] && [ -f "$venv/.diffcl-stamp" ] \
    && [ "$(cat "$venv/.diffcl-stamp")" = "$want" ]; then
    link
    smoke
    echo "up to date: $venv"
    echo "$venv/bin/python"
    exit 0
fi

py="${DIFFCL_MONAILABEL_PYTHON:-$(command -v python3.11 || command -v python3)}"
parent="$(dirname "$venv")"
mkdir -p "$parent"
free_gb=$(( $(df -Pk "$parent" | awk 'NR==2 {print $4}') / 1024 / 1024 ))
if [ "$free_gb" -lt 10 ]; then
    echo "setup_env.sh: $free_gb GB free under $parent; the MONAI Label venv needs about 9 GB (10 GB asked)" >&2
    exit 1
fi
echo "building $venv with $("$py" --version)"
rm -rf "$venv"
"$py" -m venv "$venv"
pip=("$venv/bin/python" -m pip install -c "$constraints")
# 1. torch + torchvision first (pinned pair, the build chosen above), so that nothing below pulls in another build.
echo "torch build: $build"
"${pip[@]}" "${torch_pip_options[@]}" torch torchvision
# 2. sam2 (required by MONAI Label) is an sdist whose build needs torch: build it against the torch above, without its
#    optional CUDA extension, instead of in an isolated environment that would install a second torch.
"${pip[@]}" "setuptools>=61" wheel
SAM2_BUILD_CUDA=0 "${pip[@]}" --no-build-isolation sam2
# 3. MONAI Label with its declared dependencies, and this repository (editable, so the app runs this checkout).
"${pip[@]}" monailabel monai numpy pydicom -e "$root"
"$venv/bin/python" -m pip check
link
smoke
echo "$want" > "$venv/.diffcl-stamp"
echo "$venv/bin/python"
