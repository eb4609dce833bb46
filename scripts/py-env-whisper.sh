#!/usr/bin/env bash
# Adds the speech references to the git-ignored .venv: faster-whisper (CTranslate2) and jiwer
# for bench/whisper.py (WER, identical text, speed and memory against ours). Torch is not
# needed for the benchmark; tests/fixtures/gen_whisper.py also needs scripts/py-env.sh's torch
# and transformers. CI never runs this.
#
# Usage: scripts/py-env-whisper.sh     prints the venv's python on its last line.
set -euo pipefail

FASTER_WHISPER_VERSION="1.2.1"
JIWER_VERSION="4.0.0"

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${repo_root}/.venv"
if [[ ! -x "${venv}/bin/python" ]]; then
    echo "creating ${venv} with ${PYTHON:-python3}" >&2
    "${PYTHON:-python3}" -m venv "${venv}"
fi
py="${venv}/bin/python"
if ! "${py}" -c "
import sys, faster_whisper, jiwer
sys.exit(0 if faster_whisper.__version__ == '${FASTER_WHISPER_VERSION}' else 1)" >/dev/null 2>&1; then
    "${py}" -m pip install "faster-whisper==${FASTER_WHISPER_VERSION}" "jiwer==${JIWER_VERSION}" >&2
fi
echo "${py}"
