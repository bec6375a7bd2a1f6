"""For each shipped digits config in argv: train 2 steps, run again to 3 (an auto-resume from step 2),
and export the backbone to timm safetensors when the method trains one -- all through the CLI's own
entry point, in one process (one interpreter start for every config). Writes a JSON report per config.

argv: SHARDS OUT_DIR CONFIG [CONFIG ...]
"""
import json
import shutil
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers import SMALL_VIT  # noqa: E402
from pretrain.cli import main  # noqa: E402
from pretrain.methods import METHODS
from pretrain.config import load_config

shards, out = Path(sys.argv[1]), Path(sys.argv[2])
report = {}
autoencoder = None   # the digits_vae run's VAE, exported for the latent-diffusion configs (they sort after it)
for config in sys.argv[3:]:
    name = Path(config).stem
    run = out / name
    shipped = load_config(config, ["data.train=x"])
    method = shipped.method.name
    generative = hasattr(METHODS.get(method), "sample")
    ov = [f"data.train={shards}/train", "data.val=null", f"run_dir={run}", "train.global_batch_size=16",
          "data.samples_per_epoch=160", "data.num_workers=0", "data.shuffle_buffer=64", "log.every_steps=1",
          "log.progress=false", "checkpoint.every_steps=1", "eval.knn_every_steps=0", "log.sample_every_steps=0"]
    if shipped.model.name.startswith("vit"):   # a 2-block tiny ViT (DINO, iBOT)
        ov += SMALL_VIT
    elif not generative:
        ov.append("model.name=resnet10t")
    if shipped.method.get("autoencoder"):
        ov.append(f"method.autoencoder={autoencoder}")
    r = {"method": method}
    try:
        r["rc"] = [main(["train", config, *ov, "train.max_steps=2"]), main(["train", config, *ov, "train.max_steps=3"])]
        r["log"] = (run / "log.txt").read_text()
        r["export_rc"] = main(["export", str(run), "--out", str(run / "backbone.safetensors")])
        r["exported"] = str(run / "backbone.safetensors")
        if method == "vae":   # before its checkpoints are deleted
            autoencoder = run / "autoencoder.safetensors"
            main(["export", str(run), "--which", "autoencoder", "--out", str(autoencoder)])
        shutil.rmtree(run / "checkpoints")   # 3 checkpoints x 17 configs: ~3 GB of disk otherwise
    except BaseException:   # noqa: BLE001  (recorded for the test to show)
        r["error"] = traceback.format_exc()
    report[name] = r
(out / "report.json").write_text(json.dumps(report))
