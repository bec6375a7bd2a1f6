"""Run logging: a text log (run_dir/log.txt), TensorBoard and W&B (pretrain/engine/wandb_log.py) scalars and
images, and a tqdm bar, all on rank 0."""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Optional

import torch

log = logging.getLogger("pretrain")


def setup_text_log(run_dir: Path, rank: int) -> None:
    fmt = logging.Formatter(f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    root = logging.getLogger("pretrain")
    root.setLevel(logging.INFO)
    root.handlers.clear()
    root.propagate = False
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(fmt)
    console.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    root.addHandler(console)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(run_dir / "log.txt")
        fh.setFormatter(fmt)
        root.addHandler(fh)


@torch.no_grad()
def attention_image(backend, cfg, logger, run_dir: Path, step: int, is_main: bool) -> None:
    """ViT backbones (log.attention_every_steps): the last-layer CLS attention per head of the first
    log.attention_n images of data.val (else data.train), drawn as `pretrain attention` draws it
    (pretrain/evaluation/attention.py), to TensorBoard, W&B and run_dir/attention/step_N.png. Every rank takes
    part in building the eval copy (a collective under ZeRO-3 and FSDP2), as for sample grids; rank 0 draws."""
    method = backend.eval_module()
    if not is_main:
        return
    from pretrain.data import eval_loader
    from pretrain.evaluation.attention import attention_grid
    from pretrain.evaluation.generative import save_grid, to_signed

    spec, key = (cfg.data.val, "data.val") if cfg.data.val else (cfg.data.train, "data.train")
    n, size = cfg.log.attention_n, method.backbone_input_size(cfg.data.image_size)
    images = torch.cat([b["image"] for b in eval_loader(spec, n, size, key=key, max_samples=n,
                                                        max_image_pixels=cfg.data.max_image_pixels)])[:n]
    vit = method.export_backbone(cfg.eval.which)
    was_training = vit.training
    cells, cols = attention_grid(vit, images, list(cfg.data.mean), list(cfg.data.std))   # sets vit.eval()
    vit.train(was_training)
    grid = save_grid(to_signed(cells.flatten(0, 1)), run_dir / "attention" / f"step_{step:08d}.png", nrow=cols)
    logger.image(step, "attention", grid)


class RunLogger:
    def __init__(self, run_dir: Path, is_main: bool, tensorboard: bool, progress, total: int, start: int,
                 config: Optional[dict] = None):
        """`config`: the resolved config as a dict; W&B logs when its log.wandb is true (and gets it)."""
        self.is_main = is_main
        self.tb = self.bar = self.wandb = None
        if is_main and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # TensorBoard drops the events of earlier writers from step start+1 on: on resume from step
            # `start`, those logged after that checkpoint (about to be logged again; step `start` stays);
            # on a fresh start (start = 0) in a reused run dir (overwrite=archive|delete), all of them
            self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=start + 1)
        if is_main and config and config["log"]["wandb"]:
            from pretrain.engine.wandb_log import start_wandb

            self.wandb = start_wandb(run_dir, config, start)
            w = self.wandb
            log.info("W&B run %s (%s) in %s%s", w.id, w.settings.mode, w.settings.sync_dir, "" if w.offline else f": {w.url}")
        show = sys.stderr.isatty() if progress == "auto" else bool(progress)
        if is_main and show:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, dynamic_ncols=True, desc="train")

    def scalars(self, step: int, values: dict, prefix: str = "train/") -> None:
        if not self.is_main:
            return
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(prefix + k, v, step)
        if self.wandb is not None:
            self.wandb.log({prefix + k: v for k, v in values.items()}, step=step)
        text = " ".join(f"{prefix}{k}={v:.4g}" for k, v in values.items())
        if self.bar is not None:
            self.bar.set_postfix_str(text[:120], refresh=False)
        log.info("step %d %s", step, text)

    def image(self, step: int, tag: str, grid) -> None:
        """A uint8 [3, H, W] image (a sample grid) to TensorBoard and W&B."""
        if self.is_main and self.tb is not None:
            self.tb.add_image(tag, grid, step)
        if self.is_main and self.wandb is not None:
            from pretrain.engine.wandb_log import image

            self.wandb.log({tag: image(grid)}, step=step)

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
        if self.bar is not None:
            self.bar.close()
