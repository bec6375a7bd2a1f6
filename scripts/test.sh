#!/usr/bin/env bash
# Fresh machine -> .venv with everything installed -> the whole test suite (multi-process tests
# start real gloo processes on CPU; tests/test_slurm.py starts a real 2-node SLURM cluster on this
# machine, which needs root and Debian's slurm packages: installed here when we are root with apt).
# Two pytest-xdist workers, one test file each at a time: most tests wait on subprocesses, and the
# whole suite is about 10 minutes that way on 2 cores. Extra arguments go to
# pytest, e.g. ./scripts/test.sh -m "not slow", or -n 0 to run serially.
set -euo pipefail
source "$(dirname "$0")/setup_env.sh"
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  python scripts/local_slurm.py install
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
python -m pytest -q -p no:cacheprovider -n "${PYTEST_WORKERS:-2}" --dist loadfile "$@"
