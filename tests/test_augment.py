"""Per-view augmentation: solarization against a float64 reference, one augmenter per view through the
real pipeline (worker and device-side photometric stage), and the config layers that resolve the views."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pretrain.config import ConfigError, load_config
from pretrain.data.augment import SimCLRAugment
from pretrain.data.views import IDENTITY, MultiViewAugment, ViewSpec, resolve_views

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
PHOTO_OFF = dict(jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)


def _ref_normalise(x01: np.ndarray) -> np.ndarray:
    return (x01 - np.array(MEAN).reshape(1, 3, 1, 1)) / np.array(STD).reshape(1, 3, 1, 1)


def _ref_solarize(x01: np.ndarray) -> np.ndarray:
    """BYOL: where(x < 0.5, x, 1 - x) on [0, 1] pixels."""
    return np.where(x01 < 0.5, x01, 1.0 - x01)


def _ref_blur(x01: np.ndarray, sigma: float, k: int) -> np.ndarray:
    """Separable Gaussian blur, reflect padding, in float64 (a direct sum, not a conv call)."""
    r = np.arange(k) - (k - 1) / 2
    w = np.exp(-r ** 2 / (2 * sigma ** 2))
    w /= w.sum()
    pad = k // 2
    y = np.pad(x01, ((0, 0), (0, 0), (0, 0), (pad, pad)), mode="reflect")
    y = sum(w[i] * y[..., i:i + x01.shape[-1]] for i in range(k))
    y = np.pad(y, ((0, 0), (0, 0), (pad, pad), (0, 0)), mode="reflect")
    return sum(w[i] * y[..., i:i + x01.shape[-2], :] for i in range(k))


def _pixels(n=6, s=16, seed=0):
    return torch.randint(0, 256, (n, 3, s, s), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------ solarize
def test_solarize_matches_a_float64_reference():
    x = _pixels()
    out = SimCLRAugment(16, MEAN, STD, **PHOTO_OFF, solarize_p=1.0).photometric(x, torch.Generator().manual_seed(0))
    ref = _ref_normalise(_ref_solarize(x.double().numpy() / 255))
    np.testing.assert_allclose(out.double().numpy(), ref, atol=2e-5)
    # and it changed something: about half the pixels are >= 0.5
    assert not np.allclose(ref, _ref_normalise(x.double().numpy() / 255), atol=1e-3)


def test_solarize_comes_after_the_blur_as_in_byol():
    """Order jitter -> grayscale -> blur -> solarize: with a fixed sigma the batch equals the float64
    blur-then-solarize reference, and not solarize-then-blur."""
    x = _pixels(4, 16, 1)
    aug = SimCLRAugment(16, MEAN, STD, jitter_p=0.0, grayscale_p=0.0, blur_p=1.0, blur_sigma=(1.3, 1.3),
                        blur_kernel_frac=0.3, solarize_p=1.0)
    out = aug.photometric(x, torch.Generator().manual_seed(0)).double().numpy()
    x01 = x.double().numpy() / 255
    right = _ref_normalise(_ref_solarize(_ref_blur(x01, 1.3, aug.blur_k)))
    wrong = _ref_normalise(_ref_blur(_ref_solarize(x01), 1.3, aug.blur_k))
    np.testing.assert_allclose(out, right, atol=1e-4)
    assert np.abs(out - wrong).max() > 0.1


def test_solarize_is_per_sample_with_probability_p():
    x = _pixels(2000, 4, 2)
    out = SimCLRAugment(4, MEAN, STD, **PHOTO_OFF, solarize_p=0.3).photometric(x, torch.Generator().manual_seed(0))
    x01 = x.double().numpy() / 255
    plain, sol = _ref_normalise(x01), _ref_normalise(_ref_solarize(x01))
    o = out.double().numpy()
    is_plain = np.abs(o - plain).reshape(len(o), -1).max(1) < 2e-5
    is_sol = np.abs(o - sol).reshape(len(o), -1).max(1) < 2e-5
    assert (is_plain | is_sol).all()                                  # each image: all or nothing
    frac = (is_sol & ~is_plain).mean()
    assert abs(frac - 0.3) < 0.04, frac


def test_solarize_gpu_path_equals_cpu_path():
    """The masked (device) branch and the index (CPU) branch give the same values."""
    y = torch.randn(8, 3, 25)
    on = torch.tensor([True, False] * 4)
    mean, std = torch.tensor(MEAN).view(1, 3, 1), torch.tensor(STD).view(1, 3, 1)
    a = SimCLRAugment._solarize_(y.clone(), on, mean, std, by_index=True)
    b = SimCLRAugment._solarize_(y.clone(), on, mean, std, by_index=False)
    assert torch.equal(a, b) and not torch.equal(a, y)


def test_no_solarize_draws_nothing_from_the_generator():
    """solarize_p = 0 leaves the random stream (and so every existing recipe's batches) unchanged."""
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    SimCLRAugment(16, MEAN, STD, solarize_p=0.0).photometric(_pixels(), g1)
    SimCLRAugment(16, MEAN, STD).photometric(_pixels(), g2)
    assert torch.equal(torch.rand(4, generator=g1), torch.rand(4, generator=g2))


# ------------------------------------------------------------------------------------------------ several views
def test_equal_views_draw_like_one_augmenter_over_the_stacked_batch():
    """Views with the same photometric settings go through one call over [V*B]: the batches that one
    augmenter for all views produced before views were declared."""
    x = torch.randint(0, 256, (2, 5, 3, 16, 16), dtype=torch.uint8)
    one = SimCLRAugment(16, MEAN, STD)
    multi = MultiViewAugment([one, SimCLRAugment(16, MEAN, STD, crop_scale=(0.5, 1.0))])   # geometry differs only
    assert multi.shared == [True]
    want = one.photometric(x.flatten(0, 1), torch.Generator().manual_seed(1)).view(x.shape)
    assert torch.equal(multi.photometric([x], torch.Generator().manual_seed(1))[0], want)


@pytest.mark.parametrize("where", ["worker", "device"])
def test_each_view_goes_through_its_own_augmenter(digits_shards, where):
    """Through build_train_loader and the real pipeline: view 0 is the plain image, view 1 (data.views)
    the same image flipped and solarized, photometric stage in the worker or on the (CPU) device."""
    from pretrain.data import build_train_loader
    from pretrain.methods import METHODS

    cfg = load_config(None, [f"data.train={digits_shards}/train", "data.image_size=16", "data.num_workers=0",
                             f"data.augment_on={where}", "data.augment.crop_scale=[1.0,1.0]",
                             "data.augment.crop_ratio=[1.0,1.0]", "data.augment.flip_p=0.0",
                             "data.augment.jitter_p=0.0", "data.augment.grayscale_p=0.0", "data.augment.blur_p=0.0",
                             "data.augment.solarize_p=0.0", "data.views=[{},{flip_p: 1.0, solarize_p: 1.0}]"])
    loader = build_train_loader(cfg, METHODS.get("simclr"), 8, 2, 0, "cpu")
    if where == "device":
        loader.dataset.photometric_in_worker = False     # as on CUDA: uint8 crops, photometric in the main process
    v0, v1 = next(loader.batches(0))["views"][0].double()                # [B, 3, S, S] each
    mean, std = torch.tensor(MEAN, dtype=torch.float64).view(1, 3, 1, 1), torch.tensor(STD, dtype=torch.float64).view(1, 3, 1, 1)
    x0 = (v0 * std + mean).numpy()                                       # back to [0, 1]
    want = _ref_normalise(_ref_solarize(x0[..., ::-1]))
    np.testing.assert_allclose(v1.numpy(), want, atol=5e-5)
    assert not np.allclose(v0.numpy(), v1.numpy(), atol=1e-2)


# ------------------------------------------------------------------------------------------------ config layers
def _resolve(*overrides, views=(ViewSpec(), ViewSpec(hue=0.2))):
    cfg = load_config(None, ["data.train=x", *overrides])
    return resolve_views(views, cfg.data.augment, cfg.data.views, cfg.data.image_size, "method m")


def test_method_views_then_data_augment_then_data_views():
    a, b = _resolve()
    assert (a, b) == (ViewSpec(), ViewSpec(hue=0.2))                     # null: the method's values
    a, b = _resolve("data.augment.hue=0.05", "data.augment.crop_scale=[0.5,1.0]")
    assert a.hue == b.hue == 0.05 and a.crop_scale == b.crop_scale == (0.5, 1.0)
    a, b = _resolve("data.augment.blur_p=0.3", "data.views=[{blur_p: 1.0}, {solarize_p: 0.2}]")
    assert (a.blur_p, a.solarize_p, b.blur_p, b.solarize_p, b.hue) == (1.0, 0.0, 0.3, 0.2, 0.2)


@pytest.mark.parametrize("overrides, message", [
    (["data.views=[{blur_p: 1.0}]"], r"data.views has 1 entries but method m takes 2 view\(s\)"),
    (["data.views=[{}, {blurp: 1.0}]"], r"unknown view key 'data.views\[1\].blurp'; did you mean 'blur_p'\?"),
    (["data.augment.flip_p=1.5"], r"data.augment.flip_p must be a probability in \[0, 1\], got 1.5"),
    (["data.views=[{}, {crop_scale: [0.9, 0.1]}]"], r"data.views\[1\].crop_scale must be a pair"),
    (["data.augment.hue=0.7"], r"data.augment.hue must be a number in \[0, 0.5\]"),
    (["data.views=[{}, {size: 0}]"], r"data.views\[1\].size must be null or an integer >= 1"),
])
def test_bad_view_settings_are_one_line_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        _resolve(*overrides)


def test_identity_view_is_a_centre_crop_and_resize():
    """The generative methods' view: no randomness in the output, the image centre-cropped to a square."""
    img = torch.randint(0, 256, (3, 20, 30), dtype=torch.uint8)
    aug = SimCLRAugment(10, MEAN, STD, spec=IDENTITY)
    a, b = aug.geometric(img, torch.Generator().manual_seed(0)), aug.geometric(img, torch.Generator().manual_seed(1))
    from torchvision.transforms.v2 import functional as TF
    want = TF.resize(TF.center_crop(img, [20, 20]), [10, 10], antialias=True)
    assert torch.equal(a, b) and torch.equal(a, want)
