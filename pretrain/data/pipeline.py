"""Streaming WebDataset reader.

Training uses *resampled* mode: each (rank, worker) draws shards at random, with replacement, from
every source, so any number of shards serves any number of ranks, and an epoch is a fixed number of
batches that is identical on every rank (no rank runs dry first and hangs the others in a
collective). Evaluation reads each shard exactly once, split by rank and then by worker.

Determinism: the sample stream of a worker is a function of (seed, epoch, rank, worker), and the
augmentation of a batch a function of (seed, epoch, rank, batch index). A batch reads batch_size
samples of its worker's stream *plus one per corrupt sample*, so the position of a stream is not a
function of the step: every batch carries how far its worker's stream had been read, the
TrainLoader keeps that per worker (`state_dict()`, saved in checkpoints), and a resumed worker
replays (reads, undecoded) exactly that many samples and continues as it would have. This needs the
same data.num_workers as before; without a recorded position (an older checkpoint, another
num_workers) each worker skips batch_size per earlier batch, which is exact only over clean data.

Faults: corrupt samples, and images larger than `max_image_pixels` (read from the header, never
decoded: decompression bombs), are skipped, counted and logged. A shard that yields nothing at all
(not a tar, missing, empty) is reported once per rank with its path, counted once, and not drawn
again by that worker in that epoch; a source whose every shard is so is a DataError.

Only image/cls/json members are read and decoded; nothing in a shard is ever unpickled. Where JPEGs are
decoded and cropped (workers, or the device: data.decode_on) is in pretrain/data/device.py and docs/data.md.
"""
from __future__ import annotations

import io
import json
import logging
import random
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
from braceexpand import braceexpand
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision.io import ImageReadMode, decode_image
from webdataset import tariterators

from pretrain.data.device import device_views, looks_like_jpeg, pack
from pretrain.data.views import MultiViewAugment

log = logging.getLogger("pretrain.data")
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
READ_EXTS = set(IMAGE_KEYS) | {"cls", "json", "npy"}   # npy: a precomputed latent (`pretrain latents`)
MAX_IMAGE_PIXELS = 89_478_485          # PIL's default Image.MAX_IMAGE_PIXELS (~ 0.25 GiB as 24-bit RGB)
HEADER_PIXEL_LIMIT = 2 * MAX_IMAGE_PIXELS   # PIL refuses to read larger headers (DecompressionBombError)


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
def log_skip(count: int, what: str) -> None:
    """The warning for the `count`-th skipped sample or shard: the first 10, then every 1000th."""
    if count <= 10 or count % 1000 == 0:
        log.warning("skipping unreadable data (%d so far): %s", count, what)


class SkipCounter:
    """Counts corrupt samples/tars; the handler webdataset calls on read errors.

    `streak` counts failures since the last good sample: past `max_streak` the data is taken to be
    unreadable as a whole (a resampled stream would otherwise retry bad shards forever).
    """

    def __init__(self, max_streak: int = 1000):
        self.count = self.streak = 0
        self.max_streak = max_streak
        self.quiet = False   # while a resumed worker replays its stream: these were counted before

    def __call__(self, exn: Exception) -> bool:
        if self.quiet:
            return True
        self.count += 1
        self.streak += 1
        log_skip(self.count, str(exn)[:300])
        if self.streak > self.max_streak:
            raise DataError(f"{self.max_streak} unreadable samples or shards in a row (last: {str(exn)[:200]}); "
                            f"the shards look corrupt: rewrite them with `pretrain shards`")
        return True


def read_samples(urls: Iterator[str], handler: SkipCounter, on_unreadable=None) -> Iterator[Dict]:
    """Raw samples {__key__, jpg|png|..., cls, json: bytes} from tar shards; other members are not read.

    `on_unreadable(url, exn)`, when given, takes the errors of a shard that yields no member at all
    (cannot be opened, not a tar, empty, no image/cls/json member) instead of `handler`.
    """
    def select(fname):
        return fname.rsplit(".", 1)[-1].lower() in READ_EXTS
    sources = ({"url": u} for u in urls)
    if on_unreadable is None:
        streams = tariterators.url_opener(sources, handler=handler)
        files = tariterators.tar_file_expander(streams, handler=handler, select_files=select)
        return tariterators.group_by_keys(files, handler=handler)
    shard = {"url": None, "members": 0}     # the shard being read, and how many members it gave so far

    def opened(streams):
        for s in streams:
            shard.update(url=s["url"], members=0)
            yield s

    def counted(files):
        for f in files:
            if f:
                shard["members"] += 1
            elif not shard["members"]:     # end of a tar that held nothing we read
                on_unreadable(shard["url"], DataError("no image, .cls or .json member"))
            yield f

    def read_error(exn):
        return on_unreadable(shard["url"], exn) if not shard["members"] else handler(exn)
    streams = tariterators.url_opener(sources, handler=lambda e: on_unreadable(e.args[-1], e))
    files = counted(tariterators.tar_file_expander(opened(streams), handler=read_error, select_files=select))
    return tariterators.group_by_keys(files, handler=handler)


def read_header(sample: Dict, max_pixels: int = MAX_IMAGE_PIXELS):
    """Raw sample -> (image key, (h, w), PIL mode, PIL format), from the image header only. Raises when
    there is no image, the header is unreadable, or the image has more than `max_pixels` pixels."""
    key = next((k for k in IMAGE_KEYS if k in sample), None)
    if key is None:
        raise DataError(f"sample {sample.get('__key__')} in {sample.get('__url__')} has no image")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(sample[key])) as im:    # PNG/JPEG/WebP: reads the header only
                (w, h), mode, fmt = im.size, im.mode, im.format
            what, pixels = f"a {w}x{h} image", w * h
        except Image.DecompressionBombError:                    # PIL's ceiling, which caps max_pixels
            what, pixels = f"an image of over {HEADER_PIXEL_LIMIT} pixels", HEADER_PIXEL_LIMIT + 1
    if pixels > max_pixels:
        raise DataError(f"sample {sample.get('__key__')} in {sample.get('__url__')}: {what} is over "
                        f"data.max_image_pixels={max_pixels} (a decompression bomb?)")
    return key, (h, w), mode, fmt


def decode(sample: Dict, max_pixels: int = MAX_IMAGE_PIXELS):
    """Raw sample -> (uint8 image [3, H, W], int label or -1). Raises on anything unreadable, and on
    an image of more than `max_pixels` pixels (its size is read from the header; it is not decoded)."""
    return decode_or_keep(sample, max_pixels, keep_jpeg=False)[::2]


def decode_or_keep(sample: Dict, max_pixels: int = MAX_IMAGE_PIXELS, keep_jpeg: bool = True):
    """Raw sample -> (image, (h, w), label): with `keep_jpeg`, a whole-looking RGB or grey JPEG stays encoded,
    as 1-d uint8 bytes for the device to decode (data.decode_on=device; device.looks_like_jpeg); any other
    image is decoded to uint8 [3, h, w]. Raises as `decode` does."""
    key, size, mode, fmt = read_header(sample, max_pixels)
    label = int(sample["cls"]) if "cls" in sample else -1
    data = torch.frombuffer(bytearray(sample[key]), dtype=torch.uint8)
    if keep_jpeg and looks_like_jpeg(sample[key], mode, fmt):
        return data, size, label
    return decode_image(data, mode=ImageReadMode.RGB), size, label


def decode_latent(sample: Dict) -> Tuple[torch.Tensor, int]:
    """Raw sample of a latent shard (`pretrain latents`) -> (float32 [2, L]: a VAE posterior's mean and log variance,
    int label or -1). numpy's own format, read without pickle; anything else raises."""
    arr = np.load(io.BytesIO(sample["npy"]), allow_pickle=False)
    if arr.ndim != 2 or arr.shape[0] != 2 or arr.dtype.kind != "f":
        raise DataError(f"sample {sample.get('__key__')} in {sample.get('__url__')}: a latent must be a float [2, L] "
                        f"array (mean, log variance), got {arr.dtype} {list(arr.shape)}")
    return torch.from_numpy(arr.astype(np.float32)), int(sample["cls"]) if "cls" in sample else -1


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

    Set `epoch`, `start` (micro-batch index within the epoch to begin at) and `consumed` (per logical
    worker, how many samples of its stream the batches before `start` read; None: none) before
    iterating. Batch b is made by logical worker b % W from its own stream. Each batch:
    {"views": per view size, [V_g, B, 3, S_g, S_g] (uint8, or float if `photometric_in_worker`; views.view_groups),
    "label": [B], "seed": int, "masks": [M, B, N] bool (only with `masking`: the method's masks, drawn after the views),
    "epoch": int, "index": int, "consumed": int (samples of the worker's stream read so far),
    "skipped": int, "unreadable": [[url, reason], ...] (shards this worker found unreadable since its last batch)}.
    With `decode_on_device` (data.decode_on=device) a batch carries, instead of "views", the JPEG bytes and the
    drawn crop boxes and flips ("encoded", "rows", "sizes", "boxes", "flips"; pretrain/data/device.py), which
    TrainLoader turns into the same views on its device.
    """

    def __init__(self, sources: List[Source], batch_size: int, batches_per_epoch: int, augment, num_views: int,
                 photometric_in_worker: bool, seed: int, rank: int, shuffle_buffer: int = 1000,
                 max_image_pixels: int = MAX_IMAGE_PIXELS, masking=None, decode_on_device: bool = False):
        self.sources, self.batch_size, self.batches_per_epoch = sources, batch_size, batches_per_epoch
        # data.decode_on=device: ship JPEG bytes and crop boxes, not crops (pretrain/data/device.py)
        self.decode_on_device = decode_on_device
        if decode_on_device and photometric_in_worker:
            raise DataError("data.decode_on=device decodes and crops on the device, so the photometric stage runs "
                            "there too: set data.augment_on=device (or auto), or data.decode_on=worker")
        self.masking = masking   # Method.masking: (batch_size, generator) -> masks, from the batch's generator
        # one augmenter per view (views.MultiViewAugment), or one for all `num_views` views
        self.augment = augment if isinstance(augment, MultiViewAugment) else MultiViewAugment([augment] * num_views)
        self.num_views, self.photometric_in_worker = len(self.augment), photometric_in_worker
        self.seed, self.rank, self.shuffle_buffer = seed, rank, shuffle_buffer
        self.max_image_pixels = max_image_pixels
        self.epoch, self.start, self.consumed = 0, 0, None

    def _samples(self, rng: random.Random, counter: SkipCounter, unreadable: list):
        alive = [list(s.urls) for s in self.sources]   # shards still drawn, per source

        def drop(url, exn):   # a shard that yields nothing: never drawn again in this stream
            if all(u != url for u, _ in unreadable):
                unreadable.append([url, str(exn)[:200]])
            for a in alive:
                a[:] = [u for u in a if u != url]
            return True

        def shards(i):
            while True:
                if not alive[i]:
                    n, (url, why) = len(self.sources[i].urls), unreadable[-1]
                    raise DataError(f"none of the {n} shards of a training source can be read (e.g. {url}: {why}); "
                                    f"they look corrupt or are not tar files: rewrite them with `pretrain shards`")
                yield rng.choice(alive[i])
        streams = [read_samples(shards(i), counter, drop) for i in range(len(self.sources))]
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
        counter, unreadable = SkipCounter(), []
        stream = _shuffle(self._samples(rng, counter, unreadable), self.shuffle_buffer, rng)
        first = self.start + (logical - self.start) % W         # first batch index >= start owned by us
        pos = self.consumed[logical] if self.consumed else 0
        counter.quiet = True
        for _ in range(pos):   # replay, undecoded, what earlier batches read: the same draws, the same stream
            next(stream)
            counter.streak = 0
        counter.quiet, reported, sent = False, counter.count, 0
        for b in range(first, self.batches_per_epoch, W):
            bseed = _seed(self.seed, self.epoch, self.rank, b, 1)
            g = torch.Generator().manual_seed(bseed)
            views, labels, items, latents = [[] for _ in range(self.num_views)], [], [], []
            while len(labels) < self.batch_size:
                sample = next(stream)
                pos += 1
                if "npy" in sample:   # a precomputed latent: no image, no augmentation
                    try:
                        latent, label = decode_latent(sample)
                    except Exception as e:
                        counter(e)
                        continue
                    counter.streak = 0
                    latents.append(latent)
                    labels.append(label)
                    continue
                try:
                    if self.decode_on_device:   # JPEG bytes (else decoded pixels), with their header's size
                        img, size, label = decode_or_keep(sample, self.max_image_pixels)
                    else:
                        img, label = decode(sample, self.max_image_pixels)
                except Exception as e:  # corrupt image bytes, bad label, a decompression bomb...
                    counter(e)
                    continue
                counter.streak = 0
                if self.decode_on_device:   # the worker path's draws, in its order; the device crops
                    items.append((img, size))
                    for v, params in zip(views, self.augment.geometric_params(*size, g)):
                        v.append(params)
                else:
                    for v, crop in zip(views, self.augment.geometric(img, g)):   # view v: augmenter v
                        v.append(crop)
                labels.append(label)
            if latents:
                if len(latents) != len(labels):
                    raise DataError("data.train mixes image shards and latent shards (`pretrain latents`); use one kind")
                x = {"views": [], "latents": torch.stack(latents)}                # [B, 2, L]
            elif self.decode_on_device:
                x = self._device_inputs(items, views)
            else:
                x = {"views": self.augment.stack(views)}                   # per size: [V_g, B, 3, S_g, S_g] uint8
            masks = {"masks": self.masking(len(labels), g)} if self.masking is not None else {}
            if self.photometric_in_worker:
                x["views"] = self.augment.photometric(x["views"], g)
            yield {**x, "label": torch.tensor(labels), "seed": bseed, "epoch": self.epoch, "index": b,
                   "consumed": pos, "skipped": counter.count - reported, "unreadable": unreadable[sent:], **masks}
            reported, sent = counter.count, len(unreadable)

    @staticmethod
    def _device_inputs(items, params) -> dict:
        """What the device needs to make a batch's views (device.device_views): the images packed in one
        buffer ("encoded" uint8, "rows" [B, 4]), header sizes [B, 2], crop boxes [V, B, 4] (top, left,
        height, width) and flips [V, B]."""
        flat, rows = pack([img for img, _ in items])
        return {"encoded": flat, "rows": rows, "sizes": torch.tensor([size for _, size in items]).view(-1, 2),
                "boxes": torch.tensor([[box for box, _ in v] for v in params], dtype=torch.int64),
                "flips": torch.tensor([[flip for _, flip in v] for v in params], dtype=torch.bool)}


class TrainLoader:
    """Endless iterator of training micro-batches on `device`, epoch after epoch.

    `batches(start, state)` begins at global micro-batch index `start` (= step * grad_accum); `state`,
    the `state_dict()` this loader had when the trainer had taken `start` batches, makes the resumed
    stream exact. `skipped` counts corrupt samples and unreadable shards seen by this rank;
    `unreadable` holds the shards found unreadable (each reported and counted once per rank).
    """

    def __init__(self, dataset: ResampledBatches, num_workers: int, device: torch.device):
        self.dataset, self.num_workers, self.device = dataset, num_workers, device
        self.skipped = 0
        self.unreadable = set()
        self.workers = max(1, num_workers)          # logical workers (streams) per rank
        self._next, self._consumed = 0, [0] * self.workers

    def state_dict(self) -> dict:
        """Where this rank's data stands after the batches taken so far (plain ints): the next global
        micro-batch index, data.num_workers' streams, and how many samples each stream has read."""
        fresh = self._next % self.dataset.batches_per_epoch == 0     # the next batch starts an epoch
        return {"batch": self._next, "num_workers": self.workers,
                "consumed": [0] * self.workers if fresh else list(self._consumed)}

    def positions(self, start: int, state: Optional[dict]) -> List[int]:
        """Per logical worker, the samples of its stream that batches before `start` read: from
        `state` when it was recorded there with these workers, else (with a warning) batch_size per
        earlier batch, which is exact only if those batches met no corrupt sample."""
        ds, W = self.dataset, self.workers
        s = start % ds.batches_per_epoch
        estimate = [(s + (w - s) % W - w) // W * ds.batch_size for w in range(W)]
        if s == 0:
            return estimate   # all zero: an epoch starts
        if state is None:
            why = "the checkpoint has no data position (written by an older version)"
        elif state.get("num_workers") != W:
            why = f"data.num_workers changed ({state.get('num_workers')} streams then, {W} now)"
        elif state.get("batch") != start:
            why = f"the data position was recorded at micro-batch {state.get('batch')}, not {start}"
        else:
            return [int(c) for c in state["consumed"]]
        log.warning("resuming the data stream at micro-batch %d without an exact position: %s; each worker skips "
                    "batch_size samples per earlier batch, which differs from an uninterrupted run if those "
                    "batches met corrupt samples", start, why)
        return estimate

    def batches(self, start: int = 0, state: Optional[dict] = None) -> Iterator[dict]:
        ds, n = self.dataset, self.dataset.batches_per_epoch
        epoch, ds.start = divmod(start, n)
        ds.consumed = self.positions(start, state)
        self._next, self._consumed = start, list(ds.consumed)
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
                self._account(batch, epoch * n)
                if "encoded" in batch:   # data.decode_on=device: decode and crop here
                    views = self._device_views(batch)
                    if views is None:
                        continue
                else:
                    views = [v.to(self.device, non_blocking=True) for v in batch["views"]]
                if not ds.photometric_in_worker:   # on the device, from the batch seed: its own (deterministic) draws
                    g = torch.Generator(self.device).manual_seed(batch["seed"])
                    views = ds.augment.photometric(views, g)
                batch["views"] = views
                batch["label"] = batch["label"].to(self.device, non_blocking=True)
                if "latents" in batch:
                    batch["latents"] = batch["latents"].to(self.device, non_blocking=True)
                if "masks" in batch:
                    batch["masks"] = batch["masks"].to(self.device, non_blocking=True)
                yield batch
            epoch, ds.start, ds.consumed = epoch + 1, 0, None
            self._consumed = [0] * self.workers

    def _device_views(self, batch: dict):
        """data.decode_on=device: the batch's uint8 view groups made on the device (device.device_views).
        A sample no decoder reads is replaced by the next decoded one of the batch (views, labels, masks),
        counted as skipped and logged, so the batch keeps its size; None when none decodes."""
        views, src, errors = device_views(batch, self.dataset.augment, self.device)
        for e in errors:
            self.skipped += 1
            log_skip(self.skipped, f"{e}; replaced in batch {batch['index']} by another of its samples")
        if src is not None:
            batch["label"] = batch["label"][src]
            if "masks" in batch:
                batch["masks"] = batch["masks"][:, src]
        return views

    def _account(self, batch: dict, epoch_start: int) -> None:
        """Take a batch's bookkeeping out of it: stream position, skip counts, unreadable shards."""
        self._consumed[batch["index"] % self.workers] = int(batch.pop("consumed"))
        self._next = epoch_start + batch["index"] + 1
        self.skipped += batch.pop("skipped")
        for url, why in batch.pop("unreadable"):
            if url not in self.unreadable:
                self.unreadable.add(url)
                self.skipped += 1
                log.warning("skipping shard %s: it cannot be read (%s); it is not drawn again", url, why)


# ------------------------------------------------------------------------------------------------
# evaluation: every sample exactly once, split by rank and worker
class EvalBatches(IterableDataset):
    """{"image": uint8 [B, 3, S, S] (resize + centre crop), "label": [B]} over this rank's shards."""

    def __init__(self, urls: List[str], batch_size: int, image_size: int, rank: int = 0, world: int = 1,
                 max_samples: Optional[int] = None, max_image_pixels: int = MAX_IMAGE_PIXELS):
        self.urls, self.batch_size, self.image_size = urls, batch_size, image_size
        self.rank, self.world, self.max_samples = rank, world, max_samples
        self.max_image_pixels = max_image_pixels

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
                img, label = decode(sample, self.max_image_pixels)
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
                max_samples: Optional[int] = None, key: str = "data.val",
                max_image_pixels: int = MAX_IMAGE_PIXELS) -> DataLoader:
    """Every sample of `spec` once (this rank's share), as EvalBatches; larger images than
    `max_image_pixels` are skipped and counted as corrupt."""
    urls = [u for s in expand_sources(spec, key) for u in s.urls]
    ds = EvalBatches(urls, batch_size, image_size, rank, world, max_samples, max_image_pixels)
    return DataLoader(ds, batch_size=None, num_workers=min(num_workers, len(urls)),
                      generator=torch.Generator().manual_seed(0))   # leaves the global RNG alone (see TrainLoader)
