#!/usr/bin/env bash
# Set up ./.venv (scripts/setup.sh) and run the whole test suite on the CPU, offline; then the vLLM engine's tests in
# their own environment (scripts/setup.sh vllm). Arguments go to the first pytest run only, and skip the second.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 DS_ACCELERATOR=cpu TOKENIZERS_PARALLELISM=false
.venv/bin/python -m pytest tests "$@"
if [ $# -eq 0 ]; then
  bash scripts/setup.sh vllm
  MINIREC_REQUIRE_VLLM=1 .venv-vllm/bin/python -m pytest tests/test_vllm_engine.py
fi
