"""Every registered method, timm-style: builds from a config, trains a step, exports a backbone.
Also: any timm model by name, a ViT with img_size included."""
import copy

import pytest
import torch

from helpers import SMALL_VIT
from pretrain.config import load_config
from pretrain.data.views import view_groups
from pretrain.engine.backends import place
from pretrain.methods import METHODS, create_method
from pretrain.models import ModelError, create_backbone

SMALL = ["data.train=unused", "model.name=resnet10t", "data.image_size=16"]


def _batch(method, size=16, B=8):
    """A fixed batch of the views the method declares (one tensor per view size, as the pipeline
    delivers them): Gaussian, or for generative methods pixels on the 8-bit grid in [-1, 1]."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    views = []
    for side, idx in view_groups(method.views, size):
        shape = (len(idx), B, 3, side, side)
        views.append(torch.randint(0, 256, shape, generator=g) / 127.5 - 1 if hasattr(method, "sample")
                     else torch.randn(shape, generator=g))
    masks = {"masks": method.masking(B, g)} if method.masking is not None else {}
    return {"views": views, "label": torch.zeros(B, dtype=torch.long), **masks}


GEN = ["data.mean=[0.5,0.5,0.5]", "data.std=[0.5,0.5,0.5]"]   # generative methods model pixels in [-1, 1]


def _small(name, *extra):
    cls = METHODS.get(name)
    small_head = ["method.out_dim=1024", "method.patch_out_dim=1024"] if name == "ibot" else []   # fast enough
    cfg = load_config(None, SMALL + (SMALL_VIT if cls.requires_vit else []) + [f"method.name={name}"] + small_head
                      + (GEN if hasattr(cls, "sample") else []) + list(extra))
    return cfg, create_method(cfg)


@pytest.mark.parametrize("name", METHODS.names())
def test_registered_method_trains_and_exports(name):
    """Every optimizer phase of every method lowers its loss on a fixed batch (a GAN: D with G fixed,
    then G with D fixed; the noise is fixed by reseeding), and the method exports its backbone."""
    # VICReg's paper expander (8192 wide, nothing normalises its last layer's output) oscillates under Adam at
    # 1e-3 on 8 samples (its paper's LARS steps are relative to each weight's norm); its digits width goes down
    cfg, method = _small(name, *(["method.proj_hidden_dim=1024", "method.proj_dim=1024"] if name == "vicreg" else []))
    batch = _batch(method)
    for phase in method.phases:
        opt = torch.optim.Adam([p for g in method.param_groups(0.0, phase) for p in g["params"]], lr=1e-3)
        losses = []
        for _ in range(4):   # the same batch a few times: the loss must go down
            torch.manual_seed(1)
            method.before_step(method.step_context(0, 10, 5))
            loss = method(batch, method.step_context(0, 10, 5, phase=phase))["loss"]
            assert torch.isfinite(loss)
            opt.zero_grad()
            loss.backward()
            opt.step()
            method.after_step(method.step_context(1, 10))
            losses.append(loss.item())
        assert losses[-1] < losses[0], (phase, losses)
    if method.backbone is None:   # pixel-space generative models train no backbone
        with pytest.raises(ValueError, match="no backbone to export"):
            method.export_backbone()
    else:
        backbone = method.export_backbone()
        assert backbone(torch.randn(2, 3, 16, 16)).shape == (2, backbone.num_features)
    # param groups: no weight decay on 1-D parameters (biases, norms)
    groups = [g for phase in method.phases for g in method.param_groups(0.1, phase)]
    nodecay = {id(p) for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert all(id(p) in nodecay for p in method.parameters() if p.ndim == 1 and p.requires_grad)
    # frozen parameters (momentum encoders, EMA copies) are never handed to an optimizer
    assert all(p.requires_grad for g in groups for p in g["params"])


@pytest.mark.parametrize("name", METHODS.names())
def test_registered_method_is_layout_agnostic(name):
    """train.channels_last: the method with NHWC 4-d weights (placed by the backends' `place`)
    gives the NCHW losses and gradients in every phase, so no method depends on the layout (masks,
    .view() of activations, reshapes)."""
    torch.manual_seed(0)
    # MoCo v2's default split-BN of 8 groups would normalise single samples here, where float32
    # rounding noise swamps the gradients of either layout; groups of 4 samples are well-conditioned
    cfg, nchw = _small(name, "train.channels_last=true", *(["method.split_bn_groups=2"] if name == "moco_v2" else []))
    nhwc = place(copy.deepcopy(nchw), cfg, torch.device("cpu"))
    assert any(not p.is_contiguous() for p in nhwc.parameters())   # the copy really is NHWC
    batch = _batch(nchw)
    for phase in nchw.phases:
        out = []
        for m in (nchw, nhwc):
            m.zero_grad(set_to_none=True)
            torch.manual_seed(1)
            loss = m(batch, m.step_context(phase=phase))["loss"]
            loss.backward()
            out.append((loss.item(), {n: p.grad.flatten() for n, p in m.named_parameters() if p.grad is not None}))
        (la, ga), (lb, gb) = out
        assert lb == pytest.approx(la, rel=1e-4), phase
        assert ga and ga.keys() == gb.keys()
        # other kernels sum in another order: the gradient agrees to float32 rounding, which contrastive
        # losses and BN amplify to <1% here (measured over seeds); a layout bug would be off by O(1)
        a, b = torch.cat(list(ga.values())), torch.cat([gb[k] for k in ga])
        assert (a - b).norm() / a.norm() < 2e-2, phase


def test_vit_backbone_with_img_size_trains_under_simclr():
    cfg = load_config(None, ["data.train=unused", "model.name=vit_tiny_patch16_224", "data.image_size=32",
                             "model.kwargs.img_size=32", "model.kwargs.patch_size=8", "model.kwargs.depth=2",
                             "method.proj_hidden_dim=64"])
    method = create_method(cfg)
    loss = method.training_step(_batch(method, size=32), method.step_context())["loss"]
    loss.backward()
    assert torch.isfinite(loss)
    assert method.backbone.patch_embed.patch_size == (8, 8)


def test_unknown_and_unbuildable_models_are_clear_errors():
    with pytest.raises(ModelError, match="unknown timm model 'resnet19'.*resnet18"):
        create_backbone("resnet19")
    with pytest.raises(ModelError, match="could not build"):
        create_backbone("resnet18", {"no_such_argument": 1})


@pytest.mark.parametrize("name", [n for n in METHODS.names() if not hasattr(METHODS.get(n), "sample")])
def test_features_take_the_backbone_the_monitor_names(name):
    """The kNN monitor calls method.features(images, eval.which): every method accepts "default" (CPC's own
    features too)."""
    _, m = _small(name)
    m.eval()
    assert m.features(torch.randn(2, 3, 16, 16), "default").shape[0] == 2
