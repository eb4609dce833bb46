#!/usr/bin/env bash
# Fetches Fashion-MNIST (Xiao et al. 2017, MIT) for the ViT tests (issue 14) from Debian into a
# git-ignored cache, without installing anything: `apt-get download dataset-fashion-mnist` +
# `dpkg -x`, the .deb checked against its sha256. `transformer data fetch fashion-mnist
# --mirror ROOT/usr/share/datasets` then copies the four IDX files out of it, checking each
# decompressed file's sha256 (Debian's gzip bytes differ from upstream's).
#
# Usage: scripts/fetch-fashion-mnist.sh      prints the unpacked root on its last line
#   FASHION_MNIST_CACHE=DIR   cache folder (default <repo>/.cache/fashion-mnist)
# Files: ROOT/usr/share/datasets/fashion-mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${FASHION_MNIST_CACHE:-${repo_root}/.cache/fashion-mnist}"
root="${cache}/root"
marker="${root}/.complete"
deb="dataset-fashion-mnist_0.0~git20200523.55506a9-1_all.deb"
sha="39e172fe32dd318ebb3e512220c3beea2fa47d7e20bab348fb4e0922d6beefc0"

if [[ -f "${marker}" ]]; then
    echo "fashion-mnist already unpacked" >&2
    echo "${root}"
    exit 0
fi
mkdir -p "${cache}"
cd "${cache}"
if [[ ! -f "${deb}" ]] || [[ "$(sha256sum "${deb}" | cut -d' ' -f1)" != "${sha}" ]]; then
    rm -f "${deb}"
    # A fresh machine may have no package lists yet.
    apt-get download "dataset-fashion-mnist=0.0~git20200523.55506a9-1" >&2 \
        || { apt-get update >&2 && apt-get download "dataset-fashion-mnist=0.0~git20200523.55506a9-1" >&2; }
fi
actual="$(sha256sum "${deb}" | cut -d' ' -f1)"
if [[ "${actual}" != "${sha}" ]]; then
    echo "error: ${cache}/${deb}: sha256 ${actual}, expected ${sha}" >&2
    exit 1
fi
tmp="${cache}/root.tmp.$$"
rm -rf "${tmp}"
trap 'rm -rf "${tmp}"' EXIT
dpkg -x "${deb}" "${tmp}"
touch "${tmp}/.complete"
rm -rf "${root}"
mv "${tmp}" "${root}"
echo "unpacked fashion-mnist into ${root}" >&2
echo "${root}"
