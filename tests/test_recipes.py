"""Recipes that must match their papers: each method's declared augmentation, the shipped digits configs'
augmentation (unchanged, so the measured figures stay valid), MoCo v2's head, MoCo v3's per-view BN and
frozen patch projection, and one reference config per method at paper scale.

The paper numbers are written here from the papers and the official code, not read from the methods."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pretrain.config import load_config
from pretrain.data.views import resolve_views
from pretrain.methods import METHODS, create_method
from helpers import SMALL_VIT

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
GEN = ["data.mean=[0.5,0.5,0.5]", "data.std=[0.5,0.5,0.5]"]


def _views(cfg):
    """The per-view augmentation (dicts, size dropped) a loaded config trains with: the built method's views,
    which the pipeline reads (a multi-crop method's follow its keys: SwAV's num_local_crops, crop scales)."""
    specs = resolve_views(create_method(cfg).views, cfg.data.augment, cfg.data.views, cfg.data.image_size)
    return [{k: v for k, v in vars(s).items() if k != "size"} for s in specs]


def _spec(crop_scale, jitter, jitter_p, grayscale_p, blur_p, solarize_p, flip_p=0.5, crop_ratio=(3 / 4, 4 / 3),
          blur_sigma=(0.1, 2.0), blur_kernel_frac=0.1):
    b, c, s, h = jitter
    return dict(crop_scale=crop_scale, crop_ratio=crop_ratio, flip_p=flip_p, jitter_p=jitter_p, brightness=b,
                contrast=c, saturation=s, hue=h, grayscale_p=grayscale_p, blur_p=blur_p, blur_sigma=blur_sigma,
                blur_kernel_frac=blur_kernel_frac, solarize_p=solarize_p)


# ------------------------------------------------------------------------------------------------ shipped digits configs
#: What every view of the shipped digits configs trained with before methods declared their views: the old
#: pretrain/configs/default.yaml `data.augment` (MoCo v2's values, crop_ratio [0.75, 1.3333333]) under each
#: config's own overrides; no solarization existed.
_OLD_DEFAULT = dict(crop_scale=(0.2, 1.0), crop_ratio=(0.75, 1.3333333), flip_p=0.5, jitter_p=0.8, brightness=0.4,
                    contrast=0.4, saturation=0.4, hue=0.1, grayscale_p=0.2, blur_p=0.5, blur_sigma=(0.1, 2.0),
                    blur_kernel_frac=0.1, solarize_p=0.0)
_OLD_QUICKSTART = {**_OLD_DEFAULT, "crop_scale": (0.3, 1.0), "flip_p": 0.0, "saturation": 0.0, "hue": 0.0,
                   "grayscale_p": 0.0, "blur_p": 0.5, "blur_sigma": (0.1, 1.0)}
_OLD_GENERATIVE = {**_OLD_QUICKSTART, "crop_scale": (1.0, 1.0), "crop_ratio": (1.0, 1.0), "flip_p": 0.0,
                   "jitter_p": 0.0, "grayscale_p": 0.0, "blur_p": 0.0}
OLD = {
    "quickstart_digits.yaml": [_OLD_QUICKSTART] * 2,
    "digits_moco_v2.yaml": [_OLD_QUICKSTART] * 2,
    "digits_moco_v3.yaml": [_OLD_QUICKSTART] * 2,
    "digits_cpc.yaml": [_OLD_QUICKSTART],
    "digits_vae.yaml": [_OLD_GENERATIVE],
    "digits_gan.yaml": [_OLD_GENERATIVE],
    "digits_pixelcnn.yaml": [_OLD_GENERATIVE],
    "digits_ddpm.yaml": [_OLD_GENERATIVE],
    "simclr_resnet18.yaml": [_OLD_DEFAULT] * 2,
    "digits_byol.yaml": [_OLD_QUICKSTART] * 2,     # new configs: the quickstart's pinned augmentation
    "digits_simsiam.yaml": [_OLD_QUICKSTART] * 2,
    "digits_barlow_twins.yaml": [_OLD_QUICKSTART] * 2,
    "digits_vicreg.yaml": [_OLD_QUICKSTART] * 2,
    "digits_nnclr.yaml": [_OLD_QUICKSTART] * 2,
    # 2 global crops on the quickstart's crop, 4 local ones at 10-30% of the area (data.augment.crop_scale: null)
    "digits_swav.yaml": [_OLD_QUICKSTART] * 2 + [{**_OLD_QUICKSTART, "crop_scale": (0.1, 0.3)}] * 4,
    # DINO and iBOT: SwAV's digits crops (2 global at 30-100%, 4 local at 10-30%) on the quickstart's augmentation
    "digits_dino.yaml": [_OLD_QUICKSTART] * 2 + [{**_OLD_QUICKSTART, "crop_scale": (0.1, 0.3)}] * 4,
    "digits_ibot.yaml": [_OLD_QUICKSTART] * 2 + [{**_OLD_QUICKSTART, "crop_scale": (0.1, 0.3)}] * 4,
    "digits_moco_v3_vit.yaml": [_OLD_QUICKSTART] * 2,   # MoCo v3 on the DINO digits ViT, the quickstart's crops
    "digits_mae.yaml": [{**_OLD_QUICKSTART, "jitter_p": 0.0, "blur_p": 0.0}],   # MAE: the quickstart's crop only
    "digits_ijepa.yaml": [{**_OLD_QUICKSTART, "jitter_p": 0.0, "blur_p": 0.0}],   # I-JEPA: the quickstart's crop only
    # flow and the DiT denoisers: the generative base's whole image, no flips (DiT/SiT flip ImageNet; a flipped
    # digit is another symbol), as digits_ddpm.yaml, so the digits comparison changes only the model
    "digits_flow.yaml": [_OLD_GENERATIVE],
    "digits_flow_dit.yaml": [_OLD_GENERATIVE],
    "digits_ddpm_dit.yaml": [_OLD_GENERATIVE],
    "digits_vae_latent_flow.yaml": [_OLD_GENERATIVE],
}


def test_every_shipped_small_config_is_listed():
    shipped = {p.name for p in CONFIGS.glob("*.yaml") if p.name.startswith(("digits_", "quickstart"))} - {
        "digits_generative_base.yaml"}
    assert shipped | {"simclr_resnet18.yaml"} == set(OLD)


@pytest.mark.parametrize("name", sorted(OLD))
def test_shipped_digits_configs_keep_their_augmentation(name):
    """The measured quickstart/compare figures stay valid: each view trains with the values it had."""
    cfg = load_config(str(CONFIGS / name))
    if cfg.method.get("autoencoder"):   # latent diffusion: the views do not depend on the (not yet made) VAE file
        cfg = load_config(str(CONFIGS / name), ['method.autoencoder=""'])
    assert _views(cfg) == OLD[name]


# ------------------------------------------------------------------------------------------------ paper augmentation
#: SimCLR (Chen et al. 2020), appendix A and google-research/simclr data_util.py: random resized crop
#: 0.08-1 of the area, aspect 3/4-4/3, flip; colour jitter of strength 1 (0.8, 0.8, 0.8, 0.2) with p 0.8;
#: colour drop (grayscale) p 0.2; Gaussian blur p 0.5, sigma 0.1-2, kernel 10% of the side; both views.
SIMCLR = _spec((0.08, 1.0), (0.8, 0.8, 0.8, 0.2), 0.8, 0.2, 0.5, 0.0)
#: MoCo v2 (Chen, Fan, Girshick & He 2020), section 3 "augmentation" and facebookresearch/moco --aug-plus:
#: crop 0.2-1, ColorJitter(0.4, 0.4, 0.4, 0.1) p 0.8, grayscale 0.2, blur sigma 0.1-2 p 0.5, flip.
MOCO_V2 = _spec((0.2, 1.0), (0.4, 0.4, 0.4, 0.1), 0.8, 0.2, 0.5, 0.0)
#: MoCo v3 (Chen, Xie & He 2021), facebookresearch/moco-v3 main_moco.py, BYOL's recipe (Grill et al. 2020,
#: table 6): crop 0.08-1 (--crop-min default), ColorJitter(0.4, 0.4, 0.2, 0.1) p 0.8, grayscale 0.2, flip;
#: blur p 1.0 / 0.1 and solarization p 0.0 / 0.2 on views 1 / 2.
MOCO_V3 = [_spec((0.08, 1.0), (0.4, 0.4, 0.2, 0.1), 0.8, 0.2, 1.0, 0.0),
           _spec((0.08, 1.0), (0.4, 0.4, 0.2, 0.1), 0.8, 0.2, 0.1, 0.2)]
#: BYOL (Grill et al. 2020), table 6 and deepmind-research/byol utils/augmentations.py: crop 0.08-1, jitter
#: (0.4, 0.4, 0.2, 0.1) p 0.8, grayscale 0.2, flip; blur (sigma 0.1-2, kernel side/10) p 1.0 / 0.1, solarize p 0 / 0.2.
BYOL = [_spec((0.08, 1.0), (0.4, 0.4, 0.2, 0.1), 0.8, 0.2, 1.0, 0.0),
        _spec((0.08, 1.0), (0.4, 0.4, 0.2, 0.1), 0.8, 0.2, 0.1, 0.2)]
#: SimSiam (Chen & He 2021), facebookresearch/simsiam main_simsiam.py: MoCo v2's augmentation on both views.
SIMSIAM = [MOCO_V2, MOCO_V2]
#: SwAV (Caron et al. 2020), facebookresearch/swav src/multicropdataset.py and scripts/swav_800ep_pretrain.sh: 2 global
#: crops (scale 0.14-1) + 6 local crops (0.05-0.14, at 96 px), each: flip, ColorJitter(0.8, 0.8, 0.8, 0.2) p 0.8,
#: grayscale 0.2, PIL Gaussian blur radius 0.1-2 p 0.5; no solarization.
SWAV = ([_spec((0.14, 1.0), (0.8, 0.8, 0.8, 0.2), 0.8, 0.2, 0.5, 0.0)] * 2
        + [_spec((0.05, 0.14), (0.8, 0.8, 0.8, 0.2), 0.8, 0.2, 0.5, 0.0)] * 6)
#: DINO (Caron et al. 2021), facebookresearch/dino main_dino.py DataAugmentationDINO with its defaults: 2 global crops
#: (--global_crops_scale 0.4 1, 224 px) + 8 local crops (--local_crops_scale 0.05 0.4, 96 px), each: flip,
#: ColorJitter(0.4, 0.4, 0.2, 0.1) p 0.8, grayscale 0.2; GaussianBlur(1.0) on global crop 1, GaussianBlur(0.1) +
#: Solarization(0.2) on global crop 2, GaussianBlur(p=0.5) on the local crops (radius 0.1-2).
_DINO_GLOBAL = [_spec((0.4, 1.0), (0.4, 0.4, 0.2, 0.1), 0.8, 0.2, 1.0, 0.0),
                _spec((0.4, 1.0), (0.4, 0.4, 0.2, 0.1), 0.8, 0.2, 0.1, 0.2)]
DINO = _DINO_GLOBAL + [_spec((0.05, 0.4), (0.4, 0.4, 0.2, 0.1), 0.8, 0.2, 0.5, 0.0)] * 8
#: iBOT (Zhou et al. 2022), bytedance/ibot main_ibot.py DataAugmentationiBOT (DINO's photometry) with the README's
#: ViT-S/16 crops: --global_crops_scale 0.25 1, --local_crops_number 10, --local_crops_scale 0.05 0.25.
IBOT = ([{**v, "crop_scale": (0.25, 1.0)} for v in _DINO_GLOBAL]
        + [_spec((0.05, 0.25), (0.4, 0.4, 0.2, 0.1), 0.8, 0.2, 0.5, 0.0)] * 10)
#: No augmentation (whole image, no flips, no colour): VAE, GAN, PixelCNN. DDPM (Ho et al. 2020, appendix B):
#: random horizontal flips on CIFAR-10.
NONE = _spec((1.0, 1.0), (0.4, 0.4, 0.4, 0.1), 0.0, 0.0, 0.0, 0.0, flip_p=0.0, crop_ratio=(1.0, 1.0))
PAPER = {"simclr": [SIMCLR, SIMCLR], "moco_v2": [MOCO_V2, MOCO_V2], "moco_v3": MOCO_V3,
         "byol": BYOL, "simsiam": SIMSIAM,
         "barlow_twins": BYOL, "vicreg": BYOL,   # the official main.py Transform / augmentations.py: BYOL's pair
         "nnclr": BYOL,   # Dwibedi et al. 2021, section 4: BYOL's augmentation
         "swav": SWAV, "dino": DINO, "ibot": IBOT,
         "cpc": [MOCO_V2],     # CPC keeps its image-level augmentation (CPC v2 augments patches; docs/methods.md)
         "vae": [NONE], "gan": [NONE], "pixelcnn": [NONE], "ddpm": [{**NONE, "flip_p": 0.5}],
         "flow": [{**NONE, "flip_p": 0.5}],   # DiT (and SiT) train with horizontal flips, as DDPM
         # MAE fine-tuning, facebookresearch/mae util/datasets.py build_transform -> timm create_transform: crop
         # 0.08-1 of the area, aspect 3/4-4/3, flip; colour jitter off (RandAugment on; it and random erasing have no view stage)
         "finetune": [{**NONE, "crop_scale": (0.08, 1.0), "crop_ratio": (3 / 4, 4 / 3), "flip_p": 0.5}]}
#: MAE (He et al. 2022), facebookresearch/mae main_pretrain.py: RandomResizedCrop(scale 0.2-1, bicubic) + flip only
PAPER["mae"] = [_spec((0.2, 1.0), (0.4, 0.4, 0.4, 0.1), 0.0, 0.0, 0.0, 0.0)]
#: I-JEPA (Assran et al. 2023), facebookresearch/ijepa configs/in1k_vith14_ep300.yaml: RandomResizedCrop(scale 0.3-1) only
PAPER["ijepa"] = [_spec((0.3, 1.0), (0.4, 0.4, 0.4, 0.1), 0.0, 0.0, 0.0, 0.0, flip_p=0.0)]


def _effective(view):
    """Drop the strengths of a stage that never runs (jitter at p 0, blur at p 0)."""
    v = dict(view)
    if v["jitter_p"] == 0:
        for k in ("brightness", "contrast", "saturation", "hue"):
            v.pop(k)
    if v["blur_p"] == 0:
        v.pop("blur_sigma"), v.pop("blur_kernel_frac")
    return v


def test_every_method_has_a_paper_augmentation_here():
    assert set(PAPER) == set(METHODS.names())


@pytest.mark.parametrize("name", sorted(PAPER))
def test_each_method_defaults_to_its_papers_augmentation(name):
    cfg = load_config(None, ["data.train=x", f"method.name={name}"] + (GEN if hasattr(METHODS.get(name), "sample") else [])
                      + (SMALL_VIT if METHODS.get(name).requires_vit else []))
    got = _views(cfg)
    assert [_effective(v) for v in got] == [_effective(v) for v in PAPER[name]]
    assert METHODS.get(name).num_views == len(PAPER[name])


# ------------------------------------------------------------------------------------------------ MoCo v2 head
def _moco_v2(*extra):
    cfg = load_config(None, ["data.train=x", "model.name=resnet10t", "data.image_size=16", "method.name=moco_v2",
                             "method.proj_hidden_dim=32", "method.proj_dim=8", "method.queue_size=16", *extra])
    return create_method(cfg)


def test_moco_v2_default_head_is_the_official_fc_relu_fc():
    """facebookresearch/moco builder.py (--mlp): Linear(d, d) -> ReLU -> Linear(d, dim), with biases, no BN."""
    m = _moco_v2()
    kinds = [type(x) for x in m.projector]
    assert kinds == [nn.Linear, nn.ReLU, nn.Linear]
    assert all(x.bias is not None for x in m.projector if isinstance(x, nn.Linear))
    assert not any(isinstance(x, nn.modules.batchnorm._BatchNorm) for x in m.key_projector.modules())


def test_moco_v2_bn_head_is_an_option():
    m = _moco_v2("method.proj_bn=true")
    assert [type(x) for x in m.projector] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]


# ------------------------------------------------------------------------------------------------ MoCo v3
def _moco_v3(*extra, vit=False):
    model = (["model.name=vit_tiny_patch16_224", "model.kwargs.img_size=16", "model.kwargs.patch_size=4",
              "model.kwargs.depth=1"] if vit else ["model.name=resnet10t"])
    cfg = load_config(None, ["data.train=x", "data.image_size=16", "method.name=moco_v3", "method.proj_hidden_dim=32",
                             "method.pred_hidden_dim=32", "method.proj_dim=16", *model, *extra])
    torch.manual_seed(0)
    return create_method(cfg), cfg


def _ctr64(q, k, T):
    """2T * InfoNCE(q, k) with positives on the diagonal, float64."""
    q, k = F.normalize(q.double(), dim=1), F.normalize(k.double(), dim=1)
    return F.cross_entropy(q @ k.T / T, torch.arange(len(q))) * 2 * T


def test_moco_v3_runs_each_view_through_its_own_forward():
    """BatchNorm statistics per view, as the official builder.py: every BN call sees B samples (not 2B),
    and the loss equals a float64 reference that encodes the views one at a time."""
    m, _ = _moco_v3()
    m.train()
    B = 8
    g = torch.Generator().manual_seed(0)
    v1 = torch.randn(B, 3, 16, 16, generator=g)
    v2 = 2 * torch.randn(B, 3, 16, 16, generator=g) + 1              # other statistics than v1
    ref = copy.deepcopy(m).double()
    seen = []
    first_bn = next(x for x in m.backbone.modules() if isinstance(x, nn.modules.batchnorm._BatchNorm))
    key_bn = next(x for x in m.key_backbone.modules() if isinstance(x, nn.modules.batchnorm._BatchNorm))
    hooks = [bn.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape[0])) for bn in (first_bn, key_bn)]
    loss = m.training_step({"views": [torch.stack([v1, v2])]}, m.step_context())["loss"]
    for h in hooks:
        h.remove()
    assert seen == [B] * 4                                            # 2 views x (query, key) encoder

    with torch.no_grad():
        q1, q2 = (ref.predictor(ref.projector(ref.backbone(v.double()))) for v in (v1, v2))
        k1, k2 = (ref.key_projector(ref.key_backbone(v.double())) for v in (v1, v2))
        want = _ctr64(q1, k2, m.temperature) + _ctr64(q2, k1, m.temperature)
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)


def test_stop_grad_conv1_freezes_the_patch_projection():
    """MoCo v3's ViT trick (vits.py --stop-grad-conv1): patch_embed.proj gets no gradient and does not
    move under the engine's optimizer, while the rest of the ViT trains."""
    from pretrain.engine.backends import DDPBackend

    m, cfg = _moco_v3("method.stop_grad_conv1=true", "optim.name=adamw", "optim.weight_decay=0.1", vit=True)
    proj = m.backbone.patch_embed.proj
    assert not proj.weight.requires_grad and not proj.bias.requires_grad
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    be = DDPBackend(m, cfg, torch.device("cpu"))
    be.set_lr(1e-2)
    batch = {"views": [torch.randn(2, 8, 3, 16, 16, generator=torch.Generator().manual_seed(1))]}
    with be.accumulate(last=True):
        be.backward(be.forward(batch)["loss"])
    assert proj.weight.grad is None and proj.bias.grad is None
    be.step()
    m.after_step(m.step_context(1, 10))
    params = dict(m.named_parameters())
    for name in ("backbone.patch_embed.proj.weight", "backbone.patch_embed.proj.bias"):
        assert torch.equal(params[name], before[name]), name
    # the key copy's EMA towards an unchanged projection moves it by rounding only (m k + (1 - m) k)
    torch.testing.assert_close(params["key_backbone.patch_embed.proj.weight"],
                               before["key_backbone.patch_embed.proj.weight"], rtol=1e-6, atol=1e-8)
    for name in ("backbone.blocks.0.attn.qkv.weight", "projector.0.weight", "predictor.0.weight"):
        assert not torch.equal(params[name], before[name]), name
    # off by default: the projection trains
    assert _moco_v3(vit=True)[0].backbone.patch_embed.proj.weight.requires_grad


def test_stop_grad_conv1_needs_a_vit():
    with pytest.raises(ValueError, match=r"method.stop_grad_conv1 freezes a ViT's patch projection"):
        _moco_v3("method.stop_grad_conv1=true")


def test_moco_v3_resnet_predictor_without_final_bn():
    """The official ResNet predictor (builder.py MoCo_ResNet): _build_mlp(2, ..., last_bn=False)."""
    m, _ = _moco_v3("method.pred_last_bn=false")
    assert isinstance(m.predictor[-1], nn.Linear) and isinstance(m.projector[-1], nn.BatchNorm1d)


# ------------------------------------------------------------------------------------------------ reference configs
def _ref(name):
    return load_config(str(CONFIGS / name))


def test_simclr_resnet50_is_the_papers_recipe():
    """SimCLR (Chen et al. 2020): section 2.3 "default setting" (batch 4096, LARS, lr 0.3 x B/256 = 4.8,
    wd 1e-6, 10 warmup epochs then cosine, 2-layer projector 2048 -> 128, global BN), table 5 / the
    official README (temperature 0.1), section 6 / table 6 (1000 epochs for the main ResNet-50 result)."""
    c = _ref("simclr_resnet50.yaml")
    assert (c.method.name, c.model.name, c.data.image_size) == ("simclr", "resnet50", 224)
    assert (c.train.global_batch_size, c.train.epochs) == (4096, 1000)
    assert (c.optim.name, c.optim.lr, c.optim.lr_scaling, c.optim.weight_decay, c.optim.momentum) == (
        "lars", 0.3, "linear", 1e-6, 0.9)
    assert (c.optim.warmup_epochs, c.optim.trust_coefficient) == (10, 0.001)
    assert (c.method.temperature, c.method.proj_hidden_dim, c.method.proj_dim, c.method.proj_layers) == (0.1, 2048, 128, 2)
    assert c.method.sync_bn is True
    assert _views(c) == [SIMCLR, SIMCLR]


def test_moco_v2_resnet50_is_the_papers_recipe():
    """MoCo v2 (Chen et al. 2020), table 1 / facebookresearch/moco README: batch 256, SGD lr 0.03 (momentum 0.9),
    wd 1e-4, 200 epochs, cosine schedule, T 0.2, K 65536, m 0.999, MLP head fc-ReLU-fc (2048 -> 128), aug+."""
    c = _ref("moco_v2_resnet50.yaml")
    assert (c.method.name, c.model.name, c.data.image_size) == ("moco_v2", "resnet50", 224)
    assert (c.train.global_batch_size, c.train.epochs) == (256, 200)
    assert (c.optim.name, c.optim.lr, c.optim.lr_scaling, c.optim.weight_decay, c.optim.momentum) == (
        "sgd", 0.03, "linear", 1e-4, 0.9)
    assert c.optim.warmup_epochs == 0 and c.optim.warmup_steps is None
    assert (c.method.temperature, c.method.queue_size, c.method.momentum) == (0.2, 65536, 0.999)
    assert (c.method.proj_hidden_dim, c.method.proj_dim, c.method.proj_bn) == (2048, 128, False)
    assert _views(c) == [MOCO_V2, MOCO_V2]


def test_moco_v3_vit_small_is_the_papers_recipe():
    """MoCo v3 (Chen, Xie & He 2021) ViT-S, facebookresearch/moco-v3 CONFIG.md: batch 4096, AdamW lr 1.5e-4 x B/256,
    wd 0.1, 300 epochs, 40 warmup, --stop-grad-conv1, --moco-m-cos (0.99 -> 1), T 0.2; 3-layer projector and
    2-layer predictor (hidden 4096, out 256); ViT-S with 12 heads (vits.py); torch.optim.AdamW's default betas."""
    c = _ref("moco_v3_vit_small.yaml")
    assert (c.method.name, c.model.name, c.model.kwargs.num_heads, c.data.image_size) == (
        "moco_v3", "vit_small_patch16_224", 12, 224)
    assert (c.train.global_batch_size, c.train.epochs) == (4096, 300)
    assert (c.optim.name, c.optim.lr, c.optim.lr_scaling, c.optim.weight_decay, c.optim.warmup_epochs) == (
        "adamw", 1.5e-4, "linear", 0.1, 40)
    assert list(c.optim.betas) == [0.9, 0.999]
    assert (c.method.temperature, c.method.momentum, c.method.stop_grad_conv1) == (0.2, {"shape": "cosine", "start": 0.99, "end": 1.0}, True)
    assert (c.method.proj_layers, c.method.proj_hidden_dim, c.method.proj_dim, c.method.pred_hidden_dim,
            c.method.pred_last_bn) == (3, 4096, 256, 4096, True)
    assert _views(c) == MOCO_V3


def test_moco_v3_resnet50_is_the_official_300_epoch_recipe():
    """MoCo v3 ResNet-50, facebookresearch/moco-v3 CONFIG.md (300 epochs: --lr=.3 --epochs=300 --moco-m-cos
    --crop-min=.2) on main_moco.py's defaults: batch 4096, LARS (momentum 0.9), wd 1e-6, 10 warmup epochs,
    T 1.0, m 0.99; builder.py MoCo_ResNet: 2-layer projector and predictor, the predictor without final BN."""
    c = _ref("moco_v3_resnet50.yaml")
    assert (c.method.name, c.model.name, c.data.image_size) == ("moco_v3", "resnet50", 224)
    assert (c.train.global_batch_size, c.train.epochs) == (4096, 300)
    assert (c.optim.name, c.optim.lr, c.optim.lr_scaling, c.optim.weight_decay, c.optim.momentum,
            c.optim.warmup_epochs) == ("lars", 0.3, "linear", 1e-6, 0.9, 10)
    assert (c.method.temperature, c.method.momentum) == (1.0, {"shape": "cosine", "start": 0.99, "end": 1.0})
    assert (c.method.proj_layers, c.method.proj_hidden_dim, c.method.proj_dim, c.method.pred_hidden_dim,
            c.method.pred_last_bn, c.method.stop_grad_conv1) == (2, 4096, 256, 4096, False, False)
    assert _views(c) == [{**v, "crop_scale": (0.2, 1.0)} for v in MOCO_V3]


def test_cpc_resnet50_patch_grid_is_the_papers():
    """CPC (van den Oord et al. 2018, section 3.2; kept by CPC v2): a 256 px image cut into a 7 x 7 grid of
    64 px patches overlapping by 32 px, the context predicting up to 5 rows below; one view."""
    c = _ref("cpc_resnet50.yaml")
    assert (c.method.name, c.data.image_size, c.method.patch_size, c.method.patch_stride, c.method.pred_steps) == (
        "cpc", 256, 64, 32, 5)
    assert (c.data.image_size - c.method.patch_size) // c.method.patch_stride + 1 == 7
    assert len(_views(c)) == 1


def test_ddpm_cifar10_is_the_papers_recipe():
    """DDPM (Ho et al. 2020), section 4 and appendix B, CIFAR-10: T 1000, linear betas 1e-4 -> 0.02,
    eps-prediction, batch 128, Adam lr 2e-4 with 5000 warmup steps and no decay, grad clip 1, EMA 0.9999,
    800k steps, random horizontal flips; UNet 128 channels, multipliers (1, 2, 2, 2), 2 res blocks each."""
    c = _ref("ddpm_cifar10.yaml")
    assert (c.method.name, c.data.image_size, list(c.data.mean), list(c.data.std)) == ("ddpm", 32, [0.5] * 3, [0.5] * 3)
    assert (c.method.timesteps, c.method.schedule, c.method.prediction, c.method.ema_decay) == (1000, "linear", "eps", 0.9999)
    assert (c.method.base_channels, list(c.method.channel_mults), c.method.blocks) == (128, [1, 2, 2, 2], 2)
    assert (c.train.global_batch_size, c.train.max_steps, c.train.clip_grad) == (128, 800000, 1.0)
    assert (c.optim.name, c.optim.lr, c.optim.lr_scaling, c.optim.weight_decay, c.optim.warmup_steps) == (
        "adamw", 2e-4, "none", 0.0, 5000)
    assert list(c.optim.betas) == [0.9, 0.999]
    assert c.optim.min_lr == c.optim.lr                          # constant after the warmup
    assert [_effective(v) for v in _views(c)] == [_effective({**NONE, "flip_p": 0.5})]
    from pretrain.methods.ddpm import betas_for
    b = betas_for(c.method.schedule, c.method.timesteps)
    assert (b[0].item(), b[-1].item()) == pytest.approx((1e-4, 0.02))


def test_dit_b2_flow_cifar10_is_sits_recipe():
    """SiT (Ma et al. 2024) with the official willisma/SiT train.py / models.py: SiT-B/2 = DiT-B/2 (depth 12,
    width 768, 12 heads, patch 2), class-conditional with label dropout 0.1, the linear path with a velocity
    target and uniform t; AdamW lr 1e-4 constant, weight decay 0, betas (0.9, 0.999), batch 256, EMA 0.9999,
    no clipping, 400k steps (SiT-B/2's tables), random horizontal flips; 250 sampler network calls, CFG 1.5
    for FID. On CIFAR-10 pixels (10 classes, 32 px: 256 tokens, as SiT-B/2 on 32 x 32 ImageNet latents)."""
    c = _ref("dit_b2_flow_cifar10.yaml")
    assert (c.method.name, c.data.image_size, list(c.data.mean), list(c.data.std)) == ("flow", 32, [0.5] * 3, [0.5] * 3)
    assert (c.method.denoiser, c.method.num_classes, c.method.label_dropout, c.method.time_sampling) == (
        "DiT-B/2", 10, 0.1, "uniform")
    assert (c.method.ema_decay, c.method.guidance) == (0.9999, 1.5)
    assert 2 * c.method.sample_steps == 250 and c.method.sampler == "heun"     # Heun: 2 network calls per step
    assert (c.train.global_batch_size, c.train.max_steps, c.train.clip_grad) == (256, 400000, 0.0)
    assert (c.optim.name, c.optim.lr, c.optim.lr_scaling, c.optim.weight_decay, c.optim.warmup_steps) == (
        "adamw", 1e-4, "none", 0.0, 0)
    assert list(c.optim.betas) == [0.9, 0.999] and c.optim.min_lr == c.optim.lr   # constant
    with torch.device("meta"):   # DiT-B/2 and its EMA copy: 2 x 130M parameters, no memory or init time on meta
        m = create_method(c)
        views = _views(c)
    net = m.net
    assert (len(net.blocks), net.x_embedder.proj.out_channels, net.blocks[0].attn.num_heads, net.patch_size) == (
        12, 768, 12, 2)
    assert net.grid == (16, 16) and net.y_embedder.num_embeddings == 11 and net.out_channels == 3
    assert [_effective(v) for v in views] == [_effective({**NONE, "flip_p": 0.5})]
    assert m.num_views == len(views)


@pytest.mark.parametrize("name", ["simclr_resnet50.yaml", "moco_v2_resnet50.yaml", "moco_v3_vit_small.yaml",
                                  "moco_v3_resnet50.yaml", "cpc_resnet50.yaml", "ddpm_cifar10.yaml"])
def test_reference_configs_build_their_method(name):
    """Each reference config builds as it stands (paper-size model; a couple of seconds at most)."""
    m = create_method(_ref(name))
    assert m.num_views == len(_views(_ref(name)))


# ------------------------------------------------------------------------------------------------ DINO and iBOT
#: ImageNet-1k's train split, and the official steps per epoch at batch 16 GPUs x 64: DistributedSampler pads each
#: rank to ceil(N / 16) images, the loader drops the last partial batch (drop_last=True)
IMAGENET_TRAIN = 1281167
OFFICIAL_STEPS_PER_EPOCH = -(-IMAGENET_TRAIN // 16) // 64                        # 1251


def _official_cosine(base, final, epochs, niter, warmup_epochs=0, start_warmup=0.0):
    """facebookresearch/dino (and bytedance/ibot) utils.cosine_scheduler: one value per iteration."""
    import numpy as np

    warmup = np.linspace(start_warmup, base, warmup_epochs * niter) if warmup_epochs > 0 else np.array([])
    iters = np.arange(epochs * niter - warmup_epochs * niter)
    return np.concatenate((warmup, final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))))


def _official_teacher_temp(warmup_temp, temp, warmup_epochs, epochs):
    """main_dino.py DINOLoss / main_ibot.py iBOTLoss: one value per epoch."""
    import numpy as np

    return np.concatenate((np.linspace(warmup_temp, temp, warmup_epochs), np.ones(epochs - warmup_epochs) * temp))


@pytest.fixture(scope="module")
def dino_ibot_refs():
    """The two reference configs and their methods (ViT-S/16 with 65536 / 8192 prototypes: seconds to build)."""
    out = {}
    for name in ("dino_vit_small_imagenet.yaml", "ibot_vit_small_imagenet.yaml"):
        cfg = _ref(name)
        out[name] = (cfg, create_method(cfg))
    return out


def test_dino_vit_small_is_the_papers_recipe(dino_ibot_refs):
    """facebookresearch/dino README: `run_with_submitit.py --nodes 2 --ngpus 8 --arch vit_small`, i.e. main_dino.py's
    defaults on 16 GPUs: --batch_size_per_gpu 64, --epochs 100, adamw, --lr 0.0005 (x B/256), --min_lr 1e-6,
    --warmup_epochs 10, --weight_decay 0.04 -> --weight_decay_end 0.4, --clip_grad 3.0, --freeze_last_layer 1,
    --momentum_teacher 0.996, --use_fp16 true, --drop_path_rate 0.1, --out_dim 65536, --norm_last_layer true,
    --use_bn_in_head false, --warmup_teacher_temp 0.04, --teacher_temp 0.04, --warmup_teacher_temp_epochs 0,
    --global_crops_scale 0.4 1, --local_crops_number 8, --local_crops_scale 0.05 0.4; DINOHead(nlayers=3,
    hidden_dim=2048, bottleneck_dim=256); DINOLoss(student_temp=0.1, center_momentum=0.9); vit_small: patch 16,
    width 384, depth 12, 6 heads; the README evaluates the teacher (--checkpoint_key teacher)."""
    c, m = dino_ibot_refs["dino_vit_small_imagenet.yaml"]
    assert (c.method.name, c.model.name, c.data.image_size) == ("dino", "vit_small_patch16_224", 224)
    vit = m.backbone
    assert (vit.patch_embed.patch_size, vit.embed_dim, len(vit.blocks), vit.blocks[0].attn.num_heads) == ((16, 16), 384, 12, 6)
    assert vit.blocks[0].attn.qkv.bias is not None
    assert c.model.kwargs.drop_path_rate == 0.1 and c.model.kwargs.dynamic_img_size is True
    assert all(getattr(x, "drop_prob", 0.0) == 0.0 for x in m.key_backbone.modules())      # the teacher: no drop path
    assert (c.train.global_batch_size, c.train.epochs, c.train.precision, c.train.clip_grad) == (16 * 64, 100, "fp16", 0.0)
    assert (c.optim.name, c.optim.lr, c.optim.lr_scaling, c.optim.min_lr, c.optim.warmup_epochs) == (
        "adamw", 0.0005, "linear", 1e-6, 10)
    assert list(c.optim.betas) == [0.9, 0.999]                                      # torch.optim.AdamW(params_groups)
    assert (c.method.out_dim, c.method.hidden_dim, c.method.bottleneck_dim, c.method.head_layers) == (65536, 2048, 256, 3)
    assert (c.method.norm_last_layer, c.method.head_bn) == (True, False)
    assert not m.head.last_layer.weight_g.requires_grad
    assert (c.method.student_temp, c.method.center_momentum, c.method.centering, c.method.clip_grad) == (0.1, 0.9, "center", 3.0)
    assert (c.method.koleo_weight, c.method.layer_decay, c.method.patch_embed_lr_mult) == (0.0, 1.0, 1.0)
    assert _views(c) == DINO
    assert [v.size for v in m.views] == [None, None] + [96] * 8
    assert m.export_backbone() is m.key_backbone


def test_ibot_vit_small_is_the_papers_recipe(dino_ibot_refs):
    """bytedance/ibot README, ViT-S/16 on two nodes of 8 GPUs: --teacher_temp 0.07 --warmup_teacher_temp_epochs 30
    --norm_last_layer false --epochs 800 --batch_size_per_gpu 64 --shared_head true --out_dim 8192
    --local_crops_number 10 --global_crops_scale 0.25 1 --local_crops_scale 0.05 0.25 --pred_ratio 0 0.3
    --pred_ratio_var 0 0.2, on main_ibot.py's defaults: adamw, --lr 0.0005 (x B/256), --min_lr 1e-6, --warmup_epochs
    10, --weight_decay 0.04 -> 0.4, --clip_grad 3.0, --freeze_last_layer 1, --momentum_teacher 0.996, --use_fp16 true,
    --drop_path 0.1, --warmup_teacher_temp 0.04, --warmup_teacher_patch_temp 0.04, --teacher_patch_temp 0.07,
    --shared_head_teacher true, --lambda1 1, --lambda2 1, --pred_shape block, pred_aspect_ratio (0.3, 1/0.3);
    iBOTLoss(student_temp=0.1, center_momentum=0.9, center_momentum2=0.9); iBOTHead 2048 / 256 / 3 layers."""
    c, m = dino_ibot_refs["ibot_vit_small_imagenet.yaml"]
    assert (c.method.name, c.model.name, c.data.image_size) == ("ibot", "vit_small_patch16_224", 224)
    assert c.model.kwargs.drop_path_rate == 0.1 and c.model.kwargs.dynamic_img_size is True
    assert (c.train.global_batch_size, c.train.epochs, c.train.precision, c.train.clip_grad) == (16 * 64, 800, "fp16", 0.0)
    assert (c.optim.name, c.optim.lr, c.optim.lr_scaling, c.optim.min_lr, c.optim.warmup_epochs) == (
        "adamw", 0.0005, "linear", 1e-6, 10)
    assert list(c.optim.betas) == [0.9, 0.999]
    assert (c.method.out_dim, c.method.hidden_dim, c.method.bottleneck_dim, c.method.head_layers) == (8192, 2048, 256, 3)
    assert (c.method.norm_last_layer, c.method.head_bn, c.method.patch_head) == (False, False, "shared")
    assert m.head.last_layer.weight_g.requires_grad and m.patch_heads() == (m.head, m.key_head)
    assert (c.method.student_temp, c.method.center_momentum, c.method.clip_grad) == (0.1, 0.9, 3.0)
    assert (c.method.cls_weight, c.method.patch_weight) == (1.0, 1.0)
    # pred_ratio 0 or 0.3 +- 0.2, chosen per global crop: masked with probability 1/2, target ratio U(0.1, 0.5)
    assert (tuple(c.method.mask_ratio), c.method.mask_prob) == (pytest.approx((0.3 - 0.2, 0.3 + 0.2)), 1 / 2)
    assert m.masking.grid == (224 // 16, 224 // 16) and m.masking.num_views == 2
    assert _views(c) == IBOT


@pytest.mark.parametrize("name,teacher_temp,patch_temp,epochs", [
    ("dino_vit_small_imagenet.yaml", (0.04, 0.04, 0), None, 100),
    ("ibot_vit_small_imagenet.yaml", (0.04, 0.07, 30), (0.04, 0.07, 30), 800)])
def test_dino_ibot_schedules_follow_the_official_arrays(dino_ibot_refs, name, teacher_temp, patch_temp, epochs):
    """LR, weight decay, teacher momentum, teacher temperatures and the last-layer freeze, as the trainer evaluates
    them for the reference config at ImageNet's 1251 steps per epoch, against the official arrays
    (utils.cosine_scheduler per iteration, the loss's np.linspace per epoch, cancel_gradients_last_layer's
    `epoch < freeze_last_layer`). Ours are per step: the LR warmup ends one step earlier (<= base / warmup
    steps) and the temperature warmup ramps within epochs (<= 0.03 / 30 from the official per-epoch value)."""
    import numpy as np

    from pretrain.engine.trainer import plan

    c, m = dino_ibot_refs[name]
    c = load_config(str(CONFIGS / name), ["data.val=null", f"data.samples_per_epoch={IMAGENET_TRAIN}"])
    p = plan(c, 1)
    n = OFFICIAL_STEPS_PER_EPOCH
    assert (p["steps_per_epoch"], p["total"]) == (n, epochs * n)
    base = 0.0005 * 1024 / 256
    official = {"lr": _official_cosine(base, 1e-6, epochs, n, warmup_epochs=10),
                "weight_decay": _official_cosine(0.04, 0.4, epochs, n),
                "momentum": _official_cosine(0.996, 1.0, epochs, n)}
    temps = {"teacher_temp": np.repeat(_official_teacher_temp(*teacher_temp, epochs), n)}
    if patch_temp:
        temps["teacher_patch_temp"] = np.repeat(_official_teacher_temp(*patch_temp, epochs), n)
    steps = sorted(set(range(0, 2 * n)) | set(range(0, epochs * n, 97)) | {10 * n - 1, 10 * n, 30 * n - 1, 30 * n,
                                                                          epochs * n - 1})
    for s in steps:
        ctx = m.step_context(s, p["total"], n, **{k: f(s, p["total"], n) for k, f in p["schedules"].items()})
        assert ctx["lr"] == pytest.approx(official["lr"][s], abs=base / (10 * n) + 1e-12), s
        assert ctx["weight_decay"] == pytest.approx(official["weight_decay"][s], abs=1e-12), s
        assert ctx["momentum"] == pytest.approx(official["momentum"][s], abs=1e-12), s
        for k, want in temps.items():
            assert ctx[k] == pytest.approx(want[s], abs=0.03 / 30 + 1e-12), (k, s)
            if s >= 30 * n or teacher_temp[2] == 0:
                assert ctx[k] == pytest.approx(want[s], abs=1e-12), (k, s)
        assert (ctx["freeze_last_layer"] > 0) == (s // n < 1), s
