"""Weights & Biases next to TensorBoard (log.wandb=true), in offline mode: what a real run writes is read back
with wandb's own reader of its .wandb transaction log (`wandb leet inspect --json`), not with our code."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from helpers import SMALL_VIT, cli, tb_scalars, train_overrides
from pretrain.config import ConfigError, load_config, to_dict
from pretrain.engine.wandb_log import ID_FILE, check_wandb, resolve_mode

#: the tests that run wandb itself; it comes with the test extra (scripts/setup_env.sh), so this skips only on a
#: machine set up otherwise (PRETRAIN_SYSTEM_PYTHON)
needs_wandb = pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb not installed: pip install -e '.[test]'")
#: no W&B server reachable, whatever the machine: a closed local port, no stored key, no system metrics
OFFLINE_ENV = dict(WANDB_BASE_URL="http://127.0.0.1:9", NETRC="/nonexistent/netrc", WANDB__DISABLE_STATS="true")


def records(run_file: Path) -> list:
    """Every record of a .wandb file as a dict, through wandb's own reader."""
    p = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(run_file)],
                       capture_output=True, text=True, timeout=120, check=True)
    return [json.loads(line) for line in p.stdout.splitlines() if line.strip()]


def history(recs: list) -> dict:
    """step -> the logged values of that step (wandb's internal _runtime/_step/_timestamp left out)."""
    return {r["history"]["step"]["num"]: {k: v for k, v in r["history"]["item"].items() if not k.startswith("_")}
            for r in recs if r["type"] == "history"}


def png(path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"))


def offline_runs(run_dir: Path) -> list:
    """The .wandb files of run_dir's offline attempts, oldest first."""
    return sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))


@pytest.fixture
def no_wandb_env(monkeypatch, tmp_path):
    for k in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    return tmp_path / "netrc"


def test_auto_mode_is_offline_without_a_key(no_wandb_env, monkeypatch):
    assert resolve_mode("auto") == "offline"
    no_wandb_env.write_text("machine example.com login user password x\n")
    assert resolve_mode("auto") == "offline"
    no_wandb_env.write_text("machine api.wandb.ai login user password " + "k" * 40 + "\n")   # what `wandb login` writes
    assert resolve_mode("auto") == "online"
    assert resolve_mode("offline") == "offline" and resolve_mode("disabled") == "disabled"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_mode("auto") == "disabled"
    monkeypatch.delenv("WANDB_MODE")
    no_wandb_env.unlink()
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert resolve_mode("auto") == "online"


def test_bad_mode_and_missing_wandb_are_one_line_errors(monkeypatch):
    cfg = load_config(None, ["data.train=x", "log.wandb=true", "log.wandb_mode=sometimes"])
    with pytest.raises(ConfigError, match="log.wandb_mode must be one of auto, offline, online, disabled"):
        check_wandb(cfg.log)
    monkeypatch.setitem(sys.modules, "wandb", None)    # `import wandb` fails as if it were not installed
    check_wandb(load_config(None, ["data.train=x"]).log)   # log.wandb=false: not needed, not looked for
    with pytest.raises(ConfigError, match=r"needs the wandb package.*pip install wandb"):
        check_wandb(load_config(None, ["data.train=x", "log.wandb=true"]).log)


def test_train_without_wandb_installed_stops_before_the_run(tmp_path, monkeypatch, digits_shards):
    """train() with wandb blocked stops at the config check (the CLI prints it as `error: ...`, exit 2),
    before the run dir is claimed or anything is built."""
    import logging

    from pretrain.engine.trainer import train

    monkeypatch.setitem(sys.modules, "wandb", None)
    run_dir = tmp_path / "run"
    cfg = load_config(None, train_overrides(digits_shards, run_dir, log__wandb="true", overwrite="delete", resume="never"))
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "step_00000001.pt").write_bytes(b"")    # overwrite=delete would remove it
    try:
        with pytest.raises(ConfigError) as e:
            train(cfg)
    finally:
        for h in logging.getLogger("pretrain").handlers:   # train()'s log.txt handler
            h.close()
    assert "pip install wandb" in str(e.value) and "\n" not in str(e.value)
    assert (run_dir / "checkpoints" / "step_00000001.pt").exists() and not (run_dir / ID_FILE).exists()


@needs_wandb
def test_logger_images_config_and_fresh_start_id(tmp_path, monkeypatch):
    """RunLogger alone: a sample grid arrives as a PNG with the grid's pixels; the config is the run's;
    resuming (start > 0) keeps the id, a fresh start (start = 0) in the same run dir draws a new one."""
    from PIL import Image

    from pretrain.engine.logger import RunLogger

    for k, v in OFFLINE_ENV.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    config = to_dict(load_config(None, ["data.train=x", "log.wandb=true", f"run_dir={tmp_path}"]))
    grid = torch.randint(0, 256, (3, 10, 14), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    ids = []
    for start in (0, 3, 0):
        logger = RunLogger(tmp_path, True, False, False, 10, start, config)
        logger.scalars(start + 1, {"loss": 1.5})
        logger.image(start + 1, "samples", grid)
        logger.close()
        ids.append((tmp_path / ID_FILE).read_text().strip())
    assert ids[0] == ids[1] != ids[2]
    recs = records(offline_runs(tmp_path)[0])
    run_rec = next(r["run"] for r in recs if r["type"] == "run")
    assert run_rec["run_id"] == ids[0]
    assert {k: v for k, v in run_rec["config"]["update"].items() if k != "_wandb"} == config
    row = history(recs)[1]
    assert row["train/loss"] == 1.5 and row["samples._type"] == "image-file"
    png = next(offline_runs(tmp_path)[0].parent.glob("files/" + row["samples.path"]))
    assert torch.equal(torch.from_numpy(np.array(Image.open(png).convert("RGB"))).permute(2, 0, 1), grid)


def test_attention_maps_need_a_vit(tmp_path, digits_shards):
    """log.attention_every_steps with a ResNet: the one-line error of `pretrain attention`, before step 1."""
    import logging

    from pretrain.engine.trainer import train

    cfg = load_config(None, train_overrides(digits_shards, tmp_path / "run", log__attention_every_steps=1,
                                            log__tensorboard="false"))
    try:
        with pytest.raises(ValueError, match=r"resnet10t is not a timm ViT.*model.name=vit_\*"):
            train(cfg)
    finally:
        for h in logging.getLogger("pretrain").handlers:
            h.close()
    assert "step 1 train/loss" not in (tmp_path / "run" / "log.txt").read_text()


@needs_wandb
@pytest.mark.slow
def test_train_logs_to_wandb_offline_and_resumes_the_same_run(tmp_path, digits_shards, experiment):
    """A real `pretrain train` (a small ViT) with log.wandb=true (mode auto, no key, no network -> offline):
    W&B holds the same scalars as TensorBoard at the same steps, the resolved config, and the attention maps of
    log.attention_every_steps as images. A second `pretrain train` on the run dir (resume=auto from step 4)
    logs to the same run id, steps 5..6 only."""
    run_dir = tmp_path / "run"
    ov = dict(log__wandb="true", checkpoint__every_steps=2, train__max_steps=4, log__attention_every_steps=2)
    p = cli("train", experiment, *train_overrides(digits_shards, run_dir, **ov), *SMALL_VIT, check=True, **OFFLINE_ENV)
    assert "wandb" not in p.stdout and "wandb:" not in p.stderr, p.stderr[-2000:]   # quiet: our log lines only
    run_id = (run_dir / ID_FILE).read_text().strip()
    (first,) = offline_runs(run_dir)
    assert first.name == f"run-{run_id}.wandb" and first.parent.name.endswith(run_id)
    assert f"W&B run {run_id} (offline)" in (run_dir / "log.txt").read_text()
    recs = records(first)
    run_rec = next(r["run"] for r in recs if r["type"] == "run")
    assert run_rec["run_id"] == run_id and run_rec["project"] == "pretrain"
    config = {k: v for k, v in run_rec["config"]["update"].items() if k != "_wandb"}
    assert config == yaml.safe_load((run_dir / "config.yaml").read_text())
    rows = history(recs)
    assert sorted(rows) == [1, 2, 3, 4]
    for tag in ("train/loss", "train/lr", "train/grad_norm", "schedule/weight_decay"):
        tb = tb_scalars(run_dir, tag)
        assert sorted(tb) == sorted(rows)
        for step, v in tb.items():    # TensorBoard stores float32
            assert rows[step][tag] == pytest.approx(v, rel=1e-6), (tag, step)
    assert len({rows[s]["train/loss"] for s in rows}) == 4    # real, changing values
    for step in (2, 4):   # the attention grid: the PNG under run_dir/attention/, pixel for pixel
        assert rows[step]["attention._type"] == "image-file" and "attention._type" not in rows[step - 1]
        logged = first.parent / "files" / rows[step]["attention.path"]
        assert np.array_equal(png(logged), png(run_dir / "attention" / f"step_{step:08d}.png"))

    ov.update(train__max_steps=6)
    cli("train", experiment, *train_overrides(digits_shards, run_dir, **ov), *SMALL_VIT, check=True, **OFFLINE_ENV)
    assert (run_dir / ID_FILE).read_text().strip() == run_id
    first_again, second = offline_runs(run_dir)
    assert first_again == first and second.name == f"run-{run_id}.wandb"
    recs2 = records(second)
    run2 = next(r["run"] for r in recs2 if r["type"] == "run")
    assert run2["run_id"] == run_id and run2.get("resume")
    rows2 = history(recs2)
    assert sorted(rows2) == [5, 6]                 # continues after the checkpoint's step, never below it
    assert rows2[6]["attention._type"] == "image-file"
    tb = tb_scalars(run_dir)
    assert sorted(tb) == list(range(1, 7))
    for step in rows2:
        assert rows2[step]["train/loss"] == pytest.approx(tb[step], rel=1e-6)
    internal = "\n".join(f.read_text() for f in (run_dir / "wandb").glob("offline-run-*/logs/debug-internal.log"))
    assert '"level":"ERROR"' not in internal and "127.0.0.1:9" not in internal   # never tried the network
