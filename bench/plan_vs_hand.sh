#!/usr/bin/env bash
# A planned space against a hand-scaled one at the same --time-budget (about 1 h on 2 cores at 25m):
#   bash bench/plan_vs_hand.sh [DATA_DIR] [BUDGET] [OUT]
# DATA_DIR holds train/ and val/ COCO sets (default ../shared/data/camvid). Both arms search
# bench/spaces/hand_scaled.yaml's searched half on train/ for BUDGET (default 25m); the planned arm's
# fixed half comes from `seghpo plan`. Each arm's ensemble bundle is then scored on val/, which no
# decision saw: rows (a) best single member, (b) ensemble, (c) post-processed, in OUT/pred-<arm>/.
# Ray starts its trial workers at nice 15; run it on an otherwise idle machine.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DATA=${1:-$ROOT/../shared/data/camvid}
BUDGET=${2:-25m}
OUT=${3:-runs/plan_vs_hand}
mkdir -p "$OUT"
cp "$ROOT/bench/spaces/hand_scaled.yaml" "$OUT/hand.yaml"
python "$ROOT/tune/plan.py" --data "$DATA/train/annotations.json" --space "$OUT/hand.yaml" \
    --time-budget "$BUDGET" --out "$OUT/planned.yaml" | tee "$OUT/plan.log"
for arm in hand planned; do
  python "$ROOT/tune/run.py" --space "$OUT/$arm.yaml" --data "$DATA/train/annotations.json" \
      --time-budget "$BUDGET" --name "$arm" --storage "$OUT/runs" --wandb disabled | tee "$OUT/$arm.tune.log"
done
for arm in hand planned; do
  python "$ROOT/ensemble/run.py" --experiment "$OUT/runs/$arm" --wandb disabled | tee "$OUT/$arm.ens.log"
  python "$ROOT/ensemble/predict.py" --bundle "$OUT/runs/$arm/ensemble/bundle" \
      --images "$DATA/val/annotations.json" --out "$OUT/pred-$arm" | tee "$OUT/$arm.pred.log"
done
grep -h -A2 "^test (" "$OUT"/hand.pred.log "$OUT"/planned.pred.log
