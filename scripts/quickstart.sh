#!/usr/bin/env bash
# Fresh machine -> .venv, install -> shards from a real dataset a package ships (scikit-learn's
# 1797 handwritten digits) -> SimCLR pretraining -> export -> kNN + linear probe, next to a
# random-init backbone of the same architecture and raw pixels. 6.5 to 31 minutes on 2 CPU cores,
# depending on the host's oneDNN convolution kernels (docs/benchmarks.md).
# Extra arguments are config overrides for the training run, e.g. ./scripts/quickstart.sh train.epochs=5
set -euo pipefail
source "$(dirname "$0")/setup_env.sh"
OUT="${QUICKSTART_DIR:-quickstart}"
CONFIG=configs/quickstart_digits.yaml
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"

echo "== 1/4 shards: sklearn digits (8x8), stored upscaled to 32x32, 80/20 train/val split"
rm -rf "$OUT/data" "$OUT/run"     # the quickstart's own scratch dir: start clean every time
pretrain shards digits "$OUT/data" --size 32 --val-fraction 0.2 --shard-size 256

echo "== 2/4 SimCLR pretraining ($CONFIG)"
start=$(date +%s)
pretrain train "$CONFIG" data.train="$OUT/data/train" data.val="$OUT/data/val" run_dir="$OUT/run" "$@"
echo "training took $(( $(date +%s) - start )) s"

echo "== 3/4 export backbone"
pretrain export "$OUT/run" --out "$OUT/backbone.safetensors"

echo "== 4/4 evaluation on the val split (kNN: k=20, cosine, T=0.07; linear: L-BFGS logistic regression)"
read -r MODEL SIZE < <(python -c "import json;m=json.load(open('$OUT/backbone.json'));print(m['timm_name'],m['input_size'][-1])")
EV=(--train "$OUT/data/train" --val "$OUT/data/val" --image-size "$SIZE")
RANDOM_INIT=(--model "$MODEL" --model-kwargs '{"zero_init_last": false}')   # non-degenerate random init
{
  pretrain eval knn --backbone "$OUT/backbone.safetensors" "${EV[@]}"
  pretrain eval knn "${RANDOM_INIT[@]}" "${EV[@]}"
  pretrain eval knn --raw-pixels "${EV[@]}"
  pretrain eval linear --backbone "$OUT/backbone.safetensors" "${EV[@]}"
  pretrain eval linear "${RANDOM_INIT[@]}" "${EV[@]}"
  pretrain eval linear --raw-pixels "${EV[@]}"
} | tee "$OUT/eval.jsonl"
python - "$OUT/eval.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
print("\n              kNN top-1   linear top-1")
for name in ("backbone.safetensors", "random-init", "raw pixels"):
    r = {x["eval"]: x["top1"] for x in rows if name in x["backbone"]}
    label = {"backbone.safetensors": "SimCLR", "random-init": "random init", "raw pixels": "raw pixels"}[name]
    print(f"{label:<14}{100 * r['knn']:>8.1f}%   {100 * r['linear']:>10.1f}%")
simclr = next(x["top1"] for x in rows if x["eval"] == "knn" and "backbone.safetensors" in x["backbone"])
rand = next(x["top1"] for x in rows if x["eval"] == "knn" and "random-init" in x["backbone"])
print(f"\nSimCLR kNN gain over random init: {100 * (simclr - rand):+.1f} points")
sys.exit(0 if simclr > rand else "SimCLR did not beat the random-init baseline")
PY
