#!/usr/bin/env bash
# The prepared GPU run for the default model (issue #3: "train longer there in one prepared run of at most
# 8 minutes"), made for the `device` machine (torch preinstalled, no network) but runnable on any CUDA box.
#
#   scripts/gpu_train.sh calib              data + a short calibration of both runs + GPU benchmarks
#   scripts/gpu_train.sh train STEPS_A STEPS_B  (0 skips a run; INIT_B / LR_B: run B's start and lr)
#   scripts/gpu_train.sh profile [BATCH...]    where a training step's time goes, per batch size
#
# Run A trains the `synth-small-gpu` recipe from scratch; run B continues the embedded CPU-trained default
# with the same recipe at a lower learning rate. Both share the GPU (the model is small: one run alone
# leaves it mostly idle). Results go to $OUT: each final model as an fp16 tar, logs and evaluations.
set -u
PY=${PYTHON:-python3}
OUT=${OUT:-$PWD/.gpu/out}
W=${GPU_WORK:-$PWD/.gpu}
N_TRAIN=${N_TRAIN:-16000}
N_TEST=${N_TEST:-300}
CAL_STEPS=${CAL_STEPS:-60}
DEV=${DEV:-cuda}
mkdir -p "$W" "$OUT"
if ls .whl/*.whl >/dev/null 2>&1 && [ ! -d /tmp/site/fastapi ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
[ -d /tmp/site ] && export PYTHONPATH=/tmp/site
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
CLI="$PY -m pixelllm_plugins.cli"
EMBEDDED=pixelllm_plugins/weights/synth-small
stamp() { echo "[$(date +%T)] $*"; }

data() {
  if [ ! -f "$W/data/refcoco_train.json" ]; then
    stamp "data: $N_TRAIN train + $N_TEST test scenes"
    $CLI synth --out "$W/data" --split test --num-images "$N_TEST" --workers 16 || exit 1
    $CLI synth --out "$W/data" --split train --num-images "$N_TRAIN" --workers 16 || exit 1
  fi
}

run() {  # run NAME STEPS [train options]
  local name=$1 steps=$2; shift 2
  [ "$steps" -gt 0 ] || return 0
  $CLI train --recipe synth-small-gpu --data "$W/data" --out "$W/$name" --steps "$steps" --no-resume \
    --no-progress "$@" > "$W/$name.log" 2>&1
  echo "run $name exit $?" >> "$W/$name.log"
}

both() {  # both STEPS_A STEPS_B
  run A "$1" &
  run B "$2" --init "${INIT_B:-$EMBEDDED}" --lr "${LR_B:-5e-4}" --warmup-steps 100 &
  wait
  for r in A B; do stamp "$r: $(tail -1 "$W/$r.log")"; tail -3 "$W/$r/metrics.jsonl" 2>/dev/null | cut -c1-300; done
}

step_time() {  # seconds per step between the 40% and the last logged step of a run
  $PY - "$1" <<'PYEOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1] + "/metrics.jsonl") if '"elapsed_s"' in l]
a, b = rows[int(len(rows) * 0.4)], rows[-1]
print(f"{(b['elapsed_s'] - a['elapsed_s']) / max(1, b['step'] - a['step']):.4f}")
PYEOF
}

case "${1:-}" in
  calib)
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
    data
    stamp "calibration: $CAL_STEPS steps of A and B together"
    both "$CAL_STEPS" "$CAL_STEPS"
    for r in A B; do stamp "$r seconds/step: $(step_time "$W/$r")"; done
    stamp "refer on the GPU (embedded model)"
    $CLI eval --model "$EMBEDDED" --device "$DEV" --data "$W/data" --split test --tasks refer --limit 100 \
      2>&1 | grep -v WARN | tail -4
    stamp "core benchmark"
    timeout 120 $PY benchmarks/bench_core.py --presets synth-small --device "$DEV" --batches 1 16 \
      --out "$OUT/bench_core_gpu.json" 2>&1 | tail -12
    stamp "worker benchmark"
    timeout 150 $PY benchmarks/bench_worker.py --model "$EMBEDDED" --device "$DEV" --rounds 1 \
      --json "$OUT/bench_worker_gpu.json" 2>&1 | tail -14
    stamp done
    ;;
  train)
    data
    stamp "training A ($2 steps) and B ($3 steps)"
    both "$2" "$3"
    for r in A B; do
      if [ -d "$W/$r/final" ]; then
        $PY scripts/export_model.py "$W/$r/final" "$W/export-$r" && tar -C "$W" -cf "$OUT/model-$r.tar" "export-$r"
        stamp "$r on the test split (GPU):"
        $CLI eval --model "$W/export-$r" --device "$DEV" --data "$W/data" --split test --tasks refer trace \
          --limit 300 2>&1 | grep -v WARN | tail -6
      fi
    done
    tar -C "$W" -cf "$OUT/logs.tar" A.log B.log A/metrics.jsonl B/metrics.jsonl 2>/dev/null
    stamp done
    ;;
  profile)
    data
    shift
    for b in ${@:-48 192}; do
      timeout 120 $PY benchmarks/profile_train_step.py --data "$W/data" --device "$DEV" --batch-size "$b" \
        --top 20 --out "$OUT/profile_b$b.txt" 2>&1 | head -8
    done
    ;;
  *) echo "usage: $0 calib | train STEPS_A STEPS_B | profile [BATCH...]" >&2; exit 2 ;;
esac
