#!/usr/bin/env python
"""Per-step communication and per-rank memory, measured next to their formulas (docs/scaling.md).

    python scripts/bench_scaling.py [--quick] [--json OUT.json]

Measures at world size 1 (a plain process) and 2 (itself again under `torchrun --standalone
--nproc_per_node 2`, gloo, CPU) and prints MEASURED, FORMULA and their ratio for each quantity, the
ratios between backends, then the formulas extrapolated to 64 nodes x 8 GPUs (ResNet-50, ViT-B/16).
`--quick`: resnet10t, a small head, fp32 only (a smoke run, ~1 minute).

Each backend runs two real training steps of SimCLR (pretrain.methods.create_method on a
pretrain.config.load_config config, AdamW, random images, global BN across ranks as the trainer
sets it up) through the engine's own backends (pretrain.engine.backends.create_backend): DDP, and
DeepSpeed ZeRO-1, -2, -3 and FSDP2 in fp32 (and bf16 unless --quick). Step 1 creates the optimizer state and
lets DDP rebuild its buckets; everything is measured in step 2:

* communication: torch.distributed's collectives are wrapped with counters, and each call is put
  down to the code that made it by looking up the Python stack (the SimCLR gather's forward and
  backward, global BN, DDP's buffer broadcast). DDP reduces gradients in C++, so a DDP comm hook
  (`register_comm_hook`) notes each bucket and then runs the default all-reduce (counted). Payload:
  the collective's tensor (an all-gather's output, an all-reduce's buffer); wire: what a ring
  algorithm sends per rank for it, (W-1)/W of an all-gather's output or a reduce-scatter's input,
  2(W-1)/W of an all-reduce's buffer (a convention applied to the measured sizes, not a capture).
* memory: between step 2's backward and its optimizer step (weights, gradients and optimizer state
  all alive), every tensor reachable from the model (.data, .grad, ZeRO-3's ds_tensor, buffers),
  the optimizer (param groups, state), DDP's buckets (noted by the hook) and DeepSpeed's ZeRO
  optimizer object (its attributes walked recursively through lists, dicts and DeepSpeed objects)
  is put in one category (where first seen) and de-duplicated by storage; storage bytes are summed.
  ZeRO-1/2's reduce bucket lives only during backward: its size is noted when it is reduced.
"""
from __future__ import annotations

import argparse
import gc
import inspect
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MB = 1e6
PERSIST = 100_000   # DeepSpeed's stage3_param_persistence_threshold: smaller tensors stay whole under ZeRO-3
# memory categories: the first five scale with psi (the "model states"), the last two do not
CATS = ("params", "grads", "DDP bkts", "master", "optim", "red.bkt", "other")
STATES = CATS[:5]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------
# formulas: bytes per rank per step, bytes per rank. b local batch, V views, D embedding dim, W ranks
def gather_formula(b, V, D, W, s=4):
    """SimCLR's NT-Xent: V all-gathers [b, D] -> [W*b, D] forward, V all-reduces of the [W*b, D]
    gradient backward. nt_xent gathers fp32 whatever the training precision: s = 4."""
    if W == 1:
        return {"payload": 0, "wire": 0}
    return {"payload": 2 * V * W * b * D * s, "wire": 3 * V * (W - 1) * b * D * s}


def allreduce_formula(nbytes, W):
    return {"payload": nbytes if W > 1 else 0, "wire": 2 * (W - 1) * nbytes // W}


def memory_formula(stage, psi, W, precision="fp32", persist=0):
    """Per-rank model states under AdamW as DDP (stage 0), DeepSpeed and FSDP2 (stage "fsdp") keep them (CATS[:5]).
    FSDP2 keeps fp32 shards of everything in either precision (bf16 copies exist only while a unit computes).
    w: bytes per weight and gradient element of the model DeepSpeed computes with (4 fp32, 2 bf16);
    persist: parameters in tensors of <= PERSIST elements, which ZeRO-3 keeps whole on every rank."""
    if stage == "fsdp":
        return {"params": 4 * psi / W, "grads": 4 * psi / W, "DDP bkts": 0, "master": 0, "optim": 8 * psi / W}
    if stage == 0:   # DDP; in bf16 it autocasts, so weights, grads and their bucket copies stay fp32
        return {"params": 4 * psi, "grads": 4 * psi, "DDP bkts": 4 * psi if W > 1 else 0, "master": 0, "optim": 8 * psi}
    w = 4 if precision == "fp32" else 2
    return {"params": w * psi if stage < 3 else w * (psi / W + (persist if W > 1 else 0)), "grads": w * psi / W,
            "DDP bkts": 0, "master": 4 * psi / W, "optim": 8 * psi / W}


def paper_formula(stage, psi, W, mixed):
    """The ZeRO paper (Rajbhandari et al. 2020): weights + grads + K*psi optimizer state; K = 12 (fp32
    master + Adam's moments) in mixed precision (2+2+12), K = 8 (no separate master) in fp32 (4+4+8)."""
    w, g, k = (2, 2, 12) if mixed else (4, 4, 8)
    return [(w + g + k) * psi, (w + g) * psi + k * psi / W, w * psi + (g + k) * psi / W, (w + g + k) * psi / W][stage]


# ------------------------------------------------------------------------------------------------
# counting collectives
# collective -> (position, keyword) of the tensor(s) whose size is its payload, its ring wire factor * W
WRAPPED = {"all_gather": (0, "tensor_list", 1), "all_reduce": (0, "tensor", 2), "broadcast": (0, "tensor", 1),
           "all_gather_into_tensor": (0, "output_tensor", 1), "reduce_scatter_tensor": (1, "input", 1),
           "_broadcast_coalesced": (1, "tensors", 1),
           "all_gather_single": (0, "output_tensor", 1), "reduce_scatter_single": (1, "input", 1)}   # FSDP2's


def _sources() -> dict:
    """The code that makes each counted kind of collective -> its name."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from torch.distributed.fsdp._fully_shard import _fsdp_collectives as fsdp

    from pretrain.losses.distributed import _AllReduceSumWithGrad, _GatherWithGrad

    return {_GatherWithGrad.forward.__code__: "gather fwd", _GatherWithGrad.backward.__code__: "gather bwd",
            _AllReduceSumWithGrad.forward.__code__: "global BN", _AllReduceSumWithGrad.backward.__code__: "global BN",
            DDP._distributed_broadcast_coalesced.__code__: "DDP buffers", count_hook.__code__: "DDP grads",
            # both are wrapped by torch.no_grad, whose wrapper's code object they share: the functions' own
            inspect.unwrap(fsdp.foreach_all_gather).__code__: "FSDP gather",
            inspect.unwrap(fsdp.foreach_reduce).__code__: "FSDP red.-scatter"}


def _source(sources) -> str:
    f = sys._getframe(2)
    while f is not None and f.f_code not in sources:
        f = f.f_back
    return "other" if f is None else sources[f.f_code]


def _nbytes(t) -> int:
    return sum(map(_nbytes, t)) if isinstance(t, (list, tuple)) else t.numel() * t.element_size()


class CommCounter:
    """Inside `with`: {source: {payload, wire, calls}} of every torch.distributed collective."""

    def __enter__(self):
        self.bytes, self._orig, self._sources = {}, {n: getattr(dist, n) for n in WRAPPED}, _sources()
        for name, fn in self._orig.items():
            setattr(dist, name, self._counted(name, fn))
        return self

    def _counted(self, name, fn):
        def counted(*args, **kw):
            i, key, factor = WRAPPED[name]
            n, W = _nbytes(args[i] if len(args) > i else kw[key]), dist.get_world_size()
            d = self.bytes.setdefault(_source(self._sources), {"payload": 0, "wire": 0, "calls": 0})
            d["payload"] += n
            d["wire"] += factor * (W - 1) * n // W
            d["calls"] += 1
            return fn(*args, **kw)
        return counted

    def __exit__(self, *exc):
        for name, fn in self._orig.items():
            setattr(dist, name, fn)


def count_hook(buckets, bucket):
    """DDP comm hook: note the bucket (DDP's flat copy of its gradients), then all-reduce it as DDP does."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    buckets[bucket.index()] = bucket.buffer()
    return allreduce_hook(None, bucket)


# ------------------------------------------------------------------------------------------------
# walking memory
def _walk(obj, seen, depth=0):
    """Tensors inside obj: through lists, tuples, dicts and DeepSpeed's own objects."""
    if id(obj) in seen or depth > 8:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple, set, dict)):
        for v in obj.values() if isinstance(obj, dict) else obj:
            yield from _walk(v, seen, depth + 1)
    elif type(obj).__module__.startswith("deepspeed") and hasattr(obj, "__dict__"):
        for v in vars(obj).values():
            yield from _walk(v, seen, depth + 1)


def _category(attr: str) -> str:
    """The memory category of a DeepSpeed ZeRO optimizer attribute's tensors, from its name."""
    for words, cat in ((("ipg", "bucket"), "red.bkt"), (("fp32", "single_partition"), "master"), (("grad",), "grads"),
                       (("fp16", "bit16", "lp_param", "param"), "params")):
        if any(w in attr.lower() for w in words):
            return cat
    return "other"


def measure_memory(be, ddp_buckets, reduce_buckets) -> dict:
    seen, out = set(), dict.fromkeys(CATS, 0)

    def add(cat, t):   # a storage counts once, in the category it is first seen in
        t = t.to_local() if isinstance(t, DTensor) else t   # FSDP2: this rank's shard
        if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes() and t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            out[cat] += t.untyped_storage().nbytes()

    params = list(be.module.parameters())
    for p in params:
        add("params", p.data)
        add("params", getattr(p, "ds_tensor", None))   # ZeRO-3's partition of p
    for p in params:
        add("grads", p.grad)
    zero = be.engines["main"].optimizer if be.name == "deepspeed" else None
    opt = be.optimizers["main"] if zero is None else zero.optimizer
    for p in (p for g in opt.param_groups for p in g["params"]):   # ZeRO-1/2: the flat fp32 partitions
        add("master", p)
        add("grads", p.grad)
    for t in (t for st in opt.state.values() for t in st.values()):
        add("optim", t)
    for t in ddp_buckets.values():
        add("DDP bkts", t)
    for t in be.module.buffers():
        add("other", t)
    if zero is not None:
        walked = {id(zero), id(opt)}
        for name, v in vars(zero).items():
            for t in _walk(v, walked):
                add(_category(name), t)
    out["red.bkt"] += sum(reduce_buckets.values())   # ZeRO-1/2: already freed at the end of backward
    return out


def watch_reduce_bucket(zero, found):
    """ZeRO-1/2 allocate their reduce bucket during backward and free it at its end: note its
    storages' sizes (found: data_ptr -> bytes) when it is reduced."""
    reduce = zero.reduce_ipg_grads

    def noting(*args, **kw):
        for t in (t for bucket in zero.ipg_buckets.values() for t in bucket.buffer):
            found[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return reduce(*args, **kw)
    zero.reduce_ipg_grads = noting


# ------------------------------------------------------------------------------------------------
# one rank's measurements
def run_one(a, W, stage, precision):
    """Two training steps (stage 0: DDP, "fsdp": FSDP2, else DeepSpeed ZeRO-stage); what step 2 communicated,
    and the memory held between its backward and optimizer step."""
    from pretrain.config import load_config
    from pretrain.engine.backends import create_backend
    from pretrain.methods import create_method
    from pretrain.models import GlobalBatchNorm, convert_sync_bn

    cfg = load_config(None, [
        "method.name=simclr", f"method.proj_hidden_dim={a.hidden}", f"method.proj_dim={a.dim}", "data.train=unused",
        f"model.name={a.model}", f"data.image_size={a.image_size}", f"train.global_batch_size={a.batch * W}",
        "optim.name=adamw", "optim.lr=1e-3", "optim.weight_decay=0.05", f"train.precision={precision}",
        f"train.backend={'ddp' if stage == 0 else stage if stage == 'fsdp' else 'deepspeed'}",
        f"deepspeed.zero_stage={0 if stage == 'fsdp' else stage}"])
    torch.manual_seed(0)
    method = create_method(cfg)
    if method.sync_bn and W > 1:   # as pretrain.engine.trainer does
        method = convert_sync_bn(method, torch.device("cpu"))
    psi = sum(p.numel() for p in method.parameters() if p.requires_grad)
    persist = sum(p.numel() for p in method.parameters() if p.numel() <= PERSIST)
    # global BN: per layer, [sum, count] (C+1 fp32) then the squared deviations (C) all-reduced forward,
    # and the gradients of both backward
    bn = 8 * sum(2 * m.num_features + 1 for m in method.modules() if isinstance(m, GlobalBatchNorm))
    buffers = sum(b.numel() * b.element_size() for b in method.buffers())   # DDP broadcasts them every forward
    be = create_backend(method, cfg, torch.device("cpu"))
    ddp_buckets, reduce_buckets = {}, {}
    if stage == 0 and be.ddp:
        be.model.register_comm_hook(ddp_buckets, count_hook)
    if stage in (1, 2):
        watch_reduce_bucket(be.engines["main"].optimizer, reduce_buckets)
    g = torch.Generator().manual_seed(dist.get_rank() if dist.is_initialized() else 0)
    batch = {"views": [torch.randn(2, a.batch, 3, a.image_size, a.image_size, generator=g)]}
    for _ in (1, 2):
        reduce_buckets.clear()
        with CommCounter() as comm:
            loss = be.forward(batch)["loss"]
            if stage in (0, "fsdp"):
                be.backward(loss)
                mem = measure_memory(be, ddp_buckets, reduce_buckets)
                be.step(need_norm=False)
            else:   # what DeepSpeedBackend.backward does, with the measurement in between
                be.engines["main"].backward(loss)
                mem = measure_memory(be, ddp_buckets, reduce_buckets)
                be.engines["main"].step()
    del be, method, ddp_buckets
    gc.collect()
    return {"psi": psi, "persist": persist, "bn": bn, "buffers": buffers, "comm": comm.bytes, "memory": mem}


def worker(a) -> dict:
    """Every run on this rank; memory from every rank (gathered), communication from this one."""
    from pretrain import dist as pdist

    env = pdist.env_from()
    if env.world_size > 1:
        pdist.init_distributed(env, "gloo", timeout_s=600)
    out, t0 = {"W": env.world_size, "runs": {}}, time.perf_counter()
    for stage, precision in [(s, "fp32") for s in (0, 1, 2, 3, "fsdp")] + \
            ([] if a.quick else [(s, "bf16") for s in (1, 2, 3, "fsdp")]):
        key = "DDP" if stage == 0 else ("FSDP2" if stage == "fsdp" else f"ZeRO-{stage}") + \
            (" bf16" if precision == "bf16" else "")
        r = run_one(a, env.world_size, stage, precision)
        mems = [r["memory"]] * env.world_size
        if env.world_size > 1:
            dist.all_gather_object(mems, r["memory"])
        out["runs"][key] = dict(r, memory=mems)
        if env.rank == 0:
            log(f"[W={env.world_size}] {key}: measured ({time.perf_counter() - t0:.0f} s)")
    return out


# ------------------------------------------------------------------------------------------------
# report
def summary(res) -> dict:
    """Per backend: mean over ranks of each category; "states" (the five psi-proportional ones),
    "paper" (states less DDP's buckets, as the paper counts), "all"; "max" (the largest rank's states)."""
    out = {}
    for key, r in res["runs"].items():
        m = {c: sum(x[c] for x in r["memory"]) / len(r["memory"]) for c in CATS}
        m.update(states=sum(m[c] for c in STATES), all=sum(m[c] for c in CATS),
                 max=max(sum(x[c] for c in STATES) for x in r["memory"]))
        m["paper"] = m["states"] - m["DDP bkts"]
        out[key] = m
    return out


def report(res, a):
    W, ddp = res["W"], res["runs"]["DDP"]
    psi, persist, c, none = ddp["psi"], ddp["persist"], ddp["comm"], {"payload": 0, "wire": 0}
    print(f"\n=== world size {W}: {a.model} + SimCLR head {a.hidden}-{a.dim}: psi = {psi:,} trainable parameters "
          f"({persist:,} in tensors of <= 1e5), b = {a.batch}, V = 2, D = {a.dim}, {a.image_size} px, AdamW")
    print(f"  {'bytes per rank per step':<56} {'measured':>12} {'formula':>12}  ratio")
    gather = {k: c.get("gather fwd", none)[k] + c.get("gather bwd", none)[k] for k in ("payload", "wire")}
    bcast = {"payload": ddp["buffers"] if W > 1 else 0, "wire": (W - 1) * ddp["buffers"] // W}
    fsdp_rows = []
    for key, w in (("FSDP2", 4), ("FSDP2 bf16", 2)):   # weights gathered in the compute dtype, twice; fp32 reduce
        if key in res["runs"]:
            fc = res["runs"][key]["comm"]
            fsdp_rows += [(f"{key} weight all-gathers (fwd + bwd)", fc.get("FSDP gather", none),
                           {"payload": 2 * w * psi if W > 1 else 0, "wire": 2 * (W - 1) * w * psi // W}),
                          (f"{key} gradient reduce-scatter", fc.get("FSDP red.-scatter", none),
                           {"payload": 4 * psi if W > 1 else 0, "wire": (W - 1) * 4 * psi // W})]
    for name, m, f in (("SimCLR gather (fwd all-gather, bwd all-reduce)", gather, gather_formula(a.batch, 2, a.dim, W)),
                       ("DDP gradient all-reduce", c.get("DDP grads", none), allreduce_formula(4 * psi, W)),
                       ("global BN all-reduces (fwd + bwd)", c.get("global BN", none), allreduce_formula(ddp["bn"], W)),
                       ("DDP buffer broadcast (every forward)", c.get("DDP buffers", none), bcast), *fsdp_rows):
        for k in ("payload", "wire"):
            print(f"  {name + ', ' + k:<56} {m[k]:>12,} {f[k]:>12,}  " + (f"{m[k] / f[k]:.3f}" if f[k] else "-"))
    print(f"  {'MB per rank (mean of ranks)':<26}" + "".join(f"{x:>9}" for x in STATES + ("states",)) +
          f"  ratio | {'paper':>7}  ratio | {'max rank':>8} | {'red.bkt':>7} {'other':>5}")
    s = summary(res)
    for key, m in s.items():
        stage, bf16 = 0 if key == "DDP" else "fsdp" if key.startswith("FSDP") else int(key[5]), "bf16" in key
        f = memory_formula(stage, psi, W, "bf16" if bf16 else "fp32", persist)
        fs, paper = sum(f.values()), paper_formula(3 if stage == "fsdp" else stage, psi, W, bf16)
        print(f"  {key:<14}measured   " + "".join(f"{m[k] / MB:9.2f}" for k in STATES + ("states",)) +
              f"  {m['states'] / fs:.3f} | {paper / MB:7.2f}  {m['paper'] / paper:.3f} | {m['max'] / MB:8.2f} | "
              f"{m['red.bkt'] / MB:7.0f} {m['other'] / MB:5.2f}")
        print(f"  {'':<14}formula    " + "".join(f"{f[k] / MB:9.2f}" for k in STATES) + f"{fs / MB:9.2f}")
    print("  ratio: measured / formula; paper: the ZeRO paper's count (fp32 4+4+8, bf16 2+2+12 bytes per parameter)"
          " next to measured states less DDP's buckets")
    for key, m in s.items():
        if key != "DDP":
            d = s["DDP"]
            print(f"  {key + ' / DDP':<18} per-rank memory {m['states'] / d['states']:.3f} (model states), "
                  f"{m['paper'] / d['paper']:.3f} (without DDP's buckets), {m['all'] / d['all']:.3f} (everything)")


def extrapolate(W=512, B=4096, hidden=2048, dim=128):
    """The formulas for ResNet-50 and ViT-B/16 + the SimCLR head at W ranks, global batch B."""
    from pretrain.config import load_config
    from pretrain.methods import create_method

    g = gather_formula(B // W, 2, dim, W)
    print(f"\n=== extrapolation: {W} ranks (64 nodes x 8 GPUs), global batch {B} (b = {B // W}), SimCLR head {hidden}-"
          f"{dim}, AdamW. SimCLR gather per rank per step: payload {g['payload'] / MB:.2f} MB, ring wire "
          f"{g['wire'] / MB:.2f} MB")
    for name in ("resnet50", "vit_base_patch16_224"):
        m = create_method(load_config(None, ["data.train=unused", f"model.name={name}", "data.image_size=224",
                                             f"method.proj_hidden_dim={hidden}", f"method.proj_dim={dim}"]))
        psi = sum(p.numel() for p in m.parameters() if p.requires_grad)
        persist = sum(p.numel() for p in m.parameters() if p.numel() <= PERSIST)
        big = max(p.numel() for p in m.parameters())
        d = allreduce_formula(4 * psi, W)
        print(f"  {name}: psi = {psi:,} ({persist:,} in tensors of <= 1e5, largest tensor {big:,}); DDP all-reduce "
              f"payload {d['payload'] / MB:.1f} MB, ring wire {d['wire'] / MB:.1f} MB; gather / DDP wire "
              f"{g['wire'] / d['wire']:.4f}")
        print(f"    {'MB per rank':<14}" + "".join(f"{x:>9}" for x in STATES) + f"{'total':>9}{'paper':>9}"
              f"  ZeRO-1/2 worst rank (grads of whole tensors)")
        for prec in ("fp32", "bf16"):
            for stage in (0, 1, 2, 3, "fsdp"):
                f, w = memory_formula(stage, psi, W, prec, persist), 4 if prec == "fp32" else 2
                worst = sum(f.values()) + w * 2 * big if stage in (1, 2) else None
                name = {0: "DDP", "fsdp": "FSDP2"}.get(stage, f"ZeRO-{stage}")
                print(f"    {name + ' ' + prec:<14}" +
                      "".join(f"{f[k] / MB:9.2f}" for k in STATES) + f"{sum(f.values()) / MB:9.2f}"
                      f"{paper_formula(3 if stage == 'fsdp' else stage, psi, W, prec == 'bf16') / MB:9.2f}" +
                      (f"  <= {worst / MB:.2f}" if worst else ""))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smallest settings, fp32 only: a smoke run")
    p.add_argument("--json", help="also write every measurement to this file")
    p.add_argument("--worker", help=argparse.SUPPRESS)   # internal: measure in this process, rank 0 writes JSON here
    a = p.parse_args(argv)
    a.model, a.hidden, a.dim, a.batch, a.image_size = ("resnet10t", 256, 64, 4, 16) if a.quick else \
        ("resnet18", 2048, 128, 8, 32)
    if a.worker:
        from pretrain.dist import cleanup

        res = worker(a)
        if not dist.is_initialized() or dist.get_rank() == 0:
            Path(a.worker).write_text(json.dumps(res))
        cleanup()   # with every rank, before exit (a gloo group alive at exit can abort a rank: exit -6)
        return 0
    launcher_vars = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in launcher_vars}
    path = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=path)
    results, t0 = {}, time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        for W in (1, 2):
            out = Path(d) / f"w{W}.json"
            launch = [] if W == 1 else ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={W}"]
            subprocess.run([sys.executable, *launch, __file__, *(["--quick"] if a.quick else []), "--worker", str(out)],
                           env=env, check=True)
            results[W] = json.loads(out.read_text())
    log(f"measured in {time.perf_counter() - t0:.0f} s")
    for W in (1, 2):
        report(results[W], a)
    extrapolate()
    if a.json:
        Path(a.json).write_text(json.dumps({str(W): r for W, r in results.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
