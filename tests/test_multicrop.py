"""Multi-crop: views of several sizes through the real pipeline, delivered as one tensor per size
(deterministic by seed, resumable, augmented in the worker or on the device), the config rules for
their sizes, and the per-group LR keys and step hook that the new methods rely on."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn as nn
from torchvision.transforms.v2 import functional as TF

from pretrain.config import ConfigError, load_config
from pretrain.data import build_train_loader
from pretrain.data.views import ViewSpec, multi_crop, resolve_views, view_groups
from pretrain.methods import Method

GLOBAL = ViewSpec(crop_scale=(0.4, 1.0))
LOCAL = ViewSpec(crop_scale=(0.05, 0.4))


class _MultiCrop:
    """What build_train_loader reads of a method: its views (2 x data.image_size + 3 x 8 px)."""
    views = multi_crop(GLOBAL, LOCAL, num_global=2, num_local=3, local_size=8)


def _loader(shards, *extra, workers=0, where="worker", method=_MultiCrop):
    cfg = load_config(None, [f"data.train={shards}/train", "data.image_size=16", f"data.num_workers={workers}",
                             "data.augment_on=worker", "seed=3", *extra])
    loader = build_train_loader(cfg, method, 6, 4, 0, "cpu")
    if where == "device":
        loader.dataset.photometric_in_worker = False    # as on CUDA: uint8 crops, photometric in the main process
    return loader


def test_multi_crop_declares_globals_then_locals():
    views = multi_crop(GLOBAL, LOCAL, num_global=2, num_local=6, local_size=96)
    assert [v.size for v in views] == [None] * 2 + [96] * 6
    assert view_groups(views, 224) == [(224, [0, 1]), (96, [2, 3, 4, 5, 6, 7])]
    assert views[0].crop_scale == (0.4, 1.0) and views[-1].crop_scale == (0.05, 0.4)


def test_views_of_one_size_must_be_contiguous():
    """A view of another size between two of one size would need a tensor per size with a hole in it."""
    with pytest.raises(ConfigError, match="views of one size must come one after another"):
        resolve_views([ViewSpec(), ViewSpec(size=8), ViewSpec()], image_size=16)
    # data.views can give a view its size (here: the second of two views becomes a local crop)
    specs = resolve_views([ViewSpec(), ViewSpec()], views=[{}, {"size": 8}], image_size=16)
    assert view_groups(specs, 16) == [(16, [0]), (8, [1])]


@pytest.mark.parametrize("where", ["worker", "device"])
def test_batch_has_one_tensor_per_size(digits_shards, where):
    batch = next(_loader(digits_shards, where=where).batches(0))
    assert [tuple(v.shape) for v in batch["views"]] == [(2, 6, 3, 16, 16), (3, 6, 3, 8, 8)]
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in batch["views"])
    # every view is its own crop: no two views of a sample are equal
    views = [v for g in batch["views"] for v in g]
    assert all(not torch.equal(a, b) for a, b in itertools.combinations(views[:2], 2))
    assert all(not torch.equal(a, b) for a, b in itertools.combinations(views[2:], 2))


def test_multi_crop_batches_are_deterministic_and_resume_exactly(digits_shards):
    """Same seed: the same batches, with worker processes too; resuming at batch 3 from the loader
    state recorded there gives batches 3.. of the uninterrupted stream."""
    def take(loader, start=0, state=None, n=5):
        return [b["views"] for b in itertools.islice(loader.batches(start, state), n)]

    want = take(_loader(digits_shards, workers=2))
    again = take(_loader(digits_shards, workers=2))
    first = _loader(digits_shards, workers=2)
    it = first.batches(0)
    for _ in range(3):
        next(it)
    state = first.state_dict()
    it.close()
    resumed = take(_loader(digits_shards, workers=2), 3, state, n=2)
    for got, ref in zip(again + resumed, want + want[3:5]):
        assert all(torch.equal(x, y) for x, y in zip(got, ref))
    other = take(_loader(digits_shards, "seed=4"), n=1)[0]
    assert not torch.equal(other[1], want[0][1])


def test_a_local_crop_is_the_image_at_its_own_size(digits_shards):
    """With every random op off and crops of the whole image, view v is the 16 px image resized to its
    view's side by torchvision (antialiased): the size reaches the crop, not a resize after it."""
    off = ["data.augment.crop_scale=[1.0,1.0]", "data.augment.crop_ratio=[1.0,1.0]", "data.augment.flip_p=0.0",
           "data.augment.jitter_p=0.0", "data.augment.grayscale_p=0.0", "data.augment.blur_p=0.0",
           "data.augment.solarize_p=0.0", "data.mean=[0.0,0.0,0.0]", "data.std=[1.0,1.0,1.0]"]
    batch = next(_loader(digits_shards, *off).batches(0))
    globals_, locals_ = (torch.round(g * 255).to(torch.uint8) for g in batch["views"])   # back to pixels
    want = TF.resize(globals_[0], [8, 8], antialias=True)                                # [B, 3, 8, 8]
    assert torch.equal(globals_[0], globals_[1])
    for v in locals_:
        assert (v.int() - want.int()).abs().max() <= 1


# ------------------------------------------------------------------------------------------------ engine hooks
class _Groups(Method):
    """Three parameter groups: scheduled, scaled (lr_scale 0.1) and fixed at the peak (fixed_lr)."""

    def __init__(self):
        super().__init__(nn.Linear(2, 2))
        self.b, self.c = nn.Linear(2, 2), nn.Linear(2, 2)
        self.a = self.backbone

    def param_groups(self, wd, phase="main"):
        return [{"params": list(self.a.parameters()), "weight_decay": wd},
                {"params": list(self.b.parameters()), "weight_decay": 0.0, "lr_scale": 0.1},
                {"params": list(self.c.parameters()), "weight_decay": 0.0, "fixed_lr": True}]

    def training_step(self, batch, ctx):
        x = batch["x"]
        return {"loss": (self.a(x) + self.b(x) + self.c(x)).pow(2).mean()}


@pytest.mark.parametrize("backend", ["ddp", "deepspeed"])
def test_param_group_lr_scale_and_fixed_lr_under_each_backend(backend):
    """set_lr(lr, peak): a group with lr_scale gets lr x scale, a fixed_lr group keeps the peak
    (SimSiam's predictor), under DDP and under DeepSpeed's wrapped optimizer."""
    from pretrain.engine.backends import create_backend

    cfg = load_config(None, ["data.train=x", f"train.backend={backend}", "optim.name=sgd",
                             "train.global_batch_size=4"] + (["deepspeed.zero_stage=2"] if backend == "deepspeed" else []))
    be = create_backend(_Groups(), cfg, torch.device("cpu"))
    be.set_lr(0.02, 0.5)
    opt = be.optimizers["main"] if backend == "ddp" else be.engines["main"].optimizer
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.02, 0.002, 0.5])
    # and the optimizer steps with them: at a scheduled LR of 0 only the fixed-LR group moves
    be.set_lr(0.0, 0.5)
    before = [torch.cat([p.detach().flatten() for p in m.parameters()]) for m in (be.module.a, be.module.b, be.module.c)]
    be.backward(be.forward({"x": torch.ones(4, 2)})["loss"])
    be.step()
    after = [torch.cat([p.detach().flatten() for p in m.parameters()]) for m in (be.module.a, be.module.b, be.module.c)]
    assert [torch.equal(x, y) for x, y in zip(before, after)] == [True, True, False]

