"""Data: shard writing, streaming reading, augmentation. No launch code here."""
from pretrain.data.augment import SimCLRAugment, center_resize, normalize
from pretrain.data.pipeline import (DataError, EvalBatches, ResampledBatches, Source, TrainLoader, decode, eval_loader,
                                    expand_sources, read_samples, split_shards)
from pretrain.data.shards import ShardWriter, write_shards
from pretrain.data.views import MultiViewAugment, ViewSpec, describe, resolve_views, view_augmenters


def build_train_loader(cfg, method, local_batch: int, batches_per_epoch: int, rank: int, device):
    """The training loader a run config describes (data.* keys), for this rank, delivering the views
    `method` declares (`method.views`, with data.augment / data.views applied; see data/views.py)."""
    import logging

    import torch

    sources = expand_sources(cfg.data.train, "data.train")
    aug = view_augmenters(cfg, method.views, f"method {cfg.method.name}")
    if rank == 0:
        logging.getLogger("pretrain.data").info("augmentation: %s", describe([a.spec for a in aug.augs]))
    where = cfg.data.augment_on
    if where not in ("auto", "worker", "device"):
        raise DataError(f"data.augment_on must be auto, worker or device, got {where!r}")
    in_worker = where == "worker" or (where == "auto" and torch.device(device).type != "cuda")
    decode_on = cfg.data.get("decode_on", "worker")
    if decode_on not in ("auto", "worker", "device"):
        raise DataError(f"data.decode_on must be auto, worker or device, got {decode_on!r}")
    if decode_on == "device" and where == "auto":
        in_worker = False   # decoding on the device puts both augmentation stages there
    on_device = decode_on == "device" or (decode_on == "auto" and torch.device(device).type == "cuda" and not in_worker)
    if rank == 0:
        logging.getLogger("pretrain.data").info(
            "JPEG decoding and crops: %s; photometric stage: %s", "device" if on_device else "loader workers",
            "loader workers" if in_worker else "device")
    ds = ResampledBatches(sources, local_batch, batches_per_epoch, aug, len(aug), in_worker, cfg.seed, rank,
                          cfg.data.shuffle_buffer, check_max_image_pixels(cfg.data.max_image_pixels),
                          getattr(method, "masking", None), decode_on_device=on_device)
    return TrainLoader(ds, cfg.data.num_workers, torch.device(device))


def check_max_image_pixels(n) -> int:
    """data.max_image_pixels, checked: a positive int up to the largest image header PIL reads."""
    from pretrain.data.pipeline import HEADER_PIXEL_LIMIT

    if isinstance(n, bool) or not isinstance(n, int) or not 0 < n <= HEADER_PIXEL_LIMIT:
        raise DataError(f"data.max_image_pixels must be an int in [1, {HEADER_PIXEL_LIMIT}] (PIL refuses larger "
                        f"image headers), got {n!r}")
    return n


def count_samples(spec, key="data.train"):
    """Total samples from index.json files, or None when unknown."""
    counts = [s.samples for s in expand_sources(spec, key)]
    return sum(counts) if all(c is not None for c in counts) else None
