#!/usr/bin/env bash
# GPU check (benchmarks/gpu_check.py): the decode engine's step on a Llama-3.1-8B-shaped bf16
# model against the GPU cost grid, and a cross-process KV pull against a device copy. Uses
# the JAX already installed on the machine and this repository as it is (nothing installed):
# the repository goes on PYTHONPATH. Ends within GPU_CHECK_TIMEOUT_S (default 470 s); the
# JSON is written section by section to $OUT/gpu_check.json when OUT is set, so a cut-short
# run still reports what it measured.
#
#   scripts/gpu_check.sh                      # on the GPU host
#   OUT=/tmp/gc scripts/gpu_check.sh --batches 1,32 --kv-lens 2048
#   scripts/gpu_check.sh --tiny               # CPU, seconds: checks the script
#   PYTHON=/opt/venv/bin/python scripts/gpu_check.sh --grid /data/aic_grid.csv
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-python3}
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# The KV pool for batch 64 x 8K tokens plus the weights take ~85 GiB of an H200's 140: leave
# room for the transfer check's second process on the same GPU.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.80}

status=0
timeout --signal=TERM --kill-after=15 "${GPU_CHECK_TIMEOUT_S:-470}" \
  "$python" "$repo/benchmarks/gpu_check.py" "$@" || status=$?
if ((status == 124)); then
  echo "gpu_check.sh: stopped after ${GPU_CHECK_TIMEOUT_S:-470} s; partial JSON in" \
    "${OUT:-<no OUT set>}/gpu_check.json" >&2
fi
exit "$status"
