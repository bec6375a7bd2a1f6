"""The training loop, one for every method and backend. Read it top to bottom:

    setup -> resume -> for each step: schedules (LR, weight decay, the method's `scheduled` keys) into a
          StepContext -> method.before_step(ctx) -> for each optimizer phase (one for most methods; D then
          G for a GAN): forward(batch, ctx) -> backward (x grad_accum) -> method.on_gradients -> clip+step
          -> method.after_step(ctx) (EMA etc.) -> log -> samples / monitor (kNN, or a classifier's top-1) -> checkpoint
          (-> on a preemption signal: checkpoint, requeue, stop)

`train()` sets up and resumes; `_loop()` is the loop. Around it, `Preemption` turns SIGUSR1/SIGTERM
into a clean stop after a step that all ranks agree on, and `Watchdog` turns a hung rank into an
error naming it (pretrain/engine/faults.py).
"""
from __future__ import annotations

import resource
import signal
import time
from pathlib import Path
from typing import Iterator, Optional

import torch

from pretrain import comm
from pretrain import dist as pdist
from pretrain.config import ConfigError, batch_split, save_config, to_dict
from pretrain.data import DataError, build_train_loader, count_samples, eval_loader
from pretrain.engine.backends import create_backend, deepspeed_config
from pretrain.engine.checkpoint import Checkpointer, claim_run_dir
from pretrain.engine.faults import Preemption, Watchdog, default_store
from pretrain.engine.logger import RunLogger, attention_image, log, setup_text_log
from pretrain.engine.wandb_log import check_wandb
from pretrain.schedules import Schedule, scaled_lr
from pretrain.evaluation import extract_features, knn_accuracy
from pretrain.methods import create_method
from pretrain.models import convert_sync_bn


def plan(cfg, world: int) -> dict:
    """Batch sizes and step counts a config implies on `world` ranks; errors say what to change."""
    gb, local_batch = cfg.train.global_batch_size, batch_split(cfg, world)
    per_epoch = cfg.data.samples_per_epoch or count_samples(cfg.data.train)
    if cfg.data.val:   # fail now, not after training when the final kNN monitor first reads it
        count_samples(cfg.data.val, "data.val")
    if not per_epoch:
        raise ConfigError("data.samples_per_epoch is not set and the shards have no index.json; set it")
    steps_per_epoch = per_epoch // gb
    if steps_per_epoch < 1:
        raise ConfigError(f"one epoch ({per_epoch} samples) is smaller than train.global_batch_size={gb}; "
                          f"raise data.samples_per_epoch or lower the batch")
    total = cfg.train.max_steps or cfg.train.epochs * steps_per_epoch
    warmup = cfg.optim.warmup_steps if cfg.optim.warmup_steps is not None else cfg.optim.warmup_epochs * steps_per_epoch
    if cfg.train.backend == "deepspeed":   # its config's contradictions with ours, before anything is built
        deepspeed_config(cfg, world)
    lr = scaled_lr(cfg.optim.lr, gb, cfg.optim.lr_scaling)
    try:
        wd = Schedule.parse(cfg.optim.weight_decay)   # a number, or a mapping (a DictConfig is one)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"optim.weight_decay: {e}") from None
    return dict(local_batch=local_batch, steps_per_epoch=steps_per_epoch, total=total,
                warmup=min(warmup, total), lr=lr, schedules={
                    "lr": Schedule(lr, cfg.optim.min_lr, "cosine", warmup_steps=min(warmup, total)),
                    "weight_decay": wd})


def memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # peak RSS, KiB on Linux


@torch.no_grad()
def _outputs(backend, cfg, fn, splits):
    """[(outputs [N, D], labels [N])] of fn(eval copy of the method, images) over this rank's share of each
    (spec, config key) in `splits`. Ranks see different numbers of batches: no collectives inside."""
    rank, world = comm.world_info()
    model = backend.eval_module()
    was_training = model.training
    model.eval()
    out = [extract_features(lambda x: fn(model, x), eval_loader(spec, 256, cfg.data.image_size, 0, rank, world,
                                                                cfg.eval.max_samples, key,
                                                                max_image_pixels=cfg.data.max_image_pixels),
                            backend.device, cfg.data.mean, cfg.data.std, backend.dtype) for spec, key in splits]
    model.train(was_training)
    return out


def knn_monitor(backend, cfg) -> float:
    """kNN top-1 on data.val with data.train as the memory bank; every rank extracts its share."""
    out = _outputs(backend, cfg, lambda m, x: m.features(x, cfg.eval.which),
                   ((cfg.data.train, "data.train"), (cfg.data.val, "data.val")))
    if comm.world_info()[1] > 1:   # gather everyone's features on every rank
        parts = comm.all_gather_object(out)
        # a rank with no shard of a split has empty [0, 0] features: leave it out of the concatenation
        out = [tuple(torch.cat([p[i][j] for p in parts if len(p[i][1])]) for j in range(2)) for i in range(2)]
    (tf, ty), (vf, vy) = out
    return knn_accuracy(tf, ty, vf, vy, cfg.eval.knn_k, cfg.eval.knn_temperature)


def top1_monitor(backend, cfg) -> dict:
    """{"top1", "val_samples"}: top-1 of the method's classifier (`logits`) on data.val; every rank scores its share."""
    [(pred, y)] = _outputs(backend, cfg, lambda m, x: m.logits(x).argmax(1, keepdim=True),
                           [(cfg.data.val, "data.val")])   # [N, 1] class indices, [N] labels
    correct, n, unlabelled = map(sum, zip(*comm.all_gather_object(
        (int((pred.flatten().long() == y).sum()), len(y), int((y < 0).sum())))))
    if unlabelled or not n:
        why = f"{unlabelled} samples without a .cls label" if unlabelled else "no readable samples"
        raise DataError(f"data.val has {why}; the top-1 monitor needs labelled val shards")
    return {"top1": correct / n, "val_samples": n}


#: eval.monitor -> (backend, cfg) -> {name: value}, logged as eval/<name> (Method.monitor names the default)
MONITORS = {"knn": lambda backend, cfg: {"knn_top1": knn_monitor(backend, cfg)}, "top1": top1_monitor}


def monitor_for(cfg, method):
    """The monitor the loop runs on data.val (eval.monitor; auto: the method's `monitor`), or None without
    data.val or a backbone; errors name a monitor the method cannot have."""
    every = cfg.eval.every_epochs
    if isinstance(every, bool) or not isinstance(every, int) or every < 0:
        raise ConfigError(f"eval.every_epochs must be an integer >= 0 (0: off), got {every!r}")
    kind = method.monitor if cfg.eval.monitor == "auto" else cfg.eval.monitor
    if kind not in MONITORS:
        raise ConfigError(f"eval.monitor must be auto, {' or '.join(MONITORS)}, got {kind!r}")
    if kind == "top1" and not hasattr(method, "logits"):
        raise ConfigError(f"eval.monitor=top1 needs a classifier; {cfg.method.name} has none (use knn, or method.name=finetune)")
    return MONITORS[kind] if cfg.data.val and method.backbone is not None else None


@torch.no_grad()
def sample_grid(backend, cfg, logger, run_dir: Path, step: int, is_main: bool) -> None:
    """Generative methods: log.sample_n samples (fixed seed, so grids compare across steps) to
    TensorBoard and run_dir/samples/step_N.png. Every rank takes part in building the eval copy
    (a collective under ZeRO-3); rank 0 samples."""
    from pretrain.evaluation.generative import save_grid

    model = backend.eval_module()
    if not is_main:
        return
    was_training = model.training
    model.eval()
    g = torch.Generator().manual_seed(cfg.seed)   # on the CPU: the same grid on any device
    with torch.random.fork_rng(devices=[backend.device] if backend.device.type == "cuda" else []):
        images = model.sample(cfg.log.sample_n, generator=g)
    model.train(was_training)
    logger.image(step, "samples", save_grid(images, run_dir / "samples" / f"step_{step:08d}.png"))


def train(cfg, data: Optional[Iterator[dict]] = None) -> dict:
    """Run (or resume) the training that `cfg` describes; returns final metrics.

    `data`: an iterator of micro-batches ({"views": [[V_g, B, 3, S_g, S_g] per view size] float on the device, ...}) to
    train on instead of the loader that `cfg.data` describes, e.g. a fixed in-memory batch to time
    the engine alone (scripts/bench.py). Positioning it on resume is then the caller's business.
    """
    env = pdist.env_from()
    device = pdist.init_distributed(env, cfg.dist.backend, cfg.dist.timeout_s)
    torch.set_flush_denormal(True)   # small conv nets on CPU otherwise slow down as weights shrink
    run_dir = Path(cfg.run_dir)
    setup_text_log(run_dir, env.rank)
    p = plan(cfg, env.world_size)
    check_wandb(cfg.log)   # every rank, before the run dir is touched
    resume_from = claim_run_dir(run_dir, cfg.resume, cfg.overwrite)   # refused or cleared before anything is built
    acc = cfg.train.grad_accum

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    method = create_method(cfg, warm_start=resume_from is None)   # a resume loads its checkpoint, not model.pretrained_file
    if getattr(method, "sync_bn", False) and env.world_size > 1:
        method = convert_sync_bn(method, device)
    backend = create_backend(method, cfg, device)
    method = backend.module
    ckpt = Checkpointer(run_dir, backend, cfg.checkpoint.keep_last)
    state = ckpt.resume(resume_from)
    start = state["step"] if state else 0
    # this rank's data-stream position (TrainLoader.state_dict), when the checkpoint holds one per rank
    positions = (state or {}).get("data") or []
    data_state = positions[env.rank] if len(positions) == env.world_size else None
    if state:
        method.load_extra_state(state["extra"])
        log.info("resumed from step %d", start)
    else:
        torch.manual_seed(cfg.seed + env.rank)  # per-rank randomness (dropout, drop-path)
    if env.is_main:
        save_config(cfg, run_dir / "config.yaml")
        log.info("%s on %d rank(s) (%s), %s: %d steps (%d/epoch), local batch %d x accum %d, peak lr %.4g",
                 cfg.method.name, env.world_size, env.source, device, p["total"], p["steps_per_epoch"],
                 p["local_batch"], acc, p["lr"])
    # handlers before the loader starts its workers: forked workers inherit them, so a signal sent to
    # the whole process tree (SLURM does that) does not kill them
    with Preemption(cfg.preempt.signals, cfg.preempt.requeue) as preempt, \
            Watchdog(cfg.dist.timeout_s, env.rank, env.world_size, default_store()) as watch:
        metrics = _loop(cfg, env, p, method, backend, ckpt, data, start, run_dir, preempt, watch, data_state)
        if preempt.agreed:
            metrics.update(preempted=signal.Signals(preempt.agreed).name, requeued=preempt.requeue())
    comm.barrier()
    return metrics


def _loop(cfg, env, p, method, backend, ckpt, data, start, run_dir, preempt, watch, data_state=None) -> dict:
    device, acc = backend.device, cfg.train.grad_accum
    loader = None
    if data is None:
        loader = build_train_loader(cfg, method, p["local_batch"], p["steps_per_epoch"] * acc, env.rank, device)
        data = loader.batches(start * acc, data_state)
    config_dict = to_dict(cfg)
    logger = RunLogger(run_dir, env.is_main, cfg.log.tensorboard, cfg.log.progress, p["total"], start, config_dict)

    monitor, monitor_epochs = monitor_for(cfg, method), cfg.eval.every_epochs * p["steps_per_epoch"]
    if cfg.log.attention_every_steps:     # a backbone without CLS attention: a one-line error before step 1
        from pretrain.evaluation.attention import vit_attention

        vit_attention(method.export_backbone(cfg.eval.which))
    losses_sum, n_logged, wait, t_last, metrics = None, 0, 0.0, time.perf_counter(), {}
    multi = len(method.phases) > 1
    for step in range(start, p["total"]):
        watch.mark(step, "step")
        engine_values = {k: s(step, p["total"], p["steps_per_epoch"]) for k, s in p["schedules"].items()}
        ctx = method.step_context(step, p["total"], p["steps_per_epoch"], **engine_values)
        lr = ctx["lr"]
        backend.set_lr(lr, p["lr"], ctx["weight_decay"], ctx.values)
        method.before_step(ctx)
        done = step + 1
        log_now = done % cfg.log.every_steps == 0 or done == p["total"]
        micro, step_losses, norms = [], {}, {}
        for phase in method.phases:
            pctx = ctx.with_phase(phase)
            with backend.phase(phase):
                for i in range(acc):
                    if i < len(micro):    # a later phase of a multi-phase step: the same micro-batches
                        batch = micro[i]
                    else:
                        t0 = time.perf_counter()
                        watch.mark(step, "data")
                        batch = next(data)
                        watch.mark(step, "step")
                        wait += time.perf_counter() - t0
                        if multi:
                            micro.append(batch)
                    with backend.accumulate(last=i == acc - 1):
                        losses = backend.forward(batch, pctx)
                        backend.backward(losses["loss"])
                    for k, v in losses.items():   # summed on the device: no host sync here
                        key = f"{phase}/{k}" if multi else k
                        step_losses[key] = step_losses.get(key, 0) + v.detach().float()
                norms[phase] = backend.step(pctx, need_norm=log_now)
        method.after_step(ctx)
        names = list(step_losses)
        detached = torch.stack([step_losses[k] for k in names])
        losses_sum = detached if losses_sum is None else losses_sum + detached
        n_logged += acc
        logger.advance()

        if log_now:
            watch.mark(step, "log")
            # one collective: the rank-mean of the losses, and of the corrupt-sample counts (x W = sum)
            skipped = torch.tensor([float(loader.skipped if loader else 0)], device=losses_sum.device)
            *mean, skipped = comm.all_reduce_mean(torch.cat([losses_sum / n_logged, skipped])).tolist()
            elapsed = time.perf_counter() - t_last
            metrics = dict(zip(names, mean))
            metrics.update({"grad_norm" if k == "main" else f"{k}/grad_norm": float(v) for k, v in norms.items()})
            metrics.update(lr=lr, epoch=step / p["steps_per_epoch"],
                           images_per_s=n_logged * p["local_batch"] * env.world_size / elapsed,
                           data_wait_frac=wait / elapsed, memory_mb=memory_mb(device),
                           skipped_samples=round(skipped * env.world_size))
            logger.scalars(done, metrics)
            logger.scalars(done, {k: v for k, v in ctx.values.items() if k != "lr"}, prefix="schedule/")
            losses_sum, n_logged, wait, t_last = None, 0, 0.0, time.perf_counter()
        if cfg.log.sample_every_steps and hasattr(method, "sample") and (
                done % cfg.log.sample_every_steps == 0 or done == p["total"]):
            watch.mark(step, "eval")
            sample_grid(backend, cfg, logger, run_dir, done, env.is_main)
            t_last = time.perf_counter()
        if cfg.log.attention_every_steps and (done % cfg.log.attention_every_steps == 0 or done == p["total"]):
            watch.mark(step, "eval")
            attention_image(backend, cfg, logger, run_dir, done, env.is_main)
            t_last = time.perf_counter()
        if monitor and ((cfg.eval.knn_every_steps and done % cfg.eval.knn_every_steps == 0) or done == p["total"]
                        or (monitor_epochs and done % monitor_epochs == 0)):
            watch.mark(step, "eval")
            result = monitor(backend, cfg)
            metrics.update(result)
            logger.scalars(done, result, prefix="eval/")
            t_last = time.perf_counter()
        stop = preempt.check()   # True on every rank together, once any rank got a preemption signal
        if stop or done % cfg.checkpoint.every_steps == 0 or done == p["total"]:
            watch.mark(step, "checkpoint")
            ckpt.save(done, step // p["steps_per_epoch"], config_dict, method.extra_state(),
                      loader.state_dict() if loader else None)
            t_last = time.perf_counter()
        if stop:
            log.warning("preempted by %s at step %d: checkpoint written, stopping", signal.Signals(preempt.agreed).name, done)
            break
    logger.close()
    return metrics
