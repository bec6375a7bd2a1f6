#!/usr/bin/env python
"""Side-by-side benchmarks: each prints ratios measured in one run, A and B interleaved, medians.

    python scripts/bench.py data   [--quick]   # our shard loader vs torchvision ImageFolder + PIL SimCLR transform
    python scripts/bench.py data-paths [--quick] [--device cpu|cuda]
                                               # JPEG decode + augmentation in the workers vs on the device
    python scripts/bench.py multicrop [--quick] [--baseline lightly|none]
                                               # multi-crop 2x224 + 6x96: ours vs our two-view 224 vs lightly
    python scripts/bench.py engine [--quick] [--method simclr|moco_v2]
                                               # `pretrain` train step vs a hand-written PyTorch loop
    python scripts/bench.py checkpointing [--quick] [--models NAME:BATCH:PX ...]
                                               # model.grad_checkpointing off vs on: kept activations, step time
    python scripts/bench.py compile [--quick] [--methods simclr dino mae] [--backend inductor]
                                               # train.compile: eager vs compiled method forward+backward

Results and settings are in docs/benchmarks.md. `--quick` is a seconds-long smoke run (tiny
sizes, one rep): it checks that both sides run, its figures mean little.

data: the same real photos (scikit-image's sample photos, or scikit-learn's two sample photos when
scikit-image is not installed) are cut into N random square crops, JPEG-encoded once, and written
both as an image folder (root/<photo>/<i>.jpg) and as WebDataset shards (pretrain.data.write_shards).
Ours: pretrain.data.build_train_loader (ResampledBatches + TrainLoader, both SimCLR augmentation
stages in the loader workers, as on CPU). Baseline: torchvision.datasets.ImageFolder + the SimCLR
torchvision.transforms recipe applied per image with PIL, twice (two views), through a DataLoader.
Same images, workers, batch size, prefetch and output size. Throughput is counted in source
images/s (each delivered as two augmented views), in steady state (the first batches, i.e. worker
start-up and our shuffle-buffer fill, are not timed), by wall clock and per CPU-second used by the
main process and its workers (the latter depends much less on other load on the machine). Runs
alternate ours, baseline, ours, baseline...

multicrop: the same kind of photos (larger by default, 384 px), three loaders interleaved: ours with
SwAV's multi-crop views (2 x 224 px crops of 14-100% of the image + 6 x 96 px of 5-14%, SwAV's colour
distortion and blur on every crop) through build_train_loader, with a stand-in method that only declares
those views; ours with two 224 px views (MoCo v2's, as `data`); and lightly's SwaVTransform with the
same crops and colour settings on the image folder through torchvision's ImageFolder + DataLoader.
Ratios: ours multi-crop / lightly and ours multi-crop / ours two-view. lightly is optional
(`pip install -e ".[lightly]"`, or lightest `pip install --no-deps lightly lightning-utilities`);
`--baseline none` runs ours only.

engine: pretrain.engine.trainer.train() fed a fixed in-memory batch (its `data=` argument) vs a bare
loop with the same model, loss, LARS optimizer, LR schedule and batch, written out by hand: for
SimCLR, NT-Xent; for MoCo v2, split-BN query and (shuffled) key forwards, the queue loss, the
enqueue and the momentum update of the key encoder after every optimizer step. The two
alternate step by step (the bare step runs inside the iterator that feeds train()), so a busy
spell of the machine hits both alike. An engine step is timed from handing out its batch to the
request for the next one: everything the loop does for one step (schedule, forward, backward,
optimizer, bookkeeping, logging every 10 steps). The first steps of each run are not timed.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def med(xs):
    return statistics.median(xs)


def load() -> str:
    """1-minute load average: other processes on the machine add noise to every figure."""
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except OSError:
        return "?"


# ------------------------------------------------------------------------------------------------
# data
def source_photos():
    """A few real RGB photos (uint8 HxWx3) and the name of where they come from."""
    try:
        import skimage.data as sd

        names = ["astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field",
                 "retina", "colorwheel"]
        photos = []
        for n in names:
            try:
                a = getattr(sd, n)()
            except Exception:   # a photo that would need a download
                continue
            if a.ndim == 3 and a.shape[2] >= 3:
                photos.append((n, np.ascontiguousarray(a[..., :3])))
        if photos:
            return photos, "skimage.data"
    except ImportError:
        pass
    from sklearn.datasets import load_sample_images

    d = load_sample_images()
    return [(Path(f).stem, img) for f, img in zip(d.filenames, d.images)], "sklearn.datasets.load_sample_images"


def make_images(root: Path, n: int, size: int, seed: int = 0) -> str:
    """n random square crops (side 25-100% of the photo's shorter side) resized to size x size, as
    JPEG (quality 90) in root/folder/<photo>/<i>.jpg and in WebDataset shards under root/shards/train."""
    from PIL import Image

    from pretrain.data import write_shards

    done = root / "done"
    if done.is_file():
        return done.read_text()
    photos, where = source_photos()
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(n):
        label = i % len(photos)
        name, a = photos[label]
        h, w = a.shape[:2]
        side = int(rng.integers(min(h, w) // 4, min(h, w) + 1))
        top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        img = Image.fromarray(a[top:top + side, left:left + side]).resize((size, size), Image.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        data = buf.getvalue()
        d = root / "folder" / name
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{i:06d}.jpg").write_bytes(data)
        samples.append((data, "jpg", label, {"source": name}))
    write_shards(samples, [p[0] for p in photos], root / "shards", shard_size=500, val_fraction=0.0)
    desc = f"{n} JPEG crops of {len(photos)} {where} photos, {size}x{size}"
    done.write_text(desc)
    return desc


def simclr_torchvision(out: int):
    """The SimCLR recipe in torchvision.transforms (PIL, per image)."""
    from torchvision import transforms as T

    k = max(3, int(0.1 * out))
    k = k if k % 2 else k + 1
    return T.Compose([
        T.RandomResizedCrop(out, scale=(0.2, 1.0)),
        T.RandomHorizontalFlip(),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
        T.RandomApply([T.GaussianBlur(k, sigma=(0.1, 2.0))], p=0.5),
        T.ToTensor(),
        T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    ])


class TwoViews:
    def __init__(self, t):
        self.t = t

    def __call__(self, img):
        return [self.t(img), self.t(img)]


def cpu_seconds() -> float:
    """CPU time (user + system) used so far by this process and its live children (the loader
    workers). Unlike wall time it hardly depends on what else the machine is running. Linux only."""
    if not os.path.isdir("/proc"):
        return float("nan")   # the CPU columns read nan
    t = os.times()
    total, me, tick = t.user + t.system, str(os.getpid()), os.sysconf("SC_CLK_TCK")
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[1] == me:   # ppid; then utime, stime at fields 11, 12
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def rate(n: int, seconds: float) -> float:
    """n / seconds; nan when no time was measured (CPU time counts in clock ticks: a --quick run can see none)."""
    return n / seconds if seconds > 0 else float("nan")


def time_batches(it, n_warm: int, n_timed: int, check):
    """Steady-state (wall seconds, CPU seconds) for n_timed batches after n_warm untimed ones."""
    for _ in range(n_warm):
        check(next(it))
    t0, c0 = time.perf_counter(), cpu_seconds()
    for _ in range(n_timed):
        check(next(it))
    return time.perf_counter() - t0, cpu_seconds() - c0


class DeclaresViews:
    """A stand-in method: all build_train_loader reads of a method is its `views`."""

    def __init__(self, views):
        self.views = views


def run_ours(shards: Path, out: int, batch: int, workers: int, n_warm: int, n_timed: int, seed: int, views=None):
    """Our loader's (img/s, img/CPU-s): MoCo v2's two views, or the given `views` (ViewSpecs)."""
    from pretrain.config import load_config
    from pretrain.data import build_train_loader
    from pretrain.data.views import view_groups
    from pretrain.methods import METHODS

    cfg = load_config(None, [f"data.train={shards}", f"data.image_size={out}", f"data.num_workers={workers}",
                             "data.augment_on=worker", f"seed={seed}"])
    # default: MoCo v2's two views, the same parameters as the torchvision baseline (simclr_torchvision)
    method = METHODS.get("moco_v2") if views is None else DeclaresViews(views)
    shapes = [(len(idx), batch, 3, side, side) for side, idx in view_groups(method.views, out)]
    loader = build_train_loader(cfg, method, batch, n_warm + n_timed, 0, "cpu")
    it = loader.batches(0)

    def check(b):
        got = [tuple(v.shape) for v in b["views"]]
        assert got == shapes and all(v.dtype == torch.float32 for v in b["views"]), (got, shapes)

    dt, cpu = time_batches(it, n_warm, n_timed, check)
    it.close()   # shuts the workers down
    return rate(n_timed * batch, dt), rate(n_timed * batch, cpu)


def run_baseline(folder: Path, out: int, batch: int, workers: int, n_warm: int, n_timed: int, seed: int,
                 transform=None, sides=None):
    """ImageFolder + DataLoader (img/s, img/CPU-s): the torchvision SimCLR recipe twice, or `transform`
    (PIL image -> one tensor per view, of the given `sides`)."""
    from torch.utils.data import DataLoader, RandomSampler
    from torchvision.datasets import ImageFolder

    transform, sides = (TwoViews(simclr_torchvision(out)), [out] * 2) if transform is None else (transform, sides)
    ds = ImageFolder(str(folder), transform=transform)
    g = torch.Generator().manual_seed(seed)
    sampler = RandomSampler(ds, replacement=True, num_samples=(n_warm + n_timed) * batch, generator=g)
    dl = DataLoader(ds, batch_size=batch, sampler=sampler, num_workers=workers, drop_last=True,
                    prefetch_factor=4 if workers else None)
    it = iter(dl)

    def check(b):
        views, _ = b
        assert [tuple(v.shape) for v in views] == [(batch, 3, x, x) for x in sides]

    dt, cpu = time_batches(it, n_warm, n_timed, check)
    del it
    return rate(n_timed * batch, dt), rate(n_timed * batch, cpu)


def bench_data(a) -> int:
    settings = [tuple(int(x) for x in s.split(":")) for s in a.settings]
    work = Path(a.work_dir)
    torch.set_num_threads(1)   # the main process only collects batches; workers do the work
    rows = []
    for src, out, batch in settings:
        root = work / f"img{src}_n{a.images}"
        desc = make_images(root, a.images, src)
        log(f"[data] {desc} in {root}; output {out}px, batch {batch}, {a.workers} workers, "
            f"{a.warmup}+{a.batches} batches per run, {a.reps} reps interleaved")
        ours, base = [], []
        for r in range(a.reps):
            for name, fn, acc in (("ours", run_ours, ours), ("torchvision", run_baseline, base)):
                path = root / "shards" / "train" if name == "ours" else root / "folder"
                acc.append(fn(path, out, batch, a.workers, a.warmup, a.batches, seed=r))
                log(f"  rep {r}: {name:12s} {acc[-1][0]:8.1f} img/s  {acc[-1][1]:8.1f} img/CPU-s  (load {load()})")
        rows.append((src, out, batch, ours, base))
    print(f"\nData pipeline: two-view SimCLR augmentation, {a.workers} workers, {a.images} images, "
          f"{a.reps} interleaved reps, medians ({os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"load average {load()})")
    print("img/s: source images per second (each delivered as two augmented views), steady state, wall clock;\n"
          "img/CPU-s: the same per CPU-second of the main process and its workers (less sensitive to other load);\n"
          "ratio: ours / torchvision, median of the per-rep ratios [min-max]")
    print(f"{'image':>5} {'out':>4} {'batch':>5} | {'ours img/s':>10} {'tv img/s':>8} {'ratio':>18} | "
          f"{'ours img/CPU-s':>14} {'tv img/CPU-s':>12} {'ratio':>18}")
    for src, out, batch, ours, base in rows:
        cols = []
        for i in (0, 1):
            rs = [o[i] / b[i] for o, b in zip(ours, base)]
            cols.append((med([o[i] for o in ours]), med([b[i] for b in base]), med(rs), min(rs), max(rs)))
        (o0, b0, r0, lo0, hi0), (o1, b1, r1, lo1, hi1) = cols
        print(f"{src:>5} {out:>4} {batch:>5} | {o0:10.1f} {b0:8.1f} {r0:5.2f}x [{lo0:4.2f}-{hi0:4.2f}] | "
              f"{o1:14.1f} {b1:12.1f} {r1:5.2f}x [{lo1:4.2f}-{hi1:4.2f}]")
    return 0


# ------------------------------------------------------------------------------------------------
# data-paths: where JPEGs are decoded and augmented (data.decode_on / data.augment_on)
DATA_PATHS = {   # name -> config overrides
    "worker": ["data.decode_on=worker", "data.augment_on=worker"],          # everything in the loader workers
    "worker_decode": ["data.decode_on=worker", "data.augment_on=device"],   # decode + crop in workers, photometric on device
    "device": ["data.decode_on=device", "data.augment_on=device"],          # JPEG bytes to the device: decode, roi_align, photometric
}


def run_path(shards: Path, path: str, device: str, out: int, batch: int, workers: int, n_warm: int, n_timed: int,
             seed: int) -> float:
    """Source images/s of one data path (DATA_PATHS) delivering MoCo v2's two views on `device`, steady state."""
    from pretrain.config import load_config
    from pretrain.data import build_train_loader
    from pretrain.methods import METHODS

    cfg = load_config(None, [f"data.train={shards}", f"data.image_size={out}", f"data.num_workers={workers}",
                             f"seed={seed}", *DATA_PATHS[path]])
    it = build_train_loader(cfg, METHODS.get("moco_v2"), batch, n_warm + n_timed, 0, device).batches(0)

    def check(b):   # the views are ready (a CUDA sync), float, on the device
        assert tuple(b["views"][0].shape) == (2, batch, 3, out, out) and b["views"][0].dtype == torch.float32
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()

    dt, _ = time_batches(it, n_warm, n_timed, check)
    it.close()
    return rate(n_timed * batch, dt)


def bench_data_paths(device: str = "cpu", image: int = 256, out: int = 128, batch: int = 64, images: int = 1000,
                     workers: int = 2, warmup: int = 2, batches: int = 8, reps: int = 3, work_dir=None) -> dict:
    """Images/s of each data path (DATA_PATHS: worker, worker_decode, device) on `device`, side by side in one
    run (paths interleaved per rep, medians), over `images` JPEGs of image x image px cut from real photos,
    two 'out' px views each. Returns {"img_s": {path: median}, "reps": {path: [...]}, "device_vs_worker":
    median per-rep ratio, "settings": {...}}. scripts/gpu_check.py calls this on a GPU."""
    if work_dir is None:
        with tempfile.TemporaryDirectory(prefix="pretrain-bench-") as d:
            return bench_data_paths(device, image, out, batch, images, workers, warmup, batches, reps, d)
    root = Path(work_dir) / f"img{image}_n{images}"
    desc = make_images(root, images, image)
    per = {p: [] for p in DATA_PATHS}
    for r in range(reps):
        for p in DATA_PATHS:
            per[p].append(run_path(root / "shards" / "train", p, device, out, batch, workers, warmup, batches, r))
            log(f"  rep {r}: {p:14s} {per[p][-1]:8.1f} img/s  (load {load()})")
    return {"img_s": {p: med(v) for p, v in per.items()}, "reps": per,
            "device_vs_worker": med([d / w for d, w in zip(per["device"], per["worker"])]),
            "settings": {"device": str(device), "images": desc, "out": out, "batch": batch, "workers": workers,
                         "warmup": warmup, "batches": batches, "reps": reps, "torch": torch.__version__}}


def bench_paths(a) -> int:
    res = bench_data_paths(a.device, a.image, a.out, a.batch, a.images, a.workers, a.warmup, a.batches, a.reps,
                           a.work_dir)
    st = res["settings"]
    print(f"\nData paths on {st['device']}: {st['images']}, two {st['out']} px views, batch {st['batch']}, "
          f"{st['workers']} workers, {st['reps']} interleaved reps, medians ({os.cpu_count()} CPUs, load {load()})")
    for p, v in res["img_s"].items():
        print(f"  {p:14s} {v:8.1f} img/s   ({' / '.join(DATA_PATHS[p])})")
    print(f"  ratio device / worker: {res['device_vs_worker']:.2f}x")
    print(json.dumps(res))
    return 0


# ------------------------------------------------------------------------------------------------
# multicrop
LIGHTLY_MISSING = ("multicrop: lightly is not installed (the baseline): pip install --no-deps 'lightly>=1.5,<2' "
                   "lightning-utilities  (or pip install -e '.[lightly]', which also pulls pytorch_lightning), "
                   "or pass --baseline none")


def swav_views(local: int):
    """SwAV's multi-crop as the method declares it (pretrain/methods/swav.py: facebookresearch/swav main_swav.py +
    src/multicropdataset.py): 2 global crops of 14-100% of the area at data.image_size, 6 local ones of 5-14% at
    `local` px; flip, colour distortion s = 1 (ColorJitter(0.8, 0.8, 0.8, 0.2) with p 0.8, grayscale 0.2) and
    blur sigma 0.1-2 (kernel 10% of the side) with p 0.5 on every crop; no solarization."""
    from pretrain.data.views import multi_crop
    from pretrain.methods.swav import GLOBAL, LOCAL

    return multi_crop(GLOBAL, LOCAL, num_global=2, num_local=6, local_size=local)


def swav_lightly(out: int, local: int):
    """lightly's SwaVTransform with the crops and colour settings of `swav_views` (all given explicitly).
    Differences lightly does not let us remove: PIL Gaussian blur (radius = sigma, box approximation) instead
    of our separable Gaussian kernel of 10% of the side; torchvision's ColorJitter (random op order, hue in HSV) instead of ours
    (fixed order, hue as a YIQ rotation)."""
    from lightly.transforms import SwaVTransform

    return SwaVTransform(crop_sizes=(out, local), crop_counts=(2, 6), crop_min_scales=(0.14, 0.05),
                         crop_max_scales=(1.0, 0.14), hf_prob=0.5, vf_prob=0.0, rr_prob=0.0, cj_prob=0.8,
                         cj_strength=1.0, cj_bright=0.8, cj_contrast=0.8, cj_sat=0.8, cj_hue=0.2,
                         random_gray_scale=0.2, gaussian_blur=0.5, sigmas=(0.1, 2.0),
                         normalize={"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]})


def bench_multicrop(a) -> int:
    from pretrain.data.views import view_groups

    if a.baseline == "lightly":
        try:
            import lightly.transforms  # noqa: F401
        except ImportError:
            print(LIGHTLY_MISSING, file=sys.stderr)
            return 2
    out, local, batch = a.global_size, a.local_size, a.batch
    torch.set_num_threads(1)   # the main process only collects batches; workers do the work
    root = Path(a.work_dir) / f"img{a.image}_n{a.images}"
    desc = make_images(root, a.images, a.image)
    views = swav_views(local)
    runs = [("multi-crop", lambda r: run_ours(root / "shards" / "train", out, batch, a.workers, a.warmup, a.batches,
                                              seed=r, views=views)),
            ("two-view", lambda r: run_ours(root / "shards" / "train", out, batch, a.workers, a.warmup, a.batches,
                                            seed=r))]
    if a.baseline == "lightly":
        import lightly

        tf = swav_lightly(out, local)
        runs.append((f"lightly {lightly.__version__}",
                     lambda r: run_baseline(root / "folder", out, batch, a.workers, a.warmup, a.batches, seed=r,
                                            transform=tf, sides=[out] * 2 + [local] * 6)))
    log(f"[multicrop] {desc} in {root}; 2x{out} + 6x{local} px crops, batch {batch}, {a.workers} workers, "
        f"{a.warmup}+{a.batches} batches per run, {a.reps} reps interleaved, load average {load()}")
    res = {name: [] for name, _ in runs}
    for r in range(a.reps):
        for name, fn in runs:
            res[name].append(fn(r))
            log(f"  rep {r}: {name:14s} {res[name][-1][0]:8.1f} img/s  {res[name][-1][1]:8.1f} img/CPU-s  "
                f"(load {load()})")
    shapes = [(len(idx), "B", 3, s, s) for s, idx in view_groups(views, out)]
    print(f"\nMulti-crop data path: {desc}; {a.workers} workers, batch {batch}, {a.reps} interleaved reps, medians "
          f"({os.cpu_count()} CPUs, torch {torch.__version__}, load average {load()})")
    print(f"multi-crop: ours, SwAV's 2x{out} + 6x{local} crops, batch['views'] shapes {shapes}; two-view: ours, "
          f"MoCo v2's 2x{out}" + (f"; {runs[-1][0]}: SwaVTransform, same crops" if a.baseline == "lightly" else ""))
    print("img/s: source images per second, steady state, wall clock; img/CPU-s: per CPU-second of the main\n"
          "process and its workers; ratios: median of the per-rep ratios [min-max]")
    print(f"{'loader':>16} | {'img/s':>8} {'img/CPU-s':>9}")
    for name, xs in res.items():
        print(f"{name:>16} | {med([x[0] for x in xs]):8.1f} {med([x[1] for x in xs]):9.1f}")
    pairs = [("multi-crop", "two-view")] + ([("multi-crop", runs[-1][0])] if a.baseline == "lightly" else [])
    for num, den in pairs:
        cols = []
        for i in (0, 1):
            rs = [x[i] / y[i] for x, y in zip(res[num], res[den])]
            cols.append(f"{med(rs):5.2f}x [{min(rs):4.2f}-{max(rs):4.2f}]")
        print(f"ratio {num} / {den}: wall {cols[0]}, CPU {cols[1]}")
    return 0


# ------------------------------------------------------------------------------------------------
# engine
METHOD_OVERRIDES = {
    "simclr": ["method.name=simclr", "method.proj_hidden_dim=512", "method.proj_dim=128", "method.temperature=0.2"],
    "moco_v2": ["method.name=moco_v2", "method.proj_hidden_dim=512", "method.proj_dim=128", "method.temperature=0.2",
                "method.queue_size=4096", "method.momentum=0.99", "method.split_bn_groups=4"],
}


def engine_config(a, run_dir: Path, steps: int):
    from pretrain.config import load_config

    return load_config(None, METHOD_OVERRIDES[a.method] + [
        "data.train=unused", f"data.image_size={a.image_size}", f"data.samples_per_epoch={a.batch * 1000}",
        "model.name=resnet18", "optim.name=lars", "optim.lr=0.3", "optim.warmup_steps=2",
        f"train.global_batch_size={a.batch}", f"train.max_steps={steps}", "train.precision=fp32",
        f"run_dir={run_dir}", "resume=never", "overwrite=delete",   # a kept --work-dir's earlier runs: discarded
        "log.every_steps=10", "log.tensorboard=true", "log.progress=false",
        "checkpoint.every_steps=1000000", "data.val=null", f"train.channels_last={a.channels_last}",
    ])


class BareLoop:
    """The same ops as one engine step, written out by hand; `step()` runs one and returns its time."""

    def __init__(self, cfg, batch, steps: int):
        from pretrain.engine.optim import build_optimizer
        from pretrain.methods import create_method
        from pretrain.schedules import scaled_lr

        torch.manual_seed(cfg.seed)
        self.model = create_method(cfg).to(batch["views"][0].device).train()
        self.opt = build_optimizer(self.model.param_groups(cfg.optim.weight_decay), cfg.optim)
        self.peak = scaled_lr(cfg.optim.lr, cfg.train.global_batch_size, cfg.optim.lr_scaling)
        self.warmup, self.total, self.every = cfg.optim.warmup_steps, steps, cfg.log.every_steps
        self.v1, self.v2 = batch["views"][0]
        self.i, self.method = 0, cfg.method.name
        if self.method == "moco_v2":
            m = self.model
            self.queue, self.ptr, self.groups = m.queue.clone().to(self.v1.device), 0, cfg.method.split_bn_groups
            self.key_params = list(m.key_backbone.parameters()) + list(m.key_projector.parameters())
            self.query_params = list(m.backbone.parameters()) + list(m.projector.parameters())

    def simclr_loss(self):
        from pretrain.losses import nt_xent

        m, B = self.model, self.v1.shape[0]
        z = m.projector(m.backbone(torch.cat([self.v1, self.v2], 0)))
        return nt_xent(z[:B], z[B:], m.temperature)

    def moco_v2_loss(self):
        import torch.nn.functional as F

        m, G, B = self.model, self.groups, self.v1.shape[0]
        q = F.normalize(torch.cat([m.projector(m.backbone(c)) for c in self.v1.tensor_split(G)]), dim=1)
        with torch.no_grad():   # split-BN: keys in shuffled groups, then back in order
            perm = torch.randperm(B, device=self.v1.device)
            k = torch.cat([m.key_projector(m.key_backbone(c)) for c in self.v2[perm].tensor_split(G)])
            k = F.normalize(torch.empty_like(k).index_copy_(0, perm, k), dim=1)
        logits = torch.cat([(q * k).sum(1, keepdim=True), q @ self.queue.t()], 1) / m.temperature
        loss = F.cross_entropy(logits, torch.zeros(B, dtype=torch.long, device=q.device))
        K = self.queue.shape[0]
        self.queue = self.queue.index_copy(0, (self.ptr + torch.arange(B, device=k.device)) % K, k)
        self.ptr = (self.ptr + B) % K
        return loss

    def moco_v2_after(self):
        with torch.no_grad():   # the reference implementation's momentum update
            for pk, pq in zip(self.key_params, self.query_params):
                pk.mul_(0.99).add_(pq, alpha=0.01)

    def step(self) -> float:
        from pretrain.schedules import warmup_cosine

        t0 = time.perf_counter()
        lr = warmup_cosine(self.i, self.total, self.peak, self.warmup)
        for g in self.opt.param_groups:
            g["lr"] = lr
        loss = getattr(self, f"{self.method}_loss")()
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.method == "moco_v2":
            self.moco_v2_after()
        self.i += 1
        if self.i % self.every == 0:
            loss.item()   # what a bare loop would print
        sync()
        return time.perf_counter() - t0


class Interleaved:
    """The engine's data iterator: hands train() the same in-memory batch each step and, before
    each, runs one bare step. So the two alternate step by step (A, B, A, B, ...): a slow spell of
    the machine hits both alike. An engine step is timed from handing out one batch to the request
    for the next, i.e. everything train() does for a step (schedule, forward, backward, optimizer,
    bookkeeping, logging)."""

    def __init__(self, batch, bare: BareLoop):
        self.batch, self.bare = batch, bare
        self.engine_s, self.bare_s, self._t = [], [], None

    def __iter__(self):
        return self

    def __next__(self):
        sync()
        t = time.perf_counter()
        if self._t is not None:
            self.engine_s.append(t - self._t)
        self.bare_s.append(self.bare.step())
        self._t = time.perf_counter()
        return dict(self.batch)


def sync():
    if torch.cuda.is_available():   # train() runs on the GPU when there is one
        torch.cuda.synchronize()


def run_pair(a, batch, work: Path, rep: int):
    import logging

    from pretrain.engine.trainer import train

    steps = a.warmup + a.steps
    cfg = engine_config(a, work / f"run{rep}", steps)
    data = Interleaved(batch, BareLoop(cfg, batch, steps))
    train(cfg, data=data)
    logging.getLogger("pretrain").handlers.clear()
    # engine step i ran right after bare step i; the engine's last step is not timed (no next request)
    e, b = data.engine_s[a.warmup:], data.bare_s[a.warmup:len(data.engine_s)]
    return e, b


def bench_engine(a) -> int:
    torch.set_flush_denormal(True)   # train() sets it too; set for both sides from the start
    if a.threads:
        torch.set_num_threads(a.threads)
    work = Path(a.work_dir) / "engine"
    g = torch.Generator().manual_seed(0)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batch = {"views": [torch.randn(2, a.batch, 3, a.image_size, a.image_size, generator=g).to(dev)],
             "label": torch.zeros(a.batch, dtype=torch.long), "seed": 0, "epoch": 0, "index": 0}
    layout = "channels_last " if a.channels_last else ""
    log(f"[engine] {a.method} resnet18 (proj 512-128), LARS, fp32, {layout}batch {a.batch} x 2 views at {a.image_size}px, "
        f"{a.warmup} warmup + {a.steps} timed step pairs per run, {a.reps} reps, {dev}, "
        f"{torch.get_num_threads()} threads, load average {load()}")
    eng, bare, ratios, paired = [], [], [], []
    for r in range(a.reps):
        e, b = run_pair(a, batch, work, r)
        eng += e
        bare += b
        paired += [x / y for x, y in zip(e, b)]
        ratios.append(med(e) / med(b))
        log(f"  rep {r}: pretrain {med(e) * 1e3:7.1f} ms/step   bare {med(b) * 1e3:7.1f} ms/step   "
            f"ratio {ratios[-1]:.3f}")
    what = a.method + (" with train.channels_last (bare loop NCHW)" if a.channels_last else "")
    print(f"\nEngine overhead, {what}: {a.reps} reps x {a.steps} interleaved step pairs, batch {a.batch} at {a.image_size}px "
          f"({dev}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"load average {load()})")
    print("ratio: pretrain / bare, median over all step pairs (each pair ran back to back); per-rep: ratio of\n"
          "the rep's median step times [min-max]; fastest: ratio of the fastest steps")
    print(f"{'pretrain ms/step':>16} {'bare ms/step':>12} | {'ratio':>7} {'per-rep':>13} {'fastest':>8}")
    print(f"{med(eng) * 1e3:16.1f} {med(bare) * 1e3:12.1f} | {med(paired):6.3f}x "
          f"[{min(ratios):.3f}-{max(ratios):.3f}] {min(eng) / min(bare):7.3f}x")
    return 0


# ------------------------------------------------------------------------------------------------
# checkpointing
def saved_bytes_and_loss(model, x):
    """One forward: (bytes of the activations autograd keeps for the backward, exact and device-independent:
    every tensor saved for backward, counted once per storage, parameters excluded; the loss)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            kept[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(x).float().pow(2).mean()
    return sum(kept.values()), loss


def bench_checkpointing(a) -> int:
    """model.grad_checkpointing off vs on: kept activation bytes and fwd+bwd step time, interleaved."""
    from pretrain.models import create_backbone

    if a.threads:
        torch.set_num_threads(a.threads)
    print(f"model.grad_checkpointing: activations kept for the backward (saved tensors, exact) and forward+backward "
          f"step time (median of {a.steps} interleaved pairs after {a.warmup} warmup; {os.cpu_count()} CPUs, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, load average {load()})")
    print(f"{'model':>22} {'batch':>5} {'px':>4} | {'MiB off':>8} {'MiB on':>8} {'ratio':>7} | {'s off':>6} {'s on':>6} {'ratio':>7}")
    for spec in a.models:
        name, batch, px = spec.split(":")
        batch, px = int(batch), int(px)
        models = []
        for on in (False, True):
            torch.manual_seed(0)
            models.append(create_backbone(name, {"img_size": px} if name.startswith("vit") else {},
                                          grad_checkpointing=on).train())
        x = torch.randn(batch, 3, px, px, generator=torch.Generator().manual_seed(0))
        mem, times = [0, 0], [[], []]
        for i in range(a.warmup + a.steps):
            for k, m in enumerate(models):
                m.zero_grad(set_to_none=True)
                t = time.perf_counter()
                mem[k], loss = saved_bytes_and_loss(m, x)
                loss.backward()
                if i >= a.warmup:
                    times[k].append(time.perf_counter() - t)
        t0, t1 = med(times[0]), med(times[1])
        log(f"  {name}: per-pair ratios {[round(y / x, 3) for x, y in zip(*times)]}")
        print(f"{name:>22} {batch:5d} {px:4d} | {mem[0] / 2**20:8.1f} {mem[1] / 2**20:8.1f} {mem[1] / mem[0]:6.3f}x | "
              f"{t0:6.2f} {t1:6.2f} {t1 / t0:6.3f}x")
    return 0


# ------------------------------------------------------------------------------------------------
# compile
COMPILE_SETUPS = {   # method: (config overrides, batch); CPU-sized: tiny ViTs at 32 px, patch 4
    "simclr": (["method.name=simclr", "model.name=resnet18", "method.proj_hidden_dim=512", "method.proj_dim=128"], 32),
    "dino": (["method.name=dino", "method.out_dim=4096", "method.num_local_crops=4", "method.local_crop_size=16",
              "model.name=vit_tiny_patch16_224", "model.kwargs={img_size: 32, patch_size: 4, dynamic_img_size: true}"], 16),
    "mae": (["method.name=mae", "method.decoder_dim=128", "method.decoder_depth=2", "method.decoder_heads=4",
             "model.name=vit_tiny_patch16_224", "model.kwargs={img_size: 32, patch_size: 4}"], 32),
}


def bench_compile(a) -> int:
    """train.compile: eager vs compiled (a.backend) forward+backward of whole methods, interleaved step by step."""
    import copy

    from pretrain.config import load_config
    from pretrain.data.views import view_groups
    from pretrain.engine.compile import CompiledMethod
    from pretrain.methods import create_method

    if a.threads:
        torch.set_num_threads(a.threads)
    rows = []
    for name in a.methods:
        overrides, batch = COMPILE_SETUPS[name]
        cfg = load_config(None, overrides + ["data.train=unused", f"data.image_size={a.image_size}"])
        torch.manual_seed(0)
        eager = create_method(cfg).train()
        model = copy.deepcopy(eager)
        compiled = CompiledMethod(model, a.backend, name)
        g = torch.Generator().manual_seed(0)
        views = [torch.randn(len(idx), batch, 3, side, side, generator=g) for side, idx in view_groups(eager.views, a.image_size)]
        data = {"views": views, **({"masks": eager.masking(batch, g)} if eager.masking is not None else {})}
        times, first = [[], []], None
        for i in range(1 + a.warmup + a.steps):
            for k, (m, call) in enumerate(((eager, eager), (model, compiled))):
                ctx = m.step_context(i, 1000, 100, lr=0.1)
                m.zero_grad(set_to_none=True)
                t = time.perf_counter()
                call(data, ctx)["loss"].backward()
                dt = time.perf_counter() - t
                m.after_step(ctx)
                if i == 0 and k == 1:
                    first = dt
                elif i > a.warmup:
                    times[k].append(dt)
        t0, t1 = med(times[0]), med(times[1])
        log(f"  {name}: per-pair ratios {[round(y / x, 3) for x, y in zip(*times)]}; graphs {compiled.graphs}, "
            f"fallbacks {len(compiled.errors)}")
        rows.append((name, batch, first, t0, t1, compiled.graphs))
    print(f"\ntrain.compile={a.backend} vs eager: forward+backward of the method, median of {a.steps} interleaved pairs "
          f"after {a.warmup} warmup ({a.image_size} px; {os.cpu_count()} CPUs, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, load average {load()})")
    print(f"{'method':>8} {'batch':>5} | {'compile s':>9} {'graphs':>6} | {'eager s':>7} {'compiled s':>10} {'ratio':>7}")
    for name, batch, first, t0, t1, graphs in rows:
        print(f"{name:>8} {batch:5d} | {first:9.1f} {graphs:6d} | {t0:7.3f} {t1:10.3f} {t1 / t0:6.3f}x")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("data", help="our shard loader vs torchvision ImageFolder + PIL transforms")
    d.add_argument("--settings", nargs="+", default=["160:96:128", "256:128:64"],
                   help="IMAGE:OUT:BATCH (source image side, output side, batch size); default: %(default)s")
    d.add_argument("--images", type=int, default=3000)
    d.add_argument("--workers", type=int, default=2)
    d.add_argument("--warmup", type=int, default=2, help="untimed batches per run (worker start-up)")
    d.add_argument("--batches", type=int, default=8,
                   help="timed batches per run (a multiple of --workers: workers deliver in rounds)")
    d.add_argument("--reps", type=int, default=5)
    e = sub.add_parser("engine", help="pretrain train step vs a bare PyTorch loop")
    e.add_argument("--method", choices=sorted(METHOD_OVERRIDES), default="simclr")
    e.add_argument("--batch", type=int, default=32)
    e.add_argument("--image-size", type=int, default=32)
    e.add_argument("--warmup", type=int, default=3, help="untimed steps per run")
    e.add_argument("--steps", type=int, default=20, help="timed step pairs per run")
    e.add_argument("--reps", type=int, default=5)
    e.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's, = cores)")
    e.add_argument("--channels-last", action="store_true",
                   help="the engine side with train.channels_last=true (the bare loop stays NCHW): the ratio "
                        "is then NHWC / NCHW plus the engine's overhead")
    q = sub.add_parser("data-paths", help="images/s: JPEG decode + augmentation in workers vs on the device")
    q.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    q.add_argument("--image", type=int, default=256, help="source JPEG side")
    q.add_argument("--out", type=int, default=128, help="view side")
    q.add_argument("--batch", type=int, default=64)
    q.add_argument("--images", type=int, default=1000)
    q.add_argument("--workers", type=int, default=2)
    q.add_argument("--warmup", type=int, default=2, help="untimed batches per run")
    q.add_argument("--batches", type=int, default=8, help="timed batches per run (a multiple of --workers)")
    q.add_argument("--reps", type=int, default=3)
    m = sub.add_parser("multicrop", help="multi-crop 2x224 + 6x96 vs two-view 224 (ours) vs lightly's SwaVTransform")
    m.add_argument("--baseline", choices=["lightly", "none"], default="lightly",
                   help="none: ours only (multi-crop and two-view), no lightly needed")
    m.add_argument("--image", type=int, default=384, help="source image side (JPEG), about ImageNet's mean image area")
    m.add_argument("--global-size", type=int, default=224)
    m.add_argument("--local-size", type=int, default=96)
    m.add_argument("--batch", type=int, default=64)
    m.add_argument("--images", type=int, default=3000)
    m.add_argument("--workers", type=int, default=2)
    m.add_argument("--warmup", type=int, default=2, help="untimed batches per run (worker start-up)")
    m.add_argument("--batches", type=int, default=8, help="timed batches per run (a multiple of --workers)")
    m.add_argument("--reps", type=int, default=5)
    c = sub.add_parser("checkpointing", help="model.grad_checkpointing off vs on: kept activations and step time")
    c.add_argument("--models", nargs="+", default=["vit_small_patch16_224:8:224", "resnet50:8:224"],
                   help="NAME:BATCH:PX; default: %(default)s")
    c.add_argument("--warmup", type=int, default=1)
    c.add_argument("--steps", type=int, default=4, help="timed off/on pairs")
    c.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's, = cores)")
    k = sub.add_parser("compile", help="train.compile: eager vs compiled method forward+backward")
    k.add_argument("--methods", nargs="+", choices=sorted(COMPILE_SETUPS), default=sorted(COMPILE_SETUPS))
    k.add_argument("--backend", default="inductor", help="a torch.compile backend (default: %(default)s)")
    k.add_argument("--image-size", type=int, default=32)
    k.add_argument("--warmup", type=int, default=2, help="untimed steps after the compiling one")
    k.add_argument("--steps", type=int, default=10, help="timed eager/compiled pairs")
    k.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's, = cores)")
    for s in (d, e, m, q, c, k):
        s.add_argument("--quick", action="store_true", help="a fast smoke run (small and noisy)")
        s.add_argument("--work-dir", help="where to write images and runs, kept (default: a temporary dir, removed)")
    a = p.parse_args(argv)
    if a.quick and a.cmd == "data":
        a.settings, a.images, a.warmup, a.batches, a.reps = ["96:64:32"], 300, 2, 4, 1
    if a.quick and a.cmd == "engine":
        a.batch, a.warmup, a.steps, a.reps = 16, 2, 3, 1
    if a.quick and a.cmd == "multicrop":
        a.image, a.global_size, a.local_size, a.batch, a.images, a.warmup, a.batches, a.reps = 64, 32, 16, 16, 200, 2, 2, 1
    if a.quick and a.cmd == "data-paths":
        a.image, a.out, a.batch, a.images, a.warmup, a.batches, a.reps = 64, 32, 16, 200, 2, 2, 1
    if a.quick and a.cmd == "checkpointing":
        a.models, a.warmup, a.steps = ["vit_tiny_patch16_224:2:32", "resnet10t:2:32"], 0, 1
    if a.quick and a.cmd == "compile":
        a.methods, a.backend, a.warmup, a.steps = ["simclr"], "aot_eager", 0, 1
    run = {"data": bench_data, "engine": bench_engine, "multicrop": bench_multicrop, "data-paths": bench_paths,
           "checkpointing": bench_checkpointing, "compile": bench_compile}[a.cmd]
    if a.work_dir:
        return run(a)
    with tempfile.TemporaryDirectory(prefix="pretrain-bench-") as d:
        a.work_dir = d
        return run(a)


if __name__ == "__main__":
    sys.exit(main())
