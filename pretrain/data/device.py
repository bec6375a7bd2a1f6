"""The GPU data path (`data.decode_on=device`): JPEG decoding and the geometric stage on the accelerator.

What runs where, per training batch:

* loader worker: reads the sample, parses the image header (size, the `max_image_pixels` check, as the
  worker path does), checks that JPEG bytes look whole (`looks_like_jpeg`: SOI marker, a colour mode the
  decoder handles, an EOI marker at the end) and draws each view's crop box and flip from the batch
  generator with the worker path's own code (`SimCLRAugment.geometric_params`: the same draws in the same
  order, so the same crops for the same seed). It ships the encoded bytes, not pixels. Anything else (PNG,
  WebP, CMYK or truncated JPEG) is decoded in the worker as before and shipped as pixels; what fails there
  is a counted skip and the batch reads one more sample, exactly as on the worker path.
* device (`device_views`): one batched `torchvision.io.decode_jpeg(list, device=...)` (nvJPEG on CUDA);
  the images, padded to the batch's largest height and width, go through one `torchvision.ops.roi_align`
  call per view size (bilinear, `aligned=True`, adaptive sampling ratio), are flipped where drawn and
  rounded to uint8, giving the [V_g, B, 3, S_g, S_g] groups the worker path gives. The photometric stage
  follows on the device as with `augment_on=device`.

A batched decode that raises (torchvision raises for the whole list when one member is bad) is redone one
image at a time on the device, then on the CPU (libjpeg is more lenient than nvJPEG); an image that none
of them decodes is replaced by the next decodable sample of the same batch (its views, label and masks;
`replacements`), counted as a skipped sample and logged, so the batch keeps its size on every rank and
the stream position (fixed in the worker) is unchanged; the worker-side checks make this rare.

Padding: roi_align takes one [N, C, H, W] tensor, so images of different sizes are placed top-left in a
[B, 3, H_max, W_max] float tensor; the row and column just past each image repeat its last row and
column, so a bilinear sample between an image's last pixel centre and its border reads the edge value,
as roi_align's own clamp at the tensor border does, and nothing further out is ever sampled. Images all of
one size are stacked and padded in one call each.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.ops import roi_align

JPEG_MODES = ("L", "RGB")   # PIL modes of JPEGs sent undecoded (CMYK/YCCK ones are decoded in the worker)


def looks_like_jpeg(data: bytes, mode: str, fmt: str) -> bool:
    """Whether encoded bytes can go to the device decoder: a JPEG (PIL's header `fmt`) of a plain colour
    `mode`, starting with SOI and ending with EOI (within trailing padding), i.e. not truncated."""
    return fmt == "JPEG" and mode in JPEG_MODES and data[:3] == b"\xff\xd8\xff" and b"\xff\xd9" in data[-64:]


def pack(images: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per sample a 1-d uint8 tensor (encoded JPEG) or [3, h, w] uint8 pixels -> one flat uint8 buffer and
    [B, 4] int64 rows (offset, 0, 0, 0) for encoded data or (offset, 3, h, w) for pixels: one shared-memory
    tensor per batch for the DataLoader to send instead of B small ones."""
    rows, off = [], 0
    for x in images:
        rows.append([off, *(x.shape if x.dim() == 3 else (0, 0, 0))])
        off += x.numel()
    flat = torch.cat([x.reshape(-1) for x in images]) if images else torch.empty(0, dtype=torch.uint8)
    return flat, torch.tensor(rows, dtype=torch.int64).view(-1, 4)


def unpack(flat: torch.Tensor, rows: torch.Tensor) -> List[torch.Tensor]:
    """pack's inverse: the per-sample tensors (views into `flat`)."""
    ends = rows[1:, 0].tolist() + [flat.numel()]
    return [flat[o:e] if c == 0 else flat[o:e].view(c, h, w) for (o, c, h, w), e in zip(rows.tolist(), ends)]


def decode_batch(items: Sequence[torch.Tensor], sizes: Sequence[Tuple[int, int]], device) -> Tuple[list, list]:
    """Encoded JPEGs (1-d uint8, on CPU) and already-decoded [3, h, w] images -> [3, h, w] uint8 on `device`
    (None where undecodable) and one message per failure. `sizes`: the (h, w) each header gave; a decoded
    image of another size counts as undecodable (its crop boxes were drawn for that size)."""
    device = torch.device(device)
    out: list = [None] * len(items)
    enc = [i for i, x in enumerate(items) if x.dim() == 1]
    for i, x in enumerate(items):
        if x.dim() == 3:
            out[i] = x.to(device, non_blocking=True)
    why = {}
    try:   # one batched call; torchvision raises for the whole list when one member is bad
        for i, img in zip(enc, decode_jpeg([items[i] for i in enc], mode=ImageReadMode.RGB, device=device)):
            out[i] = img
    except Exception:
        for i in enc:   # find the bad ones: each alone on the device, then on the CPU (libjpeg is more lenient)
            for dev in dict.fromkeys([device, torch.device("cpu")]):
                try:
                    out[i] = decode_jpeg(items[i], mode=ImageReadMode.RGB, device=dev).to(device)
                    break
                except Exception as e:
                    why[i] = str(e).strip().splitlines()[-1][-200:]
    errors = []
    for i in range(len(items)):
        if out[i] is None:
            errors.append(f"sample {i} of the batch: JPEG data the decoder rejects ({why.get(i)})")
        elif tuple(out[i].shape[-2:]) != tuple(sizes[i]):
            errors.append(f"sample {i} of the batch: decoded to {tuple(out[i].shape[-2:])}, header said {tuple(sizes[i])}")
            out[i] = None
    return out, errors


def padded(images: Sequence[torch.Tensor]) -> torch.Tensor:
    """[3, h_i, w_i] uint8 images -> [B, 3, H_max, W_max] float32, each top-left, with one repeated row and
    column past its bottom and right edges (module docstring)."""
    if len({tuple(x.shape) for x in images}) == 1:   # one size (pre-resized shards): one stack, one pad
        return F.pad(torch.stack(images).float(), (0, 1, 0, 1), mode="replicate")
    H = max(x.shape[1] for x in images) + 1
    W = max(x.shape[2] for x in images) + 1
    out = torch.zeros(len(images), 3, H, W, device=images[0].device)
    for b, x in enumerate(images):
        out[b, :, :x.shape[1], :x.shape[2]] = x
    dev = out.device
    b = torch.arange(len(images), device=dev)
    h = torch.tensor([x.shape[1] for x in images], device=dev)
    w = torch.tensor([x.shape[2] for x in images], device=dev)
    out[b, :, :, w] = out[b, :, :, w - 1]     # [B, 3, H]: repeat each image's last column (zeros below it stay zeros)
    out[b, :, h, :] = out[b, :, h - 1, :]     # [B, 3, W]: then its last row, corner included
    return out


def roi_crops(images: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor, size: int) -> torch.Tensor:
    """images [B, 3, H, W] float; boxes [V, B, 4] (top, left, height, width) in pixels; flips [V, B] bool ->
    [V, B, 3, size, size] uint8: view v of sample b is the box resized to size x size (bilinear; areas
    larger than the output averaged over ceil(box/size)^2 samples per output pixel), flipped where drawn."""
    V, B = boxes.shape[:2]
    t, l, h, w = boxes.to(images.device, torch.float32).unbind(-1)                    # [V, B] each
    idx = torch.arange(B, device=images.device, dtype=torch.float32).expand(V, B)
    rois = torch.stack([idx, l, t, l + w, t + h], -1).view(V * B, 5)                   # (b, x1, y1, x2, y2)
    y = roi_align(images, rois, (size, size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)  # [V*B, 3, S, S]
    y = torch.where(flips.to(images.device).view(V * B, 1, 1, 1), y.flip(-1), y)
    return y.round_().clamp_(0, 255).to(torch.uint8).view(V, B, 3, size, size)


def device_views(batch: dict, augment, device):
    """A worker's device-path batch ("encoded", "rows", "sizes", "boxes", "flips") -> (per view group
    [V_g, B, 3, S_g, S_g] uint8 on `device`, per position the sample used (None: all decoded), failure
    messages). Groups None when no sample decodes."""
    items = unpack(batch.pop("encoded"), batch.pop("rows"))
    sizes = batch.pop("sizes").tolist()
    boxes, flips = batch.pop("boxes"), batch.pop("flips")                              # [V, B, 4], [V, B]
    images, errors = decode_batch(items, sizes, device)
    ok = [i for i, x in enumerate(images) if x is not None]
    if not ok:
        return None, None, errors
    src = replacements([x is not None for x in images])
    x = padded([images[i] for i in src])
    if src != list(range(len(images))):
        boxes, flips = boxes[:, src], flips[:, src]
    groups = [roi_crops(x, boxes[idx], flips[idx], augment.augs[idx[0]].size) for idx in augment.groups]
    return groups, (None if len(ok) == len(images) else src), errors


def replacements(ok: Sequence[bool]) -> List[int]:
    """Per batch position the sample it takes: itself where decoded, else the next decoded one (cyclic),
    so the batch keeps its size (methods gather batch-sized tensors across ranks). Needs one True."""
    n = len(ok)
    return [next(j % n for j in range(i, i + n) if ok[j % n]) for i in range(n)]
