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


def test_bench_multicrop_quick_runs_ours_without_lightly(tmp_path):
    """Ours with multi-crop views (2 global + 6 local crops, one tensor per size) and two-view, no lightly."""
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), "multicrop", "--quick", "--baseline", "none"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "shapes [(2, 'B', 3, 32, 32), (6, 'B', 3, 16, 16)]" in out.stdout, out.stdout[-2000:]
    ratio = re.search(r"ratio multi-crop / two-view: wall +(\d+\.\d+)x", out.stdout)
    assert ratio and float(ratio.group(1)) > 0 and "lightly" not in out.stdout, out.stdout[-2000:]


def test_bench_multicrop_without_lightly_says_how_to_install_it(tmp_path):
    """lightly is optional: when it cannot be imported, one line with the install command and exit 2."""
    code = ("import runpy, sys; sys.modules['lightly'] = None; "   # None in sys.modules: import raises ImportError
            f"sys.argv = ['bench.py', 'multicrop', '--quick']; runpy.run_path({str(ROOT / 'scripts' / 'bench.py')!r}, "
            "run_name='__main__')")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    assert re.fullmatch(r"multicrop: lightly is not installed.*pip install --no-deps .*lightly.*\n", out.stderr), out.stderr
