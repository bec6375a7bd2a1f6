"""Smoke runs of the side-by-side benchmarks, so scripts/bench.py keeps working. No timing is
asserted (the machines are noisy); the real figures are in docs/benchmarks.md."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("which", ["data", "engine --channels-last", "engine --method moco_v2"])
def test_bench_quick_prints_a_ratio(which, tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), *which.split(), "--quick"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-2000:]
    ratios = [float(r) for r in re.findall(r"(\d+\.\d+)x", out.stdout)]
    assert ratios and all(r > 0 for r in ratios), out.stdout[-2000:]
