#!/usr/bin/env bash
# The main job on a fresh machine: set up ./.venv, then run the quickstart on real data (MovieLens-100K).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" TOKENIZERS_PARALLELISM=false
minirec data --data configs/data/movielens-100k.yaml "$@"
