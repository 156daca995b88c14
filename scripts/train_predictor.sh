#!/usr/bin/env bash
# Reproduces the shipped remaining-length head (ares_jax/assets/length_head) from scratch:
# collect -> train the ARES variants and the baselines -> evaluate -> ship the validation winner
# -> measure the decode-step overhead. See docs/PREDICTOR.md.
#
#   scripts/train_predictor.sh            # everything (collection is resumable: rerun to continue)
#   SKIP_COLLECT=1 MAX_SHARDS=3 scripts/train_predictor.sh   # train/eval on a fixed snapshot
set -euo pipefail
cd "$(dirname "$0")/.."

ARES=${ARES:-.venv/bin/ares-jax}
DATA=${DATA:-runs/predictor/data}
OUT=${OUT:-runs/predictor}
SNAP=()
if [[ -n "${MAX_SHARDS:-}" ]]; then SNAP=(--max-shards "$MAX_SHARDS"); fi

# 1. Data: ShareGPT first turns + HumanEval, temperature 0.7, top-p 0.95, max_tokens 512,
#    hidden states every 16 tokens (CollectConfig defaults; recorded in the manifest).
if [[ -z "${SKIP_COLLECT:-}" ]]; then
  "$ARES" predictor collect --out "$DATA"
fi

# 2. ARES heads: mid layer (tap 15) vs last layer; L1 in tokens, L1 in log space, and L1 on a
#    prediction parametrised as a fraction of the remaining budget; plus the paper's
#    d-2048-512-64-1 shape with L1. Early stopping on validation MAE picks each one's epoch.
train() { local name=$1; shift; "$ARES" predictor train --data "$DATA" "${SNAP[@]}" \
            --out "$OUT/$name" --no-progress "$@" > "$OUT/$name.train.json"; }
mkdir -p "$OUT"
VARIANTS=(ares_tap_budget ares_tap_log ares_tap_l1 ares_last_budget ares_last_l1
          ares_paper_last_l1 ares_both_budget ares_both_small ares_both_ens5)
train ares_tap_budget  --set head.layer=tap  --set head.loss=budget_l1
train ares_tap_log     --set head.layer=tap  --set head.loss=log_l1
train ares_tap_l1      --set head.layer=tap  --set head.loss=l1
train ares_last_budget --set head.layer=last --set head.loss=budget_l1
train ares_last_l1     --set head.layer=last --set head.loss=l1
train ares_paper_last_l1 --set head.layer=last --set head.loss=l1 \
      --set 'head.hidden_sizes=[2048,512,64]' --set head.dropout=0.0
train ares_both_budget --set head.layer=both --set head.loss=budget_l1
# A smaller, more regularised trunk: with 3,000 requests the 512-128 heads peak within 1-3
# epochs (over-fitting); one 256 layer with dropout 0.3 was the best of eight settings tried on
# validation (docs/results_predictor.md).
train ares_both_small  --set head.layer=both --set head.loss=budget_l1 \
      --set 'head.hidden_sizes=[256]' --set head.dropout=0.3
# The same head as a deep ensemble: 5 members from different initialisations, each on its own
# batch order, each keeping its own best epoch, predictions averaged (1.5M parameters, 5.9 MB).
train ares_both_ens5   --set head.layer=both --set head.loss=budget_l1 \
      --set 'head.hidden_sizes=[256]' --set head.dropout=0.3 --set head.members=5
# 3. Baselines: TRAIL-style (tap layer, 2-layer MLP over 10 bins; Bayesian refinement at eval)
#    and the TetriInfer-style prompt-only classifier (separate SmolLM2 copy).
train trail --set head.kind=trail --set head.layer=tap --set 'head.hidden_sizes=[512]'
# The TRAIL-style head as a 5-member ensemble too, so that the ARES ensemble is compared with
# a baseline given the same treatment.
train trail_ens5 --set head.kind=trail --set head.layer=tap --set 'head.hidden_sizes=[512]' \
      --set head.members=5
"$ARES" predictor train-prompt-only --data "$DATA" "${SNAP[@]}" --out "$OUT/prompt_only" \
    --set trainable_blocks="${PROMPT_ONLY_BLOCKS:-0}" --no-progress > "$OUT/prompt_only.train.json"

# 4. The winner on *validation* MAE becomes "ares" (the test split is not used to choose).
WINNER=$(.venv/bin/python - "$OUT" "${VARIANTS[@]}" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
names = sys.argv[2:]
scores = {n: json.loads((out / n / "best" / "head.json").read_text())["val_mae"] for n in names}
print(min(scores, key=scores.get))
EOF
)
echo "validation winner: $WINNER" >&2

# 5. Every method on the same held-out prediction points; JSON + plot.
HEADS=()
for n in "${VARIANTS[@]}"; do
  HEADS+=(--head "$n=$OUT/$n/best")
done
"$ARES" predictor eval --data "$DATA" "${SNAP[@]}" --head "ares=$OUT/$WINNER/best" "${HEADS[@]}" \
    --head "trail=$OUT/trail/best" --head "trail_ens5=$OUT/trail_ens5/best" \
    --prompt-only "$OUT/prompt_only/best" --plot "$OUT/mae_vs_progress.png" --json > "$OUT/eval.json"
"$ARES" predictor eval --data "$DATA" "${SNAP[@]}" --head "ares=$OUT/$WINNER/best" "${HEADS[@]}" \
    --head "trail=$OUT/trail/best" --head "trail_ens5=$OUT/trail_ens5/best" \
    --prompt-only "$OUT/prompt_only/best"

# 6. Ship the winner with the package, then measure the fused head's decode-step overhead.
rm -rf ares_jax/assets/length_head
mkdir -p ares_jax/assets
cp -r "$OUT/$WINNER/best" ares_jax/assets/length_head
.venv/bin/python benchmarks/predictor_overhead.py --batch 32 > "$OUT/overhead.json"
cat "$OUT/overhead.json"
