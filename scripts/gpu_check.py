#!/usr/bin/env python
"""GPU acceptance check: one command, under 10 minutes on one GPU, a table, a non-zero exit on any failure.

    scripts/gpu_check.sh [--only CHECK ...] [--json OUT.json] [--peak-tflops X]
    scripts/gpu_check.sh --dry-run          # on the CPU in a minute or two: tiny models, fp32, the same code

Checks (each under its own time budget, printed with the time it took):

* cuda: torch.cuda.is_available(), torch.distributed.is_nccl_available(), the device name, and an
  all_reduce over a 1-rank NCCL process group.
* simclr: SimCLR ResNet-50 (configs/simclr_resnet50.yaml) at 224 px, bf16, channels_last, DDP:
  images/s and MFU. dino: DINO ViT-S/16 (configs/dino_vit_small_imagenet.yaml: 2 global 224 px + 8
  local 96 px crops, 65536-dim head) in bf16: images/s and MFU. Both train through
  pretrain.engine.trainer.train() on a fixed in-memory batch (its `data=` argument, as scripts/bench.py
  does), so the figures are the engine's own step: schedules, forward, backward, optimizer, EMA.
  images/s counts source images (each seen as 2 or 10 crops) per second over the timed steps.
* MFU = FLOPs of one training step / median step time / the device's peak dense bf16 FLOP/s (PEAK_BF16
  below, by device name; `--peak-tflops` for another device; otherwise "n/a (unknown peak)"). The
  step's FLOPs are counted by torch.utils.flop_counter.FlopCounterMode over one whole engine step
  (forward, backward, a teacher's forward; matmuls, convolutions and attention kernels, 2 per
  multiply-add); that step is not timed.
* backends: the same SimCLR ResNet-50 step under DDP, DeepSpeed ZeRO-2 and FSDP2 (train.backend=fsdp)
  on 1 GPU, and on 2 (this script again under torchrun) when the machine has them: step time and
  peak memory (torch.cuda.max_memory_allocated).
* data: the GPU data path against worker-side augmentation, images/s (bench_data_paths, from
  pretrain.data or scripts/bench.py); "skipped: not available" while neither has it.
* resume: `pretrain train` in-process, SimCLR ResNet-18 on digits shards the script writes: 50 steps in
  one go vs a fresh run dir holding only the step-25 checkpoint, resumed to 50. The final weights and
  the last step's loss must be bit-identical (cudnn.deterministic, deterministic algorithms).

Exit status: 0 when every check passed or was skipped, 1 when any failed (a check past its budget
fails; one stuck in a kernel past budget + 60 s stops the script with the table so far), 2 on a usage
error. `--fail CHECK` / `--hang CHECK` inject a failure / a hang (they test this script itself).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import inspect
import json
import logging
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")   # before cuBLAS starts: deterministic matmuls (resume)
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Peak dense (no sparsity) bf16 tensor-core TFLOP/s per GPU, from the vendors' datasheets; the first pattern that
# matches torch.cuda.get_device_name() wins. Datasheets quote "with sparsity" figures at twice these.
PEAK_BF16 = [
    # NVIDIA H100 datasheet: BF16 1,979 TFLOPS (SXM) / 1,671 (NVL) / 1,513 (PCIe), with sparsity
    (r"H100.*NVL", 835.5, "H100 NVL"),
    (r"H100.*PCIe", 756.5, "H100 PCIe"),
    (r"H100.*(SXM|HBM3)", 989.5, "H100 SXM"),
    # NVIDIA H200 datasheet: BF16 1,979 TFLOPS (SXM) / 1,671 (NVL), with sparsity; GH200 as H100 SXM
    (r"H200.*NVL", 835.5, "H200 NVL"),
    (r"H200", 989.5, "H200 SXM"),
    (r"GH200", 989.5, "GH200"),
    # NVIDIA A100 datasheet: BF16 312 TFLOPS dense (624 with sparsity), 40 and 80 GB, SXM and PCIe
    (r"A100", 312.0, "A100"),
    # NVIDIA L40S datasheet: BF16 362.05 dense (733 with sparsity); L4 datasheet: 121 (242 with sparsity)
    (r"L40S", 362.05, "L40S"),
    (r"\bL4\b", 121.0, "L4"),
    # NVIDIA A10 datasheet: BF16 125 dense (250 with sparsity); AWS's A10G publishes no separate figure: not listed
    (r"\bA10\b(?!G)", 125.0, "A10"),
    # NVIDIA Ada architecture whitepaper, RTX 4090: BF16 with FP32 accumulate 165.2 dense (330.4 with sparsity)
    (r"RTX 4090", 165.2, "RTX 4090"),
    # V100 has no bf16 tensor cores (Volta: fp16 only), so a bf16 MFU has no published peak to divide by
    (r"V100", None, "V100 (no bf16 tensor cores)"),
]


def peak_tflops(name: str):
    """(peak dense bf16 TFLOP/s or None, label) for a device name; (None, "unknown") if no entry matches."""
    for pattern, peak, label in PEAK_BF16:
        if re.search(pattern, name):
            return peak, label
    return None, "unknown"


def mfu(flops_per_step: float, step_s: float, peak_tflops_: Optional[float]) -> Optional[float]:
    """Model FLOP utilisation: achieved FLOP/s (flops_per_step / step_s) over the peak (TFLOP/s); None if no peak."""
    if not peak_tflops_ or not flops_per_step or step_s <= 0:
        return None
    return flops_per_step / step_s / (peak_tflops_ * 1e12)


def fmt_mfu(value: Optional[float], why: str = "unknown peak") -> str:
    return f"MFU {100 * value:.1f}%" if value is not None else f"MFU n/a ({why})"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------------ table
@dataclass
class Row:
    check: str
    result: str
    figure: str
    status: str      # PASS | FAIL | SKIP
    seconds: float
    budget: float


class Skip(Exception):
    """The check cannot run here (not a failure)."""


class CheckFailed(Exception):
    """The check ran and its condition did not hold."""


class CheckTimeout(Exception):
    pass


def table(rows: List[Row]) -> str:
    """check | result | figure | pass/fail | time, columns as wide as their content."""
    head = ("check", "result", "figure", "pass/fail", "time")
    cells = [head] + [(r.check, r.result, r.figure, r.status, f"{r.seconds:.0f}/{r.budget:.0f} s") for r in rows]
    w = [max(len(c[i]) for c in cells) for i in range(len(head))]
    line = lambda c: " | ".join(x.ljust(w[i]) for i, x in enumerate(c)).rstrip()   # noqa: E731
    return "\n".join([line(head), "-+-".join("-" * x for x in w)] + [line(c) for c in cells[1:]])


# ------------------------------------------------------------------------------------------------ settings
def settings(a) -> dict:
    """Sizes of every check: the real ones on a GPU, tiny ones (fp32, a few steps) for --dry-run."""
    if a.dry_run:
        tiny_vit = "{img_size: 32, patch_size: 8, depth: 2, dynamic_img_size: true, drop_path_rate: 0.0}"
        return dict(
            precision="fp32", warm=1, timed=2, simclr_model="resnet10t", dino_model="vit_tiny (2 blocks)",
            simclr=["model.name=resnet10t", "data.image_size=32", "method.proj_hidden_dim=64", "method.proj_dim=32"],
            simclr_batch=a.simclr_batch or 8, simclr_size=32,
            dino=["model.name=vit_tiny_patch16_224", f"model.kwargs={tiny_vit}", "data.image_size=32",
                  "method.out_dim=256", "method.hidden_dim=64", "method.bottleneck_dim=32",
                  "method.num_local_crops=4", "method.local_crop_size=16"],
            dino_batch=a.dino_batch or 4,
            resume=dict(model="resnet10t", size=16, batch=8, steps=6, workers=1),
            data=dict(image=64, out=32, batch=16, images=64, workers=1, warmup=1, batches=2, reps=1),
            budget=dict(cuda=20, simclr=60, dino=60, backends=120, data=60, resume=90))
    return dict(precision="bf16", warm=5, timed=15, simclr=[], simclr_model="resnet50",
                simclr_batch=a.simclr_batch or 128, simclr_size=224, dino=[], dino_model="ViT-S/16",
                dino_batch=a.dino_batch or 64,
                resume=dict(model="resnet18", size=64, batch=64, steps=50, workers=2),
                data=dict(image=256, out=224, batch=64, images=640, workers=min(8, os.cpu_count() or 2), warmup=2,
                          batches=8, reps=2),
                budget=dict(cuda=30, simclr=90, dino=90, backends=180, data=60, resume=90))


# ------------------------------------------------------------------------------------------------ engine runs
class TimedBatches:
    """train()'s data iterator: the same in-memory batch every step. Each request for a batch ends the previous
    step (times[k + 1] - times[k] is step k, after a device sync); step `flop_step` runs under FlopCounterMode."""

    def __init__(self, batch: dict, device, flop_step: int):
        self.batch, self.device, self.flop_step = batch, device, flop_step
        self.times, self.flops, self.i, self._mode = [], None, 0, None

    def __iter__(self):
        return self

    def __next__(self):
        sync(self.device)
        self.times.append(time.perf_counter())
        if self._mode is not None:   # the counted step has just ended
            self._mode.__exit__(None, None, None)
            self.flops, self._mode = self._mode.get_total_flops(), None
        if self.i == self.flop_step:
            from torch.utils.flop_counter import FlopCounterMode

            self._mode = FlopCounterMode(display=False)
            self._mode.__enter__()
        self.i += 1
        return dict(self.batch)


def engine_run(config: Optional[str], overrides: List[str], groups, batch: int, s: dict, work: Path,
               world: int = 1, count_flops: bool = True) -> dict:
    """Train `warm + timed + 1` steps of `config` + `overrides` through pretrain.engine.trainer.train on one fixed
    batch of `batch` images per rank (groups: [(views, side)] as batch["views"] holds them). Returns the median
    step time (s), images/s (all ranks), the FLOPs of one step (count_flops), peak memory (MB) and the last loss."""
    from pretrain import dist as pdist
    from pretrain.config import load_config
    from pretrain.engine.trainer import memory_mb, train

    warm, timed = s["warm"], s["timed"]
    steps = warm + timed + 1                         # the last step has no next request: not timed
    cfg = load_config(config, [
        "data.train=unused", "data.val=null", f"data.samples_per_epoch={batch * world * 1000}",
        f"train.global_batch_size={batch * world}", f"train.max_steps={steps}", f"train.precision={s['precision']}",
        f"run_dir={work}", "resume=never", "overwrite=delete", "log.every_steps=1000000", "log.tensorboard=false",
        "log.progress=false", "checkpoint.every_steps=1000000", "checkpoint.keep_last=1", *overrides])
    device = torch.device("cpu")
    if torch.cuda.is_available():   # this rank's GPU, as train() will pick it
        device = torch.device("cuda", pdist.env_from().local_rank)
        torch.cuda.set_device(device)
    g = torch.Generator().manual_seed(0)
    views = [torch.randn(v, batch, 3, side, side, generator=g).to(device) for v, side in groups]
    data = TimedBatches({"views": views, "label": torch.zeros(batch, dtype=torch.long, device=device), "seed": 0,
                         "epoch": 0, "index": 0}, device, flop_step=warm - 1 if count_flops else -1)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        gc.collect()   # an earlier run's engine (cycles) must not count in this one's peak
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        metrics = train(cfg, data=data)
    finally:
        logging.getLogger("pretrain").handlers.clear()
    step_s = statistics.median(b - a for a, b in zip(data.times[warm:], data.times[warm + 1:]))
    loss = metrics.get("loss", float("nan"))
    if not math.isfinite(loss):
        raise CheckFailed(f"loss is {loss} after {steps} steps")
    return dict(step_s=step_s, images_per_s=batch * world / step_s, flops=data.flops or 0.0,
                memory_mb=memory_mb(device), loss=loss)


def throughput_row(res: dict, peak, label: str, what: str):
    value = mfu(res["flops"], res["step_s"], peak)
    why = "unknown peak" if label == "unknown" else f"no peak for {label}"
    figure = (f"{res['images_per_s']:.1f} img/s, {res['step_s'] * 1e3:.1f} ms/step, "
              f"{res['flops'] / 1e12:.3g} TFLOP/step, {fmt_mfu(value, why)}")
    return what, figure


# ------------------------------------------------------------------------------------------------ checks
CHECKS: Dict[str, Callable] = {}


def check(fn):
    CHECKS[fn.__name__.removeprefix("check_")] = fn
    return fn


@check
def check_cuda(a, s, work):
    """CUDA and NCCL visible; an all_reduce over a 1-rank process group (NCCL; gloo in a dry run)."""
    import torch.distributed as dist

    if a.dry_run:
        name, backend, device = "cpu (dry run)", "gloo", torch.device("cpu")
    else:
        if not torch.cuda.is_available():
            raise CheckFailed("torch.cuda.is_available() is False")
        if not dist.is_nccl_available():
            raise CheckFailed("torch.distributed.is_nccl_available() is False")
        name, backend, device = torch.cuda.get_device_name(0), "nccl", torch.device("cuda", 0)
        torch.cuda.set_device(device)
    if dist.is_initialized():
        raise CheckFailed("a process group is already initialized in this process")
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    try:
        t = torch.full((4,), 3.0, device=device)
        dist.all_reduce(t)
        sync(device)
        if not torch.equal(t.cpu(), torch.full((4,), 3.0)):
            raise CheckFailed(f"1-rank {backend} all_reduce returned {t.tolist()}")
    finally:
        dist.destroy_process_group()
    nccl = torch.cuda.nccl.version() if backend == "nccl" else "n/a"
    nccl = ".".join(map(str, nccl)) if isinstance(nccl, tuple) else nccl
    return f"{name}, {torch.cuda.device_count()} GPU(s)", \
        f"torch {torch.__version__}, CUDA {torch.version.cuda}, NCCL {nccl}: {backend} all_reduce ok"


def device_peak(a):
    """(peak TFLOP/s or None, label) of this machine's device."""
    if a.peak_tflops:
        return a.peak_tflops, "--peak-tflops"
    if not torch.cuda.is_available():
        return None, "unknown"
    return peak_tflops(torch.cuda.get_device_name(0))


@check
def check_simclr(a, s, work):
    """SimCLR ResNet-50 (configs/simclr_resnet50.yaml) at 224 px, bf16, channels_last: images/s and MFU."""
    res = engine_run(str(ROOT / "configs" / "simclr_resnet50.yaml"), s["simclr"] + ["train.channels_last=true"],
                     [(2, s["simclr_size"])], s["simclr_batch"], s, work / "simclr")
    what = f"{s['simclr_model']} {s['simclr_size']} px, batch {s['simclr_batch']} x 2 views, {s['precision']}"
    return throughput_row(res, *device_peak(a), what)


@check
def check_dino(a, s, work):
    """DINO ViT-S/16 (configs/dino_vit_small_imagenet.yaml), 2 global + local crops, bf16: images/s and MFU."""
    from pretrain.config import load_config

    path = str(ROOT / "configs" / "dino_vit_small_imagenet.yaml")
    cfg = load_config(path, ["data.train=unused", *s["dino"]])
    groups = [(2, cfg.data.image_size), (cfg.method.num_local_crops, cfg.method.local_crop_size)]
    res = engine_run(path, s["dino"], groups, s["dino_batch"], s, work / "dino")
    crops = f"{groups[0][0]}x{groups[0][1]} + {groups[1][0]}x{groups[1][1]} px"
    return throughput_row(res, *device_peak(a), f"{s['dino_model']}, batch {s['dino_batch']}, {crops}, "
                                                f"{s['precision']}")


# AdamW: DeepSpeed's ZeRO flattens away the per-layer norms LARS needs (a one-line ConfigError otherwise)
BACKENDS = {"ddp": ["train.backend=ddp"], "zero2": ["train.backend=deepspeed", "deepspeed.zero_stage=2"],
            "fsdp": ["train.backend=fsdp"]}


def backend_runs(s, work: Path, world: int) -> dict:
    """{backend: {step_s, memory_mb} or {error} or {skip}}: SimCLR ResNet-50 (as check_simclr, NCHW, AdamW, half the
    batch per rank) under each backend. memory_mb: peak allocated on the GPU (MiB); on the CPU, the process's
    peak RSS."""
    from pretrain.dist import cleanup

    out = {}   # under torchrun the process group stays up from one backend to the next; cleanup() at the end
    for name, ov in BACKENDS.items():
        if name == "fsdp" and importlib.util.find_spec("pretrain.engine.fsdp") is None:
            out[name] = {"skip": "pretrain.engine.fsdp not available"}
            continue
        try:
            r = engine_run(str(ROOT / "configs" / "simclr_resnet50.yaml"),
                           s["simclr"] + ["optim.name=adamw", "optim.lr=1e-3", "optim.weight_decay=0.05"] + ov,
                           [(2, s["simclr_size"])],
                           s["simclr_batch"] // 2, s, work / f"{name}-w{world}", world=world, count_flops=False)
            out[name] = {"step_s": r["step_s"], "memory_mb": r["memory_mb"]}
        except CheckTimeout:
            raise
        except Exception as e:   # one backend's failure is its cell's, the others still run
            out[name] = {"error": f"{type(e).__name__}: {e}".splitlines()[0][:200]}
        finally:
            if world == 1:
                cleanup()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    if world > 1:
        cleanup()
    return out


def descendants(pid: int) -> List[int]:
    """The processes below `pid` (torchrun's ranks live in their own process groups), from /proc."""
    children: Dict[int, List[int]] = {}
    for d in Path("/proc").iterdir():
        with contextlib.suppress(OSError, IndexError, ValueError):
            if d.name.isdigit():
                children.setdefault(int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]), []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def backend_cells(res: dict, world: int) -> List[str]:
    cells = []
    for name, r in res.items():
        if "skip" in r:
            cells.append(f"{name} w{world} skipped ({r['skip']})")
        elif "error" in r:
            cells.append(f"{name} w{world} FAILED ({r['error']})")
        else:
            cells.append(f"{name} w{world} {r['step_s'] * 1e3:.0f} ms {r['memory_mb']:.0f} MiB")
    return cells


@check
def check_backends(a, s, work):
    """DDP vs DeepSpeed ZeRO-2 vs FSDP2: step time and peak memory on 1 GPU, and on 2 (torchrun) where present."""
    results = {1: backend_runs(s, work, 1)}
    ranks = a.ranks or (2 if torch.cuda.device_count() >= 2 else 1)
    if ranks > 1:
        out = work / "backends.json"
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                                  "MASTER_PORT")}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", __file__,
               "--worker-backends", str(out), "--work-dir", str(work / f"w{ranks}")] + \
            (["--dry-run"] if a.dry_run else []) + (["--simclr-batch", str(a.simclr_batch)] if a.simclr_batch else [])
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            _, err = proc.communicate(timeout=max(10.0, a.deadline - time.monotonic() - 5))
        except BaseException as e:   # our timeout, or the budget's SIGALRM: end the launcher and its ranks
            for pid in [proc.pid] + descendants(proc.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            proc.wait()
            if isinstance(e, subprocess.TimeoutExpired):
                raise CheckFailed(f"torchrun {ranks} ranks still running at the end of the budget: stopped") from None
            raise
        if proc.returncode != 0 or not out.is_file():
            errors = [l for l in err.splitlines() if "Error" in l] or err.splitlines()[-1:]
            raise CheckFailed(f"torchrun {ranks} ranks exited {proc.returncode}: {(errors or ['?'])[0][:200]}")
        results[ranks] = json.loads(out.read_text())
    cells = [c for w, r in results.items() for c in backend_cells(r, w)]
    failed = [c for c in cells if "FAILED" in c]
    what = f"SimCLR {s['simclr_model']}, AdamW, batch {s['simclr_batch'] // 2}/rank, ranks " + \
        ", ".join(map(str, results))
    if failed:
        raise CheckFailed("; ".join(failed))
    return what, "; ".join(cells)


def find_data_bench():
    """bench_data_paths(device, ...) from pretrain.data or scripts/bench.py, or None."""
    with contextlib.suppress(ImportError):
        import pretrain.data as pdata
        if hasattr(pdata, "bench_data_paths"):
            return pdata.bench_data_paths
    spec = importlib.util.spec_from_file_location("pretrain_scripts_bench", ROOT / "scripts" / "bench.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return getattr(mod, "bench_data_paths", None)


@check
def check_data(a, s, work):
    """The GPU data path against worker-side augmentation: images/s of each (helper: bench_data_paths)."""
    fn = find_data_bench()
    if fn is None:
        raise Skip("not available (no bench_data_paths in pretrain.data or scripts/bench.py)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    params = inspect.signature(fn).parameters
    kw = {k: v for k, v in dict(s["data"], work_dir=work).items() if k in params}
    res = fn(device, **kw)
    rates = res.get("img_s", {}) if isinstance(res, dict) else {}
    if not rates or not all(isinstance(v, (int, float)) and v > 0 and math.isfinite(v) for v in rates.values()):
        raise CheckFailed(f"bench_data_paths returned {str(res)[:200]}")
    d = s["data"]
    ratio = f", device / worker {res['device_vs_worker']:.2f}x" if "device_vs_worker" in res else ""
    return (f"{device}, {d['images']} JPEGs {d['image']} px -> 2 x {d['out']} px, batch {d['batch']}, "
            f"{d['workers']} workers", ", ".join(f"{k} {v:.1f} img/s" for k, v in rates.items()) + ratio)


def write_digits(out: Path, size: int) -> Path:
    from pretrain.data import write_shards
    from pretrain.data.sources import digits

    classes, samples = digits(size=size)
    write_shards(samples, classes, out, shard_size=200, val_fraction=0.0, seed=0)
    return out / "train"


@check
def check_resume(a, s, work):
    """50 steps in one go vs 25 + resume 25 (a fresh run dir with only the step-25 checkpoint): bit-identical."""
    from pretrain.config import load_config
    from pretrain.engine.trainer import train

    r = s["resume"]
    steps, half = r["steps"], r["steps"] // 2
    shards = write_digits(work / "digits", r["size"])
    ov = ["method.name=simclr", f"model.name={r['model']}", f"data.train={shards}", "data.val=null",
          f"data.image_size={r['size']}", f"data.num_workers={r['workers']}", "data.shuffle_buffer=256",
          f"train.global_batch_size={r['batch']}", f"train.max_steps={steps}", f"train.precision={s['precision']}",
          "optim.warmup_steps=5", "log.every_steps=1", "log.tensorboard=false", "log.progress=false",
          f"checkpoint.every_steps={half}", "checkpoint.keep_last=10", "resume=auto", "method.proj_hidden_dim=256",
          "method.proj_dim=64"]
    flags = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
             torch.are_deterministic_algorithms_enabled())
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        one = train(load_config(None, ov + [f"run_dir={work / 'one'}"]))
        logging.getLogger("pretrain").handlers.clear()
        name = f"step_{half:08d}.pt"
        (work / "two" / "checkpoints").mkdir(parents=True)
        shutil.copy(work / "one" / "checkpoints" / name, work / "two" / "checkpoints" / name)
        two = train(load_config(None, ov + [f"run_dir={work / 'two'}"]))
    finally:
        logging.getLogger("pretrain").handlers.clear()
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = flags[:2]
        torch.use_deterministic_algorithms(flags[2])
    final = f"step_{steps:08d}.pt"
    wa = torch.load(work / "one" / "checkpoints" / final, map_location="cpu", weights_only=True)["model"]
    wb = torch.load(work / "two" / "checkpoints" / final, map_location="cpu", weights_only=True)["model"]
    diff = max((wa[k].double() - wb[k].double()).abs().max().item() for k in wa if wa[k].is_floating_point())
    same = wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    figure = f"loss {one['loss']:.9g} vs {two['loss']:.9g}, max |w1 - w2| = {diff:.3g} over {len(wa)} tensors"
    if not same or one["loss"] != two["loss"]:
        raise CheckFailed("resumed run differs: " + figure)
    return f"{r['model']} {r['size']} px, {steps} steps vs {half} + resume {steps - half}: bit-identical", figure


# ------------------------------------------------------------------------------------------------ running
def run_check(name: str, a, s, work: Path) -> Row:
    """One check under its budget (SIGALRM raises CheckTimeout in it); its outcome as a table row."""
    budget = a.budget.get(name, s["budget"][name])
    work = work / name
    work.mkdir(parents=True, exist_ok=True)

    def alarm(*_):
        raise CheckTimeout(f"timed out after its {budget:.0f} s budget")
    old = signal.signal(signal.SIGALRM, alarm)
    a.deadline = time.monotonic() + budget
    signal.setitimer(signal.ITIMER_REAL, budget)
    t0 = time.monotonic()
    try:
        if name in a.hang:
            time.sleep(budget + 3600)
        if name in a.fail:
            raise CheckFailed("injected failure (--fail)")
        result, figure = CHECKS[name](a, s, work)
        status = "PASS"
    except Skip as e:
        result, figure, status = f"skipped: {e}", "", "SKIP"
    except Exception as e:
        if not isinstance(e, (CheckFailed, CheckTimeout)):
            log(traceback.format_exc())
        result, figure, status = f"{type(e).__name__}: {e}".splitlines()[0][:300], "", "FAIL"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    return Row(name, result, figure, status, time.monotonic() - t0, budget)


def worker_backends(a) -> int:
    """Under torchrun: every backend at this world size; rank 0 writes the results to a.worker_backends."""
    from pretrain import dist as pdist

    env = pdist.env_from()
    res = backend_runs(settings(a), Path(a.work_dir), env.world_size)
    if env.rank == 0:
        Path(a.worker_backends).write_text(json.dumps(res))
    return 0


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny models, fp32, a few steps: tests this script")
    p.add_argument("--only", nargs="+", choices=list(CHECKS), help="run these checks only")
    p.add_argument("--json", help="also write the rows to this file")
    p.add_argument("--peak-tflops", type=float, help="the device's peak dense bf16 TFLOP/s, for a device not listed")
    p.add_argument("--simclr-batch", type=int, help="images per step, SimCLR (default 128; dry run 8)")
    p.add_argument("--dino-batch", type=int, help="images per step, DINO (default 64, the recipe's per GPU; dry run 4)")
    p.add_argument("--ranks", type=int, help="backends at this many ranks too (default: 2 when 2 GPUs are present)")
    p.add_argument("--budget", nargs="+", default=[], metavar="CHECK=S", help="a check's time budget in seconds")
    p.add_argument("--fail", nargs="+", default=[], choices=list(CHECKS), help="inject a failure into these checks")
    p.add_argument("--hang", nargs="+", default=[], choices=list(CHECKS), help="make these checks hang past budget")
    p.add_argument("--work-dir", help="scratch directory, kept (default: a temporary one, removed)")
    p.add_argument("--worker-backends", help=argparse.SUPPRESS)   # internal: one torchrun rank of check_backends
    a = p.parse_args(argv)
    try:
        a.budget = {k: float(v) for k, v in (x.split("=", 1) for x in a.budget)}
    except ValueError:
        p.error("--budget takes CHECK=SECONDS, e.g. --budget simclr=120")
    if set(a.budget) - set(CHECKS):
        p.error(f"--budget: unknown check {sorted(set(a.budget) - set(CHECKS))[0]!r}; checks: {', '.join(CHECKS)}")
    return a


def main(argv=None) -> int:
    a = parse(argv)
    if a.worker_backends:
        return worker_backends(a)
    s = settings(a)
    names = a.only or list(CHECKS)
    total = sum(a.budget.get(n, s["budget"][n]) for n in names)
    log(f"gpu_check: {', '.join(names)}{' (dry run: CPU, tiny models)' if a.dry_run else ''}; budget {total:.0f} s")
    rows: List[Row] = []

    def hard_stop(name, limit):   # a check stuck in a kernel never sees its SIGALRM: end the script
        rows.append(Row(name, f"CheckTimeout: stuck past its budget + 60 s ({limit:.0f} s); stopped", "", "FAIL",
                        limit, limit - 60))
        print(table(rows), flush=True)
        os._exit(1)

    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        work = Path(a.work_dir or tmp)
        for name in names:
            limit = a.budget.get(name, s["budget"][name]) + 60
            timer = threading.Timer(limit, hard_stop, (name, limit))
            timer.daemon = True
            timer.start()
            rows.append(run_check(name, a, s, work))
            timer.cancel()
            r = rows[-1]
            log(f"[{r.status}] {name} ({r.seconds:.0f} s): {r.result} {r.figure}")
    print(table(rows))
    failed = [r.check for r in rows if r.status == "FAIL"]
    took = sum(r.seconds for r in rows)
    print(f"\n{len(rows) - len(failed)}/{len(rows)} checks passed or skipped; total {took:.0f} s"
          + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    if a.json:
        Path(a.json).write_text(json.dumps([asdict(r) for r in rows], indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
