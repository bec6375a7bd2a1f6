"""Image sources for `pretrain shards`: an image folder with class subfolders, or a built-in dataset
that a package ships (no downloads on these machines)."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Iterator, List, Tuple

import numpy as np
from PIL import Image

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
Sample = Tuple[bytes, str, int, dict]  # encoded image, extension, label, metadata


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG" if fmt == "jpg" else "PNG", **({"quality": 95} if fmt == "jpg" else {}))
    return buf.getvalue()


def digits(size: int = 32, fmt: str = "png") -> Tuple[List[str], Iterator[Sample]]:
    """scikit-learn's 1797 real 8x8 handwritten digits (16 grey levels), upscaled to size x size RGB."""
    from sklearn.datasets import load_digits

    d = load_digits()
    classes = [str(c) for c in d.target_names]

    def gen():
        for i, (x, y) in enumerate(zip(d.images, d.target)):
            arr = (x / 16.0 * 255).round().astype(np.uint8)
            img = Image.fromarray(arr, "L").resize((size, size), Image.BICUBIC).convert("RGB")
            yield _encode(img, fmt), fmt, int(y), {"source": "sklearn.digits", "index": i, "orig_size": [8, 8]}

    return classes, gen()


def image_folder(root: str, fmt: str = "keep") -> Tuple[List[str], Iterator[Sample]]:
    """root/<class>/<image>; classes are the sorted subfolder names. Files are copied as they are
    when fmt is "keep" and they are JPEG/PNG, otherwise re-encoded."""
    root_p = Path(root)
    classes = sorted(p.name for p in root_p.iterdir() if p.is_dir())
    if not classes:
        raise ValueError(f"{root} has no class subfolders; expected {root}/<class>/<image>.jpg")
    files = [(p, ci) for ci, c in enumerate(classes) for p in sorted((root_p / c).rglob("*"))
             if p.suffix.lower() in IMAGE_EXTS]
    if not files:
        raise ValueError(f"no images ({', '.join(sorted(IMAGE_EXTS))}) under {root}")

    def gen():
        for p, label in files:
            ext = p.suffix.lower().lstrip(".")
            ext = "jpg" if ext == "jpeg" else ext
            if fmt == "keep" and ext in ("jpg", "png"):
                data = p.read_bytes()
            else:
                ext = "png" if fmt == "keep" else fmt
                data = _encode(Image.open(p).convert("RGB"), ext)
            yield data, ext, label, {"source": str(p.relative_to(root_p))}

    return classes, gen()


BUILTIN = {"digits": digits}


def open_source(src: str, size: int, fmt: str):
    if src in BUILTIN:
        return BUILTIN[src](size=size, fmt="png" if fmt == "keep" else fmt)
    if Path(src).is_dir():
        return image_folder(src, fmt)
    raise ValueError(f"source {src!r} is neither an image folder nor a built-in ({', '.join(BUILTIN)})")
