"""Frozen-feature evaluation: cosine kNN with temperature-weighted votes, and a linear probe."""
from __future__ import annotations

from typing import Callable, Tuple

import torch
import torch.nn.functional as F

from pretrain.data.augment import normalize


@torch.no_grad()
def extract_features(fn: Callable, loader, device, mean, std, dtype=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Run `fn` ([B,3,H,W] float -> [B,D]) over an eval loader of uint8 batches -> (feats [N,D], labels [N])."""
    feats, labels = [], []
    for batch in loader:
        x = normalize(batch["image"].to(device), mean, std)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            feats.append(fn(x).float().flatten(1).cpu())
        labels.append(batch["label"])
    if not feats:
        return torch.empty(0, 0), torch.empty(0, dtype=torch.long)
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def knn_accuracy(train_f, train_y, test_f, test_y, k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> float:
    """Cosine kNN (as in InstDisc/DINO): the k nearest train features vote with weight exp(sim/T).

    train_f: [N, D], test_f: [M, D]; returns top-1 accuracy in [0, 1].
    """
    if len(train_f) == 0 or len(test_f) == 0:
        raise ValueError("kNN needs non-empty train and test features")
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    k = min(k, len(train_f))
    train_f, test_f = F.normalize(train_f.float(), dim=1), F.normalize(test_f.float(), dim=1)
    correct = 0
    for i in range(0, len(test_f), chunk):
        sim = test_f[i:i + chunk] @ train_f.t()                               # [m, N]
        top_sim, top_idx = sim.topk(k, dim=1)                                # [m, k]
        votes = torch.zeros(len(sim), num_classes)
        votes.scatter_add_(1, train_y[top_idx], (top_sim / temperature).exp())
        correct += (votes.argmax(1) == test_y[i:i + chunk]).sum().item()
    return correct / len(test_f)


def linear_probe(train_f, train_y, test_f, test_y, epochs: int = 100, lr: float = 0.1, weight_decay: float = 1e-4,
                 seed: int = 0) -> float:
    """Multinomial logistic regression on standardised frozen features (full-batch L-BFGS)."""
    torch.manual_seed(seed)
    mu, sd = train_f.mean(0), train_f.std(0) + 1e-6
    xtr, xte = (train_f - mu) / sd, (test_f - mu) / sd
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    clf = torch.nn.Linear(xtr.shape[1], num_classes)
    opt = torch.optim.LBFGS(clf.parameters(), lr=lr, max_iter=epochs, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(clf(xtr), train_y) + weight_decay * clf.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return (clf(xte).argmax(1) == test_y).float().mean().item()


def eval_table(lines) -> str:
    """The eval JSON lines (dicts: eval, top1, and for few-shot shots/std/ci95) as a compact text table."""
    rows = [("eval", "top1", "std", "95% CI", "train", "val")]
    for r in lines:
        ci = r.get("ci95")
        rows.append((r["eval"] + (f" {r['shots']}-shot" if "shots" in r else ""),
                     "-" if r.get("top1") is None else f"{r['top1']:.4f}",
                     "-" if r.get("std") is None else f"{r['std']:.4f}",
                     "-" if ci is None else f"[{ci[0]:.4f}, {ci[1]:.4f}]", str(r.get("train", "-")), str(r.get("val", "-"))))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
                     for row in rows)
