#!/usr/bin/env bash
# Create (or reuse) a virtual environment with megatron-grace installed from this checkout.
#   bash tools/setup_venv.sh VENV_DIR [EXTRAS]      e.g. bash tools/setup_venv.sh .venv test,eval
# On machines without an NVIDIA GPU, torch is pinned to the 2.13.0 CPU wheel FIRST: a bare torch requirement
# resolves to a CUDA build with several GB of nvidia wheels. With a GPU, pip's default (CUDA) torch is used and the
# gpu extra (Transformer Engine, flash-attn) can be requested through EXTRAS.
set -euo pipefail
venv=${1:?usage: setup_venv.sh VENV_DIR [EXTRAS]}
extras=${2:-}
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON_FOR_VENV:-python3.11}
command -v "$python" >/dev/null || python=python3
export PIP_DISABLE_PIP_VERSION_CHECK=1

if [[ ! -x $venv/bin/python ]]; then
    echo "[setup_venv] creating $venv with $($python --version)"
    "$python" -m venv "$venv"
fi
if ! (command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1); then
    "$venv/bin/pip" install -q torch==2.13.0
fi
"$venv/bin/pip" install -q -e "$repo${extras:+[$extras]}"
echo "[setup_venv] ready: $venv/bin/python"
