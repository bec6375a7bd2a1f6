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
# With FINETUNE=CONFIG (e.g. configs/finetune_digits.yaml), every backbone is also scored by 10-shot linear
# probes (mean of 5 seeds, 95% CI) and fine-tuned with that config (`pretrain eval all`), the random-init floor
# included (fine-tuning from scratch); FINETUNE_ARGS adds key=value overrides to the fine-tuning, TRAIN_ARGS to
# the pretraining runs (e.g. "train.precision=bf16 data.num_workers=8" on a GPU).
#   ./scripts/compare_methods.sh                          # every method below, ~75 min on 2 CPU cores
#   BUDGET_S=600 ./scripts/compare_methods.sh byol swav   # a subset, another budget
#   FINETUNE=configs/finetune_digits.yaml FLOOR_MODEL=vit_tiny_patch16_224 \
#     FLOOR_KWARGS='{"img_size": 16, "patch_size": 4, "depth": 4, "dynamic_img_size": true}' \
#     ./scripts/compare_methods.sh mae ijepa dino moco_v3_vit   # the masked-modeling table (docs/benchmarks.md)
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
FINETUNE="${FINETUNE:-}"
read -r -a FT_ARGS <<< "${FINETUNE_ARGS:-}"
# eval_into RESULTS_FIELDS EVAL_ARGS...: knn + linear (+ 10-shot + fine-tune with FINETUNE) as JSON lines, each with
# the extra fields (a JSON object) merged in
eval_into() {
  local extra="$1"; shift
  local kinds=(knn linear)
  if [ -n "$FINETUNE" ]; then
    pretrain eval all "$@" "${EV[@]}" --shots 10 --finetune "$FINETUNE" "${FT_ARGS[@]}" 2>/dev/null
  else
    for kind in "${kinds[@]}"; do pretrain eval $kind "$@" "${EV[@]}" | last_json; done
  fi | python -c "import json,sys; [print(json.dumps({**json.loads(l), **json.loads(sys.argv[1])})) for l in sys.stdin if l.startswith('{')]" "$extra" >> "$RESULTS"
}
RESULTS="$OUT/compare.jsonl"
: > "$RESULTS"
last_json() { python -c "import sys; print([l for l in sys.stdin.read().splitlines() if l.startswith('{')][-1])"; }
for m in "${METHODS[@]}"; do
  config="configs/digits_$m.yaml"; [ "$m" = simclr ] && config=configs/quickstart_digits.yaml
  run="$OUT/compare_$m"
  rm -rf "$run" "$run.calib"
  COMMON=(data.train="$OUT/data/train" data.val=null eval.knn_every_steps=0 log.progress=false ${TRAIN_ARGS:-})
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
  if [ -n "$FINETUNE" ]; then FT_ARGS+=(run_dir="$run.finetune"); rm -rf "$run.finetune"; fi
  eval_into "$(python -c "import json; t=json.load(open('$run.train.json')); print(json.dumps(dict(method='$m', train_s=$secs, steps=$steps, images_per_s=t['images_per_s'], memory_mb=t['memory_mb'])))")" \
    "${evals[@]}"
  if [ -n "$FINETUNE" ]; then unset 'FT_ARGS[${#FT_ARGS[@]}-1]'; fi
done
# the floor: a randomly initialised backbone (FLOOR_MODEL / FLOOR_KWARGS, e.g. the digits ViT for DINO/iBOT)
DEFAULT_FLOOR_KWARGS='{"zero_init_last": false}'
RANDOM_INIT=(--model "${FLOOR_MODEL:-resnet18}" --model-kwargs "${FLOOR_KWARGS:-$DEFAULT_FLOOR_KWARGS}")
if [ -n "$FINETUNE" ]; then   # fine-tuning needs a file: the random-init backbone, exported as `pretrain export` writes
  rm -rf "$OUT/compare_random.finetune"
  python - "${FLOOR_MODEL:-resnet18}" "${FLOOR_KWARGS:-$DEFAULT_FLOOR_KWARGS}" "$OUT/compare_random.safetensors" <<'PY'
import json, sys
import torch
from safetensors.torch import save_file
from pretrain.models import create_backbone
torch.manual_seed(0)
m = create_backbone(sys.argv[1], json.loads(sys.argv[2]))
meta = {"timm_name": sys.argv[1], "model_kwargs": json.loads(sys.argv[2]), "cifar_stem": False, "input_size": [3, 16, 16],
        "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "num_features": m.num_features, "method": "random init"}
save_file({k: v.contiguous() for k, v in m.state_dict().items()}, sys.argv[3], metadata={"format": "pt", "pretrain": json.dumps(meta)})
open(sys.argv[3].replace(".safetensors", ".json"), "w").write(json.dumps(meta))
PY
  FT_ARGS+=(run_dir="$OUT/compare_random.finetune")
  eval_into '{"method": "random init"}' --backbone "$OUT/compare_random.safetensors"
  unset 'FT_ARGS[${#FT_ARGS[@]}-1]'
  for kind in knn linear fewshot; do   # raw pixels: nothing to fine-tune
    pretrain eval $kind --raw-pixels "${EV[@]}" $([ $kind = fewshot ] && echo --shots 10) | last_json \
      | python -c "import json,sys; r=json.load(sys.stdin); r.update(method='raw pixels'); print(json.dumps(r))" >> "$RESULTS"
  done
else
  eval_into '{"method": "random init"}' "${RANDOM_INIT[@]}"
  eval_into '{"method": "raw pixels"}' --raw-pixels
fi
python - "$RESULTS" "$BUDGET_S" "${FLOOR_MODEL:-resnet18}" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
print(f"\nsame budget: {sys.argv[2]} s of training per method (16 px, batch 256; random init: {sys.argv[3]})\n")
more = any(x["eval"] in ("fewshot", "finetune") for x in rows)
print("| method | kNN top-1 | linear top-1 |" + (" 10-shot (95% CI) | fine-tuned |" if more else "")
      + " images/s | peak memory | steps | train s |\n|---|---|---|" + ("---|---|" if more else "") + "---|---|---|---|")
pct = lambda x: f"{100 * x:.1f}%"
for m in dict.fromkeys(r["method"] for r in rows):
    r = {x["eval"]: x for x in rows if x["method"] == m}
    k = r["knn"]
    extra = (f"{k['images_per_s']:.0f} | {k['memory_mb'] / 1024:.2f} GiB | {k['steps']} | {k['train_s']}"
             if "steps" in k else "- | - | - | -")
    cols = [pct(k["top1"]), pct(r["linear"]["top1"])]
    if more:
        f = r.get("fewshot")
        cols += [f"{pct(f['top1'])} ({100 * f['ci95'][0]:.1f}-{100 * f['ci95'][1]:.1f})" if f else "-",
                 pct(r["finetune"]["top1"]) if "finetune" in r else "-"]
    print(f"| {m} | {' | '.join(cols)} | {extra} |")
PY
