"""The device data path (data.decode_on=device, pretrain/data/device.py), run with device=cpu: the same crop
boxes and flips as the worker path for the same seed, pixels within a measured tolerance of the worker's
resize, roi_align against a float64 reference, padding of mixed sizes, corrupt JPEGs skipped and counted,
the config switch, and a short `pretrain train`."""
from __future__ import annotations

import io
import itertools
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.ops import roi_align

from helpers import cli, train_overrides
from pretrain.data import DataError, ResampledBatches, SimCLRAugment, TrainLoader, expand_sources, write_shards
from pretrain.data import augment as augment_mod
from pretrain.data.device import decode_batch, padded, roi_crops
from pretrain.data.sources import digits
from pretrain.data.views import MultiViewAugment, ViewSpec

MEAN, STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]
OFF = dict(jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)


def _jpeg(a: np.ndarray, quality=90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _photos(n, lo=40, hi=200, seed=0):
    """n JPEGs cut from scikit-learn's two sample photos, of random sizes (h, w in [lo, hi))."""
    from sklearn.datasets import load_sample_images

    photos, rng, out = load_sample_images().images, np.random.default_rng(seed), []
    for i in range(n):
        a = photos[i % 2]
        s = int(rng.integers(lo, min(hi, a.shape[0])))
        t, left = int(rng.integers(0, a.shape[0] - s)), int(rng.integers(0, a.shape[1] - s))
        im = Image.fromarray(a[t:t + s, left:left + s]).resize((int(rng.integers(lo, hi)), s))
        out.append(_jpeg(np.asarray(im)))
    return out


def _not_decodable() -> bytes:
    """A JPEG whose header and end marker are intact (the worker-side checks pass) but whose scan is not."""
    d = _jpeg(np.full((24, 24, 3), 128, np.uint8))
    return d[:d.find(b"\xff\xda") + 2] + b"\x00\x00\xff\xd9"


def _shards(root, images, labels=None, shard_size=10):
    samples = [(d, "jpg" if d[:2] == b"\xff\xd8" else "png", (labels or [0] * len(images))[i], {})
               for i, d in enumerate(images)]
    write_shards(samples, [str(i) for i in range(10)], root, shard_size=shard_size, val_fraction=0.0)
    return expand_sources(f"{root}/train")


@pytest.fixture(scope="module")
def photo_sources(tmp_path_factory):
    return _shards(tmp_path_factory.mktemp("photos"), _photos(24))


def _mask(B, g):
    return torch.rand(2, B, 5, generator=g) < 0.5


def _batches(sources, aug, on_device, n=2, batch=8, masking=None, shuffle_buffer=16):
    """n raw batches of ResampledBatches in this process, and a TrainLoader (CPU) to complete device ones.
    shuffle_buffer=1 with one shard: the stream is the shard's samples in order, then again."""
    ds = ResampledBatches(sources, batch, n, aug, len(aug), False, seed=3, rank=0, shuffle_buffer=shuffle_buffer,
                          masking=masking, decode_on_device=on_device)
    loader = TrainLoader(ds, 0, torch.device("cpu"))
    raw = list(itertools.islice(iter(ds), n))
    return raw, loader


def _uint8_views(sources, aug, on_device, **kw):
    """Both paths' uint8 view groups (photometric off: TrainLoader's is skipped by taking the raw stage)."""
    raw, loader = _batches(sources, aug, on_device, **kw)
    out = []
    for b in raw:
        views = loader._device_views(dict(b)) if on_device else b["views"]
        out.append((views, b))
    return out, loader


def _two_sizes():
    return MultiViewAugment([SimCLRAugment(32, MEAN, STD, crop_scale=(0.08, 1.0), **OFF),
                             SimCLRAugment(32, MEAN, STD, crop_scale=(0.08, 1.0), **OFF),
                             SimCLRAugment(32, MEAN, STD, crop_scale=(0.05, 0.3), size=16, **OFF)])


# ------------------------------------------------------------------------------------------------ same draws
def test_device_path_draws_the_worker_paths_boxes_flips_and_masks(photo_sources, monkeypatch):
    """The worker path's resized_crop calls (spied), in order, are the boxes the device path ships (its flips:
    next test); the masks drawn after them from the same generator, labels and stream positions agree too."""
    calls, real = [], augment_mod.TF.resized_crop

    def spy(img, top, left, h, w, *a, **kw):
        calls.append((top, left, h, w))
        return real(img, top, left, h, w, *a, **kw)
    monkeypatch.setattr(augment_mod.TF, "resized_crop", spy)
    aug = _two_sizes()
    worker, _ = _batches(photo_sources, aug, False, masking=_mask)
    monkeypatch.setattr(augment_mod.TF, "resized_crop", real)
    dev, _ = _batches(photo_sources, aug, True, masking=_mask)
    V, B = 3, 8
    for k, (w, d) in enumerate(zip(worker, dev)):
        boxes = d["boxes"].permute(1, 0, 2).reshape(-1, 4).tolist()    # sample-major, view order: the worker's
        assert [tuple(b) for b in boxes] == calls[k * V * B:(k + 1) * V * B]
        assert torch.equal(w["masks"], d["masks"]) and torch.equal(w["label"], d["label"])
        assert w["consumed"] == d["consumed"] and w["seed"] == d["seed"]
    flips = torch.cat([d["flips"] for d in dev], 1)
    assert 0 < flips.float().mean() < 1     # both kinds drawn


def test_square_identity_crops_are_pixel_exact_with_flips(tmp_path):
    """Whole-image crops at the image's own size: the device path returns the decoded pixels, flipped where
    the worker path flipped, exactly (no interpolation involved)."""
    rng = np.random.default_rng(0)
    images = [_jpeg(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)) for _ in range(12)]
    sources = _shards(tmp_path, images)
    aug = MultiViewAugment([SimCLRAugment(16, MEAN, STD, crop_scale=(1, 1), crop_ratio=(1, 1), flip_p=0.5, **OFF)] * 2)
    worker, _ = _uint8_views(sources, aug, False)
    dev, _ = _uint8_views(sources, aug, True)
    for (w, _), (d, _) in zip(worker, dev):
        assert torch.equal(w[0], d[0])
    flips = torch.cat([db["flips"] for _, db in dev], 1)
    assert 0 < flips.float().mean() < 1     # both kinds drawn


def test_pixels_agree_with_the_worker_resize_within_the_measured_tolerance(photo_sources):
    """Random resized crops of photos of mixed sizes (40-200 px) to 32 and 16 px: roi_align (box average of
    bilinear samples) vs torchvision's antialiased resize of the crop (a triangle filter; clamped at the crop's
    edge, where roi_align reads the neighbouring pixels). Measured here: mean |diff| 1.33 levels (of 255), 99th
    percentile 11, max 35 (sharp edges in heavily downscaled crops). Broken variants: boxes shifted by one pixel
    give 4.8 / 38, roi_align without averaging (sampling_ratio=1) 4.3 / 41; hence the bounds 2 and 16."""
    aug = _two_sizes()
    worker, _ = _uint8_views(photo_sources, aug, False, n=4)
    dev, _ = _uint8_views(photo_sources, aug, True, n=4)
    d = torch.cat([(wg.float() - dg.float()).abs().flatten() for (w, _), (v, _) in zip(worker, dev)
                   for wg, dg in zip(w, v)])
    assert d.mean() < 2 and d.quantile(0.99) <= 16, (d.mean(), d.quantile(0.99), d.max())


def test_roi_crops_match_a_float64_bilinear_reference():
    """A linear ramp is reproduced exactly by bilinear sampling and by averaging samples placed symmetrically
    in a bin, so each output pixel must be the ramp at its bin centre (pixel centres at integer + 0.5 in
    continuous coordinates); boxes stay one pixel inside the image (no edge clamp)."""
    H, W, S = 40, 50, 8
    yy, xx = np.meshgrid(np.arange(H, dtype=np.float64), np.arange(W, dtype=np.float64), indexing="ij")
    ramp = np.stack([3 * xx + 0.5 * yy, 2 * yy + 10, 240 - 4 * xx])                      # [3, H, W], in [0, 255]
    img = torch.from_numpy(ramp).float()[None]
    boxes = torch.tensor([[[1, 1, 38, 48], [5, 7, 4, 3], [10, 2, 20, 30], [3, 30, 9, 17]]])   # [V=1, B=4, (t, l, h, w)]
    flips = torch.tensor([[False, True, False, True]])
    got = roi_crops(img.expand(4, -1, -1, -1), boxes, flips, S)[0].double().numpy()          # [4, 3, S, S]
    for b, ((t, left, h, w), flip) in enumerate(zip(boxes[0].tolist(), flips[0].tolist())):
        cy = t + (np.arange(S) + 0.5) * h / S - 0.5                                        # bin centres, pixel index space
        cx = left + (np.arange(S) + 0.5) * w / S - 0.5
        cx = cx[::-1] if flip else cx
        y, x = np.meshgrid(cy, cx, indexing="ij")                                          # [S, S] each
        ref = np.stack([3 * x + 0.5 * y, 2 * y + 10, 240 - 4 * x])
        assert np.abs(got[b] - np.round(ref)).max() <= 1, b


def test_mixed_sizes_in_one_padded_batch_crop_as_each_image_alone():
    """Padding to the largest image never leaks into a crop: boxes touching the right and bottom edges,
    upscaled (samples past the last pixel centre), give what roi_align gives on the image alone."""
    rng = torch.Generator().manual_seed(0)
    imgs = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=rng) for h, w in ((9, 13), (20, 7), (16, 16))]
    boxes = torch.tensor([[[5, 8, 4, 5], [14, 3, 6, 4], [0, 0, 16, 16]]])                   # at the bottom-right corners
    (t, left, h, w), idx = boxes[0].float().unbind(-1), torch.arange(3.0)
    rois = torch.stack([idx, left, t, left + w, t + h], -1)                                   # (b, x1, y1, x2, y2)
    batch = padded(imgs)
    together = roi_align(batch, rois, 12, sampling_ratio=-1, aligned=True)
    for b, x in enumerate(imgs):
        h, w = x.shape[1:]     # the image, one replicated row and column, zeros beyond
        assert torch.equal(batch[b, :, :h + 1, :w + 1], torch.nn.functional.pad(x[None].float(), (0, 1, 0, 1), "replicate")[0])
        assert not batch[b, :, h + 1:].any() and not batch[b, :, :, w + 1:].any()
        alone = roi_align(x[None].float(), rois[b:b + 1] * torch.tensor([0, 1, 1, 1, 1]), 12, sampling_ratio=-1,
                          aligned=True)
        torch.testing.assert_close(together[b], alone[0], atol=1e-3, rtol=0)
    same = padded([imgs[2], imgs[2].flip(-1)])       # one size: the stack-and-pad shortcut, same layout
    assert torch.equal(same, torch.nn.functional.pad(torch.stack([imgs[2], imgs[2].flip(-1)]).float(), (0, 1, 0, 1),
                                                     "replicate"))


# ------------------------------------------------------------------------------------------------ faults
def test_truncated_and_garbage_images_are_skipped_in_the_worker_as_on_the_worker_path(tmp_path):
    """Truncated JPEG (no end marker), garbage and a PNG: the worker decodes what does not look like a whole
    JPEG, skips what fails (counted; the batch reads one more), so both paths read the same stream."""
    good = _photos(14, 24, 48, seed=1)
    png = io.BytesIO()
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(png, format="PNG")
    bad = [good[0][:-100], b"\xff\xd8\xff garbage" * 5]     # header intact, scan cut short (no end marker)
    sources = _shards(tmp_path, good[:6] + bad[:1] + [png.getvalue()] + good[6:10] + bad[1:] + good[10:], shard_size=20)
    aug = MultiViewAugment([SimCLRAugment(16, MEAN, STD, **OFF)] * 2)
    worker, _ = _batches(sources, aug, False, n=4, batch=4, shuffle_buffer=1)    # 16 good reads: all 17 read
    dev, _ = _batches(sources, aug, True, n=4, batch=4, shuffle_buffer=1)
    skipped = sum(b["skipped"] for b in dev)
    assert sum(b["skipped"] for b in worker) == skipped >= 2 and dev[-1]["consumed"] == 16 + skipped
    assert [b["consumed"] for b in worker] == [b["consumed"] for b in dev]
    assert all(len(b["label"]) == 4 for b in dev)
    kinds = torch.cat([b["rows"][:, 1] for b in dev])          # 0: JPEG bytes for the device, 3: decoded pixels
    assert set(kinds.tolist()) == {0, 3}


def test_jpeg_no_decoder_reads_is_replaced_counted_and_logged(tmp_path, caplog):
    """A JPEG that passes the worker's checks but no decoder reads: the batched call raises for the whole
    list, the others are decoded one by one, the bad one is replaced by the next valid sample of the batch
    (views, label, masks) so the batch keeps its full size on every rank, and it is counted and logged."""
    good = _photos(7, 24, 48, seed=2)
    sources = _shards(tmp_path, good[:3] + [_not_decodable()] + good[3:], labels=[0, 1, 2, 3, 4, 5, 6, 7])
    aug = MultiViewAugment([SimCLRAugment(16, MEAN, STD, **OFF)] * 2)
    raw, loader = _batches(sources, aug, True, n=1, batch=8, masking=_mask, shuffle_buffer=1)
    b = dict(raw[0])
    assert b["skipped"] == 0     # the worker could not tell
    labels = raw[0]["label"].tolist()
    bad = labels.index(3)
    with caplog.at_level(logging.WARNING, logger="pretrain.data"):
        views = loader._device_views(b)
    assert loader.skipped == 1 and "JPEG data the decoder rejects" in caplog.text and "replaced" in caplog.text
    assert views[0].shape == (2, 8, 3, 16, 16) and b["masks"].shape == (2, 8, 5) and len(b["label"]) == 8
    src = [i if i != bad else (bad + 1) % 8 for i in range(8)]
    assert b["label"].tolist() == [labels[i] for i in src]
    assert torch.equal(b["masks"], raw[0]["masks"][:, src])
    assert torch.equal(views[0][:, bad], views[0][:, src[bad]])


def test_decode_batch_flags_a_size_that_disagrees_with_the_header():
    """Boxes are drawn for the header's size: a decoded image of another size is dropped, not cropped."""
    data = torch.frombuffer(bytearray(_jpeg(np.zeros((10, 12, 3), np.uint8))), dtype=torch.uint8)
    out, errors = decode_batch([data, data], [(10, 12), (12, 10)], "cpu")
    assert out[0].shape == (3, 10, 12) and out[1] is None and "header said (12, 10)" in errors[0]


# ------------------------------------------------------------------------------------------------ config, end to end
@pytest.fixture(scope="module")
def jpeg_digits(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits_jpg")
    classes, samples = digits(size=16, fmt="jpg")
    write_shards(itertools.islice(samples, 300), classes, root, shard_size=100, val_fraction=0.0)
    return root


def _loader(shards, device="cpu", **data):
    from pretrain.config import load_config
    from pretrain.data import build_train_loader
    from pretrain.methods import METHODS

    cfg = load_config(None, [f"data.train={shards}/train", "data.image_size=16", "data.num_workers=0",
                             *[f"data.{k}={v}" for k, v in data.items()]])
    return build_train_loader(cfg, METHODS.get("simclr"), 8, 2, 0, device)


def test_decode_on_resolution_and_errors(jpeg_digits):
    assert not _loader(jpeg_digits).dataset.decode_on_device                  # auto on CPU: the workers
    ds = _loader(jpeg_digits, decode_on="device").dataset                      # device: photometric follows
    assert ds.decode_on_device and not ds.photometric_in_worker
    with pytest.raises(DataError, match=r"data.decode_on=device .* set data.augment_on=device"):
        _loader(jpeg_digits, decode_on="device", augment_on="worker")
    with pytest.raises(DataError, match="data.decode_on must be auto, worker or device, got 'gpu'"):
        _loader(jpeg_digits, decode_on="gpu")


def test_train_loader_delivers_device_batches_like_the_worker_path(jpeg_digits):
    """TrainLoader end to end on the CPU: the same shapes, dtype and labels as augment_on=device with
    worker decoding, and images within the interpolation tolerance after the same photometric stage."""
    a = next(_loader(jpeg_digits, decode_on="device").batches(0))
    b = next(_loader(jpeg_digits, decode_on="worker", augment_on="device").batches(0))
    assert [v.shape for v in a["views"]] == [v.shape for v in b["views"]] == [(2, 8, 3, 16, 16)]
    assert a["views"][0].dtype == torch.float32 and torch.equal(a["label"], b["label"])
    assert (a["views"][0] - b["views"][0]).abs().mean() < 0.1    # normalised units (std 0.229: ~6 levels)


@pytest.mark.slow
def test_pretrain_train_with_device_decoding_on_cpu(jpeg_digits, experiment, tmp_path):
    run = tmp_path / "run"
    p = cli("train", experiment, *train_overrides(jpeg_digits, run, train__max_steps=2, data__decode_on="device",
                                                   data__num_workers=1))
    assert p.returncode == 0, p.stderr[-3000:]
    log = (run / "log.txt").read_text()
    assert "JPEG decoding and crops: device; photometric stage: device" in log
    assert np.isfinite(json.loads(p.stdout.strip().splitlines()[-1])["loss"])


@pytest.mark.slow
def test_bench_data_paths_reports_each_path(tmp_path):
    """scripts/bench.py's hook (scripts/gpu_check.py calls it on a GPU): images/s for every path, tiny sizes."""
    import runpy
    from pathlib import Path

    bench = runpy.run_path(str(Path(__file__).resolve().parents[1] / "scripts" / "bench.py"))
    res = bench["bench_data_paths"]("cpu", image=48, out=16, batch=8, images=64, workers=0, warmup=1, batches=2,
                                    reps=1, work_dir=tmp_path)
    assert set(res["img_s"]) == {"worker", "worker_decode", "device"} and all(v > 0 for v in res["img_s"].values())
    assert res["device_vs_worker"] > 0 and res["settings"]["device"] == "cpu"
