"""Data: shard writing, shard specs, mixing, splitting, resampled epochs over real ranks,
determinism and exact resume, corrupt data, no unpickling, errors, augmentation."""
from __future__ import annotations

import io
import itertools
import json
import os
import pickle
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import WORKERS, tmp_debris, torchrun
from pretrain.data import (DataError, ResampledBatches, ShardWriter, SimCLRAugment, TrainLoader, eval_loader,
                           expand_sources, read_samples, split_shards, write_shards)
from pretrain.data.pipeline import SkipCounter
from pretrain.data.sources import digits

MEAN, STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]


# ------------------------------------------------------------------------------------------------ helpers
def tar_members(path):
    with tarfile.open(path) as t:
        return [(m.name, t.extractfile(m).read()) for m in t.getmembers()]


def samples_in(path):
    by_key = {}
    for name, data in tar_members(path):
        key, ext = name.split(".", 1)
        by_key.setdefault(key, {})[ext] = data
    return by_key


def digit_subset(n, label_offset=0, size=16):
    classes, gen = digits(size=size)
    out = []
    for image, ext, label, meta in itertools.islice(gen, n):
        out.append((image, ext, label + label_offset, meta))
    return classes, out


def small_shards(root, n=60, shard_size=10, label_offset=0):
    classes, samples = digit_subset(n, label_offset)
    write_shards(samples, classes, root, shard_size=shard_size, val_fraction=0.0)
    return sorted(str(p) for p in (Path(root) / "train").glob("*.tar"))


def make_tar(path, members):
    with tarfile.open(path, "w") as t:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return str(path)


def loader(spec, batch=16, batches_per_epoch=10, workers=0, seed=0, rank=0, views=2, in_worker=True, buffer=32):
    aug = SimCLRAugment(16, MEAN, STD)
    ds = ResampledBatches(expand_sources(spec), batch, batches_per_epoch, aug, views, in_worker, seed, rank, buffer)
    return TrainLoader(ds, workers, torch.device("cpu"))


def take(it, n):
    return [next(it) for _ in range(n)]


def eval_items(spec, **kw):
    """(label, pixel checksum) of every sample an eval loader yields."""
    out = []
    for b in eval_loader(spec, batch_size=64, image_size=16, **kw):
        out += [(int(y), int(x.long().sum())) for x, y in zip(b["image"], b["label"])]
    return out


# ------------------------------------------------------------------------------------------------ writer
def test_write_shards_counts_members_and_no_temporaries(digits_shards):
    from sklearn.datasets import load_digits

    target = load_digits().target
    top = json.loads((digits_shards / "index.json").read_text())
    assert top["train"]["samples"] + top["val"]["samples"] == len(target)
    labels = Counter()
    for split in ("train", "val"):
        idx = json.loads((digits_shards / split / "index.json").read_text())
        assert idx["samples"] == top[split]["samples"]
        on_disk = sorted(p.name for p in (digits_shards / split).glob("*.tar"))
        assert on_disk == sorted(idx["shards"])
        assert sorted(p.name for p in (digits_shards / split).iterdir()) == sorted(on_disk + ["index.json"])
        n = 0
        for i, name in enumerate(sorted(idx["shards"])):
            samples = samples_in(digits_shards / split / name)
            if i < len(idx["shards"]) - 1:
                assert len(samples) == idx["shard_size"]
            for key, members in samples.items():
                assert set(members) == {"png", "cls", "json"}, (name, key, set(members))
                assert members["png"][:8] == b"\x89PNG\r\n\x1a\n"
                label = int(members["cls"])
                assert json.loads(members["json"])["label"] == label
                labels[label] += 1
            n += len(samples)
        assert n == idx["samples"]
    assert labels == Counter(int(t) for t in target)
    assert tmp_debris(digits_shards) == []


def test_shard_writer_abort_leaves_only_complete_shards(tmp_path):
    _, samples = digit_subset(5)
    w = ShardWriter(tmp_path, shard_size=3)
    with pytest.raises(RuntimeError):
        try:
            for i, (img, ext, label, meta) in enumerate(samples):
                w.write(f"{i:04d}", img, ext, label, meta)
            raise RuntimeError("interrupted while shard 1 is open")
        except BaseException:
            w.abort()
            raise
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-000000.tar"]
    assert len(samples_in(tmp_path / "shard-000000.tar")) == 3


def test_write_shards_exception_mid_shard_leaves_no_partial_shard(tmp_path):
    classes, samples = digit_subset(40)
    img, ext, label, meta = samples[17]
    samples[17] = (img, ext, label, {"bad": object()})    # not JSON-serialisable: fails mid-shard
    with pytest.raises(TypeError):
        write_shards(samples, classes, tmp_path, shard_size=8, val_fraction=0.25)
    assert tmp_debris(tmp_path) == []
    assert not (tmp_path / "index.json").exists()
    failed = 0
    for split in ("train", "val"):
        d, idx = tmp_path / split, tmp_path / split / "index.json"
        tars = sorted(d.glob("*.tar")) if d.exists() else []
        if idx.exists():   # a split that finished: its index matches its shards
            meta = json.loads(idx.read_text())
            assert sorted(meta["shards"]) == [t.name for t in tars]
            assert sum(len(samples_in(t)) for t in tars) == meta["samples"]
        else:              # the split that failed: only full shards were renamed into place
            failed += 1
            for t in tars:
                assert len(samples_in(t)) == 8, t
    assert failed == 1


# ------------------------------------------------------------------------------------------------ specs
def test_brace_pattern_selects_exactly_those_shards(digits_shards):
    spec = f"{digits_shards}/train/shard-{{000001..000003}}.tar"
    (src,) = expand_sources(spec)
    names = [Path(u).name for u in src.urls]
    assert names == ["shard-000001.tar", "shard-000002.tar", "shard-000003.tar"]
    expected = sum(len(samples_in(u)) for u in src.urls)
    assert len(eval_items(spec)) == expected


def test_directory_spec_uses_index(digits_shards):
    (src,) = expand_sources(str(digits_shards / "train"))
    idx = json.loads((digits_shards / "train" / "index.json").read_text())
    assert src.samples == idx["samples"] and len(src.urls) == len(idx["shards"])


def test_pipe_urls_read_like_files(digits_shards):
    path = digits_shards / "val" / "shard-000000.tar"
    direct = eval_items(str(path))
    piped = eval_items(f"pipe:cat {path}")
    assert len(direct) == len(samples_in(path)) and piped == direct
    # and through the training loader
    batch = next(loader(f"pipe:cat {path}", batch=8).batches(0))
    assert len(batch["views"]) == 1 and batch["views"][0].shape == (2, 8, 3, 16, 16)


def test_mixing_sources_by_weight(tmp_path):
    a = small_shards(tmp_path / "a", n=100, shard_size=20)
    b = small_shards(tmp_path / "b", n=100, shard_size=20, label_offset=100)   # labels >= 100 mark source b
    spec = [{"urls": a, "weight": 3.0}, {"urls": b, "weight": 1.0}]
    n_batches = 30
    labels = torch.cat([x["label"] for x in take(loader(spec, batch=50, batches_per_epoch=n_batches, views=1).batches(0), n_batches)])
    frac_b = (labels >= 100).float().mean().item()
    assert abs(frac_b - 0.25) < 0.05, frac_b   # 1500 draws: sd ~0.011


def test_zero_weight_is_an_error(tmp_path):
    a = small_shards(tmp_path / "a", n=20)
    with pytest.raises(DataError, match="weight"):
        expand_sources([{"urls": a, "weight": 0}])


@pytest.mark.parametrize("n_shards", [1, 3, 7, 16])
@pytest.mark.parametrize("world, workers", [(1, 1), (2, 1), (2, 3), (3, 2), (4, 4)])
def test_split_shards_covers_each_shard_once(n_shards, world, workers):
    urls = [f"s{i}.tar" for i in range(n_shards)]
    got = [u for r in range(world) for w in range(workers) for u in split_shards(urls, r, world, w, workers)]
    assert sorted(got) == sorted(urls)


def test_uneven_shards_same_batches_every_rank_and_eval_exactly_once(tmp_path):
    """2 real ranks (gloo), 2 workers each, 3 shards of 50/50/7 samples: every rank gets the same
    number of training batches per epoch (a collective per batch does not hang), and eval reads
    every sample exactly once over ranks x workers."""
    classes, samples = digit_subset(107)
    write_shards(samples, classes, tmp_path / "d", shard_size=50, val_fraction=0.0)
    spec = str(tmp_path / "d" / "train")
    out = tmp_path / "report.json"
    n_batches = 5
    torchrun(WORKERS / "data_ranks.py", spec, spec, out, n_batches, 2, timeout=240, check=True)
    rep = json.loads(out.read_text())
    for r in rep["train"]:
        assert r["count"] == n_batches and r["indices"] == list(range(n_batches)), rep["train"]
    seen = sorted(tuple(x) for part in rep["eval"] for x in part)
    single = [tuple(x) for x in eval_items(spec)]
    assert len(single) == 107
    assert [s[:2] for s in seen] == sorted(single)


# ------------------------------------------------------------------------------------------------ determinism
def _views(batches):
    return [b["views"][0] for b in batches]


def test_same_seed_same_batches_other_seed_or_epoch_differs(digits_shards):
    spec = str(digits_shards / "train")
    a = _views(take(loader(spec, batches_per_epoch=4, seed=5).batches(0), 3))
    b = _views(take(loader(spec, batches_per_epoch=4, seed=5).batches(0), 3))
    c = _views(take(loader(spec, batches_per_epoch=4, seed=6).batches(0), 3))
    e1 = _views(take(loader(spec, batches_per_epoch=4, seed=5).batches(4), 3))   # epoch 1, batches 0..2
    r1 = _views(take(loader(spec, batches_per_epoch=4, seed=5, rank=1).batches(0), 3))
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    for other in (c, e1, r1):
        for x, y in zip(a, other):
            assert not torch.allclose(x, y)


@pytest.mark.parametrize("workers, in_worker", [(0, True), (2, True), (2, False)])
def test_resume_at_micro_batch_k_equals_uninterrupted(digits_shards, workers, in_worker):
    spec = str(digits_shards / "train")
    n, k, total = 5, 3, 9        # resume mid-epoch 0 and run across the epoch boundary
    full = take(loader(spec, batches_per_epoch=n, workers=workers, in_worker=in_worker).batches(0), total)
    resumed = take(loader(spec, batches_per_epoch=n, workers=workers, in_worker=in_worker).batches(k), total - k)
    for want, got in zip(full[k:], resumed):
        assert (got["epoch"], got["index"]) == (want["epoch"], want["index"])
        assert torch.equal(got["label"], want["label"])
        assert torch.equal(got["views"][0], want["views"][0])
    assert [b["index"] for b in full] == [0, 1, 2, 3, 4, 0, 1, 2, 3]


# ------------------------------------------------------------------------------------------------ bad data
def _truncated(src, dst):
    with tarfile.open(src) as t:
        members = t.getmembers()
    png = [m for m in members if m.name.endswith(".png")][2]
    data = Path(src).read_bytes()[: png.offset_data + png.size // 2]    # cut inside the 3rd image
    Path(dst).write_bytes(data)


@pytest.mark.parametrize("kind", ["truncated", "garbage", "bad_image"])
def test_corrupt_data_is_skipped_and_counted(tmp_path, kind):
    good = small_shards(tmp_path / "good", n=60, shard_size=10)
    bad = []
    for i in range(3):
        p = tmp_path / f"bad-{i}.tar"
        if kind == "truncated":
            _truncated(good[i], p)
        elif kind == "garbage":
            p.write_bytes(np.random.default_rng(i).integers(0, 256, 7000, dtype=np.uint8).tobytes())
        else:
            make_tar(p, [m for j in range(10) for m in ((f"x{j:03d}.png", b"\x89PNG but not really" * 3),
                                                         (f"x{j:03d}.cls", b"3"))])
        bad.append(str(p))
    tl = loader(good + bad, batch=16, batches_per_epoch=12)
    batches = take(tl.batches(0), 12)
    assert tl.skipped > 0
    for b in batches:
        assert b["views"][0].shape == (2, 16, 3, 16, 16) and torch.isfinite(b["views"][0]).all()
        assert ((b["label"] >= 0) & (b["label"] < 10)).all(), b["label"]


def test_corrupt_shard_in_eval_is_skipped(tmp_path):
    good = small_shards(tmp_path / "good", n=20, shard_size=10)
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"\x00garbage" * 500)
    assert len(eval_items(good + [str(bad)])) == 20


class _Evil:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def test_pickle_members_are_never_unpickled(tmp_path, digits_shards):
    # the payload works: unpickling it does create its marker
    canary = tmp_path / "canary"
    pickle.loads(pickle.dumps(_Evil(canary)))
    assert canary.exists()

    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Evil(marker))
    members = []
    src = samples_in(digits_shards / "val" / "shard-000000.tar")
    for key, m in itertools.islice(src.items(), 20):
        members += [(f"{key}.png", m["png"]), (f"{key}.cls", m["cls"]), (f"{key}.pyd", payload),
                    (f"{key}.pth", payload), (f"{key}.pickle", payload)]
    shard = make_tar(tmp_path / "evil.tar", members)

    raw = list(read_samples(iter([shard]), SkipCounter()))
    assert len(raw) == 20
    assert all(not ({"pyd", "pth", "pickle"} & set(s)) for s in raw)
    assert len(eval_items(shard)) == 20
    for workers in (0, 1):
        take(loader(shard, batch=8, batches_per_epoch=3, workers=workers).batches(0), 3)
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------ errors
def test_missing_shard_path_is_a_clear_error(tmp_path):
    missing = tmp_path / "no" / "such" / "shards"
    with pytest.raises(DataError) as e:
        expand_sources(str(missing), "data.train")
    assert "data.train" in str(e.value) and str(missing) in str(e.value) and "not found" in str(e.value)


def test_missing_shard_in_brace_pattern(digits_shards):
    with pytest.raises(DataError, match="shard-000099.tar not found|not found"):
        expand_sources(f"{digits_shards}/train/shard-{{000000..000099}}.tar")


@pytest.mark.parametrize("what", ["empty_dir", "empty_list", "empty_index"])
def test_empty_shard_list_is_a_clear_error(tmp_path, what):
    if what == "empty_dir":
        spec = str(tmp_path)
    elif what == "empty_list":
        spec = []
    else:
        (tmp_path / "index.json").write_text(json.dumps({"shards": [], "samples": 0}))
        spec = str(tmp_path)
    with pytest.raises(DataError, match="empty shard list"):
        expand_sources(spec, "data.train")
    with pytest.raises(DataError, match="data.val"):
        eval_loader(spec, 8, 16, key="data.val")


# ------------------------------------------------------------------------------------------------ augment
def test_geometric_shapes_and_dtype():
    aug = SimCLRAugment(16, MEAN, STD)
    g = torch.Generator().manual_seed(0)
    img = torch.randint(0, 256, (3, 40, 27), dtype=torch.uint8)
    out = aug.geometric(img, g)
    assert out.shape == (3, 16, 16) and out.dtype == torch.uint8


def test_photometric_shapes_dtype_and_determinism():
    aug = SimCLRAugment(16, MEAN, STD)
    x = torch.randint(0, 256, (12, 3, 16, 16), dtype=torch.uint8)
    a = aug.photometric(x, torch.Generator().manual_seed(7))
    b = aug.photometric(x, torch.Generator().manual_seed(7))
    c = aug.photometric(x, torch.Generator().manual_seed(8))
    assert a.shape == x.shape and a.dtype == torch.float32 and torch.isfinite(a).all()
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    # it is a normalisation of [0, 1] pixels
    lo, hi = (0 - np.array(MEAN)) / np.array(STD), (1 - np.array(MEAN)) / np.array(STD)
    assert a.min() >= lo.min() - 1e-4 and a.max() <= hi.max() + 1e-4
    # identity settings reduce to plain normalisation
    ident = SimCLRAugment(16, MEAN, STD, jitter_p=0, grayscale_p=0, blur_p=0, hue=0)
    y = ident.photometric(x, torch.Generator().manual_seed(0))
    ref = (x.float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    assert torch.allclose(y, ref, atol=1e-5)


def test_all_shards_unreadable_is_a_clear_error_not_a_hang(tmp_path):
    """A resampled stream over nothing but garbage tars must stop with DataError, not retry forever."""
    import pytest as _pytest

    from pretrain.data import DataError
    from pretrain.data.augment import SimCLRAugment
    from pretrain.data.pipeline import ResampledBatches, Source

    bad = []
    for i in range(2):
        p = tmp_path / f"bad-{i}.tar"
        p.write_bytes(b"this is not a tar file at all" * 50)
        bad.append(str(p))
    aug = SimCLRAugment(16, [0.5] * 3, [0.5] * 3)
    ds = ResampledBatches([Source(bad)], batch_size=4, batches_per_epoch=2, augment=aug, num_views=2,
                          photometric_in_worker=True, seed=0, rank=0, shuffle_buffer=8)
    with _pytest.raises(DataError, match="look corrupt"):
        next(iter(ds))
