#!/usr/bin/env bash
# GPU acceptance check (scripts/gpu_check.py): CUDA/NCCL, SimCLR ResNet-50 and DINO ViT-S/16 images/s and MFU,
# DDP vs DeepSpeed ZeRO-2 vs FSDP2, the GPU data path, exact resume. A table; exit 1 if any check failed.
# Under 10 minutes on one GPU. --dry-run: on the CPU, tiny models (tests the script itself). Arguments: --help.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
if [[ -n "${PYTHON:-}" ]]; then PY="$PYTHON"
elif [[ -n "${PRETRAIN_SYSTEM_PYTHON:-}" ]]; then PY=python3   # a lent GPU box: its python3 holds the dependencies
elif [[ -x "$ROOT/.venv/bin/python" ]]; then PY="$ROOT/.venv/bin/python"
else PY=python3; fi
exec "$PY" "$ROOT/scripts/gpu_check.py" "$@"
