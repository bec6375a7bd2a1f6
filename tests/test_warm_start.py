"""Warm start (model.pretrained_file): a timm-format safetensors file -- our own export or a timm hub
model.safetensors -- initialises the backbone before the method is built, exactly; one-line errors otherwise."""
from __future__ import annotations

import json

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from timm.layers import resample_abs_pos_embed

from helpers import SMALL_VIT, cli, error_line, inproc_error_line, train_overrides
from pretrain.config import load_config, to_dict
from pretrain.export import export
from pretrain.methods import create_method
from pretrain.models import ModelError, create_backbone

VIT = "vit_tiny_patch16_224"
VIT_KW = {"img_size": 16, "patch_size": 4, "depth": 2, "dynamic_img_size": True, "drop_path_rate": 0.0}
RESNET = ["model.name=resnet10t", "data.image_size=16", "method.proj_hidden_dim=32", "method.proj_dim=16"]


def _x(size=16, n=4):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))


def _exported(tmp_path, overrides, seed=1, name="backbone.safetensors"):
    """(method, file): a method built from `overrides` with random weights (and non-trivial BatchNorm statistics),
    saved as a checkpoint and written out by the real `export`."""
    cfg = load_config(None, ["data.train=unused", *overrides])
    torch.manual_seed(seed)
    method = create_method(cfg)
    for name_, buf in method.named_buffers():   # running statistics must travel too
        if name_.endswith(("running_mean", "running_var")):
            buf.copy_(torch.rand_like(buf) + 0.5)
    run = tmp_path / f"run{seed}"
    (run / "checkpoints").mkdir(parents=True)
    torch.save({"model": method.state_dict(), "config": to_dict(cfg)}, run / "checkpoints" / "step_00000003.pt")
    return method, export(run, tmp_path / name)


def _timm_file(path, num_classes=10, seed=0, **kw):
    """A timm model (with its classifier, as on the hub) saved as safetensors; returns the model in eval mode."""
    torch.manual_seed(seed)
    model = timm.create_model(VIT, num_classes=num_classes, **{**VIT_KW, **kw}).eval()
    save_file(model.state_dict(), str(path))
    return model


@torch.no_grad()
def test_export_warm_start_reproduces_features_and_momentum_encoder(tmp_path):
    """SimCLR's export -> BYOL warm-started from it: online and target backbones compute the source's features
    bit for bit (the file is loaded before the method copies the backbone into its target)."""
    src, out = _exported(tmp_path, RESNET)
    torch.manual_seed(7)   # another seed: nothing may come from the initialisation
    method = create_method(load_config(None, ["data.train=unused", "method.name=byol", *RESNET[:2],
                                              f"model.pretrained_file={out}"]))
    want = src.backbone.eval()(_x())
    for bb in (method.backbone, method.key_backbone):
        assert torch.equal(bb.eval()(_x()), want)
        assert all(torch.equal(v, src.backbone.state_dict()[k]) for k, v in bb.state_dict().items())
    fresh = create_method(load_config(None, ["data.train=unused", "method.name=byol", *RESNET[:2]]))
    assert not torch.allclose(fresh.backbone.eval()(_x()), want, atol=1e-3)   # loading did something


@torch.no_grad()
def test_timm_hub_file_with_classifier_warm_starts_dino_student_and_teacher(tmp_path):
    """A timm-style file (head.weight/head.bias of a 10-class model) loads into DINO's classifier-free ViT;
    student and teacher equal timm's own pre-logits features exactly."""
    src = _timm_file(tmp_path / "model.safetensors")
    assert {"head.weight", "head.bias"} <= set(load_file(str(tmp_path / "model.safetensors")))
    cfg = load_config("configs/digits_dino.yaml", ["data.train=unused", *SMALL_VIT,
                                                   f"model.pretrained_file={tmp_path / 'model.safetensors'}"])
    torch.manual_seed(3)
    method = create_method(cfg)
    want = src.forward_head(src.forward_features(_x()), pre_logits=True)
    assert torch.equal(method.backbone.eval()(_x()), want)
    assert torch.equal(method.key_backbone.eval()(_x()), want)
    assert torch.equal(method.export_backbone("teacher").eval()(_x()), want)


@torch.no_grad()
def test_resnet_hub_file_with_fc(tmp_path):
    torch.manual_seed(0)
    src = timm.create_model("resnet10t", num_classes=10).eval()
    save_file(src.state_dict(), str(tmp_path / "model.safetensors"))
    model = create_backbone("resnet10t", pretrained_file=str(tmp_path / "model.safetensors")).eval()
    assert torch.equal(model(_x()), src.forward_head(src.forward_features(_x()), pre_logits=True))


@pytest.mark.parametrize("kw,prefix", [({"reg_tokens": 2}, 3), ({"no_embed_class": True}, 0), ({}, 1)])
@torch.no_grad()
def test_pos_embed_resampled_to_another_img_size(tmp_path, kw, prefix):
    """A 16 px ViT's file into a 32 px ViT (4x4 -> 8x8 patch grid): pos_embed is timm's resample_abs_pos_embed of
    the file's, prefix tokens (class, registers) kept as they are; every other tensor is the file's."""
    src = _timm_file(tmp_path / "v.safetensors", **kw)
    model = create_backbone(VIT, {**VIT_KW, **kw, "img_size": 32}, pretrained_file=str(tmp_path / "v.safetensors"))
    want = resample_abs_pos_embed(src.pos_embed, new_size=[8, 8], num_prefix_tokens=prefix)
    assert model.pos_embed.shape == want.shape and torch.equal(model.pos_embed, want)
    if prefix:
        assert torch.equal(model.pos_embed[:, :prefix], src.pos_embed[:, :prefix])
    for k, v in model.state_dict().items():
        if k != "pos_embed":
            assert torch.equal(v, src.state_dict()[k]), k
    model.eval()(_x(32))   # and it runs at the new size


def _error(fn) -> str:
    with pytest.raises(ModelError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("model.pretrained_file="), msg
    return msg


def test_errors_name_the_first_offending_key(tmp_path):
    f = tmp_path / "v.safetensors"
    _timm_file(f)   # depth 2, width 192
    build = lambda **kw: create_backbone(VIT, {**VIT_KW, **kw}, pretrained_file=str(f))   # noqa: E731
    msg = _error(lambda: build(depth=4))
    assert "key 'blocks.2.norm1.weight' is missing from the file (the model has 4 blocks, the file 2)" in msg
    assert "model.kwargs" in msg
    msg = _error(lambda: build(depth=1))
    assert "the file's key 'blocks.1." in msg and "is not in the model (the model has 1 blocks, the file 2)" in msg
    msg = _error(lambda: build(embed_dim=96))
    assert "key 'cls_token' has shape [1, 1, 192] in the file but [1, 1, 96] in the model" in msg
    assert "not found" in _error(lambda: create_backbone("resnet10t", pretrained_file=str(tmp_path / "nope.safetensors")))


def test_pickles_and_other_files_are_refused_without_unpickling(tmp_path, monkeypatch):
    pt, txt = tmp_path / "model.pt", tmp_path / "notes.safetensors"
    torch.save(timm.create_model("resnet10t").state_dict(), pt)
    txt.write_text("hello")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was called"))
    for f in (pt, txt):
        msg = _error(lambda: create_backbone("resnet10t", pretrained_file=str(f)))
        assert "is not a safetensors file" in msg and "never unpickled" in msg


def test_export_metadata_names_the_model_that_wrote_it(tmp_path):
    _, out = _exported(tmp_path, RESNET)
    msg = _error(lambda: create_backbone("resnet18", pretrained_file=str(out)))
    assert "the file was exported from model.name=resnet10t model.kwargs={}" in msg and "model.name=resnet18" in msg


def test_cli_train_one_line_errors(tmp_path, digits_shards, experiment, capsys):
    """`pretrain train ... model.pretrained_file=...`: exit 2 with one `error:` line, before any step."""
    _, out = _exported(tmp_path, RESNET)
    torch.save({"w": torch.zeros(1)}, tmp_path / "ckpt.pth")
    ov = train_overrides(digits_shards, tmp_path / "run")
    line = inproc_error_line(capsys, "train", experiment, *ov, "model.name=resnet18", f"model.pretrained_file={out}")
    assert "key 'conv1.weight' is missing from the file" in line and "exported from model.name=resnet10t" in line
    line = inproc_error_line(capsys, "train", experiment, *ov, f"model.pretrained_file={tmp_path / 'ckpt.pth'}")
    assert "is not a safetensors file" in line
    # and from a fresh interpreter, as a user sees it
    line = error_line(cli("train", experiment, *ov, f"model.pretrained_file={tmp_path / 'nope.safetensors'}"))
    assert "nope.safetensors not found" in line
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())


@pytest.mark.slow
def test_fresh_run_starts_from_the_file_and_resume_ignores_it(tmp_path, digits_shards, experiment):
    """lr=0 keeps the weights where they started: a fresh run's checkpoint holds the file's weights; a resume
    continues its checkpoint and never reads the file (here no longer a safetensors file)."""
    a_method, a = _exported(tmp_path, RESNET, seed=1, name="a.safetensors")
    ov = train_overrides(digits_shards, tmp_path / "run", optim__lr=0.0, checkpoint__every_steps=2, train__max_steps=2,
                         checkpoint__keep_last=5)
    cli("train", experiment, *ov, f"model.pretrained_file={a}", check=True)
    want = a_method.backbone.state_dict()

    def params_at(step):   # the backbone's parameters (not its BatchNorm statistics, which lr=0 does not freeze)
        sd = torch.load(tmp_path / "run" / "checkpoints" / f"step_{step:08d}.pt", weights_only=True)["model"]
        return {n: sd[f"backbone.{n}"] for n, _ in a_method.backbone.named_parameters()}

    got = params_at(2)
    assert got and all(torch.equal(v, want[k]) for k, v in got.items())
    assert "warm start" in (tmp_path / "run" / "log.txt").read_text()

    a.write_text("not weights any more")   # a resume must not read it (a moved or rewritten file is no matter)
    cli("train", experiment, *ov, "train.max_steps=3", f"model.pretrained_file={a}", check=True)
    got = params_at(3)
    assert all(torch.equal(v, want[k]) for k, v in got.items())
    log = (tmp_path / "run" / "log.txt").read_text()
    assert "resumed from step 2" in log and log.count("warm start") == 1


@pytest.mark.slow
def test_continued_dino_pretraining_on_an_exported_vit_is_one_line(tmp_path, digits_shards):
    """DINO on top of an exported ViT: `model.pretrained_file=...` on the digits DINO config; after 2 steps the
    exported teacher is still the source (EMA at 0.99 of a student at warmup LR), far from a random init."""
    kw = ["model.kwargs={img_size: 16, patch_size: 4, depth: 4, dynamic_img_size: true, drop_path_rate: 0.1}"]
    src, out = _exported(tmp_path, ["method.name=moco_v3", f"model.name={VIT}", "data.image_size=16", *kw], seed=5)
    run = tmp_path / "dino"
    cli("train", "configs/digits_dino.yaml", f"data.train={digits_shards}/train", "data.val=null", f"run_dir={run}",
        "train.max_steps=2", "train.global_batch_size=16", "data.num_workers=0", "log.progress=false",
        "data.shuffle_buffer=64", f"model.pretrained_file={out}", check=True)
    cli("export", run, "--out", tmp_path / "teacher.safetensors", check=True)
    teacher, source = load_file(str(tmp_path / "teacher.safetensors")), src.backbone.state_dict()
    assert json.loads((tmp_path / "teacher.json").read_text())["method"] == "dino"
    drift = max((teacher[k] - v).abs().max().item() for k, v in source.items())
    torch.manual_seed(0)
    random = create_backbone(VIT, {**VIT_KW, "depth": 4}).state_dict()
    assert drift < 1e-3 < max((random[k] - v).abs().max().item() for k, v in source.items())
