#!/usr/bin/env bash
# Open MPI from Debian (openmpi-bin: mpirun; libopenmpi-dev: the library and mpicc, which the
# `mpi` crate's build asks for its flags) and libclang-dev (bindgen makes the crate's bindings
# from mpi.h), for data-parallel training (`--features mpi`) and its tests. Installs with
# apt-get, so as root (CI runs as root) or through sudo; nothing when all three are there.
set -euo pipefail
have() {
    command -v mpirun >/dev/null && command -v mpicc >/dev/null \
        && compgen -G "/usr/lib/llvm-*/lib/libclang.so*" >/dev/null
}
if have; then
    exit 0
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then
    sudo="sudo"
fi
packages=(openmpi-bin libopenmpi-dev libclang-dev)
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get install -y -q "${packages[@]}" >&2 \
    || { $sudo apt-get update -q >&2 && $sudo apt-get install -y -q "${packages[@]}" >&2; }
have || { echo "install-mpi.sh: mpirun, mpicc or libclang still missing" >&2; exit 1; }
