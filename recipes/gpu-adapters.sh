#!/usr/bin/env bash
# The 3.5 bpw base's recovery adapter on one GPU: the base (built here if missing, on the CPU), then block-wise training
# from the compression residual and `make adapters`' distillation from full precision on chat and calibration text
# (the best recipe measured on the CPU, docs/benchmarks.md) with --device cuda --bf16, then its fidelity against full
# precision (CPU). Nothing is downloaded:
# the machine needs this repo, a Python with pippin's dependencies (PY, default .venv/bin/python, else python3), the
# default model where pippin finds it (`make model` once, or a carried $PIPPIN_HOME) and ../shared/data (or SHARED).
# Results go to $OUT (default runs/gpu-adapters): the adapters, each step's log, timings.txt, device.txt, fidelity/.
#
#   OUT=/tmp/out recipes/gpu-adapters.sh                       # block-wise + the Makefile's distillation, on the GPU
#   BW_STEPS=400 E2E_STEPS=600 BATCH=16 recipes/gpu-adapters.sh # more steps and tokens, which a GPU affords
#   DEVICE=cpu LIMIT=8 BW_STEPS=1 E2E_STEPS=1 FIDELITY_LIMIT=2 recipes/gpu-adapters.sh   # a dry run of the wiring
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu-adapters}
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
SHARED=${SHARED:-../shared}
CALIB=$SHARED/data/alpaca_eval/gpt4_1106_preview_model_outputs.json
BASE=${BASE:-${PIPPIN_HOME:-$HOME/.cache/pippin}/models/smollm2-135m-instruct-3.5bpw-rot}
DEVICE=${DEVICE:-cuda}
LIMIT=${LIMIT:-256}            # AlpacaEval instructions the teacher answers (the Makefile's 256)
BW_STEPS=${BW_STEPS:-100}      # block-wise steps per block (as measured on the CPU)
E2E_STEPS=${E2E_STEPS:-150}    # distillation steps (the Makefile's)
BATCH=${BATCH:-4}
FIDELITY_LIMIT=${FIDELITY_LIMIT:-}
ADAPTERS=$OUT/adapters
mkdir -p "$ADAPTERS"
export PYTHONUNBUFFERED=1

[ -f "$CALIB" ] || { echo "gpu-adapters: no calibration data at $CALIB; set SHARED to the folder that holds data/" >&2; exit 2; }
"$PY" - "$DEVICE" <<'EOF' | tee "$OUT/device.txt"
import sys, torch
dev = sys.argv[1]
print(f"torch {torch.__version__}, device {dev}")
if dev.startswith("cuda"):
    if not torch.cuda.is_available():
        sys.exit("gpu-adapters: torch sees no CUDA device here; run with DEVICE=cpu for a dry run")
    print(torch.cuda.get_device_name(0), f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
EOF
"$PY" -c "from pippin.model.checkpoint import prepare_default; print('full precision:', prepare_default(progress=False))" | tee -a "$OUT/device.txt"

# step NAME CMD...: run one step, its output in $OUT/NAME.log, its wall time in $OUT/timings.txt
step() {
  local name=$1 t0
  shift
  t0=$(date +%s)
  if ! "$@" 2>&1 | tr '\r' '\n' | grep -v '^$' > "$OUT/$name.log"; then
    tail -5 "$OUT/$name.log" >&2
    echo "gpu-adapters: step $name failed; its log is $OUT/$name.log" >&2
    exit 1
  fi
  echo "$name $(($(date +%s) - t0)) s" | tee -a "$OUT/timings.txt"
}

# `make compressed-3.5`'s recipe; compression and its LUT tuning run on the CPU (16 cores there).
[ -f "$BASE/config.json" ] || step compress "$PY" -m pippin compress --calib "$CALIB" --calib docstrings --hessian-seqs 64 \
  --bpw 3.5 --embed-bits 4 --rotate --sequential --act8 --tune-steps 50 --no-fidelity --out "$BASE"
DATA=(--model "$BASE" --teacher default --format alpaca --data "$CALIB" --limit "$LIMIT" --teacher-replies 128 --text-data "$CALIB"
  --seq-len 256 --batch-size "$BATCH" --device "$DEVICE" --bf16 --adapters-dir "$ADAPTERS")
step blockwise "$PY" -m pippin adapter train recovery-blockwise "${DATA[@]}" --init-residual --objective blockwise \
  --steps "$BW_STEPS" --lr 1e-3 --block-seqs 64
mkdir -p "$ADAPTERS/recovery"  # the teacher's replies are the same: answered once
cp -n "$ADAPTERS/recovery-blockwise/teacher_replies.json" "$ADAPTERS/recovery/" 2>/dev/null || true
step distill "$PY" -m pippin adapter train recovery "${DATA[@]}" --init-from recovery-blockwise --objective distill \
  --steps "$E2E_STEPS" --lr 3e-4 --save-every 10
step fidelity "$PY" -m pippin eval fidelity --system "pippin:$BASE:$ADAPTERS/recovery" --system "pippin:$BASE:$ADAPTERS/recovery-blockwise" \
  --data "$SHARED/data" --out "$OUT/fidelity" --no-plots ${FIDELITY_LIMIT:+--limit "$FIDELITY_LIMIT"}
cat "$OUT/timings.txt"
