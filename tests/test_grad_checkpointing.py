"""model.grad_checkpointing: timm's activation checkpointing on the backbone (and on MAE's decoder and
I-JEPA's predictor blocks). The same gradients as without it (float64), recomputation really happens in the
backward (a forward hook counts the calls), and a model timm cannot checkpoint is a one-line error."""
import pytest
import torch

from helpers import SMALL_VIT
from pretrain.config import load_config
from pretrain.methods import create_method
from pretrain.models import ModelError, create_backbone

VIT = ("vit_tiny_patch16_224", {"img_size": 16, "patch_size": 4, "depth": 2, "drop_path_rate": 0.0}, "blocks")
RESNET = ("resnet10t", {}, "layer1")
SMALL_HEADS = {"mae": ["method.decoder_dim=32", "method.decoder_depth=2", "method.decoder_heads=2"],
               "ijepa": ["method.pred_embed_dim=32", "method.pred_depth=2", "method.pred_num_heads=2"]}


def _grads(name, kwargs, on: bool):
    """float64 loss and gradients of one forward+backward of a fresh backbone (seed 0) on a fixed batch, and
    how often `blocks[0]` / `layer1[0]` started its forward."""
    torch.manual_seed(0)
    model = create_backbone(name, kwargs, grad_checkpointing=on).double().train()
    calls = []
    module = getattr(model, "blocks", None)
    module = (module if module is not None else model.layer1)[0]
    module.register_forward_pre_hook(lambda *a: calls.append(1))   # (the recomputation stops early, before a post-hook)
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    loss = model(x).pow(2).sum()
    loss.backward()
    return loss.item(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}, len(calls)


@pytest.mark.parametrize("name,kwargs,_", [VIT, RESNET], ids=["vit", "resnet"])
def test_checkpointing_recomputes_and_keeps_the_gradients(name, kwargs, _):
    l0, g0, calls0 = _grads(name, kwargs, False)
    l1, g1, calls1 = _grads(name, kwargs, True)
    assert (calls0, calls1) == (1, 2)   # with it on, the block runs again in the backward
    assert l1 == l0
    assert g0.keys() == g1.keys() and len(g0) > 10
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-12, atol=1e-12, msg=k)


@pytest.mark.parametrize("name", ["mae", "ijepa"])
def test_method_blocks_follow_the_config(name):
    """Through the config: the backbone's blocks and the method's own block stack (MAE's decoder, I-JEPA's
    predictor) run twice per training step with model.grad_checkpointing=true, once without; I-JEPA's
    target encoder (no_grad) once either way."""
    from test_methods import _batch

    for on, expect in ((False, 1), (True, 2)):
        cfg = load_config(None, ["data.train=unused", "data.image_size=16", f"method.name={name}",
                                 f"model.grad_checkpointing={str(on).lower()}"] + SMALL_VIT + SMALL_HEADS[name])
        method = create_method(cfg)
        own = method.decoder_blocks if name == "mae" else method.predictor.blocks
        watched = {"backbone": method.backbone.blocks[0], "own": own[0]}
        if name == "ijepa":
            watched["target"] = method.key_backbone.blocks[0]
        calls = {k: 0 for k in watched}
        for k, m in watched.items():
            m.register_forward_pre_hook(lambda *a, k=k: calls.__setitem__(k, calls[k] + 1))
        method(_batch(method), method.step_context())["loss"].backward()
        assert calls == {"backbone": expect, "own": expect, **({"target": 1} if name == "ijepa" else {})}, on


def test_unsupported_model_is_a_one_line_error():
    with pytest.raises(ModelError, match=r"^model.grad_checkpointing=true: timm's 'pit_ti_224' .*does not support "
                                         r"activation checkpointing.*model.grad_checkpointing=false[^\n]*$"):
        create_backbone("pit_ti_224", grad_checkpointing=True)
    create_backbone("pit_ti_224", grad_checkpointing=False)   # off: builds


def test_batchnorm_statistics_update_once_per_forward():
    """The backward's recomputation runs ResNet's BatchNorms again in training mode; their running statistics
    and num_batches_tracked still end as without checkpointing (two forwards and one backward, then one more)."""
    states = []
    for on in (False, True):
        torch.manual_seed(0)
        model = create_backbone("resnet10t", grad_checkpointing=on).double().train()
        g = torch.Generator().manual_seed(1)
        x, y = (torch.randn(4, 3, 16, 16, dtype=torch.float64, generator=g) for _ in range(2))
        (model(x).sum() + model(y).pow(2).sum()).backward()
        model(y).sum().backward()
        states.append(model.state_dict())
    assert int(states[0]["layer1.0.bn1.num_batches_tracked"]) == 3
    for k, v in states[0].items():
        torch.testing.assert_close(states[1][k], v, rtol=0, atol=0, msg=k)
