#!/usr/bin/env python
"""The EMA update (pretrain.models.ema.EMA.update): one fused `torch._foreach_lerp_` over the flat lists of
tensors vs the per-tensor loop it replaced (mul_ + add_ per tensor), measured side by side in one run.

    python scripts/bench_ema.py [--models vit_base_patch16_224 resnet50] [--device cpu|cuda] [--reps 7] [--quick]

For each model: a teacher/student pair (timm, fp32; `--half` adds bf16 targets with fp32 masters, DeepSpeed's
case), `--updates` updates per timing, the two variants alternated `--reps` times. Prints ms per update of each,
their ratio per rep (median [min-max]), and checks that both give the same weights (to fp32 rounding).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _time(ema, n: int, foreach: bool, sync) -> float:
    sync()
    t0 = time.perf_counter()
    for _ in range(n):
        ema.update(0.996, foreach=foreach)
    sync()
    return (time.perf_counter() - t0) / n


def bench(name: str, device: str, half: bool, updates: int, reps: int) -> dict:
    import timm

    from pretrain.models.ema import EMA, momentum_copy

    online = timm.create_model(name, num_classes=0).to(device)
    target = momentum_copy(online)
    if half:
        target.to(torch.bfloat16)
    ema = EMA(target, online)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    _time(ema, 2, True, sync), _time(ema, 2, False, sync)   # warm-up: masters, allocator, kernels
    fused, loop = [], []
    for _ in range(reps):
        fused.append(_time(ema, updates, True, sync))
        loop.append(_time(ema, updates, False, sync))
    ratios = [lo / fu for fu, lo in zip(fused, loop)]
    # the same result: one update from the same state each way
    a, b = momentum_copy(online), momentum_copy(online)
    torch.manual_seed(0)
    for p in online.parameters():
        p.data.add_(torch.randn_like(p), alpha=1e-2)
    EMA(a, online).update(0.996, foreach=True), EMA(b, online).update(0.996, foreach=False)
    err = max((x - y).abs().max().item() for x, y in zip(a.parameters(), b.parameters()))
    n = sum(p.numel() for p in online.parameters())
    return {"model": name, "tensors": len(list(online.parameters())), "params": n, "half": half,
            "fused_ms": statistics.median(fused) * 1e3, "loop_ms": statistics.median(loop) * 1e3,
            "ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios), "max_diff": err}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["vit_base_patch16_224", "resnet50"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--updates", type=int, default=10)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--half", action="store_true", help="also bf16 targets with fp32 masters")
    p.add_argument("--quick", action="store_true", help="resnet18, 2 updates x 2 reps: a smoke run")
    a = p.parse_args(argv)
    if a.quick:
        a.models, a.updates, a.reps = ["resnet18"], 2, 2
    print(f"EMA update on {a.device} ({torch.get_num_threads()} threads): fused foreach_lerp_ vs per-tensor loop; "
          f"ratio = loop / fused per rep, median [min-max]")
    print(f"{'model':<24} {'tensors':>7} {'params':>12} {'targets':>7} {'fused ms':>9} {'loop ms':>9} "
          f"{'ratio':>7} {'per-rep':>15} {'max |diff|':>10}")
    for name in a.models:
        for half in (False, True) if a.half else (False,):
            r = bench(name, a.device, half, a.updates, a.reps)
            print(f"{name:<24} {r['tensors']:>7} {r['params']:>12,} {'bf16' if half else 'fp32':>7} "
                  f"{r['fused_ms']:9.2f} {r['loop_ms']:9.2f} {r['ratio']:6.2f}x "
                  f"[{r['ratio_min']:.2f}-{r['ratio_max']:.2f}]   {r['max_diff']:10.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
