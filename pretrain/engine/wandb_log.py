"""Weights & Biases next to TensorBoard (`log.wandb=true`), on rank 0 only: the same scalars, the resolved
config, and images (sample grids). `wandb` is imported only when it is switched on.

Resume-safe: the run id lives in run_dir/wandb_run_id. A run that resumes from a checkpoint (start > 0)
logs to that id again (wandb.init(id=..., resume="allow")), its steps continuing from the checkpoint's;
a fresh start (start = 0, e.g. overwrite=archive) draws a new id, as TensorBoard drops the old events.
"""
from __future__ import annotations

import importlib.util
import netrc
import os
import secrets
from pathlib import Path
from urllib.parse import urlparse

from pretrain.config import ConfigError
from pretrain.utils import atomic_write_text

MODES = ("auto", "offline", "online", "disabled")
ID_FILE = "wandb_run_id"


def check_wandb(log_cfg) -> None:
    """On every rank, before anything is built: a one-line ConfigError when `log.wandb` is on but the
    mode is unknown or wandb is not installed (without importing it)."""
    if not log_cfg.wandb:
        return
    if log_cfg.wandb_mode not in MODES:
        raise ConfigError(f"log.wandb_mode must be one of {', '.join(MODES)}, got {log_cfg.wandb_mode!r}")
    try:
        found = importlib.util.find_spec("wandb") is not None
    except ValueError:    # sys.modules["wandb"] is None: an import blocked on purpose
        found = False
    if not found:
        raise ConfigError("log.wandb=true needs the wandb package, which is not installed: pip install wandb "
                          "(or pip install -e '.[wandb]'), or set log.wandb=false")


def resolve_mode(mode: str) -> str:
    """`log.wandb_mode` -> wandb's mode. auto: $WANDB_MODE when set, else online when an API key is
    found ($WANDB_API_KEY, or ~/.netrc for $WANDB_BASE_URL's host, where `wandb login` puts it), else offline."""
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return "online" if _api_key_found() else "offline"


def _api_key_found() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def start_wandb(run_dir: Path, config: dict, start: int):
    """wandb.init for the run in `run_dir` resuming at step `start`, writing under run_dir/wandb/
    (offline: run_dir/wandb/offline-run-<time>-<id>/, one per attempt; `wandb sync` uploads them)."""
    import wandb

    lc = config["log"]
    id_file = run_dir / ID_FILE
    run_id = id_file.read_text().strip() if start > 0 and id_file.is_file() else ""
    if not run_id:
        run_id = secrets.token_hex(6)   # 12 of [0-9a-f]: a valid W&B run id
        atomic_write_text(id_file, run_id + "\n")
    run_dir.mkdir(parents=True, exist_ok=True)
    # quiet (our log.txt has the run's lines), no console capture, no git or code snapshot; wandb's
    # own settings ($WANDB_*, e.g. WANDB__DISABLE_STATS=true) still apply to the rest
    settings = wandb.Settings(silent=True, console="off", save_code=False, disable_git=True)
    return wandb.init(project=lc["wandb_project"], entity=lc["wandb_entity"], name=lc["wandb_name"] or run_dir.name,
                      id=run_id, resume="allow", dir=str(run_dir), mode=resolve_mode(lc["wandb_mode"]),
                      config=config, settings=settings)


def image(grid):
    """uint8 [3, H, W] tensor -> wandb.Image."""
    import wandb

    return wandb.Image(grid.permute(1, 2, 0).cpu().numpy())
