"""`pretrain` command line: shards | train | slurm | export | latents | finetune | eval | sample | reconstruct |
attention.

Errors a user can fix are printed as one line (`error: ...`) with exit code 2.
"""
from __future__ import annotations

import argparse
import json
import sys


def cmd_shards(a):
    from pretrain.data import write_shards
    from pretrain.data.sources import open_source

    classes, samples = open_source(a.src, a.size, a.format)
    index = write_shards(samples, classes, a.out_dir, a.shard_size, a.val_fraction, a.seed)
    for split in ("train", "val"):
        if split in index:
            print(f"{split}: {index[split]['samples']} samples in {len(index[split]['shards'])} shards -> {a.out_dir}/{split}")


def cmd_train(a):
    from pretrain.config import load_config
    from pretrain.dist import cleanup, env_from
    from pretrain.engine import train

    metrics = train(load_config(a.config, a.overrides))
    # every rank together, before the interpreter exits: a gloo group left alive then can abort a rank at exit
    # (seen under ZeRO-3: "terminate called without an active exception")
    cleanup()
    if metrics and env_from().is_main:   # one line, not one per rank interleaved on a shared stdout
        print(json.dumps({k: round(v, 5) if isinstance(v, float) else v for k, v in metrics.items()}))
    if metrics.get("preempted") and not metrics.get("requeued"):
        # stopped early with a checkpoint, and nobody requeued it: say so in the exit status
        # (128 + signal, as a shell reports a process a signal ended), so a scheduler restarts it
        import signal

        sys.exit(128 + signal.Signals[metrics["preempted"]])


def cmd_slurm(a):
    from launch.slurm import submit   # the launcher: asks SLURM for nodes and runs `train` there

    return submit(a)


def cmd_latents(a):
    from pretrain.latents import write_latents

    index = write_latents(a.autoencoder, a.data, a.out_dir, a.batch_size, a.shard_size, a.workers)
    print(f"wrote {index['samples']} latents in {len(index['shards'])} shards -> {a.out_dir}")


def cmd_export(a):
    from pretrain.export import export

    out = export(a.run_dir, a.out, a.which)
    print(f"wrote {out}" if a.which == "autoencoder" else f"wrote {out} and {out.with_suffix('.json')}")


def cmd_finetune(a):
    from pretrain.dist import env_from
    from pretrain.finetune import run

    out = run(a.backbone, a.train, a.val, a.overrides, a.config)
    if env_from().is_main:
        print(json.dumps(out))
    if out.get("preempted") and not out.get("requeued"):   # as cmd_train: 128 + signal, so a scheduler restarts it
        import signal

        sys.exit(128 + signal.Signals[out["preempted"]])


def cmd_attention(a):
    from pretrain.evaluation.attention import draw_attention

    r = draw_attention(a.run_dir, a.images, a.out, a.which, a.step, a.image_size, a.mean, a.scale)
    print(f"wrote {r['out']}: {r['images']} image(s) x {r['heads']} head(s) of {r['model']} at {r['image_size']} px "
          f"({r['pixels'][0]}x{r['pixels'][1]} px)")


def cmd_reconstruct(a):
    from pretrain.evaluation.reconstruct import draw_reconstructions

    r = draw_reconstructions(a.run_dir, a.out, a.images, a.data, a.n, a.seed)
    print(f"wrote {r['out']}: original / masked / reconstruction (visible pasted) / raw prediction of {r['images']} "
          f"image(s), MAE step {r['step']}, mask ratio {r['mask_ratio']}, seed {r['seed']} "
          f"({r['pixels'][0]}x{r['pixels'][1]} px)")


def _generative(path):
    from pretrain.export import load_method

    method, cfg, step = load_method(path)
    if not hasattr(method, "sample"):
        raise ValueError(f"{path} is a {cfg.method.name} run, which does not generate images; "
                         f"sample from a vae, gan, pixelcnn or ddpm run")
    return method.eval(), cfg, step


def _guidance(a, method, cfg) -> dict:
    """The sampling keywords --cfg / --class ask for (only those given), or a one-line error for a method without
    classifier-free guidance."""
    guide = {k: v for k, v in (("cfg", a.cfg), ("classes", a.cls)) if v is not None}
    if guide and not hasattr(method, "guided"):
        raise ValueError(f"--cfg/--class need a class-conditional ddpm or flow run; this is {cfg.method.name}")
    return guide


def cmd_sample(a):
    from pretrain.evaluation.generative import save_grid
    from pretrain.methods.generative import sample_generators

    if a.n < 1:
        raise ValueError(f"--n must be >= 1, got {a.n}")
    method, cfg, step = _generative(a.run_dir)
    guide = _guidance(a, method, cfg)
    images = method.sample(a.n, generator=sample_generators(a.seed, range(a.n)), steps=a.steps, sampler=a.sampler,
                           **guide)
    save_grid(images, a.out)
    print(f"wrote {a.n} samples of {cfg.method.name} (step {step}, seed {a.seed}) to {a.out}")


def cmd_eval_gen(a):
    """Generative metrics of a run, one JSON line: bits/dim on --val (likelihood models) next to a per-pixel histogram
    fit on --train; with --inception PATH, Inception-FID and Inception Score (and P/R in Inception features); with
    --features PATH..., Frechet distance, precision and recall in each exported backbone's features, with noise and
    --train as baselines. Under torchrun, sample i (drawn from (--seed, i)) and the feature extraction of samples and
    real images are split over ranks and gathered, so any world size gives the same set; rank 0 prints."""
    import torch
    import torch.nn.functional as F

    from pretrain.data import eval_loader
    from pretrain.dist import cleanup, env_from, init_distributed
    from pretrain.evaluation import extract_features
    from pretrain.evaluation import fidelity as fi
    from pretrain.evaluation.generative import frechet_distance, histogram_bits_per_dim, to_signed
    from pretrain.methods.generative import sample_generators

    if not a.run:
        raise ValueError("pretrain eval gen needs --run RUN_DIR (a vae, gan, pixelcnn, ddpm or flow run)")
    metrics = set(a.metrics or ["bpd"] + ["fid", "is"] * bool(a.inception) + ["fd", "pr"] * bool(a.features))
    if {"fid", "is"} & metrics and not a.inception:
        raise ValueError(fi.missing_inception_error())
    if {"fd", "pr"} & metrics and not (a.features or a.inception):
        raise ValueError("--metrics fd/pr need a feature space: --features EXPORTED.safetensors and/or --inception PATH")
    env = env_from()
    device = init_distributed(env, backend="gloo")   # features travel between ranks on the CPU
    try:
        inception = fi.load_inception(a.inception, device) if a.inception else None
        method, cfg, step = _generative(a.run)
        method.to(device)
        guide = _guidance(a, method, cfg)
        size, r, W = cfg.data.image_size, env.rank, env.world_size

        def images(spec, key):
            loader = eval_loader(spec, a.batch_size, size, a.workers, key=key, max_samples=a.max_samples)
            return torch.cat([b["image"] for b in loader])

        train, val = images(a.train, "--train"), images(a.val, "--val")
        n = a.n or len(val)
        if min(n, len(val)) < W:
            raise ValueError(f"{min(n, len(val))} images for {W} ranks; raise --n / --max-samples or use fewer ranks")
        out = {"eval": "gen", "run": str(a.run), "method": cfg.method.name, "step": step, "val": len(val), "samples": n,
               "seed": a.seed, "ranks": W, **guide}
        if "bpd" in metrics and env.is_main:
            g = torch.Generator().manual_seed(a.seed)
            bpd = [method.bits_per_dim(to_signed(x).to(device), generator=g) for x in val.split(a.batch_size)]
            if bpd[0] is not None:   # None: a model without a likelihood (GAN)
                out.update(bits_per_dim=round(torch.cat(bpd).mean().item(), 4),
                           histogram_bits_per_dim=round(histogram_bits_per_dim(train, val), 4))
        if not metrics - {"bpd"}:
            if env.is_main:
                print(json.dumps(out))
            return
        mine = fi.shard(n, r, W)
        samples = fi.generate(method, mine, a.seed, a.batch_size, steps=a.steps, sampler=a.sampler, **guide)
        out["samples_sha256"] = fi.sample_digests(samples, n)
        run = lambda fn, x, m: fi.extract(fn, x.to(device), m, a.batch_size)   # noqa: E731
        if inception is not None:
            (rp, _), (sp, sl) = run(inception, val[r::W], len(val)), run(inception, samples, n)
            out["inception"] = {"weights": str(a.inception), "standard": inception.standard}
            if "fid" in metrics:
                out["fid"] = round(frechet_distance(rp, sp), 4)
            if "is" in metrics:
                out["inception_score"], out["inception_score_std"] = (round(v, 4) for v in fi.inception_score(sl))
            if "pr" in metrics:
                out["inception"].update(zip(("precision", "recall"), (round(v, 4) for v in fi.precision_recall(rp, sp))))
        for path in a.features or []:
            from pretrain.export import load_backbone

            backbone, meta = load_backbone(path)
            backbone.eval().to(device)
            side = meta["input_size"][-1]
            fit = lambda x: x if x.shape[-1] == side else F.interpolate(x, size=(side, side), mode="bilinear",  # noqa: E731
                                                                         antialias=True, align_corners=False)
            fn = lambda u8: extract_features(torch.no_grad()(lambda x: backbone(fit(x))),  # noqa: E731
                                             [{"image": u8, "label": torch.zeros(len(u8))}], device,
                                             meta["mean"], meta["std"])[0]
            noise = torch.stack([torch.randint(0, 256, samples.shape[1:], generator=g, dtype=torch.uint8)
                                 for g in sample_generators(a.seed, mine)])   # a baseline, as many as the samples
            (real,), (fake,) = run(fn, val[r::W], len(val)), run(fn, samples, n)
            res = {}
            if "fd" in metrics:
                res.update(fd=round(frechet_distance(real, fake), 4),
                           fd_noise=round(frechet_distance(real, run(fn, noise, n)[0]), 4),
                           fd_train=round(frechet_distance(real, run(fn, train[r::W], len(train))[0]), 4))
            if "pr" in metrics:
                res.update(zip(("precision", "recall"), (round(v, 4) for v in fi.precision_recall(real, fake))))
            out.setdefault("backbones", {})[str(path)] = res
        if a.features and len(a.features) == 1 and "fd" in metrics:   # the keys of one --features, as before
            res = out["backbones"][str(a.features[0])]
            out.update(frechet_samples=res["fd"], frechet_noise=res["fd_noise"], frechet_train=res["fd_train"])
        if env.is_main:
            print(json.dumps(out))
    finally:
        cleanup()


def _features(a, spec, key):
    import torch

    from pretrain.data import eval_loader
    from pretrain.evaluation import extract_features

    loader = eval_loader(spec, a.batch_size, a.image_size, a.workers, key=key, max_samples=a.max_samples)
    if a.raw_pixels:
        return extract_features(lambda x: x.flatten(1), loader, torch.device("cpu"), a.mean, a.std)
    return extract_features(a.model_fn, loader, torch.device("cpu"), a.mean, a.std)


def _eval_source(a) -> str:
    """Set up the features of `pretrain eval knn|linear|fewshot|all`: a.model_fn (unless --raw-pixels), a.image_size,
    a.mean, a.std, from --backbone / --run / --model / --raw-pixels; returns what the JSON lines call it."""
    import torch

    if sum(map(bool, (a.backbone, a.model, a.raw_pixels, a.run))) != 1:
        raise ValueError("pass exactly one of --backbone PATH, --run RUN_DIR, --model NAME (random init) or --raw-pixels")
    meta = {"input_size": [3, a.image_size or 32, a.image_size or 32],
            "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    if a.backbone:
        from pretrain.export import load_backbone

        model, meta = load_backbone(a.backbone)
    elif a.run:   # the method's own evaluation features (CPC: mean over its patch grid)
        from pretrain.export import load_method

        method, cfg, _ = load_method(a.run)
        model = method
        meta = {"input_size": [3, cfg.data.image_size, cfg.data.image_size], "mean": list(cfg.data.mean),
                "std": list(cfg.data.std)}
    elif a.model:
        from pretrain.models import create_backbone

        torch.manual_seed(a.seed)
        model = create_backbone(a.model, json.loads(a.model_kwargs))
    if not a.raw_pixels:
        model.eval()
        a.model_fn = torch.no_grad()(model.features if a.run else model)
    a.image_size = a.image_size or meta["input_size"][-1]
    a.mean, a.std = meta["mean"], meta["std"]
    return a.backbone or (f"run {a.run} (method features)" if a.run else f"random-init {a.model}" if a.model else "raw pixels")


def _class_names(spec):
    """The class names in a `pretrain shards` split directory's index.json, else None."""
    from pathlib import Path

    path = Path(spec) / "index.json" if isinstance(spec, str) else None
    return json.loads(path.read_text()).get("classes") if path is not None and path.is_file() else None


def cmd_eval(a):
    """knn | linear | fewshot | all (the three, and `pretrain finetune` with --finetune) on features extracted once:
    one JSON line per result; `all` ends with a table on stderr."""
    import torch

    from pretrain.evaluation import eval_table, knn_accuracy, linear_probe
    from pretrain.evaluation.fewshot import check_counts, check_shots, fewshot

    torch.set_flush_denormal(True)
    if a.kind == "gen":
        return cmd_eval_gen(a)
    kinds = ("knn", "linear", "fewshot") if a.kind == "all" else (a.kind,)
    if "fewshot" in kinds:
        check_counts(a.shots, a.seeds)   # before any work
    if a.finetune is not None and (a.kind != "all" or not a.backbone):
        raise ValueError("--finetune fine-tunes an exported backbone in `pretrain eval all --backbone PATH`; "
                         "alone, run `pretrain finetune PATH --train ... --val ...`")
    if a.overrides and a.finetune is None:
        raise ValueError(f"{a.overrides[0]}: key=value arguments override the fine-tuning config of "
                         f"`pretrain eval all --finetune [CONFIG]`; no other eval takes them")
    what = _eval_source(a)
    tf, ty = _features(a, a.train, "--train")
    names = _class_names(a.train)
    if "fewshot" in kinds:
        check_shots(ty, a.shots, names)   # before the val pass
    vf, vy = _features(a, a.val, "--val")
    lines = []

    def emit(line):
        lines.append(line)
        print(json.dumps(line), flush=True)

    for kind in kinds:
        if kind == "knn":
            emit({"eval": kind, "backbone": what, "top1": round(knn_accuracy(tf, ty, vf, vy, a.k, a.temperature), 4),
                  "train": len(ty), "val": len(vy)})
        elif kind == "linear":
            acc = linear_probe(tf, ty, vf, vy, epochs=a.epochs, weight_decay=a.weight_decay)
            emit({"eval": kind, "backbone": what, "top1": round(acc, 4), "train": len(ty), "val": len(vy)})
        else:
            for r in fewshot(tf, ty, vf, vy, a.shots, range(a.seed, a.seed + a.seeds), names, epochs=a.epochs,
                             weight_decay=a.weight_decay):
                emit({"eval": kind, "backbone": what, "top1": round(r["top1"], 4), "shots": r["shots"],
                      "seeds": r["seeds"], "std": None if r["std"] is None else round(r["std"], 4),
                      "ci95": None if r["ci95"] is None else [round(c, 4) for c in r["ci95"]],
                      "train": r["train"], "val": len(vy)})
    if a.finetune is not None:
        from pretrain.finetune import run

        emit(run(a.backbone, a.train, a.val, a.overrides, a.finetune or None))
    if a.kind == "all":
        print(eval_table(lines), file=sys.stderr)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pretrain", description=__doc__.splitlines()[0])
    # the `deepspeed` launcher puts --local_rank=N before our arguments; LOCAL_RANK, which it sets
    # too, is what pretrain.dist reads
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("shards", help="write WebDataset shards from an image folder or a built-in dataset")
    s.add_argument("src", help="image folder with class subfolders, or a built-in source: digits")
    s.add_argument("out_dir")
    s.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    s.add_argument("--val-fraction", type=float, default=0.1)
    s.add_argument("--size", type=int, default=32, help="side of built-in sources' images")
    s.add_argument("--format", choices=["keep", "jpg", "png"], default="keep")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(fn=cmd_shards)

    t = sub.add_parser("train", help="pretrain (also under torchrun / srun)")
    t.add_argument("config", help="experiment YAML, e.g. configs/simclr_resnet18.yaml")
    t.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.epochs=5")
    t.set_defaults(fn=cmd_train)

    from launch.slurm import add_arguments as slurm_arguments

    sl = sub.add_parser("slurm", help="submit a training run to SLURM (torchrun on every node)",
                        description="Write a SLURM batch script for a run into its run dir and submit it (see docs/slurm.md).")
    slurm_arguments(sl)
    sl.set_defaults(fn=cmd_slurm)

    e = sub.add_parser("export", help="write the trained backbone as safetensors + JSON")
    e.add_argument("run_dir", help="run dir (newest checkpoint) or a checkpoint")
    e.add_argument("--out", required=True)
    e.add_argument("--which", default="default", help="which backbone, for methods with several (MoCo, BYOL: query, the default, or key; DINO, iBOT: teacher, the default, or student); vae: `autoencoder` writes the whole VAE for latent diffusion (method.autoencoder)")
    e.set_defaults(fn=cmd_export)

    la = sub.add_parser("latents", help="encode image shards once with a frozen VAE into latent shards (latent diffusion)",
                        description="Latent shards for ddpm/flow with method.autoencoder: point data.train at them "
                                    "instead of the image shards (docs/methods.md, latent diffusion).")
    la.add_argument("autoencoder", help="a file written by `pretrain export VAE_RUN --which autoencoder`")
    la.add_argument("--data", required=True, help="shard spec of the images to encode")
    la.add_argument("--out-dir", required=True)
    la.add_argument("--batch-size", type=int, default=256)
    la.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    la.add_argument("--workers", type=int, default=0)
    la.set_defaults(fn=cmd_latents)

    f = sub.add_parser("finetune", help="fine-tune an exported backbone on labelled shards (also under torchrun)",
                       description="Full fine-tuning with a linear head, layer-wise LR decay, mixup/cutmix and label "
                                   "smoothing (MAE's recipe; docs/finetune.md); prints one JSON line with the val top-1.")
    f.add_argument("backbone", help="a .safetensors written by `pretrain export`")
    f.add_argument("--train", required=True, help="shard spec of the labelled train split")
    f.add_argument("--val", required=True, help="shard spec of the labelled val split (top-1 each eval.every_epochs)")
    f.add_argument("--config", default=None, help="experiment YAML (default: configs/finetune_vit_base_mae.yaml, "
                                                   "MAE's ViT-B recipe; configs/finetune_digits.yaml runs on a CPU)")
    f.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.epochs=5 run_dir=runs/ft")
    f.set_defaults(fn=cmd_finetune)

    v = sub.add_parser("eval", help="kNN, linear or few-shot probe on frozen features, or all of them; gen: generative metrics",
                       description="knn | linear | fewshot (N-shot linear probe over seeds) | all (the three on features "
                                   "extracted once, and `pretrain finetune` with --finetune) print one JSON line per "
                                   "result; `all` adds a table on stderr (docs/evaluation.md). gen: generative metrics.")
    v.add_argument("kind", choices=["knn", "linear", "fewshot", "all", "gen"])
    v.add_argument("overrides", nargs="*", help="all --finetune: key=value overrides of the fine-tuning config")
    v.add_argument("--run", help="gen: the generative run dir; knn/linear: evaluate the method's own features "
                                 "(e.g. CPC's patch-grid average) from this run's newest checkpoint")
    v.add_argument("--features", nargs="+", default=None, metavar="PATH",
                   help="gen: exported backbone(s) (`pretrain export`; e.g. a DINOv2 ViT: FD-DINOv2) in whose features "
                        "the Frechet distance, precision and recall are computed, one result each")
    v.add_argument("--inception", default=None, metavar="PATH",
                   help="gen: local Inception-v3 weights for FID and Inception Score: torch-fidelity's "
                        "weights-inception-2015-12-05-6726825d.pth (paper FID), or torchvision's as .safetensors")
    v.add_argument("--metrics", nargs="+", choices=["bpd", "fid", "is", "fd", "pr"], default=None,
                   help="gen: which metrics (default: bpd, fid and is with --inception, fd and pr with --features)")
    v.add_argument("--n", type=int, default=0, help="gen: samples drawn (default: as many as --val; papers: 50000)")
    v.add_argument("--steps", type=int, default=None, help="gen: sampler steps (DDPM/DDIM, flow)")
    v.add_argument("--sampler", choices=["ddpm", "ddim", "euler", "heun"], default=None,
                   help="gen: ddpm: ddpm|ddim, flow: euler|heun (default: method.sampler)")
    v.add_argument("--cfg", type=float, default=None, help="gen: classifier-free guidance scale (class-conditional runs)")
    v.add_argument("--class", dest="cls", type=int, default=None, help="gen: draw this class only (class-conditional runs)")
    v.add_argument("--backbone", help="exported .safetensors")
    v.add_argument("--model", help="timm name: evaluate a random-init backbone instead")
    v.add_argument("--model-kwargs", default="{}", help='JSON, e.g. \'{"zero_init_last": false}\'')
    v.add_argument("--raw-pixels", action="store_true", help="evaluate raw normalised pixels instead")
    v.add_argument("--train", required=True, help="shard spec of the labelled train split")
    v.add_argument("--val", required=True, help="shard spec of the labelled val split")
    v.add_argument("--image-size", type=int, default=None, help="default: the backbone's input size")
    v.add_argument("--batch-size", type=int, default=256)
    v.add_argument("--workers", type=int, default=0)
    v.add_argument("--max-samples", type=int, default=None)
    v.add_argument("--k", type=int, default=20)
    v.add_argument("--temperature", type=float, default=0.07)
    v.add_argument("--epochs", type=int, default=200, help="linear, fewshot: L-BFGS iterations")
    v.add_argument("--shots", type=int, nargs="+", default=[1, 5, 10], help="fewshot: labelled images per class")
    v.add_argument("--seeds", type=int, default=5, help="fewshot: draws per shot count (seeds --seed, --seed+1, ...)")
    v.add_argument("--finetune", nargs="?", const="", default=None, metavar="CONFIG",
                   help="all: also fine-tune --backbone (`pretrain finetune`) with this experiment YAML (without one: "
                        "its default, MAE's ViT-B recipe; configs/finetune_digits.yaml runs on a CPU)")
    v.add_argument("--weight-decay", type=float, default=1e-4)
    v.add_argument("--seed", type=int, default=0)
    v.set_defaults(fn=cmd_eval)

    m = sub.add_parser("sample", help="a grid of samples from a generative run")
    m.add_argument("run_dir", help="run dir (newest checkpoint) or a checkpoint")
    m.add_argument("--n", type=int, default=64)
    m.add_argument("--out", required=True, help="PNG path")
    m.add_argument("--seed", type=int, default=0, help="same seed, same images")
    m.add_argument("--steps", type=int, default=None, help="DDPM/DDIM steps (default: method.sample_steps)")
    m.add_argument("--sampler", choices=["ddpm", "ddim", "euler", "heun"], default=None,
                   help="ddpm: ddpm|ddim, flow: euler|heun (default: method.sampler)")
    m.add_argument("--cfg", type=float, default=None,
                   help="classifier-free guidance scale of a class-conditional ddpm/flow run (default: method.guidance)")
    m.add_argument("--class", dest="cls", type=int, default=None,
                   help="the class to draw (class-conditional runs; default: every class in turn)")
    m.set_defaults(fn=cmd_sample)

    at = sub.add_parser("attention", help="draw a ViT's last-layer CLS attention per head for a few images (docs/attention.md)")
    at.add_argument("run_dir", help="run dir (newest checkpoint), a checkpoint, or a .safetensors from `pretrain export`")
    at.add_argument("--images", nargs="+", required=True, help="image files, one row each")
    at.add_argument("--out", required=True, help="PNG path")
    at.add_argument("--which", default="default", help="which backbone, for methods with several (MoCo: query or key)")
    at.add_argument("--step", type=int, default=None, help="the checkpoint of this step (default: the newest)")
    at.add_argument("--image-size", type=int, default=None, help="side the images are resized and cropped to "
                    "(default: the training size; another one resamples the position embedding)")
    at.add_argument("--mean", action="store_true", help="add a column with the mean over heads")
    at.add_argument("--scale", type=int, default=None, help="each cell is image-size x scale px (default: max(1, 128 // image-size))")
    at.set_defaults(fn=cmd_attention)

    rc = sub.add_parser("reconstruct", help="MAE: rows of originals, masked inputs and reconstructions (docs/methods.md)")
    rc.add_argument("run_dir", help="an MAE run dir (newest checkpoint) or checkpoint")
    rc.add_argument("--images", nargs="+", default=None, help="image files, one column each")
    rc.add_argument("--data", default=None, help="or a shard spec: its first --n images")
    rc.add_argument("--n", type=int, default=8, help="--data: how many images")
    rc.add_argument("--out", required=True, help="PNG path")
    rc.add_argument("--seed", type=int, default=0, help="the masks' seed: same seed, same masks")
    rc.set_defaults(fn=cmd_reconstruct)
    return p


def main(argv=None) -> int:
    p = parser()
    args, extra = p.parse_known_args(argv)
    # key=value overrides may come after options (`pretrain slurm CFG --nodes 2 a=b`), which argparse
    # leaves over once it has filled the positional list
    if extra and hasattr(args, "overrides") and all("=" in x and not x.startswith("-") for x in extra):
        args.overrides += extra
    elif extra:
        p.error(f"unrecognized arguments: {' '.join(extra)}")
    from pretrain.config import ConfigError
    from pretrain.data import DataError
    from pretrain.engine.checkpoint import CheckpointError
    from pretrain.models import ModelError

    try:
        rc = args.fn(args)
    except (ConfigError, DataError, ModelError, CheckpointError, ValueError, FileNotFoundError, KeyError) as e:
        msg = e.args[0] if e.args else str(e)
        print(f"error: {msg}", file=sys.stderr)
        return 2
    return rc or 0


if __name__ == "__main__":
    sys.exit(main())
