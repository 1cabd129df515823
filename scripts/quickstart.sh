#!/usr/bin/env bash
# The main job on a fresh machine: set up ./.venv, then run the MiniRec quickstart pipeline on real data
# (MovieLens-100K) with a real pretrained model (SmolLM2-135M-Instruct) on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" TOKENIZERS_PARALLELISM=false
minirec pipeline --config configs/quickstart.yaml "$@"
