#!/usr/bin/env bash
# The generative methods on the quickstart's digits (16 px), each for a fixed number of steps on CPU,
# then `pretrain eval gen`: bits/dim on the val split next to a per-pixel histogram model fit on the
# train split, and the Frechet distance (in the features of the quickstart's SimCLR backbone) between
# the val split and samples, noise, and the train split.
#   ./scripts/compare_generative.sh                  # vae gan pixelcnn ddpm
#   ./scripts/compare_generative.sh ddpm             # a subset
# Needs the quickstart's shards and SimCLR backbone: run ./scripts/quickstart.sh first (it is reused).
set -euo pipefail
source "$(dirname "$0")/setup_env.sh"
OUT="${QUICKSTART_DIR:-quickstart}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
N="${GEN_SAMPLES:-160}"            # samples for the Frechet distance
METHODS=("$@")
[ ${#METHODS[@]} -gt 0 ] || METHODS=(vae gan pixelcnn ddpm)
declare -A STEPS=([vae]=800 [gan]=800 [pixelcnn]=300 [ddpm]=800)
if [ ! -f "$OUT/backbone.safetensors" ]; then
  echo "no $OUT/backbone.safetensors: run ./scripts/quickstart.sh first (its SimCLR backbone gives the features)" >&2
  exit 2
fi
: > "$OUT/generative.jsonl"
for m in "${METHODS[@]}"; do
  run="$OUT/gen_$m"
  rm -rf "$run"
  echo "== $m (configs/digits_$m.yaml, ${STEPS[$m]} steps)"
  start=$(date +%s)
  pretrain train "configs/digits_$m.yaml" data.train="$OUT/data/train" data.val="$OUT/data/val" run_dir="$run" \
    train.max_steps="${STEPS[$m]}" > "$run.train.json"
  secs=$(( $(date +%s) - start ))
  pretrain sample "$run" --n 64 --out "$run/samples.png"
  pretrain eval gen --run "$run" --features "$OUT/backbone.safetensors" --train "$OUT/data/train" \
    --val "$OUT/data/val" --n "$N" \
    | python -c "import json,sys; r=json.loads(sys.stdin.read().strip().splitlines()[-1]); r.update(train_s=$secs, steps=${STEPS[$m]}); print(json.dumps(r))" \
    | tee -a "$OUT/generative.jsonl"
done
python - "$OUT/generative.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
print(f"\n{'method':<10}{'steps':>6}{'train s':>8}{'bits/dim':>9}{'histogram':>10}{'FD samples':>11}{'FD noise':>9}{'FD train':>9}")
for r in rows:
    bpd = f"{r['bits_per_dim']:.3f}" if "bits_per_dim" in r else "-"
    hist = f"{r['histogram_bits_per_dim']:.3f}" if "histogram_bits_per_dim" in r else "-"
    print(f"{r['method']:<10}{r['steps']:>6}{r['train_s']:>8}{bpd:>9}{hist:>10}{r['frechet_samples']:>11.2f}"
          f"{r['frechet_noise']:>9.2f}{r['frechet_train']:>9.2f}")
PY
