"""Streaming WebDataset reader.

Training uses *resampled* mode: each (rank, worker) draws shards at random, with replacement, from
every source, so any number of shards serves any number of ranks, and an epoch is a fixed number of
batches that is identical on every rank (no rank runs dry first and hangs the others in a
collective). Evaluation reads each shard exactly once, split by rank and then by worker.

Determinism: the sample stream of a worker is a function of (seed, epoch, rank, worker), and the
augmentation of a batch a function of (seed, epoch, rank, batch index). Resuming at micro-batch k
of an epoch therefore needs only k: each worker skips its share of raw samples (undecoded) and the
stream continues exactly as it would have. This needs the same data.num_workers as before.

Only image/cls/json members are read and decoded; nothing in a shard is ever unpickled.
"""
from __future__ import annotations

import io
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import numpy as np
import torch
from braceexpand import braceexpand
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision.io import ImageReadMode, decode_image
from webdataset import tariterators

log = logging.getLogger("pretrain.data")
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
READ_EXTS = set(IMAGE_KEYS) | {"cls", "json"}


class DataError(ValueError):
    """A data setting or file the user must fix."""


# ------------------------------------------------------------------------------------------------
# shard specs
@dataclass
class Source:
    urls: List[str]
    weight: float = 1.0
    samples: Optional[int] = None   # from index.json when known


def _expand_one(spec: str, key: str) -> Source:
    if spec.startswith("pipe:") or "://" in spec:
        return Source(list(braceexpand(spec)))
    p = Path(spec)
    if p.is_dir():
        idx = p / "index.json"
        if idx.is_file():
            meta = json.loads(idx.read_text())
            urls = [str(p / s) for s in meta.get("shards", [])]
            return Source(urls, samples=meta.get("samples")) if urls else Source([])
        return Source(sorted(str(s) for s in p.glob("*.tar")))
    urls = list(braceexpand(spec))
    missing = [u for u in urls if not Path(u).is_file()]
    if missing:
        raise DataError(f"{key}: shard {missing[0]} not found ({len(missing)} of {len(urls)} missing); "
                        f"check the path, or write shards with `pretrain shards SRC OUT_DIR`")
    return Source(urls)


def expand_sources(spec, key: str = "data.train") -> List[Source]:
    """A shard spec -> sources. Spec: a dir (uses its index.json, else *.tar), a path or brace
    pattern, a `pipe:` command, a list of those (one source), or a list of {urls, weight} (a mix)."""
    if spec is None:
        raise DataError(f"{key} is not set; pass {key}=path/to/shards")
    items = list(spec) if not isinstance(spec, str) else [spec]
    if items and all(hasattr(i, "get") for i in items):
        sources = []
        for i in items:
            s = _merge([_expand_one(str(u), key) for u in _as_list(i.get("urls"))])
            s.weight = float(i.get("weight", 1.0))
            if s.weight <= 0:
                raise DataError(f"{key}: weight must be > 0, got {s.weight}")
            sources.append(s)
    else:
        sources = [_merge([_expand_one(str(u), key) for u in items])]
    for s in sources:
        if not s.urls:
            raise DataError(f"{key}={spec!r} gives an empty shard list; point it at .tar shards or a "
                            f"directory written by `pretrain shards`")
    return sources


def _as_list(x):
    return [x] if isinstance(x, str) else list(x or [])


def _merge(parts: List[Source]) -> Source:
    counts = [p.samples for p in parts]
    return Source([u for p in parts for u in p.urls],
                  samples=sum(counts) if parts and all(c is not None for c in counts) else None)


def split_shards(urls: List[str], rank: int, world: int, worker: int, num_workers: int) -> List[str]:
    """Shards for one (rank, worker) in exact single-pass mode: by node first, then by worker."""
    return urls[rank::world][worker::num_workers]


# ------------------------------------------------------------------------------------------------
# reading and decoding
class SkipCounter:
    """Counts corrupt samples/tars; the handler webdataset calls on read errors.

    `streak` counts failures since the last good sample: past `max_streak` the data is taken to be
    unreadable as a whole (a resampled stream would otherwise retry bad shards forever).
    """

    def __init__(self, max_streak: int = 1000):
        self.count = self.streak = 0
        self.max_streak = max_streak

    def __call__(self, exn: Exception) -> bool:
        self.count += 1
        self.streak += 1
        if self.count <= 10 or self.count % 1000 == 0:
            log.warning("skipping unreadable data (%d so far): %s", self.count, str(exn)[:300])
        if self.streak > self.max_streak:
            raise DataError(f"{self.max_streak} unreadable samples or shards in a row (last: {str(exn)[:200]}); "
                            f"the shards look corrupt: rewrite them with `pretrain shards`")
        return True


def read_samples(urls: Iterator[str], handler: SkipCounter) -> Iterator[Dict]:
    """Raw samples {__key__, jpg|png|..., cls, json: bytes} from tar shards; other members are not read."""
    def select(fname):
        return fname.rsplit(".", 1)[-1].lower() in READ_EXTS
    streams = tariterators.url_opener(({"url": u} for u in urls), handler=handler)
    files = tariterators.tar_file_expander(streams, handler=handler, select_files=select)
    return tariterators.group_by_keys(files, handler=handler)


def decode(sample: Dict):
    """Raw sample -> (uint8 image [3, H, W], int label or -1). Raises on anything unreadable."""
    key = next((k for k in IMAGE_KEYS if k in sample), None)
    if key is None:
        raise DataError(f"sample {sample.get('__key__')} in {sample.get('__url__')} has no image")
    img = decode_image(torch.frombuffer(bytearray(sample[key]), dtype=torch.uint8), mode=ImageReadMode.RGB)
    label = int(sample["cls"]) if "cls" in sample else -1
    return img, label


def _seed(*parts) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0] >> 1)


def _shuffle(it, bufsize: int, rng: random.Random):
    buf = []
    for x in it:
        if len(buf) < bufsize:
            buf.append(x)
            continue
        j = rng.randrange(len(buf))
        yield buf[j]
        buf[j] = x
    rng.shuffle(buf)
    yield from buf


# ------------------------------------------------------------------------------------------------
# training: resampled, fixed batches per epoch, batched in the worker
class ResampledBatches(IterableDataset):
    """Yields exactly `batches_per_epoch` batches per rank per epoch (over all its workers).

    Set `epoch` and `start` (micro-batch index within the epoch to begin at) before iterating.
    Each batch: {"views": [V, B, 3, S, S] (uint8, or float if `photometric_in_worker`),
    "label": [B], "seed": int, "epoch": int, "index": int, "skipped": int}.
    """

    def __init__(self, sources: List[Source], batch_size: int, batches_per_epoch: int, augment, num_views: int,
                 photometric_in_worker: bool, seed: int, rank: int, shuffle_buffer: int = 1000):
        self.sources, self.batch_size, self.batches_per_epoch = sources, batch_size, batches_per_epoch
        self.augment, self.num_views, self.photometric_in_worker = augment, num_views, photometric_in_worker
        self.seed, self.rank, self.shuffle_buffer = seed, rank, shuffle_buffer
        self.epoch, self.start = 0, 0

    def _samples(self, rng: random.Random, counter: SkipCounter):
        def shards(src):
            while True:
                yield rng.choice(src.urls)
        streams = [read_samples(shards(s), counter) for s in self.sources]
        weights = [s.weight for s in self.sources]
        while True:
            i = rng.choices(range(len(streams)), weights)[0] if len(streams) > 1 else 0
            yield next(streams[i])

    def __iter__(self):
        info = get_worker_info()
        wid, W = (info.id, info.num_workers) if info else (0, 1)
        # DataLoader asks worker 0 first; it must produce batch `start`, so rotate logical ids.
        logical = (wid + self.start) % W
        rng = random.Random(_seed(self.seed, self.epoch, self.rank, logical))
        counter, reported = SkipCounter(), 0
        stream = _shuffle(self._samples(rng, counter), self.shuffle_buffer, rng)
        first = self.start + (logical - self.start) % W         # first batch index >= start owned by us
        for _ in range((first - logical) // W * self.batch_size):  # skip what earlier batches consumed
            next(stream)
        for b in range(first, self.batches_per_epoch, W):
            bseed = _seed(self.seed, self.epoch, self.rank, b, 1)
            g = torch.Generator().manual_seed(bseed)
            views, labels = [[] for _ in range(self.num_views)], []
            while len(labels) < self.batch_size:
                sample = next(stream)
                try:
                    img, label = decode(sample)
                except Exception as e:  # corrupt image bytes, bad label...
                    counter(e)
                    continue
                counter.streak = 0
                for v in views:
                    v.append(self.augment.geometric(img, g))
                labels.append(label)
            x = torch.stack([torch.stack(v) for v in views])              # [V, B, 3, S, S] uint8
            if self.photometric_in_worker:
                x = self.augment.photometric(x.flatten(0, 1), g).view(*x.shape[:2], *x.shape[2:])
            yield {"views": x, "label": torch.tensor(labels), "seed": bseed, "epoch": self.epoch, "index": b,
                   "skipped": counter.count - reported}
            reported = counter.count


class TrainLoader:
    """Endless iterator of training micro-batches on `device`, epoch after epoch.

    `batches(start)` begins at global micro-batch index `start` (= step * grad_accum), so a resumed
    run continues the exact stream. `skipped` counts corrupt samples seen by this rank.
    """

    def __init__(self, dataset: ResampledBatches, num_workers: int, device: torch.device):
        self.dataset, self.num_workers, self.device = dataset, num_workers, device
        self.skipped = 0

    def batches(self, start: int = 0) -> Iterator[dict]:
        ds, n = self.dataset, self.dataset.batches_per_epoch
        epoch, ds.start = divmod(start, n)
        while True:
            ds.epoch = epoch
            # Our own generator: a DataLoader draws its workers' base seed from it, which would
            # otherwise move the global RNG that methods use (MoCo's shuffle, drop-path) and break
            # exact resume. The batches do not depend on it (they carry their own seeds).
            loader = DataLoader(ds, batch_size=None, num_workers=self.num_workers,
                                generator=torch.Generator().manual_seed(epoch),
                                pin_memory=self.device.type == "cuda",
                                prefetch_factor=4 if self.num_workers else None)
            for batch in loader:
                self.skipped += batch.pop("skipped")
                views = batch["views"].to(self.device, non_blocking=True)
                if not ds.photometric_in_worker:   # GPU-side augmentation, same seed as on a worker
                    g = torch.Generator(self.device).manual_seed(batch["seed"])
                    views = ds.augment.photometric(views.flatten(0, 1), g).view(*views.shape)
                batch["views"] = views
                batch["label"] = batch["label"].to(self.device, non_blocking=True)
                yield batch
            epoch, ds.start = epoch + 1, 0


# ------------------------------------------------------------------------------------------------
# evaluation: every sample exactly once, split by rank and worker
class EvalBatches(IterableDataset):
    """{"image": uint8 [B, 3, S, S] (resize + centre crop), "label": [B]} over this rank's shards."""

    def __init__(self, urls: List[str], batch_size: int, image_size: int, rank: int = 0, world: int = 1,
                 max_samples: Optional[int] = None):
        self.urls, self.batch_size, self.image_size = urls, batch_size, image_size
        self.rank, self.world, self.max_samples = rank, world, max_samples

    def __iter__(self):
        from pretrain.data.augment import center_resize

        info = get_worker_info()
        wid, W = (info.id, info.num_workers) if info else (0, 1)
        counter = SkipCounter()
        imgs, labels, seen = [], [], 0
        limit = None if self.max_samples is None else -(-self.max_samples // (W * self.world))
        for sample in read_samples(iter(split_shards(self.urls, self.rank, self.world, wid, W)), counter):
            if limit is not None and seen >= limit:
                break
            try:
                img, label = decode(sample)
            except Exception as e:
                counter(e)
                continue
            imgs.append(center_resize(img, self.image_size))
            labels.append(label)
            seen += 1
            if len(imgs) == self.batch_size:
                yield {"image": torch.stack(imgs), "label": torch.tensor(labels)}
                imgs, labels = [], []
        if imgs:
            yield {"image": torch.stack(imgs), "label": torch.tensor(labels)}


def eval_loader(spec, batch_size: int, image_size: int, num_workers: int = 0, rank: int = 0, world: int = 1,
                max_samples: Optional[int] = None, key: str = "data.val") -> DataLoader:
    urls = [u for s in expand_sources(spec, key) for u in s.urls]
    ds = EvalBatches(urls, batch_size, image_size, rank, world, max_samples)
    return DataLoader(ds, batch_size=None, num_workers=min(num_workers, len(urls)),
                      generator=torch.Generator().manual_seed(0))   # leaves the global RNG alone (see TrainLoader)
