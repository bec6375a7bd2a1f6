"""The cross-rank proof for every method that claims it (`Method.cross_rank_exact`): W=2 ranks at local
batch B give the loss and every parameter gradient of one process at batch 2B on the same samples, under
DDP and under DeepSpeed ZeRO-2, with each method's own digits config (heads, BN, hyper-parameters).

This is where distributed bugs of these methods show: BN statistics per rank instead of global, a mean of
per-rank cross-correlation matrices instead of their sum, variance/covariance over local embeddings,
Sinkhorn marginals per rank, negatives from one rank only. Each rank runs the real backend; the reference
is plain autograd in this process."""
from __future__ import annotations

import os
import sys

import pytest
import torch

from helpers import WORKERS, torchrun
from pretrain.methods import METHODS

sys.path.insert(0, str(WORKERS))
from rank_common import build, config_path, inputs  # noqa: E402

W, B = 2, 4
EXACT = [n for n in METHODS.names() if METHODS.get(n).cross_rank_exact]
#: methods whose objective is per rank by design, and why (anything else must claim cross_rank_exact)
PER_RANK = {
    "cpc": "its encoder's BatchNorm normalises each rank's patches (CPC has no sync_bn; CPC v2 uses layer norm)",
    "moco_v2": "shuffle BN normalises each GPU's keys on its own, and each rank's queue holds its own keys",
    "vae": "per-sample loss with random draws from each rank's own generator",
    "gan": "random latents per rank; two optimizer phases",
    "pixelcnn": "per-sample likelihood, no cross-sample term: exact, but nothing to prove",
    "ddpm": "random timesteps and noise per rank",
}


def test_every_embedding_method_claims_cross_rank_exactness():
    assert set(METHODS.names()) == set(EXACT) | set(PER_RANK)
    assert all(config_path(n).exists() for n in EXACT)


@pytest.fixture(scope="module", params=["ddp", "zero2"])
def ranks(request, tmp_path_factory):
    """One torchrun of W ranks over every exact method (2 launches in all, not one per method)."""
    d = tmp_path_factory.mktemp(f"ranks_{request.param}")
    names = os.environ.get("RANK_TEST_METHODS", " ".join(EXACT)).split()   # a subset while working on one method
    data = {n: inputs(build(n)[1], W * B, seed=1) for n in names}
    torch.save(data, d / "inputs.pt")
    torchrun(WORKERS / "method_ranks.py", request.param, d / "inputs.pt", d / "out.pt", *names, timeout=900,
             check=True)
    return data, torch.load(d / "out.pt"), request.param


def _close(got, want, name, rel=2e-4):
    """Equal up to float32 summation order: atol relative to the tensor's scale."""
    scale = max(want.abs().max().item(), 1e-12)
    torch.testing.assert_close(got, want, rtol=rel, atol=rel * scale, msg=lambda m: f"{name}: {m}")


@pytest.mark.slow
@pytest.mark.parametrize("name", EXACT)
def test_two_ranks_equal_one_process_with_the_whole_batch(ranks, name):
    data, res, backend = ranks
    if name not in res:
        pytest.skip("not in RANK_TEST_METHODS")
    _, method = build(name)
    method.before_step(0, 10, 5)
    loss = method({"views": data[name]})["loss"]
    loss.backward()
    got = res[name]
    assert got["loss"].item() == pytest.approx(loss.item(), rel=1e-5, abs=1e-6)
    want = {n: p.grad for n, p in method.named_parameters() if p.requires_grad}
    assert set(got["grads"]) == set(want)
    for n, g in want.items():
        if g is None:   # unused this step (e.g. frozen by the method): no gradient on either side
            assert got["grads"][n] is None or not got["grads"][n].any(), n
            continue
        _close(got["grads"][n], g, f"{backend} {name} {n}")
    # the comparison has teeth: per-rank BN statistics give another loss, where the method has BN
    if any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in method.modules()):
        assert abs(got["plain_loss"].item() - loss.item()) > 1e-4 * max(1.0, abs(loss.item()))
