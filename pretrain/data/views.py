"""Views: what each augmented view of a sample is, declared by the method, resolved against the config.

A method declares its paper's augmentation as a tuple of `ViewSpec`s, one per view (`Method.views`);
SimCLR declares two equal ones, MoCo v3 BYOL's asymmetric pair, CPC and the generative methods one.
The config overrides them in two layers, later winning:

    method.views[v]  <-  data.augment.<key> (when not null: that parameter on every view)
                     <-  data.views[v].<key> (data.views: null, or one mapping per view)

`view_augmenters(cfg, views)` resolves them and builds one augmenter per view (`MultiViewAugment`);
the data pipeline applies view v's augmenter to view v: the geometric stage per image in the loader
workers, the photometric stage per batch (worker or device). Multi-crop is the same list with views of
other sizes (`multi_crop`: SwAV's and DINO's 2 global + N local crops). Views of one size are declared
next to each other, and the pipeline delivers them as one tensor per size (`view_groups`), so a method
runs its backbone once per resolution:

    batch["views"] = [group_0, group_1, ...]     group g: [V_g, B, 3, S_g, S_g], views in declared order
"""
from __future__ import annotations

import dataclasses
import difflib
import logging
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from pretrain.params import Rule, fraction, integer, non_negative, optional, pair

log = logging.getLogger("pretrain.data")


@dataclass(frozen=True)
class ViewSpec:
    """The augmentation of one view. Field defaults are MoCo v2's (and were the framework-wide
    defaults before each method declared its own): crop, flip, colour jitter, grayscale, blur.

    crop_scale/crop_ratio: RandomResizedCrop's area fraction and aspect-ratio ranges; flip_p: horizontal
    flip; jitter_p: probability of colour jitter, whose brightness/contrast/saturation factors are drawn
    from [max(0, 1 - s), 1 + s] and hue shift (in turns) from [-hue, hue]; grayscale_p; blur_p, blur_sigma
    (pixels), blur_kernel_frac (kernel side / image side, made odd and >= 3); solarize_p: BYOL's
    solarization (x >= 0.5 -> 1 - x on [0, 1] pixels, after blur); size: the view's side (None: data.image_size).
    """

    crop_scale: Tuple[float, float] = (0.2, 1.0)
    crop_ratio: Tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: Tuple[float, float] = (0.1, 2.0)
    blur_kernel_frac: float = 0.1
    solarize_p: float = 0.0
    size: Optional[int] = None

    def replace(self, **changes) -> "ViewSpec":
        return dataclasses.replace(self, **changes)


#: no augmentation: the whole image (centre crop to a square when it is not one), resized
IDENTITY = ViewSpec(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.0, grayscale_p=0.0,
                    blur_p=0.0)
FIELDS = tuple(f.name for f in dataclasses.fields(ViewSpec))
#: the keys of data.augment (every field but the view size: set it per view in data.views)
AUGMENT_KEYS = tuple(f for f in FIELDS if f != "size")


def multi_crop(global_view: ViewSpec, local_view: ViewSpec, num_global: int = 2, num_local: int = 6,
               local_size: int = 96) -> Tuple[ViewSpec, ...]:
    """Multi-crop views (Caron et al. 2020): `num_global` crops at data.image_size, then `num_local` crops
    of side `local_size` pixels (SwAV/DINO: 2 x 224 + 6..10 x 96)."""
    return (global_view.replace(size=None),) * num_global + (local_view.replace(size=local_size),) * num_local


def view_groups(specs: Sequence[ViewSpec], image_size: Optional[int] = None) -> List[Tuple[int, List[int]]]:
    """[(side, [view indices])] per run of equal-sized views, in declared order: the tensors of batch["views"]."""
    groups: List[Tuple[int, List[int]]] = []
    for v, s in enumerate(specs):
        side = s.size or image_size
        if groups and groups[-1][0] == side:
            groups[-1][1].append(v)
        else:
            groups.append((side, [v]))
    return groups


# ------------------------------------------------------------------------------------------------ checks
RULES = {
    "crop_scale": pair(0, 1), "crop_ratio": pair(0), "blur_sigma": pair(0, unit=" (pixels)"),
    **{k: fraction(what="a probability") for k in ("flip_p", "jitter_p", "grayscale_p", "blur_p", "solarize_p")},
    "brightness": non_negative(), "contrast": non_negative(), "saturation": non_negative(), "hue": fraction(0, 0.5),
    "blur_kernel_frac": fraction(0, 1, lo_open=True),
    "size": optional(integer(1)),
}


def _plain(v):
    """OmegaConf nodes -> Python; lists -> tuples (ViewSpec is hashable and compares by value)."""
    from omegaconf import OmegaConf

    if OmegaConf.is_config(v):
        v = OmegaConf.to_container(v, resolve=True)
    return tuple(v) if isinstance(v, list) else v


def _known(mapping, where: str) -> Dict[str, Any]:
    from pretrain.config import ConfigError

    out = {}
    for k, v in (mapping or {}).items():
        if k not in FIELDS:
            close = difflib.get_close_matches(str(k), FIELDS, n=1, cutoff=0.5)
            hint = f"; did you mean '{close[0]}'?" if close else f" (keys: {', '.join(FIELDS)})"
            raise ConfigError(f"unknown view key '{where}.{k}'{hint}")
        out[k] = _plain(v)
    return out


# ------------------------------------------------------------------------------------------------ resolving
def resolve_views(declared: Sequence[ViewSpec], augment=None, views=None, image_size: Optional[int] = None,
                  owner: str = "method") -> List[ViewSpec]:
    """The method's declared views with the config's overrides applied (module docstring), checked.

    augment: data.augment (a mapping; null values keep the method's value); views: data.views (null or a
    list of mappings, one per view). A bad value or key is a ConfigError naming the config key it came from.
    """
    from pretrain.config import ConfigError

    declared = list(declared)
    if not declared:
        raise ConfigError(f"{owner} declares no views")
    common = {k: v for k, v in _known(augment, "data.augment").items() if v is not None}
    if views is not None:
        views = list(_plain(views) if not isinstance(views, (list, tuple)) else views)
        if len(views) != len(declared):
            raise ConfigError(f"data.views has {len(views)} entries but {owner} takes {len(declared)} view(s); "
                              f"give one mapping per view (or {{}} to keep one), or set data.views=null")
    out = []
    for v, spec in enumerate(declared):
        values = {f: (getattr(spec, f), f"{owner}'s views[{v}].{f}") for f in FIELDS}
        values.update({k: (x, f"data.augment.{k}") for k, x in common.items()})
        if views is not None:
            per_view = _known(views[v] if views[v] is not None else {}, f"data.views[{v}]")
            values.update({k: (x, f"data.views[{v}].{k}") for k, x in per_view.items() if x is not None})
        for f, (x, src) in values.items():
            RULES[f].check(src, x)
        out.append(ViewSpec(**{f: x for f, (x, _) in values.items()}))
    sides = [side for side, _ in view_groups(out, image_size)]
    if len(sides) != len(set(sides)):
        raise ConfigError(f"views of side {[s.size or image_size for s in out]}: views of one size must come one after "
                          f"another (the pipeline batches each size as one tensor); reorder the 'size' entries of data.views")
    return out


class MultiViewAugment:
    """One augmenter per view: view v of every sample goes through `augs[v]`; views of one size form a
    group (`view_groups`), delivered as one tensor.

    Within a group, views that share their photometric settings go through the photometric stage as one
    batch (one set of draws from the generator, in view-major order), which is what a single augmenter
    for all views did before views were declared; otherwise each view's batch goes through its own
    augmenter. Groups, and views within a group, draw from the same generator in declared order.
    """

    def __init__(self, augs: Sequence):
        self.augs = list(augs)
        self.groups = [idx for _, idx in view_groups([a.spec.replace(size=a.size) for a in self.augs])]
        self.shared = [len({self.augs[v].photometric_key() for v in idx}) == 1 for idx in self.groups]

    def __len__(self) -> int:
        return len(self.augs)

    def geometric(self, img: torch.Tensor, g: torch.Generator) -> List[torch.Tensor]:
        """[3, h, w] uint8 -> one [3, S_v, S_v] uint8 crop per view, in view order."""
        return [a.geometric(img, g) for a in self.augs]

    def geometric_params(self, h: int, w: int, g: torch.Generator) -> list:
        """What `geometric` draws for an h x w image, without cropping: per view ((top, left, height, width), flip)."""
        return [a.geometric_params(h, w, g) for a in self.augs]

    def stack(self, crops: Sequence[Sequence[torch.Tensor]]) -> List[torch.Tensor]:
        """Per view, its B crops -> per group, [V_g, B, 3, S_g, S_g] uint8."""
        return [torch.stack([c for v in idx for c in crops[v]]).unflatten(0, (len(idx), -1)) for idx in self.groups]

    def photometric(self, groups: Sequence[torch.Tensor], g: torch.Generator) -> List[torch.Tensor]:
        """Per group, [V_g, B, 3, S_g, S_g] uint8 -> float32 of that shape, view v through augs[v]."""
        from pretrain.data.augment import new_batch

        out = []
        for idx, shared, x in zip(self.groups, self.shared, groups):
            if shared:
                out.append(self.augs[idx[0]].photometric(x.flatten(0, 1), g).view(x.shape))
            else:
                out.append(torch.stack([self.augs[v].photometric(xv, g) for v, xv in zip(idx, x)],
                                       out=new_batch(x.shape, x.device)))
        return out


def view_augmenters(cfg, declared: Sequence[ViewSpec], owner: str = "method") -> MultiViewAugment:
    """The per-view augmenters a run config (data.augment, data.views, data.image_size, data.mean/std)
    makes of a method's declared views."""
    from pretrain.data.augment import SimCLRAugment

    specs = resolve_views(declared, cfg.data.augment, cfg.data.get("views"), cfg.data.image_size, owner)
    return MultiViewAugment([SimCLRAugment(cfg.data.image_size, cfg.data.mean, cfg.data.std, spec=s) for s in specs])


def describe(specs: Sequence[ViewSpec]) -> str:
    """The views' augmentation in one line, for the run log."""
    def one(s):
        return ", ".join(f"{f}={getattr(s, f)}" for f in (FIELDS if s.size else AUGMENT_KEYS))
    if len(set(specs)) == 1:
        return f"{len(specs)} view(s), each: {one(specs[0])}"
    return "; ".join(f"view {v}: {one(s)}" for v, s in enumerate(specs))
