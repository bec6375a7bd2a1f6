"""scripts/bench_scaling.py: its formulas, its measurements in one process, and its --quick run at world
sizes 1 and 2, whose measured communication must equal the formulas byte for byte and whose per-rank
memory must order DDP > ZeRO-1 >= ZeRO-2 > ZeRO-3, FSDP2 at half of DDP's (docs/scaling.md). No timing is asserted."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from argparse import Namespace

import pytest
import torch

from helpers import REPO, child_env

spec = importlib.util.spec_from_file_location("bench_scaling", REPO / "scripts" / "bench_scaling.py")
bs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bs)

QUICK = Namespace(model="resnet10t", hidden=256, dim=64, batch=4, image_size=16, quick=True)   # as --quick


def test_formulas():
    # SimCLR gather, b=8, V=2, D=128, fp32, W=2: 2 all-gathers with [16, 128] outputs + 2 all-reduces of [16, 128]
    assert bs.gather_formula(8, 2, 128, 2) == {"payload": 4 * 16 * 128 * 4, "wire": (2 * 8 + 2 * 16) * 128 * 4}
    assert bs.gather_formula(8, 2, 128, 1) == {"payload": 0, "wire": 0}
    assert bs.allreduce_formula(400, 4) == {"payload": 400, "wire": 600}
    psi = 1000
    for mixed in (False, True):   # the paper: every stage is 16 bytes/param on one rank, ZeRO-3 is 16/W
        assert [bs.paper_formula(s, psi, 1, mixed) for s in range(4)] == [16 * psi] * 4
        assert bs.paper_formula(3, psi, 8, mixed) == 2 * psi
    # as kept: DDP's bucket copy and DeepSpeed's fp32 master are both 4 bytes/param, so ZeRO-3 / DDP is 1/W
    ddp, z3 = bs.memory_formula(0, psi, 2), bs.memory_formula(3, psi, 2)
    assert sum(ddp.values()) == 20 * psi and sum(z3.values()) == 10 * psi
    assert sum(bs.memory_formula(3, psi, 2, "bf16").values()) == 8 * psi   # (2 + 2 + 4 + 8) / 2


def test_ddp_one_process_measures_its_formulas():
    """In this process (no process group): no communication at all, and DDP's memory is exactly its
    weights, gradients and Adam's two moments (+ one 4-byte step counter per parameter tensor)."""
    with torch.random.fork_rng(devices=[]):   # run_one seeds torch: leave this process's RNG as it was
        r = bs.run_one(QUICK, 1, 0, "fp32")
    assert r["comm"] == {}
    psi, m = r["psi"], r["memory"]
    assert psi > 1_000_000
    assert m["params"] == m["grads"] == 4 * psi
    assert 8 * psi <= m["optim"] <= 8 * psi + 4 * 200 and m["DDP bkts"] == m["master"] == m["red.bkt"] == 0


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_scaling") / "quick.json"
    p = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_scaling.py"), "--quick", "--json", str(out)],
                       cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=840)
    assert p.returncode == 0, p.stderr[-4000:]
    return json.loads(out.read_text()), p.stdout


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_quick_communication_equals_formulas(quick):
    res, _ = quick
    for W in (1, 2):
        runs = res[str(W)]["runs"]
        ddp = runs["DDP"]
        c = {k: v["payload"] for k, v in ddp["comm"].items()}
        want = {"gather fwd": 2 * W * QUICK.batch * QUICK.dim * 4, "gather bwd": 2 * W * QUICK.batch * QUICK.dim * 4,
                "DDP grads": 4 * ddp["psi"], "global BN": ddp["bn"], "DDP buffers": ddp["buffers"]}
        assert c == (want if W == 2 else {}), (W, c, want)
        formula = bs.gather_formula(QUICK.batch, 2, QUICK.dim, W)
        assert c.get("gather fwd", 0) + c.get("gather bwd", 0) == formula["payload"]
        wire = sum(ddp["comm"][s]["wire"] for s in ("gather fwd", "gather bwd")) if W == 2 else 0
        assert wire == formula["wire"]
        # FSDP2 (fp32): its weights all-gathered in the forward and again in the backward, its gradients
        # reduce-scattered once; nothing at W=1
        fc = {k: v["payload"] for k, v in runs["FSDP2"]["comm"].items() if k.startswith("FSDP")}
        assert fc == ({"FSDP gather": 8 * ddp["psi"], "FSDP red.-scatter": 4 * ddp["psi"]} if W == 2 else {}), (W, fc)
        # every backend communicates the same through the SimCLR gather
        for r in runs.values():
            assert {k: v for k, v in r["comm"].items() if k.startswith("gather")} == \
                {k: v for k, v in ddp["comm"].items() if k.startswith("gather")}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_quick_memory_orders_and_matches_formulas(quick):
    res, stdout = quick
    s1, s2 = bs.summary(res["1"]), bs.summary(res["2"])
    psi, persist = res["2"]["runs"]["DDP"]["psi"], res["2"]["runs"]["DDP"]["persist"]
    # one rank: nothing to partition; DeepSpeed keeps a 4-byte fp32 master copy besides fp32 weights
    assert s1["ZeRO-3"]["states"] == pytest.approx(1.25 * s1["DDP"]["states"], rel=1e-3)
    st = {k: m["states"] for k, m in s2.items()}
    assert st["DDP"] > st["ZeRO-1"] >= st["ZeRO-2"] > st["ZeRO-3"], st
    assert 0.4 <= st["ZeRO-3"] / st["DDP"] <= 0.65, st
    for key, stage in (("DDP", 0), ("ZeRO-3", 3)):   # exact up to Adam's step counters and DeepSpeed's padding
        f = bs.memory_formula(stage, psi, 2, "fp32", persist)
        for cat in bs.STATES:
            assert s2[key][cat] == pytest.approx(f[cat], rel=2e-3, abs=4096), (key, cat)
    for key in ("ZeRO-1", "ZeRO-2"):   # grads of whole tensors around the partition: more than 4 psi / W
        f = bs.memory_formula(int(key[5]), psi, 2, "fp32", persist)
        assert 0.999 * f["grads"] <= s2[key]["grads"] < 2 * f["grads"], key
        assert s2[key]["master"] == pytest.approx(f["master"], rel=1e-3), key
    assert s2["ZeRO-3"]["red.bkt"] > 0 and s2["DDP"]["red.bkt"] == 0
    # FSDP2 at W=2: fp32 shards of weights, gradients and Adam's moments, half of DDP's (without its buckets)
    f = bs.memory_formula("fsdp", psi, 2)
    for cat in bs.STATES:
        assert s2["FSDP2"][cat] == pytest.approx(f[cat], rel=2e-3, abs=4096), ("FSDP2", cat)
    assert 0.49 <= s2["FSDP2"]["paper"] / s2["DDP"]["paper"] <= 0.51, (s2["FSDP2"], s2["DDP"])
    assert s1["FSDP2"]["states"] == pytest.approx(s1["DDP"]["paper"], rel=1e-3)
    assert "ZeRO-3 / DDP" in stdout and "FSDP2 / DDP" in stdout and "extrapolation: 512 ranks" in stdout
