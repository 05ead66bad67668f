#!/usr/bin/env bash
# The prepared GPU runs for the default model (issue #3: "train longer there in one prepared run of at most
# 8 minutes") and the GPU benchmarks (issues #2, #6). Made for the `device` machine (torch preinstalled, no
# network; the serving extra's wheels travel in .whl/) but runnable on any CUDA box. Results go to $OUT.
#
#   scripts/gpu_train.sh timed SECONDS        continue the embedded default for SECONDS of training:
#                                             calibrate 40 steps, then as many steps as fit, export, evaluate
#   scripts/gpu_train.sh bench                worker (batching on/off, 3 rounds, 1 and 4 fronts) and core benchmarks
#   scripts/gpu_train.sh profile [BATCH...]   where a training step's time goes, per batch size
#   scripts/gpu_train.sh calib                session 4's first call: data, two runs side by side, benchmarks
#   scripts/gpu_train.sh train STEPS_A STEPS_B   run A from scratch and run B continuing (0 skips a run)
#
# Knobs (environment): INIT_B (run B's start, default the embedded model), LR_B (5e-4), BATCH_B (48),
# N_TRAIN (16000 scenes), DEV (cuda). Session 4 made the shipped model with `train 0 600`, then
# `INIT_B=<that export> LR_B=3e-4 train 0 850` (docs/training.md).
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
  stamp "$name: $(tail -1 "$W/$name.log")"
  tail -2 "$W/$name/metrics.jsonl" 2>/dev/null | cut -c1-300
}

run_b() {  # run_b NAME STEPS: run B's settings
  run "$1" "$2" --init "${INIT_B:-$EMBEDDED}" --lr "${LR_B:-5e-4}" --warmup-steps 100 --batch-size "${BATCH_B:-48}"
}

step_time() {  # seconds per step between the 40% and the last logged step of a run
  $PY - "$1" <<'PYEOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1] + "/metrics.jsonl") if '"elapsed_s"' in l]
a, b = rows[int(len(rows) * 0.4)], rows[-1]
print(f"{(b['elapsed_s'] - a['elapsed_s']) / max(1, b['step'] - a['step']):.4f}")
PYEOF
}

finish() {  # finish NAME: fp16 export into $OUT, evaluation on the test split
  [ -d "$W/$1/final" ] || return 0
  $PY scripts/export_model.py "$W/$1/final" "$W/export-$1" && tar -C "$W" -cf "$OUT/model-$1.tar" "export-$1"
  stamp "$1 on the test split (GPU):"
  $CLI eval --model "$W/export-$1" --device "$DEV" --data "$W/data" --split test --tasks refer trace \
    --limit 300 2>&1 | grep -v WARN | tail -6
  tar -C "$W" -rf "$OUT/logs.tar" "$1.log" "$1/metrics.jsonl" 2>/dev/null
}

case "${1:-}" in
  timed)
    budget=${2:?seconds of training}
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
    data
    stamp "calibration: 40 steps of run B (batch ${BATCH_B:-48})"
    run_b cal 40
    per_step=$(step_time "$W/cal")
    steps=$($PY -c "print(max(50, int($budget / $per_step)))")
    stamp "$per_step s/step -> $steps steps in $budget s"
    run_b B "$steps"
    finish B
    stamp done
    ;;
  bench)
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
    for fronts in 1 4; do  # one HTTP front, or four over the one model process (16 host cores)
      stamp "worker benchmark, process engine, $fronts front(s)"
      timeout 150 $PY benchmarks/bench_worker.py --model "$EMBEDDED" --device "$DEV" --rounds 3 \
        --fronts "$fronts" --clients 1,4,16,32 \
        --json "$OUT/bench_worker_gpu_fronts$fronts.json" 2>&1 | tail -12
    done
    stamp "core benchmark"
    timeout 180 $PY benchmarks/bench_core.py --presets tiny synth-small base --batches 1 16 64 --repeat 10 \
      --florence --device "$DEV" --out "$OUT/bench_core_gpu.json" 2>&1 | tail -8
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
  calib)
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    data
    stamp "calibration: $CAL_STEPS steps of A and B together"
    run A "$CAL_STEPS" & run_b B "$CAL_STEPS" & wait
    for r in A B; do stamp "$r seconds/step: $(step_time "$W/$r")"; done
    timeout 120 $PY benchmarks/bench_core.py --presets synth-small --device "$DEV" --batches 1 16 \
      --out "$OUT/bench_core_gpu.json" 2>&1 | tail -4
    timeout 150 $PY benchmarks/bench_worker.py --model "$EMBEDDED" --device "$DEV" --rounds 1 \
      --json "$OUT/bench_worker_gpu.json" 2>&1 | tail -14
    stamp done
    ;;
  train)
    data
    stamp "training A ($2 steps) and B ($3 steps)"
    run A "$2" & run_b B "$3" & wait
    finish A
    finish B
    stamp done
    ;;
  *) echo "usage: $0 timed SECONDS | bench | profile [BATCH...] | calib | train STEPS_A STEPS_B" >&2; exit 2 ;;
esac
