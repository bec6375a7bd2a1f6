"""Issue 16's evidence on digits (16 px): eight generative models trained at one budget, compared in one fixed
feature space, plus flow vs DDPM over sampling steps and classifier-free guidance on the class-conditional DiTs.

    OMP_NUM_THREADS=2 .venv/bin/python scripts/bench_generative.py --out /tmp/bench_gen --steps 300

1. data: `pretrain shards digits OUT/data` as the quickstart writes them (80/20 split, 1438 / 359 images);
2. the fixed backbone: a short SimCLR (configs/quickstart_digits.yaml, --simclr-steps) exported with
   `pretrain export` (`--backbone simclr`), or (the default, cheaper) a random-init resnet18 (seed 0, CIFAR stem);
3. the models, each `pretrain train configs/digits_<name>.yaml` with the same train.max_steps and batch (--batch)
   (AdamW from each config, method.ema_decay=--ema; the latent flow on the VAE exported with `pretrain export --which autoencoder`);
4. per model: --n samples (sample i from (seed, i); classes i % 10 for the conditional DiTs at their
   configured guidance), feature-FD and precision/recall (k=3) against the val split, bits/dim on val where the
   method defines it, sampling seconds per image (batch 100), a 10x10 grid;
5. flow (Heun, Euler) vs DDPM (DDIM) at 10 / 25 / 50 sampling steps: FD + grids;
6. CFG at scales 0 (unconditional), 1, 2, 4 on the conditional DiT flow (and DDPM): the accuracy of a logistic
   regression probe, fit on the backbone's features of the real train split, at predicting the requested class.

Prints one table per part and writes OUT/results.json and the grids under OUT/grids/.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRETRAIN = [sys.executable, "-m", "pretrain.cli"]
#: table order; latent flow needs the VAE first
MODELS = ["vae", "gan", "pixelcnn", "ddpm", "flow", "ddpm_dit", "flow_dit", "vae_latent_flow"]
LABELS = {"vae": "VAE", "gan": "GAN", "pixelcnn": "PixelCNN", "ddpm": "DDPM (UNet)", "flow": "flow (UNet)",
          "ddpm_dit": "DDPM (DiT-S/2 shrunk, class-cond.)", "flow_dit": "flow (DiT-S/2 shrunk, class-cond.)",
          "vae_latent_flow": "latent flow on the VAE (DiT-S/1 shrunk)"}


def sh(cmd, log):
    """Run a pretrain command, its output to `log`; raise with the log's tail on failure."""
    with open(log, "w") as f:
        r = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if r.returncode:
        raise SystemExit(f"failed ({r.returncode}): {' '.join(map(str, cmd))}\n{Path(log).read_text()[-3000:]}")


def train_all(a, out: Path, res: dict):
    """Shards, the SimCLR backbone and the eight models (skipping runs that already reached the budget)."""
    data = out / "data"
    if not (data / "index.json").exists():
        sh(PRETRAIN + ["shards", "digits", data, "--size", "32", "--val-fraction", "0.2", "--shard-size", "256"],
           out / "shards.log")
    common = [f"data.train={data}/train", f"data.val={data}/val", "log.sample_every_steps=0", "log.tensorboard=false",
              "eval.knn_every_steps=0", "checkpoint.every_steps=100000", "overwrite=delete", "resume=auto"]
    res["train_s"] = res.get("train_s", {})
    if a.backbone == "simclr" and not (out / "simclr.safetensors").exists():
        t = time.time()
        sh(PRETRAIN + ["train", "configs/quickstart_digits.yaml", *common, f"run_dir={out}/runs/simclr",
                       f"train.max_steps={a.simclr_steps}"], out / "simclr.log")
        sh(PRETRAIN + ["export", out / "runs/simclr", "--out", out / "simclr.safetensors"], out / "simclr_export.log")
        res["train_s"]["simclr"] = round(time.time() - t, 1)
    for m in a.models:
        if m in res["train_s"]:
            continue
        # EMA: the configs' 0.99 / 0.995 would leave most of the init in the averaged weights at a short budget
        extra = [f"method.ema_decay={a.ema}"] if m not in ("vae", "pixelcnn") else []
        if m == "vae_latent_flow":
            extra.append(f"method.autoencoder={out}/vae_autoencoder.safetensors")
        t = time.time()
        sh(PRETRAIN + ["train", f"configs/digits_{m}.yaml", *common, *extra, f"run_dir={out}/runs/{m}",
                       f"train.max_steps={a.steps}", f"train.global_batch_size={a.batch}"], out / f"train_{m}.log")
        res["train_s"][m] = round(time.time() - t, 1)
        print(f"trained {m}: {a.steps} steps in {res['train_s'][m]} s", flush=True)
        if m == "vae":
            sh(PRETRAIN + ["export", out / "runs/vae", "--which", "autoencoder", "--out",
                           out / "vae_autoencoder.safetensors"], out / "vae_export.log")
        json.dump(res, open(out / "results.json", "w"), indent=1)


class Space:
    """The fixed feature space: uint8 images [N, 3, 16, 16] -> backbone features [N, D]."""

    def __init__(self, a, out: Path):
        import torch

        from pretrain.export import load_backbone
        from pretrain.models import create_backbone

        if a.backbone == "simclr":
            self.net, meta = load_backbone(out / "simclr.safetensors")
            self.mean, self.std = meta["mean"], meta["std"]
        else:
            torch.manual_seed(0)
            self.net = create_backbone("resnet18", {}, cifar_stem=True)   # 3x3 stride-1 stem: a 2x2 map at 16 px
            self.mean, self.std = [0.5] * 3, [0.5] * 3
        self.net.eval()

    def __call__(self, u8):
        import torch

        from pretrain.evaluation import extract_features

        fn = torch.no_grad()(self.net)
        return extract_features(fn, [{"image": b, "label": torch.zeros(len(b))} for b in u8.split(256)],
                                torch.device("cpu"), self.mean, self.std)[0]


def evaluate(a, out: Path, res: dict):
    import numpy as np
    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from pretrain.data import eval_loader
    from pretrain.evaluation import fidelity as fi
    from pretrain.evaluation.generative import frechet_distance, save_grid, to_signed
    from pretrain.export import load_method

    torch.manual_seed(0)
    grids = out / "grids"
    grids.mkdir(exist_ok=True)

    def images(split):
        batches = list(eval_loader(str(out / "data" / split), 256, 16, 0))
        return torch.cat([b["image"] for b in batches]), torch.cat([b["label"] for b in batches]).long()

    (train, train_y), (val, val_y) = images("train"), images("val")
    space = Space(a, out)
    real, train_f = space(val), space(train)
    res["backbone"] = a.backbone
    res["real_val"], res["real_train"] = len(val), len(train)
    pr = fi.precision_recall(real, train_f)
    noise = torch.randint(0, 256, (a.n, *val.shape[1:]), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    res["baselines"] = {"train_split": {"fd": frechet_distance(real, train_f), "precision": pr[0], "recall": pr[1]},
                        "uniform_noise": {"fd": frechet_distance(real, space(noise))}}
    scaler = StandardScaler().fit(train_f.numpy())
    probe = LogisticRegression(max_iter=2000).fit(scaler.transform(train_f.numpy()), train_y.numpy())
    probe_acc = lambda f, y: float((probe.predict(scaler.transform(f.numpy())) == np.asarray(y)).mean())  # noqa: E731
    res["probe_val_accuracy"] = probe_acc(real, val_y)
    print(f"backbone {a.backbone}: linear probe on real val {res['probe_val_accuracy']:.3f}; FD train vs val "
          f"{res['baselines']['train_split']['fd']:.2f}, noise {res['baselines']['uniform_noise']['fd']:.2f}", flush=True)

    def draw(method, n, **kw):
        """(uint8 samples [n, ...], seconds per image) at batch 100."""
        t = time.time()
        s = fi.generate(method, range(n), a.seed, 100, **kw)
        return s, (time.time() - t) / n

    def scores(s):
        f = space(s)
        p, r = fi.precision_recall(real, f)
        return {"fd": frechet_distance(real, f), "precision": p, "recall": r}

    res.setdefault("models", {})
    methods = {}
    for m in a.models:
        method, cfg, step = load_method(out / "runs" / m)
        method.eval()
        methods[m] = (method, cfg)
        if m in res["models"]:
            continue
        samples, spi = draw(method, a.n)
        row = {"step": step, "train_s": res["train_s"].get(m), "s_per_image": spi, **scores(samples)}
        row["sampling"] = {k: cfg.method.get(k) for k in ("sampler", "sample_steps", "guidance") if k in cfg.method}
        if cfg.method.name == "pixelcnn":
            row["sampling"] = {"network_calls": 16 * 16 * 3}
        if hasattr(method, "bound_samples"):   # DDPM: the stratified Monte Carlo bound over this many of 199 terms
            method.bound_samples = a.bound_samples
            row["bound_samples"] = a.bound_samples
        g = torch.Generator().manual_seed(a.seed)
        bpd = [method.bits_per_dim(to_signed(x), generator=g) for x in val.split(128)]
        if bpd[0] is not None:
            row["bits_per_dim"] = torch.cat(bpd).mean().item()
        save_grid(to_signed(samples[:100]), grids / f"{m}.png", nrow=10)
        res["models"][m] = row
        print(f"{m}: {json.dumps(row)}", flush=True)
        json.dump(res, open(out / "results.json", "w"), indent=1)

    res.setdefault("steps_sweep", {})
    for m, sampler in (("ddpm", "ddim"), ("flow", "heun"), ("flow", "euler")) if a.sweep else ():
        for steps in (10, 25, 50) if m in methods else ():
            key = f"{m}/{sampler}/{steps}"
            if key in res["steps_sweep"]:
                continue
            samples, spi = draw(methods[m][0], a.n, steps=steps, sampler=sampler)
            nfe = steps * (2 if sampler == "heun" else 1)
            res["steps_sweep"][key] = {"network_calls": nfe, "s_per_image": spi, **scores(samples)}
            save_grid(to_signed(samples[:100]), grids / f"steps_{m}_{sampler}_{steps}.png", nrow=10)
            print(f"steps {key}: {json.dumps(res['steps_sweep'][key])}", flush=True)
            json.dump(res, open(out / "results.json", "w"), indent=1)

    res.setdefault("cfg", {})
    n_cfg = 10 * a.per_class
    want = torch.arange(n_cfg) % 10
    for m in [m for m in a.cfg_models if m in methods]:
        method = methods[m][0]
        for w in a.scales:
            key = f"{m}/{w:g}"
            if key in res["cfg"]:
                continue
            # cfg 0: out = uncond + 0 * (cond - uncond), the unconditional model (its class is not used)
            samples, spi = draw(method, n_cfg, cfg=float(w))   # generate: class i % 10 for sample i
            f = space(samples)
            p, r = fi.precision_recall(real, f)
            res["cfg"][key] = {"probe_accuracy": probe_acc(f, want), "fd": frechet_distance(real, f), "precision": p,
                               "recall": r, "s_per_image": spi}
            order = torch.cat([torch.nonzero(want == c).view(-1)[:10] for c in range(10)])   # row c: class c
            save_grid(to_signed(samples[order]), grids / f"cfg_{m}_{w:g}.png", nrow=10)
            print(f"cfg {key}: {json.dumps(res['cfg'][key])}", flush=True)
            json.dump(res, open(out / "results.json", "w"), indent=1)


def report(res: dict):
    f = lambda v, d=3: "-" if v is None else f"{v:.{d}f}"  # noqa: E731
    print(f"\nbackbone: {res['backbone']}; real val {res['real_val']} images; samples per model {res['n']}; "
          f"train steps {res['steps']} at batch {res['batch']}, EMA {res['ema']}")
    b = res["baselines"]
    print(f"{'model':<44}{'FD':>8}{'prec':>7}{'recall':>7}{'bits/dim':>9}{'s/image':>9}{'train s':>8}")
    print(f"{'(real train split)':<44}{f(b['train_split']['fd']):>8}{f(b['train_split']['precision']):>7}"
          f"{f(b['train_split']['recall']):>7}")
    print(f"{'(uniform noise)':<44}{f(b['uniform_noise']['fd']):>8}")
    for m, r in res["models"].items():
        print(f"{LABELS[m]:<44}{f(r['fd']):>8}{f(r['precision']):>7}{f(r['recall']):>7}"
              f"{f(r.get('bits_per_dim')):>9}{f(r['s_per_image'], 4):>9}{f(r['train_s'], 0):>8}")
    print(f"\n{'sampler':<22}{'steps':>6}{'calls':>6}{'FD':>8}{'prec':>7}{'recall':>7}{'s/image':>9}")
    for k, r in res.get("steps_sweep", {}).items():
        m, s, n = k.split("/")
        print(f"{m + ' ' + s:<22}{n:>6}{r['network_calls']:>6}{f(r['fd']):>8}{f(r['precision']):>7}"
              f"{f(r['recall']):>7}{f(r['s_per_image'], 4):>9}")
    print(f"\nlinear probe on real val: {f(res['probe_val_accuracy'])}")
    print(f"{'model':<12}{'scale':>6}{'probe acc':>10}{'FD':>8}{'prec':>7}{'recall':>7}")
    for k, r in res.get("cfg", {}).items():
        m, w = k.split("/")
        print(f"{m:<12}{w:>6}{f(r['probe_accuracy']):>10}{f(r['fd']):>8}{f(r['precision']):>7}{f(r['recall']):>7}")


def markdown(res: dict, img: str = "img"):
    """The three tables of docs/benchmarks.md from results.json, with links to the grids under docs/`img`/."""
    f = lambda v, d=3: "-" if v is None else f"{v:.{d}f}"  # noqa: E731
    lines = ["| model | steps x batch | train s | FD | precision | recall | bits/dim (val) | s/image (batch 100) | "
             "sampling | grid |", "|---|---|---|---|---|---|---|---|---|---|"]
    b = res["baselines"]
    lines.append(f"| real train split (1438 images) | - | - | {f(b['train_split']['fd'])} | "
                 f"{f(b['train_split']['precision'])} | {f(b['train_split']['recall'])} | - | - | - | - |")
    lines.append(f"| uniform noise | - | - | {f(b['uniform_noise']['fd'])} | - | - | - | - | - | - |")
    for m, r in res["models"].items():
        smp = r["sampling"]
        how = (f"{smp['network_calls']} network calls (one per sub-pixel)" if "network_calls" in smp else
               f"{smp['sampler']} {smp['sample_steps']} steps" + (f", cfg {smp['guidance']:g}" if smp.get("guidance", 1) != 1 else "")
               if "sampler" in smp else "one decoder call")
        kind = " (exact)" if m == "pixelcnn" else " (bound)" if m == "vae" else f" (bound, {r.get('bound_samples')} strata)"
        bpd = f(r.get("bits_per_dim")) + (kind if r.get("bits_per_dim") is not None else "")
        lines.append(f"| {LABELS[m]} | {res['steps']} x {res['batch']} | {f(r['train_s'], 0)} | {f(r['fd'])} | "
                     f"{f(r['precision'])} | {f(r['recall'])} | {bpd} | {f(r['s_per_image'], 4)} | {how} | "
                     f"[grid]({img}/gen_{m}.png) |")
    lines += ["", "| model, sampler | steps | network calls | FD | precision | recall | s/image | grid |",
              "|---|---|---|---|---|---|---|---|"]
    for k, r in res.get("steps_sweep", {}).items():
        m, smp, n = k.split("/")
        lines.append(f"| {LABELS[m]}, {smp} | {n} | {r['network_calls']} | {f(r['fd'])} | {f(r['precision'])} | "
                     f"{f(r['recall'])} | {f(r['s_per_image'], 4)} | [grid]({img}/gen_steps_{m}_{smp}_{n}.png) |")
    lines += ["", f"| model | guidance scale | probe accuracy on requested class | FD | precision | recall | grid |",
              "|---|---|---|---|---|---|---|"]
    for k, r in res.get("cfg", {}).items():
        m, w = k.split("/")
        lines.append(f"| {LABELS[m]} | {w}{' (unconditional)' if w == '0' else ''} | {f(r['probe_accuracy'])} | "
                     f"{f(r['fd'])} | {f(r['precision'])} | {f(r['recall'])} | [grid]({img}/gen_cfg_{m}_{w}.png) |")
    print("\n".join(lines))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="/tmp/bench_gen")
    p.add_argument("--steps", type=int, default=300, help="training steps of every model (batch 128)")
    p.add_argument("--batch", type=int, default=32, help="global batch of every model")
    p.add_argument("--ema", type=float, default=0.9, help="method.ema_decay of the models that keep an EMA")
    p.add_argument("--bound-samples", type=int, default=20, help="DDPM bound: strata of the 199 middle terms")
    p.add_argument("--simclr-steps", type=int, default=150)
    p.add_argument("--backbone", choices=["simclr", "random"], default="random")
    p.add_argument("--n", type=int, default=500, help="samples per model for FD / precision / recall")
    p.add_argument("--per-class", type=int, default=50, help="CFG samples per class")
    p.add_argument("--scales", type=float, nargs="+", default=[0, 1, 2, 4])
    p.add_argument("--cfg-models", nargs="+", default=["flow_dit", "ddpm_dit"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--markdown", action="store_true", help="print the docs/benchmarks.md tables from results.json")
    p.add_argument("--no-sweep", dest="sweep", action="store_false")
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    res = json.load(open(path)) if path.exists() else {}
    if not a.report_only:
        res.update(steps=a.steps, batch=a.batch, ema=a.ema, n=a.n, machine=f"CPU, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")
        t = time.time()
        train_all(a, out, res)
        evaluate(a, out, res)
        res["total_s"] = res.get("total_s", 0) + round(time.time() - t, 1)
        json.dump(res, open(path, "w"), indent=1)
    report(res)
    if a.markdown:
        markdown(res)


if __name__ == "__main__":
    main()
