"""scripts/gpu_check.sh, the GPU acceptance check: its dry run (CPU, tiny models, the same code paths), the
table, the MFU arithmetic against a hand-counted FLOP figure, the device peak table, and the exit status
on an injected failure and on a check that overruns its budget."""
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import child_env

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def load_gpu_check():
    if "gpu_check" not in sys.modules:   # registered first: its dataclasses look their module up
        spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
        sys.modules["gpu_check"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules["gpu_check"])
    return sys.modules["gpu_check"]


def run_script(*args, timeout=300):
    return subprocess.run([str(SCRIPT), *args], cwd=ROOT, env=child_env(PYTHON=sys.executable), capture_output=True,
                          text=True, timeout=timeout)


def rows(stdout: str) -> dict:
    """check -> [result, figure, pass/fail, time] from the printed table."""
    lines = stdout.splitlines()
    head = next(i for i, l in enumerate(lines) if re.match(r"check +\| result +\| figure +\| pass/fail \| time", l))
    out = {}
    for l in lines[head + 2:]:
        if not l.strip():
            break
        cells = [c.strip() for c in l.split(" | ")]
        out[cells[0]] = cells[1:]
    return out


def test_flops_of_one_step_and_mfu_match_a_hand_count():
    """A Linear layer [B, i] -> [B, o]: 2*B*i*o FLOPs forward, the same again for each of the input and weight
    gradients (x3 with backward). TimedBatches counts exactly the step it is told to (the one between its 2nd and
    3rd requests here, on 2B rows), not the steps around it (B and 3B rows); MFU = FLOPs / step time / peak."""
    gc = load_gpu_check()
    B, i, o = 8, 16, 4
    layer = torch.nn.Linear(i, o, bias=False)
    data = gc.TimedBatches({"views": []}, torch.device("cpu"), flop_step=1)
    for step in range(3):
        next(data)
        layer(torch.randn(B * (step + 1), i, requires_grad=True)).sum().backward()
    next(data)
    assert data.flops == 3 * 2 * (2 * B) * i * o == 6144
    assert len(data.times) == 4
    # 6144 FLOPs in 2 ms = 3.072 MFLOP/s; on a 6.144 MFLOP/s (6.144e-6 TFLOP/s) device: 50%
    assert gc.mfu(6144, 2e-3, 6.144e-6) == pytest.approx(0.5, rel=1e-12)
    assert gc.mfu(3072, 2e-3, None) is None
    assert gc.fmt_mfu(0.5) == "MFU 50.0%" and gc.fmt_mfu(None) == "MFU n/a (unknown peak)"


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989.5), ("NVIDIA H100 PCIe", 756.5), ("NVIDIA H100 NVL", 835.5),
    ("NVIDIA H200", 989.5), ("NVIDIA H200 NVL", 835.5), ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA A100-PCIE-40GB", 312.0), ("NVIDIA L40S", 362.05), ("NVIDIA A10", 125.0),
    ("NVIDIA GeForce RTX 4090", 165.2), ("Tesla V100-SXM2-32GB", None), ("NVIDIA A10G", None),
    ("NVIDIA GeForce RTX 3060", None)])
def test_peak_table_by_device_name(name, peak):
    """Datasheet dense bf16 peaks by device name; V100 (no bf16 tensor cores) and unlisted devices have none."""
    got, label = load_gpu_check().peak_tflops(name)
    assert got == peak, (name, got, label)


@pytest.mark.parametrize("how", ["in-process", pytest.param("script", marks=pytest.mark.slow)])
def test_injected_failure_and_overrun_budget_exit_nonzero(how, capsys):
    """--fail makes a check fail; --hang makes one sleep past its budget, which SIGALRM turns into a failure after
    the budget (1 s), not after the sleep. Either fails the run: exit 1, FAIL in their rows (main() in this
    process, and the real command's exit status)."""
    args = ["--dry-run", "--only", "cuda", "data", "--hang", "cuda", "--budget", "cuda=1", "--fail", "data"]
    if how == "script":
        p = run_script(*args, timeout=120)
        rc, stdout = p.returncode, p.stdout
    else:
        rc, stdout = load_gpu_check().main(args), capsys.readouterr().out
    assert rc == 1, stdout
    r = rows(stdout)
    assert r["cuda"][0] == "CheckTimeout: timed out after its 1 s budget" and r["cuda"][2] == "FAIL", r
    assert r["cuda"][3] == "1/1 s", r
    assert r["data"][0] == "CheckFailed: injected failure (--fail)" and r["data"][2] == "FAIL", r
    assert "FAILED: cuda, data" in stdout


def test_usage_error_exits_2(capsys):
    with pytest.raises(SystemExit) as e:
        load_gpu_check().main(["--budget", "nosuch=3"])
    assert e.value.code == 2 and "unknown check 'nosuch'" in capsys.readouterr().err


@pytest.mark.slow
def test_dry_run_passes_and_prints_the_table(tmp_path):
    """Every check on the CPU with tiny models: each row passes (or the data row is skipped while the GPU data
    benchmark is not there), MFU is computed from the counted FLOPs and the given peak, and resume is bit-exact."""
    out = tmp_path / "rows.json"
    p = run_script("--dry-run", "--peak-tflops", "1", "--json", out, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr[-5000:]
    r = rows(p.stdout)
    assert list(r) == ["cuda", "simclr", "dino", "backends", "data", "resume"], p.stdout
    for check, (result, figure, status, took) in r.items():
        assert status == ("SKIP" if result.startswith("skipped:") and check == "data" else "PASS"), (check, r)
        assert re.fullmatch(r"\d+/\d+ s", took), took
    assert "gloo all_reduce ok" in r["cuda"][1]
    for check in ("simclr", "dino"):
        m = re.fullmatch(r"([\d.]+) img/s, ([\d.]+) ms/step, ([\d.e+-]+) TFLOP/step, MFU ([\d.]+)%", r[check][1])
        assert m, r[check]
        ips, ms, tflop, pct = map(float, m.groups())
        assert ips > 0 and tflop > 0
        # MFU = FLOP/step / step time / (1 TFLOP/s), from the printed (rounded) figures
        assert pct == pytest.approx(100 * tflop / (ms / 1e3), rel=0.02, abs=0.05), r[check]
    assert "2x32 + 4x16 px" in r["dino"][0]
    for backend in ("ddp", "zero2", "fsdp"):
        assert re.search(rf"{backend} w1 (\d+ ms \d+ MiB|skipped)", r["backends"][1]), r["backends"]
    assert r["resume"][1].startswith("loss ") and "max |w1 - w2| = 0 over" in r["resume"][1], r["resume"]
    saved = json.loads(out.read_text())
    assert [x["check"] for x in saved] == list(r) and all(x["seconds"] <= x["budget"] for x in saved)
