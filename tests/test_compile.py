"""train.compile (pretrain/engine/compile.py): the compiled method gives eager's loss and gradients, changing
schedule values do not recompile it, a graph the backend cannot compile runs eagerly after one warning line,
and a backend torch does not know is a one-line error. The cheap `aot_eager` backend (same kernels as eager)
stands in for inductor, which takes minutes to compile on 2 CPU cores.

aot_eager still costs 2-60 s per method on 2 CPU cores (the registry: 206 s), so the registry-wide test runs a
representative three by default (SimCLR on a ResNet, MAE on a ViT, MoCo v2 with its queue pointer, an int that
changes every step) and every method with PRETRAIN_COMPILE_ALL=1."""
import copy
import logging
import os

import pytest
import torch
import torch._dynamo

from pretrain.config import ConfigError, load_config
from pretrain.engine.compile import CompiledMethod, compile_backend, compile_method
from pretrain.methods import METHODS, Method
from test_methods import _batch, _small

DEFAULT = ["simclr", "mae", "moco_v2"]
FALLS_BACK = {"finetune"}
#: smaller heads where the paper's are wide or deep (compile time grows with the graph)
EXTRA = {"mae": ["method.decoder_dim=32", "method.decoder_depth=2", "method.decoder_heads=2"],
         "ijepa": ["method.pred_embed_dim=32", "method.pred_depth=2", "method.pred_num_heads=2"],
         "barlow_twins": ["method.proj_hidden_dim=256", "method.proj_dim=256"],
         "vicreg": ["method.proj_hidden_dim=256", "method.proj_dim=256"],
         "swav": ["method.freeze_prototypes_epochs=2"]}   # its end (a bool switching the graph) recompiles, rightly
ALL = os.environ.get("PRETRAIN_COMPILE_ALL") == "1"


def _step(model, call, batch, ctx):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    model.before_step(ctx)
    loss = call(batch, ctx)["loss"]
    loss.backward()
    model.after_step(ctx)
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.slow
@pytest.mark.parametrize("name", [n if ALL or n in DEFAULT else pytest.param(n, marks=pytest.mark.skip(
    reason="PRETRAIN_COMPILE_ALL=1 runs every method")) for n in METHODS.names()])
def test_compiled_method_matches_eager(name):
    """Three steps of every phase, the schedule's values changing: compiled (aot_eager) and eager give the same
    loss and gradients, and after the first step (lazily built state, e.g. DINO's center) nothing recompiles."""
    torch._dynamo.reset()
    _, eager = _small(name, *EXTRA.get(name, []))
    model = copy.deepcopy(eager)
    compiled = CompiledMethod(model, "aot_eager", name)
    batch = _batch(eager)
    graphs = []
    for step in range(3):
        for phase in eager.phases:
            outs = [_step(m, call, batch, m.step_context(step, 10, 2, phase=phase, lr=0.1 / (step + 1)))
                    for m, call in ((eager, eager), (model, compiled))]
            (la, ga), (lb, gb) = outs
            torch.testing.assert_close(lb, la, rtol=1e-5, atol=1e-6)
            assert ga.keys() == gb.keys()
            a, b = torch.cat([g.flatten() for g in ga.values()]), torch.cat([gb[k].flatten() for k in ga])
            assert (a - b).norm() <= 1e-4 * a.norm() + 1e-8, (name, step, phase)
        graphs.append(compiled.graphs)
    # finetune's timm mixup reads a tensor's value (.item()): aot_eager fails on that graph, which runs eagerly
    assert bool(compiled.errors) == (name in FALLS_BACK) and graphs[0] > 0
    assert graphs[1] == graphs[2], graphs


class _Tempered(Method):
    """A scheduled temperature read inside the forward, as DINO's teacher temperature."""
    defaults = {"temp": {"shape": "linear", "start": 0.1, "end": 0.5}}
    scheduled = ("temp",)
    views = ()

    def training_step(self, batch, ctx):
        z = torch.relu(self.backbone(batch["x"]))   # torch.relu: what the failing test backend looks for
        return {"loss": torch.logsumexp(z / ctx["temp"], 1).mean()}


def _tempered_pair(backend: str):
    """(eager _Tempered, its copy, the copy compiled with `backend`, a batch), from a fresh dynamo cache."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = _Tempered(torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)))
    model = copy.deepcopy(eager)
    return eager, model, CompiledMethod(model, backend, "tempered"), {"x": torch.randn(5, 8)}


def test_changing_schedule_values_do_not_recompile():
    """ctx["temp"] and ctx["lr"] differ at every step; compiled once, the graph is reused (a plain float in
    the context would be guarded on its value: a new graph every step), and it matches eager."""
    eager, model, compiled, batch = _tempered_pair("aot_eager")
    temps = []
    for step in range(4):
        outs = [_step(m, call, batch, m.step_context(step, 4, 1, lr=1.0 / (step + 1)))
                for m, call in ((eager, eager), (model, compiled))]
        temps.append(eager.step_context(step, 4, 1)["temp"])
        torch.testing.assert_close(outs[1][0], outs[0][0])
        for k, g in outs[0][1].items():
            torch.testing.assert_close(outs[1][1][k], g)
    assert len(set(temps)) == 4 and compiled.graphs == 1


def test_backend_failure_falls_back_to_eager_with_one_warning(caplog):
    """A backend that cannot compile the graph (torch's test backend that fails on relu): one warning line
    naming the method and the error, the forward runs eagerly with eager's results, and later steps too."""
    eager, model, compiled, batch = _tempered_pair("relu_compile_error_TESTING_ONLY")
    with caplog.at_level(logging.WARNING, logger="pretrain.engine.compile"):
        for step in range(2):
            (la, ga), (lb, gb) = [_step(m, call, batch, m.step_context(step, 4, 1))
                                  for m, call in ((eager, eager), (model, compiled))]
            torch.testing.assert_close(lb, la)
            assert ga.keys() == gb.keys()
    ours = [r.getMessage() for r in caplog.records if r.name == "pretrain.engine.compile"]
    assert len(ours) == 1 and "\n" not in ours[0], ours
    assert "method tempered" in ours[0] and "relu_compile_error_TESTING_ONLY" in ours[0], ours
    assert compiled.errors


def test_config_values():
    assert compile_backend(False) is None and compile_backend(True) == "inductor"
    assert compile_backend("aot_eager") == "aot_eager"
    with pytest.raises(ConfigError, match=r"^train.compile='inductr' is not a torch.compile backend; use false, true"):
        compile_backend("inductr")
    cfg = load_config(None, ["data.train=unused", "train.compile=aot_eager"])
    model = torch.nn.Linear(2, 2)
    assert isinstance(compile_method(model, cfg), CompiledMethod)
    assert compile_method(model, load_config(None, ["data.train=unused"])) is model


def test_ddp_backend_compiles_the_method():
    """train.compile reaches the DDP backend (one process): its forward goes through CompiledMethod."""
    from pretrain.engine.backends import create_backend

    torch._dynamo.reset()
    cfg, method = _small("simclr", "train.compile=aot_eager", "method.proj_hidden_dim=32", "method.proj_dim=16",
                         "model.name=resnet10t")
    backend = create_backend(method, cfg, torch.device("cpu"))
    assert isinstance(backend.model, CompiledMethod)
