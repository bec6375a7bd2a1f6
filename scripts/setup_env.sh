#!/usr/bin/env bash
# Sourced by quickstart.sh and test.sh: create .venv at the repo root (if missing) and install the
# package with its test/quickstart extras. Re-installs only when setup.py changed since last time.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [ -n "${PRETRAIN_SYSTEM_PYTHON:-}" ]; then
  # a machine whose python3 already holds the dependencies and may not reach a registry (a lent GPU box): no venv,
  # no install; `pretrain` and `python` run this checkout with that interpreter
  mkdir -p /tmp/pretrain-bin
  printf '#!/bin/sh\nexec python3 -m pretrain.cli "$@"\n' > /tmp/pretrain-bin/pretrain
  printf '#!/bin/sh\nexec python3 "$@"\n' > /tmp/pretrain-bin/python
  chmod +x /tmp/pretrain-bin/pretrain /tmp/pretrain-bin/python
  export PATH="/tmp/pretrain-bin:$PATH" PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
  return 0
fi
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
STAMP=.venv/.pretrain-installed
WANT="$(sha1sum setup.py | cut -d' ' -f1)"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  echo "[setup] installing pretrain and its dependencies into .venv (torch, timm, deepspeed...: a few minutes the first time)"
  .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test,quickstart,bench]"
  echo "$WANT" > "$STAMP"
fi
export PATH="$ROOT/.venv/bin:$PATH"
