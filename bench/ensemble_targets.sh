#!/usr/bin/env bash
# The ensemble's targets on unseen images (about 25 min a seed on 2 cores):
#   bash bench/ensemble_targets.sh SEED [DATA_DIR] [OUT]
# Searches bench/spaces/ensemble_targets.yaml on DATA_DIR/train (default ../shared/data/camvid) with
# search and fold seed SEED, then, scored by the bundle's own predictor on DATA_DIR/val, which no
# decision saw:
#   1. the ensemble without refits, with a distilled student (Unet, the best member's encoder):
#      OUT/seed<SEED>/ens.log (holdout rows and the combination), pred/ (val rows), distill/;
#   2. the same with --refit 2 (two configurations retrained on every training image):
#      ens-refit.log, pred-refit/.
# Rows: (a) best single member, (b) the ensemble as shipped (the holdout's combination), (c) with tuned
# thresholds. Ray starts its trial workers at nice 15; run it on an otherwise idle machine.
set -euo pipefail
SEED=${1:?seed}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DATA=${2:-$ROOT/../shared/data/camvid}
OUT=${3:-runs/ensemble_targets}/seed$SEED
RUN=$OUT/runs/ens-seed$SEED
mkdir -p "$OUT"
python "$ROOT/tune/run.py" --space "$ROOT/bench/spaces/ensemble_targets.yaml" --data "$DATA/train/annotations.json" \
    --seed "$SEED" --set folds.seed="$SEED" --name "ens-seed$SEED" --storage "$OUT/runs" --wandb disabled \
    | tee "$OUT/tune.log"
python "$ROOT/ensemble/run.py" --experiment "$RUN" --top-k 2 --distill Unet --distill-epochs 6 \
    --predict "$DATA/val/annotations.json" --out "$OUT/pred" --wandb disabled | tee "$OUT/ens.log"
cp -r "$RUN/ensemble" "$OUT/ensemble-norefit"
python "$ROOT/ensemble/run.py" --experiment "$RUN" --top-k 2 --refit 2 \
    --predict "$DATA/val/annotations.json" --out "$OUT/pred-refit" --wandb disabled | tee "$OUT/ens-refit.log"
