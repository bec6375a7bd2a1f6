"""Data faults: exact resume over corrupt samples (recorded stream positions), decompression bombs
(image size read from the header, never decoded), shards that are not tars (reported once, not drawn again)."""
from __future__ import annotations

import functools
import io
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from helpers import cli, tb_scalars, train_overrides
from test_data import _truncated, eval_items, loader, make_tar, samples_in, small_shards, take
from pretrain.data import DataError, SimCLRAugment, decode, pipeline

GARBAGE_PNG = b"\x89PNG\r\n\x1a\n" + b"not an image" * 10


def corrupt_shards(root: Path, n=120, shard_size=20, every=3):
    """Real digits shards in which every `every`-th image is garbage (a sample the decoder rejects), plus
    one shard truncated inside its 3rd image (a read error inside the tar); root/index.json lists them."""
    root = Path(root)
    good = small_shards(root / "src", n=n, shard_size=shard_size)
    names = []
    for i, path in enumerate(good):
        members = []
        for j, (key, m) in enumerate(sorted(samples_in(path).items())):
            members += [(f"{key}.png", m["png"] if j % every else GARBAGE_PNG), (f"{key}.cls", m["cls"])]
        names.append(Path(make_tar(root / f"shard-{i:02d}.tar", members)).name)
    _truncated(root / names[0], root / "shard-trunc.tar")
    names.append("shard-trunc.tar")
    (root / "index.json").write_text(json.dumps({"shards": names, "samples": n}))
    return [str(root / s) for s in names]


def _same(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert (g["epoch"], g["index"]) == (w["epoch"], w["index"])
        assert torch.equal(g["label"], w["label"])
        assert torch.equal(g["views"][0], w["views"][0])


# ------------------------------------------------------------------------------------------------ exact resume (8)
@pytest.mark.parametrize("workers", [0, 2])
def test_resume_over_corrupt_samples_sees_the_same_batches(tmp_path, workers):
    """Corrupt samples make a batch read more than batch_size samples of its worker's stream; a loader
    restarted at micro-batch k from the state of the first one yields exactly the batches k, k+1, ..."""
    shards = corrupt_shards(tmp_path)
    n, k, total = 7, 4, 10        # resume mid-epoch 0 and run across the epoch boundary
    first = loader(shards, batch=8, batches_per_epoch=n, workers=workers)
    it = first.batches(0)
    full = take(it, k)
    state = first.state_dict()
    full += take(it, total - k)
    assert first.skipped > 0
    assert json.loads(json.dumps(state)) == state and state["batch"] == k           # small, plain ints
    assert all(type(c) is int for c in state["consumed"]) and len(state["consumed"]) == max(1, workers)
    # the recorded positions are not the old arithmetic: corrupt samples were read before step k
    assert state["consumed"] != first.positions(k, None)

    resumed = loader(shards, batch=8, batches_per_epoch=n, workers=workers)
    _same(take(resumed.batches(k, state), total - k), full[k:])


def test_state_at_epoch_end_and_fallbacks_warn(tmp_path, caplog):
    shards = corrupt_shards(tmp_path)
    tl = loader(shards, batch=8, batches_per_epoch=3, workers=0)
    it = tl.batches(0)
    take(it, 3)
    assert tl.state_dict() == {"batch": 3, "num_workers": 1, "consumed": [0]}   # next epoch starts fresh
    take(it, 1)
    state = tl.state_dict()
    assert state["batch"] == 4 and state["consumed"][0] > 8
    with caplog.at_level(logging.WARNING, "pretrain.data"):
        for bad in (None, dict(state, num_workers=2), dict(state, batch=5)):
            caplog.clear()
            est = loader(shards, batch=8, batches_per_epoch=3).positions(4, bad)
            assert est == [8], bad                        # today's arithmetic: one batch of 8 before
            assert len(caplog.records) == 1 and "exact" in caplog.text, caplog.text
        caplog.clear()
        assert loader(shards, batch=8, batches_per_epoch=3).positions(3, None) == [0]    # epoch start: exact
        assert not caplog.records


@pytest.mark.slow
def test_cli_resume_over_corrupt_shards_matches_uninterrupted(tmp_path, experiment):
    """`pretrain train` 0 -> 6 with a checkpoint at step 3 (mid-epoch), over shards full of corrupt
    samples and 2 loader workers; a run dir holding only that checkpoint continues with the same losses."""
    shards = tmp_path / "shards"
    corrupt_shards(shards)
    ref, resumed = tmp_path / "ref", tmp_path / "resumed"
    kv = dict(data__train=str(shards), data__samples_per_epoch=128, data__num_workers=2, train__max_steps=6,
              checkpoint__every_steps=3, checkpoint__keep_last=5)
    ov = [o for o in train_overrides(shards, ref, **kv)]
    cli("train", experiment, *ov, check=True)
    ck = torch.load(ref / "checkpoints" / "step_00000003.pt", weights_only=True)
    (pos,) = ck["data"]                                       # one rank
    assert pos["batch"] == 3 and len(pos["consumed"]) == 2 and sum(pos["consumed"]) > 3 * 32

    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copy(ref / "checkpoints" / "step_00000003.pt", resumed / "checkpoints")
    cli("train", experiment, *train_overrides(shards, resumed, **kv), check=True)
    log_text = (resumed / "log.txt").read_text()
    assert "resumed from step 3" in log_text and "exact" not in log_text    # no fallback warning
    want, got = tb_scalars(ref), tb_scalars(resumed)
    assert sorted(got) == [4, 5, 6]
    for step in got:
        assert got[step] == pytest.approx(want[step], rel=1e-6, abs=1e-6), (step, got, want)
    assert len({round(v, 5) for v in got.values()}) > 1


# ------------------------------------------------------------------------------------------------ bombs (10)
@functools.lru_cache(maxsize=None)
def bomb(side: int) -> bytes:
    """A side x side PNG of a few tens of kB (1-bit, almost all black): side^2 x 3 bytes as decoded RGB
    (588 MB at 14000). Made at 1 bit per pixel, so building it takes side^2 / 8 bytes."""
    im = Image.new("1", (side, side))
    im.paste(1, (0, 0, 64, 64))
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=True)
    data = buf.getvalue()
    assert len(data) < 100_000, len(data)
    return data


@pytest.fixture(scope="module")
def bomb_png():
    return bomb(14000)


@pytest.fixture
def decoded(monkeypatch):
    """Sizes of the encoded images handed to the decoder; a bomb handed to it raises instead of decoding."""
    sizes, real = [], pipeline.decode_image

    def spy(data, *a, **kw):
        sizes.append(len(data))
        if len(data) > 2000:   # our digits PNGs are < 1 kB; only the bombs are bigger
            raise MemoryError("a decompression bomb reached the decoder")
        return real(data, *a, **kw)
    monkeypatch.setattr(pipeline, "decode_image", spy)
    return sizes


def _bomb_shard(tmp_path, bomb, n_good=15):
    good = samples_in(small_shards(tmp_path / "src", n=n_good, shard_size=n_good)[0])
    members = []
    for j, (key, m) in enumerate(sorted(good.items())):
        members += [(f"{key}.png", m["png"]), (f"{key}.cls", m["cls"])]
        if j == 3:
            members += [("bomb.png", bomb), ("bomb.cls", b"1")]
    return make_tar(tmp_path / "bomb.tar", members)


def test_decompression_bomb_is_skipped_without_decoding(tmp_path, bomb_png, decoded, caplog):
    shard = _bomb_shard(tmp_path, bomb_png)
    with pytest.raises(DataError, match="over 178956970 pixels.*max_image_pixels"):   # past PIL's own ceiling
        decode({"__key__": "bomb", "png": bomb_png})
    with pytest.raises(DataError, match="10000x10000 image is over data.max_image_pixels=89478485"):
        decode({"__key__": "bomb", "png": bomb(10000)})
    tl = loader(shard, batch=8, batches_per_epoch=4, workers=0)
    with caplog.at_level(logging.WARNING, "pretrain.data"):
        batches = take(tl.batches(0), 4)
    assert all(b["views"][0].shape == (2, 8, 3, 16, 16) for b in batches)
    assert tl.skipped >= 1 and "max_image_pixels" in caplog.text
    assert decoded and max(decoded) < 2000         # the bomb never reached the decoder
    decoded.clear()
    assert len(eval_items(shard)) == 15            # the eval reader skips it too
    assert decoded and max(decoded) < 2000


def test_max_image_pixels_is_the_limit(tmp_path, decoded):
    """A 100 x 100 PNG passes the default limit and is skipped under data.max_image_pixels=9999; the
    config key reaches the training loader."""
    from pretrain.config import load_config
    from pretrain.data import build_train_loader

    buf = io.BytesIO()
    Image.new("RGB", (100, 100), (9, 99, 199)).save(buf, format="PNG")
    sample = {"__key__": "x", "png": buf.getvalue(), "cls": b"2"}
    img, label = decode(sample)
    assert img.shape == (3, 100, 100) and label == 2
    assert decode(sample, max_pixels=10_000)[0].shape == (3, 100, 100)
    with pytest.raises(DataError, match="100x100"):
        decode(sample, max_pixels=9_999)
    from pretrain.methods import create_method

    shard = make_tar(tmp_path / "a.tar", [("x.png", buf.getvalue()), ("x.cls", b"2")])
    assert load_config(None, [f"data.train={shard}"]).data.max_image_pixels == 89_478_485    # PIL's default
    for bad in ("0", "-5", "1.5e8", "178956971"):
        cfg = load_config(None, [f"data.train={shard}", f"data.max_image_pixels={bad}", "model.name=resnet10t"])
        with pytest.raises(DataError, match="data.max_image_pixels must be"):
            build_train_loader(cfg, create_method(cfg), 4, 1, 0, "cpu")
    cfg = load_config(None, [f"data.train={shard}", "data.max_image_pixels=9999", "model.name=resnet10t"])
    tl = build_train_loader(cfg, create_method(cfg), 4, 1, 0, "cpu")
    assert tl.dataset.max_image_pixels == 9999


# ------------------------------------------------------------------------------------------------ unreadable shards (11)
@pytest.mark.parametrize("workers", [0, 2])
def test_non_tar_shard_is_reported_once_and_not_drawn_again(tmp_path, caplog, workers):
    good = small_shards(tmp_path / "good", n=20, shard_size=20)            # one clean shard
    bad = tmp_path / "not-a-tar.tar"
    bad.write_bytes(b"this is not a tar file at all" * 50)
    tl = loader(good + [str(bad)], batch=8, batches_per_epoch=6, workers=workers)
    with caplog.at_level(logging.WARNING, "pretrain.data"):
        batches = take(tl.batches(0), 12)                                  # two epochs
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and str(bad) in warnings[0], warnings
    assert tl.skipped == 1                                                 # counted once
    assert all(b["views"][0].shape == (2, 8, 3, 16, 16) for b in batches)
    assert tl.unreadable == {str(bad)}


@pytest.mark.parametrize("mixed", [False, True])
def test_every_shard_of_a_source_unreadable_is_a_data_error(tmp_path, mixed):
    bad = []
    for i in range(3):
        p = tmp_path / f"bad-{i}.tar"
        p.write_bytes(b"garbage" * 100 if i else b"")
        bad.append(str(p))
    spec = [{"urls": small_shards(tmp_path / "good", n=20, shard_size=20), "weight": 1}, {"urls": bad, "weight": 1}] \
        if mixed else bad
    with pytest.raises(DataError, match="none of the 3 shards") as e:
        take(loader(spec, batch=8, batches_per_epoch=50).batches(0), 50)
    assert "bad-" in str(e.value)
