#!/usr/bin/env bash
# Every GPU benchmark in one call, sized to finish in about 8 minutes on one H100/H200:
#
#   eval/bench/run_all.sh            # training vs transformers at 4K, hybrid vs attention at 2K and 8K, decode at
#                                    # 32K, the gated-delta and MoE kernel benchmarks; then plots and tables; then
#                                    # the expert-parallel MoE layer at EP = 1..8 (only on a node with >= 2 GPUs,
#                                    # about 4 minutes more)
#   eval/bench/run_all.sh --long     # also the 32K and 64K crossover points (about 4 minutes more)
#   eval/bench/run_all.sh --context-parallel   # also context_parallel.py over every visible GPU (torchrun), CP up
#                                    # to the GPU count at 16K-256K tokens per row (issue 17's targets need 8 GPUs)
#
# Results (device, versions, date, git commit, command in each file) go to eval/bench/results/: one JSON (+ PNG)
# per benchmark, results/README.md with every table, and the tables between the bench-results markers of the
# top-level README. Each benchmark runs under its own time limit, so one that hangs or fails costs only its share;
# the JSON files are written as rows complete, so a benchmark stopped at its limit keeps what it measured. The log
# of the whole run is results/run_all.log; the exit status is non-zero if any benchmark failed or timed out.
# Environment: PYTHON (default python), MODEL (default configs/model/gpu_1b.yaml).
set -u
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python}
MODEL=${MODEL:-configs/model/gpu_1b.yaml}
LONG=0
CONTEXT_PARALLEL=0
for arg in "$@"; do
    case "$arg" in
        --long) LONG=1 ;;
        --context-parallel) CONTEXT_PARALLEL=1 ;;
        *) echo "usage: $0 [--long] [--context-parallel]   (unknown argument: $arg)" >&2; exit 2 ;;
    esac
done

if ! "$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "run_all.sh needs a CUDA GPU (torch.cuda.is_available() is False); the CPU smoke runs are" \
         "'python eval/bench/train_throughput.py --device cpu --tiny' and 'python eval/bench/decode.py --device cpu --tiny'" >&2
    exit 1
fi
RESULTS=eval/bench/results
mkdir -p "$RESULTS"
LOG="$RESULTS/run_all.log"
: > "$LOG"
TAG=$("$PYTHON" -c 'import sys; sys.path.insert(0, "eval/bench"); import e2e; print(e2e.device_tag("cuda"))')

failed=()
# bench NAME SECONDS COMMAND...: run one benchmark under a time limit, log its output, remember a failure.
bench() {
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
    local started=$SECONDS
    timeout --signal=INT --kill-after=20 "$limit" "$@" 2>&1 | tee -a "$LOG"
    local status=${PIPESTATUS[0]}
    echo "=== $name: exit $status after $((SECONDS - started))s" | tee -a "$LOG"
    if [ "$status" -ne 0 ]; then
        failed+=("$name (exit $status$([ "$status" -eq 124 ] && echo ', time limit'))")
    fi
}

CROSSOVER=(2048 8192)
CROSSOVER_LIMIT=90
if [ "$LONG" -eq 1 ]; then
    CROSSOVER+=(32768 65536)
    CROSSOVER_LIMIT=330
fi

bench train_throughput 180 "$PYTHON" eval/bench/train_throughput.py --suite transformers --model "$MODEL" \
    --warmup 3 --steps 8 --out "$RESULTS/train_throughput_$TAG.json"
bench crossover "$CROSSOVER_LIMIT" "$PYTHON" eval/bench/train_throughput.py --suite crossover --model "$MODEL" \
    --crossover-seq-lens "${CROSSOVER[@]}" --warmup 2 --steps 5 --out "$RESULTS/crossover_$TAG.json"
bench decode 90 "$PYTHON" eval/bench/decode.py --model "$MODEL" --context 32768 --batch 1 8 --new-tokens 128 \
    --out "$RESULTS/decode_$TAG.json"
bench gated_delta 50 "$PYTHON" eval/bench/gated_delta.py --out "$RESULTS/gated_delta_$TAG.json"
bench moe 50 "$PYTHON" eval/bench/moe.py --out "$RESULTS/moe_$TAG.json"
if [ "$CONTEXT_PARALLEL" -eq 1 ]; then
    GPUS=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')
    CP_SIZES=()
    for cp in 1 2 4 8; do [ "$cp" -le "$GPUS" ] && CP_SIZES+=("$cp"); done
    bench context_parallel 900 "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$GPUS" \
        eval/bench/context_parallel.py --model "$MODEL" --seq-lens 16384 65536 131072 262144 \
        --context-parallel "${CP_SIZES[@]}" --activation-checkpointing --out "$RESULTS/context_parallel_$TAG.json"
fi
bench tables 30 "$PYTHON" eval/bench/plot.py --markdown-out "$RESULTS/README.md" --readme README.md
# Last, so that a caller's time limit sized for one GPU (gpu_kit.py) cuts only this one; plot.py has no table for
# it yet: read its JSON.
GPUS=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')
if [ "$GPUS" -ge 2 ]; then
    bench moe_ep 240 "$PYTHON" eval/bench/moe_ep.py --out "$RESULTS/moe_ep_$TAG.json"
else
    echo "=== moe_ep: skipped: expert parallelism needs at least 2 GPUs on the node, $GPUS visible" | tee -a "$LOG"
fi

if [ ${#failed[@]} -ne 0 ]; then
    printf 'failed or timed out: %s\n' "${failed[@]}" | tee -a "$LOG" >&2
    exit 1
fi
echo "all benchmarks done: $RESULTS (tables in $RESULTS/README.md and README.md)" | tee -a "$LOG"
