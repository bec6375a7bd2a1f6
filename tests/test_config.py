"""Config layering (defaults <- experiment <- overrides), key validation and where the resolved config is saved."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf

from pretrain.config import DEFAULTS, ConfigError, load_config, to_dict


@pytest.fixture()
def defaults():
    return yaml.safe_load(DEFAULTS.read_text())


def _exp(tmp_path, text):
    p = tmp_path / "exp.yaml"
    p.write_text(text)
    return str(p)


def test_precedence_defaults_experiment_overrides(tmp_path, defaults):
    exp = _exp(tmp_path, "train:\n  epochs: 7\n  grad_accum: 2\noptim:\n  lr: 0.5\n  name: adamw\ndata:\n  train: from/exp\n")
    cfg = load_config(exp, ["optim.lr=0.125", "data.train=from/cli", "seed=3"])
    # overrides beat the experiment
    assert cfg.optim.lr == 0.125 and cfg.data.train == "from/cli" and cfg.seed == 3
    # the experiment beats the defaults
    assert cfg.train.epochs == 7 and cfg.train.grad_accum == 2 and cfg.optim.name == "adamw"
    assert defaults["train"]["epochs"] != 7 and defaults["optim"]["name"] != "adamw"
    # untouched keys keep their defaults
    assert cfg.train.global_batch_size == defaults["train"]["global_batch_size"]
    assert cfg.optim.momentum == defaults["optim"]["momentum"]
    assert list(cfg.data.mean) == defaults["data"]["mean"]


def test_method_defaults_are_merged_and_overridable():
    from pretrain.methods.simclr import SimCLR

    cfg = load_config(None, ["data.train=x", "method.proj_dim=64"])
    assert cfg.method.proj_dim == 64
    assert cfg.method.temperature == SimCLR.defaults["temperature"]
    assert set(SimCLR.defaults) <= set(cfg.method.keys())


@pytest.mark.parametrize("source, bad, suggestion", [
    ("cli", "train.epoch=3", "train.epochs"),
    ("cli", "method.temprature=0.1", "method.temperature"),
    ("cli", "optim.warmup_step=5", "optim.warmup_steps"),
    ("exp", "train:\n  epoch: 3\n", "train.epochs"),
    ("exp", "method:\n  proj_hiden_dim: 8\n", "method.proj_hidden_dim"),
])
def test_unknown_key_names_key_and_closest(tmp_path, source, bad, suggestion):
    with pytest.raises(ConfigError) as e:
        if source == "cli":
            load_config(None, ["data.train=x", bad])
        else:
            load_config(_exp(tmp_path, bad), ["data.train=x"])
    msg = str(e.value)
    wrong = bad.split("=")[0] if source == "cli" else ".".join(l.strip().rstrip(":").split(":")[0]
                                                              for l in bad.splitlines())
    assert f"'{wrong}'" in msg, msg
    assert suggestion in msg, msg


def test_open_mappings_accept_any_key():
    cfg = load_config(None, ["data.train=x", "model.kwargs.drop_path_rate=0.1", "deepspeed.overrides.wall_clock_breakdown=true"])
    assert cfg.model.kwargs.drop_path_rate == 0.1
    assert cfg.deepspeed.overrides.wall_clock_breakdown is True


def test_override_without_equals_is_an_error():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["data.train=x", "train.epochs"])


def test_missing_data_train_is_an_error():
    with pytest.raises(ConfigError, match="data.train"):
        load_config(None, [])


def test_missing_experiment_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "nope.yaml"), ["data.train=x"])


def test_resolved_config_saved_in_run_dir_and_checkpoint(ref_run, experiment):
    run_dir, overrides, _ = ref_run
    expected = to_dict(load_config(str(experiment), overrides))
    saved = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"))
    assert saved == expected
    ckpts = sorted((run_dir / "checkpoints").glob("step_*.pt"))
    assert ckpts
    state = torch.load(ckpts[-1], map_location="cpu", weights_only=True)
    assert state["config"] == expected
    # the saved config is a complete, valid experiment file: it reproduces itself
    assert to_dict(load_config(str(run_dir / "config.yaml"))) == expected


# ------------------------------------------------------------------------------------------------ _base_ and configs/
def test_base_file_is_extended_and_switching_method_drops_its_keys(tmp_path):
    (tmp_path / "base.yaml").write_text("method:\n  name: simclr\n  proj_hidden_dim: 77\ntrain:\n  epochs: 3\n"
                                        "data:\n  train: x\n")
    (tmp_path / "child.yaml").write_text("_base_: base.yaml\ntrain:\n  epochs: 5\n")
    (tmp_path / "cpc.yaml").write_text("_base_: child.yaml\nmethod:\n  name: cpc\n  pred_steps: 1\n")
    child = load_config(str(tmp_path / "child.yaml"))
    assert child.train.epochs == 5 and child.method.proj_hidden_dim == 77 and child.data.train == "x"
    cpc = load_config(str(tmp_path / "cpc.yaml"))
    assert cpc.method.name == "cpc" and cpc.method.pred_steps == 1 and "proj_hidden_dim" not in cpc.method
    # the same from the command line: a simclr experiment, method.name=moco_v2
    moco = load_config(str(tmp_path / "child.yaml"), ["method.name=moco_v2", "method.queue_size=8"])
    assert moco.method.queue_size == 8 and moco.method.proj_hidden_dim == 2048   # MoCo's own default
    (tmp_path / "loop.yaml").write_text("_base_: loop.yaml\n")
    with pytest.raises(ConfigError, match="extends itself"):
        load_config(str(tmp_path / "loop.yaml"))


CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_shipped_config_builds_its_method(path, tmp_path):
    from pretrain.methods import METHODS, create_method

    # `pretrain finetune` gives finetune_*.yaml their shards (and the model, from the export: here the default's)
    over = ["data.train=unused"] if path.stem.startswith("finetune_") else []
    if load_config(str(path), over).method.get("autoencoder"):   # latent diffusion: the VAE its comment names,
        over.append(f"method.autoencoder={_vae_export(tmp_path)}")  # freshly initialised and exported
    cfg = load_config(str(path), over)
    assert type(create_method(cfg)) is METHODS.get(cfg.method.name)


def _vae_export(tmp_path):
    """configs/digits_vae.yaml's VAE with random weights, written by `pretrain export --which autoencoder`."""
    import torch

    from pretrain.config import to_dict
    from pretrain.export import export
    from pretrain.methods import create_method

    cfg = load_config(str(Path(__file__).resolve().parents[1] / "configs" / "digits_vae.yaml"), [])
    (tmp_path / "vae" / "checkpoints").mkdir(parents=True)
    torch.save({"model": create_method(cfg).state_dict(), "config": to_dict(cfg)},
               tmp_path / "vae" / "checkpoints" / "step_00000001.pt")
    return export(tmp_path / "vae", tmp_path / "ae.safetensors", "autoencoder")
