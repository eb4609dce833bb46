#!/usr/bin/env bash
# Adds the LLM references to the git-ignored .venv (scripts/py-env.sh makes it):
# transformers + gguf + accelerate (their GGUF loader dequantizes to f32; the f32 fixtures in
# tests/fixtures/gguf/ come from it) and llama-cpp-python (llama.cpp itself, built from its PyPI
# source package: the quantized-path comparison and the speed benchmark). CI never runs this.
#
# Usage: scripts/py-env-llm.sh        prints the venv's python on its last line.
# llama.cpp is built for this CPU's vector extensions (AVX-512 with VNNI and BF16 where the CPU
# has them) with CMAKE_BUILD_PARALLEL_LEVEL jobs (default: nproc), but without AMX: on this
# machine's Xeon the kernel does not grant the AMX tile state, and a GGML_NATIVE build dies
# with SIGILL at its first `tilezero` (gdb: ggml_backend_amx_mul_mat). CMAKE_ARGS overrides.
set -euo pipefail

TRANSFORMERS_VERSION="5.24.0"
GGUF_VERSION="0.19.0"
LLAMA_CPP_PYTHON_VERSION="0.3.36"

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="$("${repo_root}/scripts/py-env.sh" | tail -n 1)"

if ! "${py}" -c "import transformers, gguf, accelerate" >/dev/null 2>&1; then
    "${py}" -m pip install "transformers==${TRANSFORMERS_VERSION}" "gguf==${GGUF_VERSION}" accelerate sentencepiece >&2
fi
# Another version installed, or LLAMA_CPP_REBUILD=1 (e.g. after a build for another CPU), rebuilds.
if ! "${py}" -c "import llama_cpp, sys; sys.exit(0 if '${LLAMA_CPP_PYTHON_VERSION}' == llama_cpp.__version__ else 1)" >/dev/null 2>&1 \
    || [[ -n "${LLAMA_CPP_REBUILD:-}" ]]; then
    # scikit-build-core fetches cmake and ninja from PyPI when the machine has none.
    export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
    flags="$(grep -m1 '^flags' /proc/cpuinfo || true)"
    has() { [[ " ${flags} " == *" $1 "* ]] && echo ON || echo OFF; }
    default_args="-DGGML_NATIVE=OFF -DGGML_AVX=$(has avx) -DGGML_AVX2=$(has avx2) \
-DGGML_FMA=$(has fma) -DGGML_F16C=$(has f16c) -DGGML_AVX_VNNI=$(has avx_vnni) \
-DGGML_AVX512=$(has avx512f) -DGGML_AVX512_VBMI=$(has avx512vbmi) \
-DGGML_AVX512_VNNI=$(has avx512_vnni) -DGGML_AVX512_BF16=$(has avx512_bf16)"
    export CMAKE_ARGS="${CMAKE_ARGS:-${default_args}}"
    echo "building llama-cpp-python with CMAKE_ARGS=${CMAKE_ARGS}" >&2
    "${py}" -m pip install --force-reinstall --no-deps --no-cache-dir --no-binary llama-cpp-python \
        "llama-cpp-python==${LLAMA_CPP_PYTHON_VERSION}" >&2
fi
echo "${py}"
