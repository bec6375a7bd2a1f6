"""Export to timm-loadable safetensors, and frozen-feature evaluation (kNN, linear probe)."""
from __future__ import annotations

import json

import pytest
import timm
import torch
import torch.nn.functional as F

from helpers import cli, tmp_debris
from pretrain.config import from_dict
from pretrain.engine.checkpoint import find_checkpoint
from pretrain.evaluation import knn_accuracy, linear_probe
from pretrain.methods import create_method


@pytest.fixture(scope="module")
def exported(ref_run, tmp_path_factory):
    run_dir, _, _ = ref_run
    out = tmp_path_factory.mktemp("export") / "backbone.safetensors"
    p = cli("export", run_dir, "--out", out, check=True)
    assert str(out) in p.stdout
    return run_dir, out


def _trained_backbone(run_dir):
    """The backbone as training left it, rebuilt from the checkpoint without the export code."""
    state = torch.load(find_checkpoint(run_dir), map_location="cpu", weights_only=True)
    method = create_method(from_dict(state["config"]))
    method.load_state_dict(state["model"])
    return method.backbone.eval(), from_dict(state["config"])


def test_export_loads_in_timm_with_same_features(exported):
    run_dir, out = exported
    meta = json.loads(out.with_suffix(".json").read_text())
    backbone, cfg = _trained_backbone(run_dir)
    assert meta["timm_name"] == cfg.model.name and meta["input_size"] == [3, cfg.data.image_size, cfg.data.image_size]
    assert meta["num_features"] == backbone.num_features and meta["step"] == 6

    model = timm.create_model(cfg.model.name, pretrained=True, pretrained_cfg_overlay=dict(file=str(out)),
                              num_classes=10).eval()
    assert model.get_classifier().out_features == 10
    x = torch.randn(5, 3, cfg.data.image_size, cfg.data.image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = backbone(x)
        got = model.forward_head(model.forward_features(x), pre_logits=True)
        fresh = timm.create_model(cfg.model.name, num_classes=0).eval()(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(fresh, want, atol=1e-3)   # loading did something
    assert tmp_debris(out.parent) == []


@pytest.mark.slow
def test_eval_cli_knn_and_linear(exported, digits_shards):
    _, out = exported
    res = {}
    for kind in ("knn", "linear"):
        p = cli("eval", kind, "--backbone", out, "--train", digits_shards / "train", "--val", digits_shards / "val",
                "--epochs", "30", check=True)
        res[kind] = json.loads(p.stdout.strip().splitlines()[-1])
        assert res[kind]["eval"] == kind
        n_val = json.loads((digits_shards / "val" / "index.json").read_text())["samples"]
        assert res[kind]["val"] == n_val
        # digits are easy: even a few SimCLR steps give features far above chance (0.1)
        assert 0.3 < res[kind]["top1"] <= 1.0, res


def test_knn_separable_clusters_is_perfect():
    g = torch.Generator().manual_seed(0)
    centers = F.normalize(torch.randn(5, 16, generator=g), dim=1) * 10

    def draw(n_per):
        y = torch.arange(5).repeat_interleave(n_per)
        return centers[y] + 0.5 * torch.randn(len(y), 16, generator=g), y

    (tf, ty), (vf, vy) = draw(50), draw(20)
    assert knn_accuracy(tf, ty, vf, vy, k=10) == pytest.approx(1.0)
    assert linear_probe(tf, ty, vf, vy, epochs=50) == pytest.approx(1.0)


def test_knn_random_labels_is_chance():
    g = torch.Generator().manual_seed(0)
    tf, vf = torch.randn(2000, 32, generator=g), torch.randn(1000, 32, generator=g)
    ty, vy = torch.randint(0, 4, (2000,), generator=g), torch.randint(0, 4, (1000,), generator=g)
    acc = knn_accuracy(tf, ty, vf, vy, k=20)
    assert abs(acc - 0.25) < 0.06, acc


def test_knn_rejects_empty():
    with pytest.raises(ValueError):
        knn_accuracy(torch.empty(0, 4), torch.empty(0, dtype=torch.long), torch.randn(3, 4), torch.zeros(3, dtype=torch.long))
