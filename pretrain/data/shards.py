"""Write WebDataset tar shards: <out>/{train,val}/shard-NNNNNN.tar plus index.json files.

Each sample is `<key>.{jpg|png}`, `<key>.cls` (integer label as text) and `<key>.json` (metadata).
Every file is written under a temporary name and renamed when complete, and index.json is written
last, so an interrupted run never leaves a half-written shard or an index pointing at one.
"""
from __future__ import annotations

import io
import json
import random
import tarfile
from pathlib import Path
from typing import Iterator, List

from pretrain.utils import atomic_path, atomic_write_text


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0          # reproducible shards
    tar.addfile(info, io.BytesIO(data))


class ShardWriter:
    """Writes samples into shards of `shard_size` samples; each shard is renamed into place when closed."""

    def __init__(self, out_dir: Path, shard_size: int):
        self.out_dir, self.shard_size = Path(out_dir), shard_size
        self.shards: List[str] = []
        self.count = 0
        self._tar = self._ctx = None
        self._n_in_shard = 0

    def _open(self):
        name = f"shard-{len(self.shards):06d}.tar"
        self._ctx = atomic_path(self.out_dir / name)
        self._tar = tarfile.open(self._ctx.__enter__(), "w")
        self.shards.append(name)
        self._n_in_shard = 0

    def _close(self):
        if self._tar is not None:
            self._tar.close()
            self._ctx.__exit__(None, None, None)
            self._tar = None

    def write(self, key: str, image: bytes, ext: str, label: int, meta: dict) -> None:
        if self._tar is None or self._n_in_shard >= self.shard_size:
            self._close()
            self._open()
        _add(self._tar, f"{key}.{ext}", image)
        _add(self._tar, f"{key}.cls", str(label).encode())
        _add(self._tar, f"{key}.json", json.dumps({"label": label, **meta}).encode())
        self._n_in_shard += 1
        self.count += 1

    def abort(self):
        if self._tar is not None:
            self._tar.close()
            self._ctx.__exit__(KeyboardInterrupt, None, None)  # removes the temporary
            self._tar = None
            self.shards.pop()

    def finish(self, classes) -> dict:
        self._close()
        index = {"shards": self.shards, "samples": self.count, "shard_size": self.shard_size, "classes": list(classes)}
        atomic_write_text(self.out_dir / "index.json", json.dumps(index, indent=1))
        return index


def write_shards(samples: Iterator, classes, out_dir, shard_size: int = 1000, val_fraction: float = 0.1,
                 seed: int = 0) -> dict:
    """Split `samples` (image bytes, ext, label, meta) into train/val at random and write both.

    Returns the top-level index {"train": {...}, "val": {...}, "classes": [...]}, also saved as
    <out_dir>/index.json.
    """
    if shard_size < 1:
        raise ValueError(f"--shard-size must be >= 1, got {shard_size}")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    samples = list(samples)
    if not samples:
        raise ValueError("the source has no images")
    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)   # shuffle before splitting, so shards mix classes
    n_val = int(round(len(samples) * val_fraction))
    out = Path(out_dir)
    index = {"classes": list(classes)}
    for split, idx in (("val", order[:n_val]), ("train", order[n_val:])):
        if not idx:
            continue
        w = ShardWriter(out / split, shard_size)
        try:
            for i in idx:
                image, ext, label, meta = samples[i]
                w.write(f"{i:08d}", image, ext, label, meta)
        except BaseException:
            w.abort()
            raise
        index[split] = {k: v for k, v in w.finish(classes).items() if k != "classes"}
    atomic_write_text(out / "index.json", json.dumps(index, indent=1))
    return index
