"""Few-shot linear probe on frozen features: N labelled images per class (stratified, seeded), the linear probe
fit on them, top-1 on the whole val split; mean, std and a Student-t 95% confidence interval over seeds."""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from pretrain.evaluation import linear_probe


def check_counts(shots: Sequence[int], seeds: int) -> None:
    """One-line ValueErrors for a shot count < 1 or fewer than one seed."""
    bad = [n for n in shots if n < 1]
    if bad:
        raise ValueError(f"--shots must be >= 1 (images per class), got {bad[0]}")
    if seeds < 1:
        raise ValueError(f"--seeds must be >= 1 (few-shot draws per shot count), got {seeds}")


def check_shots(labels: torch.Tensor, shots: Sequence[int], names: Optional[Sequence[str]] = None) -> None:
    """One-line ValueErrors: unlabelled samples, fewer than 2 classes, or a class with fewer training images
    [labels: N] than the largest shot count (named, with its count)."""
    if len(labels) and int(labels.min()) < 0:
        raise ValueError(f"{int((labels < 0).sum())} --train samples have no .cls label; few-shot needs labelled shards")
    classes, counts = torch.unique(labels, return_counts=True)
    if len(classes) < 2:
        raise ValueError(f"few-shot needs at least 2 classes in --train, found {len(classes)}")
    n, i = max(shots), int(counts.argmin())
    if counts[i] < n:
        c = int(classes[i])
        name = f" ('{names[c]}')" if names is not None and c < len(names) else ""
        raise ValueError(f"--shots {n} needs {n} training images of every class, but class {c}{name} has only "
                         f"{int(counts[i])} in --train; use --shots of at most {int(counts[i])}")


def sample_shots(labels: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """Indices [C*n] of `n` samples of each class present in `labels` [N], drawn without replacement by
    torch.Generator(seed) (class by class, in label order); check_shots first for a readable error."""
    g = torch.Generator().manual_seed(seed)
    picks = []
    for c in torch.unique(labels):
        idx = (labels == c).nonzero().flatten()                     # [n_c] this class's samples
        picks.append(idx[torch.randperm(len(idx), generator=g)[:n]])
    return torch.cat(picks)


def mean_ci(values: Sequence[float], level: float = 0.95) -> Tuple[float, Optional[float], Optional[List[float]]]:
    """(mean, sample std (ddof 1), [lo, hi]): the Student-t interval mean -/+ t_{(1+level)/2, S-1} std / sqrt(S)
    over S values; std and interval are None for a single value."""
    from scipy.stats import t

    s = len(values)
    mean = sum(values) / s
    if s < 2:
        return mean, None, None
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (s - 1))
    half = float(t.ppf((1 + level) / 2, s - 1)) * std / math.sqrt(s)
    return mean, std, [mean - half, mean + half]


def fewshot(train_f, train_y, val_f, val_y, shots: Sequence[int] = (1, 5, 10), seeds: Sequence[int] = range(5),
            names: Optional[Sequence[str]] = None, **probe) -> List[Dict]:
    """For each N in `shots`: the linear probe (pretrain.evaluation.linear_probe, keyword args `probe`) fit on
    sample_shots(train_y, N, seed) of train_f [N_train, D] for each seed, top-1 on all of val_f [N_val, D].
    Returns one dict per N: {"shots", "seeds", "top1" (mean), "std", "ci95", "top1_per_seed", "train" (C*N)}."""
    seeds = list(seeds)
    check_counts(shots, len(seeds))
    check_shots(train_y, shots, names)
    out = []
    for n in shots:
        accs = []
        for seed in seeds:
            idx = sample_shots(train_y, n, seed)
            accs.append(linear_probe(train_f[idx], train_y[idx], val_f, val_y, seed=seed, **probe))
        mean, std, ci = mean_ci(accs)
        out.append({"shots": n, "seeds": len(accs), "top1": mean, "std": std, "ci95": ci, "top1_per_seed": accs,
                    "train": len(idx)})
    return out
