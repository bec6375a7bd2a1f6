#!/usr/bin/env bash
# Fresh machine -> .venv with everything installed -> the whole test suite (multi-process tests
# start real gloo processes on CPU). Extra arguments go to pytest, e.g. ./scripts/test.sh -m "not slow".
set -euo pipefail
source "$(dirname "$0")/setup_env.sh"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
python -m pytest -q -p no:cacheprovider "$@"
