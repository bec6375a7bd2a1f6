"""Generative metrics users can compare with papers, sharded across ranks (`pretrain eval gen`).

* Inception features through torch-fidelity 0.4.0 from a LOCAL weights file (nothing is downloaded):
  the pt_inception-2015-12-05 state dict torch-fidelity / pytorch-fid use (FID and IS as in the papers), or
  torchvision's ImageNet Inception-v3 as safetensors (its FID is NOT the standard one: other weights, other
  resizing and normalisation). The user's file is read safely (safetensors or torch.load(weights_only=True)),
  checked key by key against the architecture, and torch-fidelity gets a copy we wrote ourselves.
* Frechet distance (`generative.frechet_distance`), Inception Score (torch-fidelity's `isc_features_to_metric`
  on the unbiased logits), precision/recall (Kynkaenniemi et al. 2019, k = 3) in any feature space.
* Sharding: rank r of W handles sample indices r, r+W, ...; sample i depends on (seed, i) only
  (`sample_generators`), and `gather_rows` puts the rows back in index order, so W ranks give the set of one.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Dict, Sequence, Tuple

import torch
import torch.nn.functional as F

INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 "weights-inception-2015-12-05-6726825d.pth")
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def missing_inception_error() -> str:
    """The one-line error for an Inception metric without --inception."""
    return (f"Inception metrics need local weights: download {INCEPTION_URL} (torch-fidelity's pt_inception-2015-12-05, "
            f"the weights of paper FIDs) on a machine with internet and pass --inception PATH")


def read_weights(path) -> Dict[str, torch.Tensor]:
    """A state dict from `path` without unsafe unpickling: safetensors, or torch.load(weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--inception {path} not found; download {INCEPTION_URL} and pass its path")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:   # a pickle with code in it, a truncated file, not a weights file at all
        raise ValueError(f"--inception {path} is not a plain weights file ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:160] if str(e) else ''}); pass torch-fidelity's "
                         f"pt_inception .pth or torchvision's Inception-v3 as .safetensors") from None
    if not isinstance(sd, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in sd.items()):
        raise ValueError(f"--inception {path} is not a state dict of tensors; pass torch-fidelity's pt_inception .pth "
                         f"or torchvision's Inception-v3 as .safetensors")
    return sd


def check_state_dict(sd: Dict[str, torch.Tensor], want: Dict[str, torch.Tensor], path, arch: str) -> Dict[str, torch.Tensor]:
    """`sd` checked against the architecture's state dict `want`: a one-line error naming the first key that is
    missing, unexpected or of another shape; BatchNorm's num_batches_tracked may be absent (taken from `want`)."""
    for k, v in want.items():
        if k not in sd and not k.endswith("num_batches_tracked"):
            raise ValueError(f"--inception {path}: key {k} of {arch} is missing; is it an Inception-v3 weights file?")
        if k in sd and tuple(sd[k].shape) != tuple(v.shape):
            raise ValueError(f"--inception {path}: {k} has shape {list(sd[k].shape)}, {arch} needs {list(v.shape)}")
    extra = [k for k in sd if k not in want]
    if extra:
        raise ValueError(f"--inception {path}: unexpected key {extra[0]} for {arch}")
    return {k: sd[k].to(v.dtype) if k in sd else v for k, v in want.items()}


class Inception(torch.nn.Module):
    """uint8 images [B, 3, H, W] (any size: resized to 299) -> (pool features [B, 2048], unbiased logits
    [B, K] = pool @ fc.weight^T), both float32. `standard`: torch-fidelity's pt_inception weights (paper FID/IS)."""

    def __init__(self, net: torch.nn.Module, standard: bool):
        super().__init__()
        self.net, self.standard = net.eval().requires_grad_(False), standard
        if not standard:
            self._pool = None
            net.avgpool.register_forward_hook(lambda m, i, o: setattr(self, "_pool", o.flatten(1)))

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.standard:   # torch-fidelity resizes (TF1-compatible bilinear) and normalises itself
            pool, logits = self.net(images)
            return pool, logits
        x = F.interpolate(images.float() / 255, size=(299, 299), mode="bilinear", align_corners=False)
        mean = torch.tensor(_IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(_IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
        self.net((x - mean) / std)
        return self._pool.float(), (self._pool @ self.net.fc.weight.t()).float()


def load_inception(path, device="cpu") -> Inception:
    """An `Inception` from a local weights file: torch-fidelity's pt_inception state dict (fc 1008 classes; .pth or
    .safetensors) or torchvision's Inception-v3 (fc 1000 classes, AuxLogits; its FID is not the standard one)."""
    sd = read_weights(path)
    fc = sd.get("fc.weight")
    if fc is not None and tuple(fc.shape) == (1000, 2048) or "AuxLogits.fc.weight" in sd:
        import torchvision

        # transform_input=True, as torchvision builds it for these weights (ported from TF, they take [-1, 1]
        # inputs): it maps the ImageNet-normalised input below back to that range
        net = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False, transform_input=True)
        net.load_state_dict(check_state_dict(sd, net.state_dict(), path, "torchvision's inception_v3"))
        return Inception(net, standard=False).to(device)
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    want = _fidelity_state_dict(FeatureExtractorInceptionV3)
    verified = check_state_dict(sd, want, path, "torch-fidelity's InceptionV3")
    # torch-fidelity unpickles its file with weights_only=False: it only ever gets this copy, written here from
    # verified tensors, in a directory only we can write to
    with tempfile.TemporaryDirectory(prefix="pretrain-inception-") as tmp:
        torch.save(verified, Path(tmp) / "inception.pth")
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                          feature_extractor_weights_path=str(Path(tmp) / "inception.pth"))
    return Inception(net, standard=True).to(device)


def _fidelity_state_dict(cls) -> Dict[str, torch.Tensor]:
    """The keys and shapes of torch-fidelity's InceptionV3, from its own __init__ on the meta device, fed an empty
    state dict we wrote (nothing downloaded, nothing loaded); num_batches_tracked as zeros."""
    class Skeleton(cls):
        def load_state_dict(self, state_dict, strict=True, assign=False):
            return None

    with tempfile.TemporaryDirectory(prefix="pretrain-inception-") as tmp, torch.device("meta"):
        torch.save({}, Path(tmp) / "empty.pth")
        net = Skeleton("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(Path(tmp) / "empty.pth"))
    return {k: torch.zeros(v.shape, dtype=v.dtype) if k.endswith("num_batches_tracked") else v
            for k, v in net.state_dict().items()}


def inception_score(logits: torch.Tensor, splits: int = 10) -> Tuple[float, float]:
    """Inception Score (mean, std over `splits`, 10 as in the papers; fewer when N < 2 * splits, so that every split
    has 2 samples or more) from unbiased logits [N, K], by torch-fidelity's own function."""
    from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric

    r = isc_features_to_metric(logits.double().cpu(), splits=max(1, min(splits, len(logits) // 2)))
    return r[KEY_METRIC_ISC_MEAN], r[KEY_METRIC_ISC_STD]


def _knn_radius(x: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    """Distance of each row of x [N, D] to its k-th nearest other row -> [N] (the row itself is at distance 0)."""
    return torch.cat([torch.cdist(c, x).kthvalue(k + 1, dim=1).values for c in x.split(chunk)])


def _inside(x: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, chunk: int) -> torch.Tensor:
    """Fraction of rows of x [N, D] inside any ball (centres [M, D], radii [M])."""
    hits = [(torch.cdist(c, centres) <= radii[None]).any(1) for c in x.split(chunk)]
    return torch.cat(hits).double().mean()


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3, chunk: int = 4096) -> Tuple[float, float]:
    """Improved precision and recall (Kynkaenniemi et al. 2019) in float64: precision = share of fake [M, D]
    inside the union of the real [N, D] rows' k-NN balls; recall = share of real inside the fake rows' balls."""
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} real and generated samples, "
                         f"got {len(real)} and {len(fake)}; raise --n / --max-samples")
    real, fake = real.double(), fake.double()
    precision = _inside(fake, real, _knn_radius(real, k, chunk), chunk)
    recall = _inside(real, fake, _knn_radius(fake, k, chunk), chunk)
    return float(precision), float(recall)


def shard(n: int, rank: int, world_size: int) -> range:
    """The sample indices rank `rank` of `world_size` handles: rank, rank + W, ... < n."""
    return range(rank, n, world_size)


def gather_rows(x: torch.Tensor, n: int) -> torch.Tensor:
    """Every rank's rows x [len(shard(n, r, W)), D] (CPU) -> all n rows [n, D] in index order, on every rank
    (padded to equal size for the all-gather)."""
    import torch.distributed as dist

    from pretrain import comm

    W = comm.world_size()
    if W == 1:
        return x
    m = -(-n // W)                                                       # rows of rank 0, the most
    padded = torch.zeros(m, *x.shape[1:], dtype=x.dtype)
    padded[:len(x)] = x
    out = [torch.empty_like(padded) for _ in range(W)]
    dist.all_gather(out, padded)
    return torch.stack(out, 1).reshape(m * W, *x.shape[1:])[:n]          # row j*W + r = index r + j*W


@torch.no_grad()
def generate(method, indices: Sequence[int], seed: int, batch_size: int, **kw) -> torch.Tensor:
    """uint8 samples [len(indices), 3, S, S]; sample i from `sample_generators(seed, [i])` whatever the batch. A
    class-conditional model without `classes` in kw draws class i % num_classes for sample i (balanced classes,
    the same for any split over ranks and batches)."""
    from pretrain.evaluation.generative import to_uint8
    from pretrain.methods.generative import sample_generators

    idx = list(indices)
    by_index = getattr(method, "num_classes", 0) and kw.get("classes") is None

    def draw(b):
        extra = {"classes": torch.tensor(b) % method.num_classes} if by_index else {}
        return to_uint8(method.sample(len(b), generator=sample_generators(seed, b), **kw, **extra)).cpu()
    out = [draw(b) for b in (idx[i:i + batch_size] for i in range(0, len(idx), batch_size))]
    return torch.cat(out) if out else torch.empty(0, dtype=torch.uint8)


@torch.no_grad()
def extract(fn, images: torch.Tensor, n: int, batch_size: int) -> Tuple[torch.Tensor, ...]:
    """This rank's uint8 images [k, 3, H, W] (its `shard` of n) through `fn` (uint8 batch -> a tensor or a tuple
    of tensors [b, D]) in batches -> every output for all n rows [n, D] in index order, on every rank (CPU)."""
    outs = [fn(b) for b in images.split(batch_size)]
    outs = [o if isinstance(o, tuple) else (o,) for o in outs]
    return tuple(gather_rows(torch.cat([o[j] for o in outs]).float().cpu(), n) for j in range(len(outs[0])))


def sample_digests(images: torch.Tensor, n: int) -> str:
    """sha256 over the per-sample sha256 of uint8 images [k, ...] (this rank's shard of n) in index order: the same
    hex string for the same sample set however it was split over ranks and batches."""
    import hashlib

    import numpy as np

    local = torch.stack([torch.from_numpy(np.frombuffer(hashlib.sha256(x.numpy().tobytes()).digest(), dtype=np.uint8))
                         for x in images.cpu()])                          # [k, 32]
    return hashlib.sha256(gather_rows(local, n).numpy().tobytes()).hexdigest()
