#!/usr/bin/env bash
# The CPU measurements behind BENCHMARKS.md, in the order they were run (each invocation takes
# 1-4 min on 2 cores). Results: benchmarks/results/cpu.jsonl (one JSON line per implementation,
# dtype and batch), tables and operator profiles: benchmarks/results/cpu.log.
#
#   benchmarks/run_cpu.sh two-threads   # the whole machine (wall-clock img/s under its load)
#   benchmarks/run_cpu.sh one-thread    # one core: CPU seconds per image, free of the thread
#                                       # stalls that other jobs cause (see BENCHMARKS.md)
#   benchmarks/run_cpu.sh rest          # 0.4b task models, profiles, memory, parity drift
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
OUT=benchmarks/results/cpu.jsonl
LOG=benchmarks/results/cpu.log
mkdir -p benchmarks/results
run() { echo "## $(date -u +%FT%TZ) load $(cut -d' ' -f1 /proc/loadavg): $*" | tee -a "$LOG"; python "$@" 2>&1 | grep -v -e USDT -e Warning -e warn -e "return torch" | tee -a "$LOG"; }
F="benchmarks/forward.py --out $OUT"

two_threads() {
  # optimisations one by one, backbone 0.1b (interleaved rounds, repeated)
  for rep in 1 2; do
    run $F --size 0.1b --part backbone --impl ours-legacy,ours,ours-fused,hf --dtype fp32 --iters 1
    run $F --size 0.1b --part backbone --impl ours-legacy,ours,ours-fused,hf --dtype bf16 --iters 1 --no-peak
  done
  # dtypes side by side, eager
  run $F --size 0.1b --part backbone --impl ours-fused --dtype fp32,bf16,autocast --iters 2 --no-peak
  # torch.compile: compile time and steady state
  run $F --size 0.1b --part backbone --impl ours-fused,ours-compiled --dtype fp32 --iters 2 --no-peak
  run $F --size 0.1b --part backbone --impl ours-fused,ours-compiled --dtype bf16 --iters 2 --no-peak
  run $F --size 0.1b --part backbone --impl ours-fused,hf-compiled --dtype fp32 --iters 2 --no-peak
  # task model (seg head at full resolution), batch 1 and 2
  run $F --size 0.1b --part task --impl ours-fused,hf --dtype fp32,bf16 --iters 1 --no-peak
  run $F --size 0.1b --part task --impl ours-compiled --dtype bf16 --iters 2 --no-peak
  run $F --size 0.1b --part backbone --impl ours-fused,hf --dtype bf16 --batch 2 --iters 1 --no-peak
}

one_thread() {
  T="$F --threads 1 --no-peak"
  run $T --size 0.1b --part backbone --impl ours-legacy,ours,ours-fused,hf --dtype fp32 --iters 1
  run $T --size 0.1b --part backbone --impl ours-legacy,ours,ours-fused,hf --dtype bf16 --iters 1
  run $T --size 0.1b --part backbone --impl ours-fused --dtype fp32,bf16,autocast --iters 1
  run $T --size 0.1b --part backbone --impl ours-compiled,hf-compiled --dtype fp32 --iters 2
  run $T --size 0.1b --part backbone --impl ours-compiled,hf-compiled --dtype bf16 --iters 2
  run $T --size 0.1b --part task --impl ours-fused,hf --dtype fp32,bf16 --iters 1
  run $T --size 0.1b --part task --impl ours-compiled,hf-compiled --dtype bf16 --iters 1
  run $T --size 0.1b --part backbone --impl ours-fused,hf --dtype bf16 --batch 2 --iters 1
  # 0.4b: one or two implementations per invocation (a forward takes 1-2 min on one core)
  for dtype in fp32 bf16; do
    for impl in ours-fused hf ours-compiled hf-compiled; do
      run $T --size 0.4b --part backbone --impl $impl --dtype $dtype --iters 1
    done
  done
  for dtype in fp32 bf16; do
    for impl in ours-fused hf; do
      run $T --size 0.4b --part task --impl $impl --dtype $dtype --iters 1
    done
  done
}

# the rest of the one-thread set, run in a later session on a quiet machine (the first stopped
# during the 0.4b task-model runs)
rest() {
  T="$F --threads 1 --no-peak"
  for dtype in fp32 bf16; do
    for impl in ours-fused hf; do
      run $T --size 0.4b --part task --impl $impl --dtype $dtype --iters 1
    done
  done
  # whole machine, quiet: fp32 and bf16 side by side, two rounds each
  run $F --size 0.1b --part backbone --impl ours-fused,hf --dtype fp32,bf16 --iters 2 --no-peak
  # operator tables
  run benchmarks/profile_ops.py --threads 1 --size 0.4b --dtype fp32 --fused
  run benchmarks/profile_ops.py --threads 1 --size 0.4b --dtype bf16 --fused
  run benchmarks/profile_ops.py --threads 1 --size 0.4b --dtype bf16 --compiled
  # peak memory, one process per implementation and dtype
  run benchmarks/memory.py --threads 1 --size 0.4b --part backbone --impl ours-fused,hf --dtype fp32,bf16 --out $OUT
  run benchmarks/memory.py --threads 1 --size 0.4b --part task --impl ours-fused,hf --dtype fp32,bf16 --out $OUT
  run benchmarks/memory.py --threads 1 --size 0.1b --part task --impl ours-fused,hf --dtype fp32,bf16 --out $OUT
  # how far each variant moves the official outputs
  run benchmarks/parity_drift.py --fixtures "${SAPIENS2_FIXTURES:-../shared/fixtures}"
}

# memory and parity drift again, after the loading fix (a converting load kept the file mapped)
# and with the weights made resident before measuring; parity drift with one compilation per case
memory() {
  for part in backbone task; do
    run benchmarks/memory.py --threads 1 --size 0.4b --part $part --impl ours-fused,hf --dtype fp32,bf16 --out $OUT
  done
  run benchmarks/memory.py --threads 1 --size 0.1b --part task --impl ours-fused,hf --dtype fp32,bf16 --out $OUT
  run benchmarks/parity_drift.py --fixtures "${SAPIENS2_FIXTURES:-../shared/fixtures}"
}

# what the official bf16 RoPE costs a float32 forward (transformers skips it), then the real
# run against forward-only on photos at the released input size and on an H.264 video
e2e() {
  run $F --threads 1 --no-peak --size 0.1b --part backbone --impl ours-fused,ours-rope32,hf --dtype fp32 --iters 2
  run $F --threads 1 --no-peak --size 0.1b --part backbone --impl ours-compiled,ours-compiled-rope32,hf-compiled --dtype fp32 --iters 2
  run benchmarks/predict_overhead.py --task seg --arch 0.1b --input-size 1024x768 --images 4 --batch-size 1 --rounds 2
  run benchmarks/predict_overhead.py --task seg --arch 0.1b --input-size 512x384 --video 12 --image-size 1280x720 --batch-size 2 --rounds 2
  # the small model (384 wide, 12 layers) at 384x288: a pipeline stress test on video
  run benchmarks/predict_overhead.py --task seg --video 48 --image-size 1280x720 --rounds 3
}

case "${1:-}" in
  two-threads) two_threads ;;
  one-thread) one_thread ;;
  rest) rest ;;
  memory) memory ;;
  e2e) e2e ;;
  *) echo "usage: $0 two-threads|one-thread|rest|memory|e2e" >&2; exit 2 ;;
esac
