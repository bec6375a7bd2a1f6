#!/usr/bin/env bash
# Every embedding method on the quickstart's real dataset (scikit-learn's digits) at the same wall-clock
# training budget, each on its own digits recipe (configs/digits_<method>.yaml; SimCLR's is the
# quickstart's): ResNet-18 at 16 px, batch 256, one process. Then kNN and linear probes of each exported
# backbone on the val split, next to a random-init backbone and raw pixels (the floor).
#
# The budget is BUDGET_S seconds of training per method (default 300). A short calibration run
# (CALIB_STEPS steps) measures each method's steady step rate on this machine just before its run, and the
# run gets train.max_steps = BUDGET_S x that rate, so its LR warmup and cosine are planned over the steps it
# really takes. Reported: kNN and linear top-1, steady images/s, peak memory (RSS of the training process
# on CPU, allocated memory on a GPU), steps and the run's real wall time.
#   ./scripts/compare_methods.sh                          # every method below, ~75 min on 2 CPU cores
#   BUDGET_S=600 ./scripts/compare_methods.sh byol swav   # a subset, another budget
set -euo pipefail
source "$(dirname "$0")/setup_env.sh"
OUT="${QUICKSTART_DIR:-quickstart}"
BUDGET_S="${BUDGET_S:-300}"
CALIB_STEPS="${CALIB_STEPS:-12}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
METHODS=("$@")
[ ${#METHODS[@]} -gt 0 ] || METHODS=(simclr moco_v2 moco_v3 cpc byol simsiam barlow_twins vicreg swav nnclr)

if [ ! -f "$OUT/data/train/index.json" ]; then   # the quickstart's shards
  pretrain shards digits "$OUT/data" --size 32 --val-fraction 0.2 --shard-size 256
fi
EV=(--train "$OUT/data/train" --val "$OUT/data/val" --image-size 16)
RESULTS="$OUT/compare.jsonl"
: > "$RESULTS"
last_json() { python -c "import sys; print([l for l in sys.stdin.read().splitlines() if l.startswith('{')][-1])"; }
for m in "${METHODS[@]}"; do
  config="configs/digits_$m.yaml"; [ "$m" = simclr ] && config=configs/quickstart_digits.yaml
  run="$OUT/compare_$m"
  rm -rf "$run" "$run.calib"
  COMMON=(data.train="$OUT/data/train" data.val=null eval.knn_every_steps=0 log.progress=false)
  echo "== $m ($config): calibrating over $CALIB_STEPS steps"
  rate=$(pretrain train "$config" "${COMMON[@]}" run_dir="$run.calib" train.max_steps="$CALIB_STEPS" \
           log.every_steps=$(( CALIB_STEPS / 2 )) checkpoint.every_steps=100000 | last_json \
         | python -c "import json,sys; r=json.load(sys.stdin); print(r['images_per_s'])")
  steps=$(python -c "print(max(1, int($BUDGET_S * $rate / 256)))")
  rm -rf "$run.calib"
  echo "== $m: $rate images/s -> $steps steps for ${BUDGET_S}s"
  start=$(date +%s)
  pretrain train "$config" "${COMMON[@]}" run_dir="$run" train.max_steps="$steps" | last_json > "$run.train.json"
  secs=$(( $(date +%s) - start ))
  pretrain export "$run" --out "$run/backbone.safetensors"
  evals=(--backbone "$run/backbone.safetensors")
  [ "$m" = cpc ] && evals=(--run "$run")   # CPC's own features: the patch grid it trained on (docs/benchmarks.md)
  for kind in knn linear; do
    pretrain eval $kind "${evals[@]}" "${EV[@]}" | last_json \
      | python -c "import json,sys; r=json.load(sys.stdin); t=json.load(open('$run.train.json')); r.update(method='$m', train_s=$secs, steps=$steps, images_per_s=t['images_per_s'], memory_mb=t['memory_mb']); print(json.dumps(r))" \
      >> "$RESULTS"
  done
done
# the floor: a randomly initialised backbone (FLOOR_MODEL / FLOOR_KWARGS, e.g. the digits ViT for DINO/iBOT)
DEFAULT_FLOOR_KWARGS='{"zero_init_last": false}'
RANDOM_INIT=(--model "${FLOOR_MODEL:-resnet18}" --model-kwargs "${FLOOR_KWARGS:-$DEFAULT_FLOOR_KWARGS}")
for kind in knn linear; do
  pretrain eval $kind "${RANDOM_INIT[@]}" "${EV[@]}" | last_json \
    | python -c "import json,sys; r=json.load(sys.stdin); r.update(method='random init'); print(json.dumps(r))" >> "$RESULTS"
  pretrain eval $kind --raw-pixels "${EV[@]}" | last_json \
    | python -c "import json,sys; r=json.load(sys.stdin); r.update(method='raw pixels'); print(json.dumps(r))" >> "$RESULTS"
done
python - "$RESULTS" "$BUDGET_S" "${FLOOR_MODEL:-resnet18}" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
print(f"\nsame budget: {sys.argv[2]} s of training per method (16 px, batch 256; random init: {sys.argv[3]})\n")
print("| method | kNN top-1 | linear top-1 | images/s | peak memory | steps | train s |\n|---|---|---|---|---|---|---|")
for m in dict.fromkeys(r["method"] for r in rows):
    r = {x["eval"]: x for x in rows if x["method"] == m}
    k = r["knn"]
    extra = (f"{k['images_per_s']:.0f} | {k['memory_mb'] / 1024:.2f} GiB | {k['steps']} | {k['train_s']}"
             if "steps" in k else "- | - | - | -")
    print(f"| {m} | {100 * k['top1']:.1f}% | {100 * r['linear']['top1']:.1f}% | {extra} |")
PY
