#!/usr/bin/env bash
# Creates the Python environment used to regenerate the PyTorch parity fixtures
# (tests/fixtures/gen_parity.py). CI never runs Python; only developers who
# regenerate fixtures need this.
#
# Usage: scripts/py-env.sh            (from anywhere; the venv lives at <repo>/.venv)
#   PYTHON=python3.11 scripts/py-env.sh   to pick the interpreter that creates the venv.
#   pip honours PIP_INDEX_URL / PIP_EXTRA_INDEX_URL, e.g. a CPU-only torch wheel:
#   PIP_INDEX_URL=https://download.pytorch.org/whl/cpu scripts/py-env.sh
set -euo pipefail

# The fixtures record the torch version that produced them; keep this pin in
# step with the header of tests/fixtures/gen_parity.py.
TORCH_VERSION="2.15.0"

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${repo_root}/.venv"
python_bin="${PYTHON:-python3}"

if [[ ! -x "${venv}/bin/python" ]]; then
    echo "creating ${venv} with ${python_bin}" >&2
    "${python_bin}" -m venv "${venv}"
fi

# Idempotent: an environment that already imports both packages is left alone.
if "${venv}/bin/python" -c "import torch, safetensors" >/dev/null 2>&1; then
    installed="$("${venv}/bin/python" -c "import torch; print(torch.__version__)")"
    echo "torch ${installed} and safetensors already importable; nothing to install" >&2
    if [[ "${installed%%+*}" != "${TORCH_VERSION}" ]]; then
        echo "warning: torch ${installed} != pinned ${TORCH_VERSION}; fixtures may differ" >&2
    fi
else
    "${venv}/bin/python" -m pip install --upgrade pip
    "${venv}/bin/python" -m pip install "torch==${TORCH_VERSION}" numpy safetensors
fi

echo "${venv}/bin/python"
