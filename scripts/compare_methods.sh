#!/usr/bin/env bash
# Every method on the quickstart's real dataset (scikit-learn's digits) with the same budget as the
# quickstart's SimCLR (ResNet-18, 16 px, 800 steps of 256, one process), then kNN and linear probes
# of each exported backbone next to a random-init one. About 6-8 minutes per method on 2 CPU cores.
#   ./scripts/compare_methods.sh                    # simclr moco_v2 moco_v3 cpc
#   ./scripts/compare_methods.sh moco_v2 cpc        # a subset
set -euo pipefail
source "$(dirname "$0")/setup_env.sh"
OUT="${QUICKSTART_DIR:-quickstart}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
METHODS=("$@")
[ ${#METHODS[@]} -gt 0 ] || METHODS=(simclr moco_v2 moco_v3 cpc)

if [ ! -f "$OUT/data/train/index.json" ]; then   # the quickstart's shards
  pretrain shards digits "$OUT/data" --size 32 --val-fraction 0.2 --shard-size 256
fi
EV=(--train "$OUT/data/train" --val "$OUT/data/val" --image-size 16)
: > "$OUT/compare.jsonl"
for m in "${METHODS[@]}"; do
  config="configs/digits_$m.yaml"; [ "$m" = simclr ] && config=configs/quickstart_digits.yaml
  run="$OUT/compare_$m"
  rm -rf "$run"
  echo "== $m ($config)"
  start=$(date +%s)
  pretrain train "$config" data.train="$OUT/data/train" data.val="$OUT/data/val" run_dir="$run" > "$run.train.json"
  secs=$(( $(date +%s) - start ))
  pretrain export "$run" --out "$run/backbone.safetensors"
  for kind in knn linear; do
    pretrain eval $kind --backbone "$run/backbone.safetensors" "${EV[@]}" \
      | python -c "import json,sys; r=json.loads(sys.stdin.read().strip().splitlines()[-1]); r.update(method='$m', train_s=$secs); print(json.dumps(r))" \
      >> "$OUT/compare.jsonl"
  done
done
RANDOM_INIT=(--model resnet18 --model-kwargs '{"zero_init_last": false}')
for kind in knn linear; do
  pretrain eval $kind "${RANDOM_INIT[@]}" "${EV[@]}" \
    | python -c "import json,sys; r=json.loads(sys.stdin.read().strip().splitlines()[-1]); r.update(method='random init', train_s=0); print(json.dumps(r))" \
    >> "$OUT/compare.jsonl"
done
python - "$OUT/compare.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
print(f"\n{'method':<14}{'kNN top-1':>10}{'linear top-1':>14}{'train s':>9}")
for m in dict.fromkeys(r["method"] for r in rows):
    r = {x["eval"]: x for x in rows if x["method"] == m}
    print(f"{m:<14}{100 * r['knn']['top1']:>9.1f}%{100 * r['linear']['top1']:>13.1f}%{r['knn']['train_s']:>9}")
PY
