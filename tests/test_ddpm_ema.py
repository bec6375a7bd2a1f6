"""DDPM numerics under half precision, the DDIM update, and EMA state across resume.

* DDPM's schedule arithmetic (abar, the noising x_t = sqrt(abar) x0 + sqrt(1 - abar) eps) stays fp32 whatever the
  batch/weights dtype; only the UNet's inputs are cast (by the UNet, to its weights' dtype).
* One DDIM step equals the paper's update (Song et al. 2021, eq. 12, eta = 0) with x0 clamped to [-1, 1] and eps
  recomputed from the clamped x0, against an independent float64 computation.
* An EMA's state (the fp32 masters of half-precision targets) is checkpointed: a run resumed at step 1 ends with
  bit-identical EMA weights and losses to one that never stopped (MoCo v2, DDPM; DDP, DeepSpeed ZeRO-2 bf16).
"""
from __future__ import annotations

import math
import shutil

import pytest
import torch
import torch.nn as nn

from helpers import tb_scalars, torchrun, train_overrides
from pretrain.config import load_config
from pretrain.methods import create_method
from pretrain.models.ema import EMA, momentum_copy

GEN = ["data.train=unused", "model.name=resnet10t", "data.mean=[0.5,0.5,0.5]", "data.std=[0.5,0.5,0.5]",
       "method.name=ddpm", "method.base_channels=8", "method.channel_mults=[1,2]", "method.blocks=1", "method.sample_steps=5"]


def _ddpm(size=8, *extra):
    return create_method(load_config(None, GEN + [f"data.image_size={size}", *extra]))


class _Recorder(nn.Module):
    """A stand-in network: records what it is given, predicts `out` (or zeros)."""

    def __init__(self, out=None):
        super().__init__()
        self.out, self.seen = out, []

    def forward(self, x, t, y=None):
        self.seen.append((x.detach().clone(), t.detach().clone()))
        return torch.zeros_like(x) if self.out is None else self.out.to(x.dtype)


# ------------------------------------------------------------------------------------------------ half precision
def test_noising_is_never_noise_free_with_a_bf16_batch():
    """The cosine schedule over 1000 steps has 1 - abar < 2^-10 for its first ~21 timesteps: rounded to bf16
    (the dtype of the batch under DeepSpeed bf16) abar is exactly 1 and those timesteps get no noise at all.
    With x0 = 0, x_t = sqrt(1 - abar_t) eps, so the network's input is zero exactly where 1 - abar_t == 0 in
    the dtype training_step actually noises in."""
    m = _ddpm(8, "method.timesteps=1000", "method.schedule=cosine")
    m.net = _Recorder()
    torch.manual_seed(0)
    x0 = torch.zeros(16000, 3, 1, 1, dtype=torch.bfloat16)          # [B, 3, 1, 1]: enough draws to hit every t
    loss = m.training_step({"views": [x0[None]]}, m.step_context())["loss"]
    x_t, t = m.net.seen[0]
    assert set(t.tolist()) == set(range(1000))
    silent = sorted(set(t[(x_t == 0).flatten(1).any(1)].tolist()))
    assert silent == [], f"{len(silent)} timesteps get no noise: {silent[:30]}"
    assert torch.isfinite(loss)


def test_unet_with_half_precision_weights_takes_fp32_inputs():
    """DeepSpeed bf16 casts the weights (not the buffers) to bf16; DDPM noises in fp32, and the UNet casts its
    inputs, the image and the timestep embedding, to its weights' dtype (today: a dtype-mismatch crash)."""
    m = _ddpm(8)
    for p in m.parameters():
        p.data = p.data.to(torch.bfloat16)
    x0 = (torch.randint(0, 256, (1, 4, 3, 8, 8), generator=torch.Generator().manual_seed(0)) / 127.5 - 1)
    loss = m.training_step({"views": [x0]}, m.step_context())["loss"]
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad.float()).all() for p in m.net.parameters())


# ------------------------------------------------------------------------------------------------ DDIM
def _cosine_abar64(T: int, s: float = 0.008) -> torch.Tensor:
    """abar_k for index k (= step k + 1), Nichol & Dhariwal (2021) eq. 17 with betas clipped at 0.999, float64."""
    f = [math.cos((k / T + s) / (1 + s) * math.pi / 2) ** 2 for k in range(T + 1)]
    out, prod = [], 1.0
    for k in range(T):
        prod *= 1 - min(1 - f[k + 1] / f[k], 0.999)
        out.append(prod)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_ddim_step_recomputes_eps_from_the_clamped_x0(prediction):
    """With a network whose prediction puts part of x0_hat outside [-1, 1], one DDIM step (eta = 0) from
    t to t_prev must be Song et al.'s eq. 12 with x0_hat clamped and eps_hat = (x_t - sqrt(abar_t) x0_hat) /
    sqrt(1 - abar_t) recomputed from it (as ermongroup/ddim and improved-diffusion's _predict_eps_from_xstart
    do), computed here independently in float64."""
    T, t, t_prev = 20, 12, 5
    m = _ddpm(8, f"method.timesteps={T}", "method.schedule=cosine", f"method.prediction={prediction}")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 8, 8, generator=g)                            # x_t
    out = 3 * torch.randn(2, 3, 8, 8, generator=g)                     # the network's raw prediction
    net = _Recorder(out)

    abar = _cosine_abar64(T)
    a, s = abar[t].sqrt(), (1 - abar[t]).sqrt()
    x64, o64 = x.double(), out.double()
    x0_raw = (x64 - s * o64) / a if prediction == "eps" else a * x64 - s * o64
    clamped = (x0_raw.abs() > 1)
    assert 0.1 < clamped.double().mean() < 0.9                          # some clamped, some not
    x0 = x0_raw.clamp(-1, 1)
    eps = (x64 - a * x0) / s
    want = abar[t_prev].sqrt() * x0 + (1 - abar[t_prev]).sqrt() * eps

    # the (eps, x0) pair a DDIM step uses lies on the line through x_t: x_t = sqrt(abar) x0 + sqrt(1 - abar) eps
    eps_hat, x0_hat = m.predict_eps_x0(net, x, torch.full((2,), t))
    torch.testing.assert_close(x0_hat.double(), x0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(eps_hat.double(), eps, rtol=1e-4, atol=1e-4)
    got = m.sampler_step(net, x, t, t_prev, "ddim")
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    # the last step lands on the clamped x0
    torch.testing.assert_close(m.sampler_step(net, x, t, -1, "ddim").double(), x0, rtol=1e-5, atol=1e-5)



# ------------------------------------------------------------------------------------------------ EMA state
def _bf16_pair():
    """An online fp32 network and its bf16 EMA target (DeepSpeed's bf16 casts the frozen copy too)."""
    torch.manual_seed(0)
    online = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))
    target = momentum_copy(online).to(torch.bfloat16)
    return online, target


def _train(online, emas, steps, m=0.9):
    for _ in range(steps):
        with torch.no_grad():
            for p in online.parameters():
                p.add_(0.01 * torch.randn_like(p))
        for ema in emas:
            ema.update(m)


def test_ema_state_round_trip_continues_bit_for_bit(tmp_path):
    """The fp32 masters of a bf16 EMA target survive a checkpoint (torch.save, weights_only load): an EMA rebuilt
    on the reloaded target continues exactly like the one that never stopped. Restarting the masters from the
    bf16 target instead (the old resume) does not."""
    online, target = _bf16_pair()
    ema = EMA(target, online)
    _train(online, [ema], 3)
    torch.save({"ema": ema.state_dict(), "target": target.state_dict()}, tmp_path / "ck.pt")
    ck = torch.load(tmp_path / "ck.pt", weights_only=True)
    assert ck["ema"]["world"] == 1 and len(ck["ema"]["full"]) == 4 and not any(ck["ema"]["parts"])

    resumed, restarted = momentum_copy(online), momentum_copy(online)
    for t in (resumed, restarted):
        t.to(torch.bfloat16).load_state_dict(ck["target"])
    ema_resumed, ema_restarted = EMA(resumed, online), EMA(restarted, online)
    ema_resumed.load_state_dict(ck["ema"])
    ema_restarted.load_state_dict(None)
    torch.manual_seed(1)
    _train(online, [ema, ema_resumed, ema_restarted], 2)
    for a, b in zip(target.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    assert any(not torch.equal(a, b) for a, b in zip(target.parameters(), restarted.parameters()))


def test_ema_state_saved_by_another_number_of_ranks(caplog):
    """ZeRO-3 partition masters saved by 2 ranks cannot serve 1 rank: they are dropped with a warning and
    restart from the target; replicated ("full") masters are kept. A master whose shape is not the model's is
    refused with an error naming the cause."""
    online, target = _bf16_pair()
    ema = EMA(target, online)
    _train(online, [ema], 1)
    state = ema.state_dict()
    state = dict(state, world=2, parts=[{"0.part": torch.zeros(18)}, {"0.part": torch.zeros(17)}])
    fresh = EMA(target, online)
    with caplog.at_level("WARNING", logger="pretrain"):
        fresh.load_state_dict(state)
    assert "saved by 2 rank(s) and this run has 1" in caplog.text
    assert set(fresh._masters) == {(i, "full") for i in range(4)}
    bad = dict(state, world=1, parts=[], full={**state["full"], "0.full": torch.zeros(3, 5)})
    with pytest.raises(ValueError, match=r"EMA master 0.full is \(3, 5\).*\(7, 5\)"):
        EMA(target, online).load_state_dict(bad)


# ------------------------------------------------------------------------------------------------ real runs
MOCO = dict(method__name="moco_v2", method__queue_size=64, method__momentum=0.9, method__proj_hidden_dim=32,
            method__proj_dim=16)
DDPM = ["method.base_channels=8", "method.channel_mults=[1,2]", "method.blocks=1", "method.timesteps=20",
        "method.sample_steps=5", "method.bound_samples=19", "method.ema_decay=0.9"]
EMA_PREFIX = {"moco_v2": ("key_backbone.", "key_projector."), "ddpm": ("net_ema.",)}
STEPS = 2   # checkpoints at 1 and 2; the resumed run does step 2, whose EMA update needs the saved masters


def _overrides(shards, run_dir, method, backend):
    kv = dict(train__max_steps=STEPS, checkpoint__every_steps=1, checkpoint__keep_last=5, optim__name="adamw",
              optim__lr=1e-3)
    if backend.startswith("zero"):   # bf16 weights: the EMA keeps fp32 masters (ZeRO-3: one per rank's partition)
        kv.update(train__backend="deepspeed", deepspeed__zero_stage=int(backend[-1]), train__precision="bf16")
    if method == "moco_v2":
        # 32 px under bf16: at 16 px resnet10t's layer4 sees a 1x1 input, where PyTorch's CPU bf16 conv
        # weight gradient is not deterministic (see test_deepspeed.py)
        return train_overrides(shards, run_dir, data__image_size=32 if backend != "ddp" else 16, **MOCO, **kv)
    ov = train_overrides(shards, run_dir, method__name="ddpm", data__mean="[0.5,0.5,0.5]", data__std="[0.5,0.5,0.5]",
                         data__image_size=8, **kv)
    return [o for o in ov if not o.startswith("method.proj")] + DDPM


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, digits_shards, experiment):
    """(method, backend) -> run dir of a 2-rank run of STEPS steps with a checkpoint at every step (made once)."""
    made = {}

    def get(method, backend):
        if (method, backend) not in made:
            run_dir = tmp_path_factory.mktemp("ema") / f"{method}_{backend}"
            torchrun("-m", "pretrain.cli", "train", experiment, *_overrides(digits_shards, run_dir, method, backend),
                     timeout=580, check=True)
            made[method, backend] = run_dir
        return made[method, backend]
    return get


def _checkpoint(run_dir, step):
    """(model state dict, rank 0's method extra state) of a DDP (.pt) or DeepSpeed (dir) checkpoint; under
    ZeRO-3 the weights consolidated from the ranks' partitions."""
    p = run_dir / "checkpoints" / f"step_{step:08d}"
    if p.with_suffix(".pt").is_file():
        state = torch.load(p.with_suffix(".pt"), map_location="cpu", weights_only=True)
        return state["model"], state["extra"]
    zero3 = p / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    state = torch.load(zero3 if zero3.is_file() else p / "mp_rank_00_model_states.pt", map_location="cpu",
                       weights_only=True)
    if not zero3.is_file():
        return state["module"], state["extra"]
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(p.parent), tag=p.name), state["extra"]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_ddpm_trains_under_deepspeed_zero2_bf16(uninterrupted):
    """The timestep embedding reaches the bf16 UNet in bf16 (today: a dtype-mismatch crash at the first step)."""
    losses = tb_scalars(uninterrupted("ddpm", "zero2"))
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert all(math.isfinite(v) and v > 0 for v in losses.values()), losses


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("method,backend", [("moco_v2", "ddp"), ("ddpm", "ddp"), ("moco_v2", "zero2"),
                                            ("ddpm", "zero2"), ("ddpm", "zero3")])
def test_resumed_run_has_bit_identical_ema(tmp_path, digits_shards, experiment, uninterrupted, method, backend):
    """Resumed from its step-1 checkpoint, a 2-rank run ends step 2 with the same EMA weights (MoCo's key encoder,
    DDPM's EMA UNet), the same EMA masters and the same loss, bit for bit, as the run that never stopped. Under
    DeepSpeed bf16 the EMA target is bf16 and its fp32 master must be restored: restarted from the bf16 target
    (the old resume), the step-2 update rounds differently. Under ZeRO-3 each rank's master is its own partition,
    gathered to rank 0 on save and handed back on load."""
    ref = uninterrupted(method, backend)
    res = tmp_path / "resumed"
    (res / "checkpoints").mkdir(parents=True)
    src = next(p for p in (ref / "checkpoints").iterdir() if p.name.startswith("step_00000001"))
    (shutil.copytree if src.is_dir() else shutil.copy)(src, res / "checkpoints" / src.name)
    torchrun("-m", "pretrain.cli", "train", experiment, *_overrides(digits_shards, res, method, backend),
             timeout=580, check=True)
    assert "resumed from step 1" in (res / "log.txt").read_text()

    want, got = tb_scalars(ref), tb_scalars(res)
    assert sorted(got) == [STEPS] and got[STEPS] == want[STEPS], (got, want)
    (w_model, w_extra), (g_model, g_extra) = _checkpoint(ref, STEPS), _checkpoint(res, STEPS)
    ema_keys = [k for k in w_model if k.startswith(EMA_PREFIX[method]) and w_model[k].is_floating_point()]
    assert ema_keys
    differ = [k for k in ema_keys if not torch.equal(w_model[k], g_model[k])]
    assert not differ, f"{len(differ)} of {len(ema_keys)} EMA tensors differ, e.g. {differ[:5]}"
    (w_ema,), (g_ema,) = w_extra["ema"].values(), g_extra["ema"].values()
    for w, g in [(w_ema["full"], g_ema["full"]), *zip(w_ema["parts"], g_ema["parts"])]:
        assert w.keys() == g.keys() and all(torch.equal(w[k], g[k]) for k in w)
    params = [k for k in ema_keys if "running_" not in k and "num_batches" not in k]
    if backend == "ddp":         # fp32 weights: the EMA is all in the weights
        assert w_ema["full"] == {} and not any(w_ema["parts"])
    elif backend == "zero2":     # bf16 weights: one fp32 master per parameter, the same on every rank
        assert len(w_ema["full"]) == len(params) and w_model[ema_keys[0]].dtype == torch.bfloat16
    else:                        # each rank's partition of every parameter (the EMA UNet never runs a forward)
        assert len(w_ema["parts"]) == 2 and all(len(part) == len(params) for part in w_ema["parts"])
        assert not torch.equal(w_ema["parts"][0]["0.part"], w_ema["parts"][1]["0.part"])
