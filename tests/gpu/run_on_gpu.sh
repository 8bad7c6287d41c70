#!/usr/bin/env bash
# Issue 11's GPU checks on a machine with one (or more) GPUs, from a checkout:
#
#   bash tests/gpu/run_on_gpu.sh                      # every stage: tests bench_1b bench_8b
#   bash tests/gpu/run_on_gpu.sh tests bench_1b       # some of them (each stage has its own time limit)
#
# It installs the wheels carried in .whl/ (fairscale, fire, termcolor: `pip wheel --no-deps -w .whl fairscale
# fire termcolor` on a machine with an index) and this package, both without dependencies, so the machine's own
# torch stays; then runs the stages:
#   tests     the GPU test set (LLAMA_DIST_GPU_TESTS=1 python -m pytest -q tests/gpu)
#   bench_1b  random bf16 weights shaped like Llama-3.2-1B: batch 1 (ours compiled, transformers' default generate
#             and its static cache + torch.compile mode), then batch 8 and 32 (ours, transformers' default)
#   bench_8b  the same, shaped like Llama-3-8B (a 15 GiB checkpoint, written to $BENCH_DIR first)
# Batch 1 runs on its own: the compiled decode step always decodes every slot of the cache (max_batch_size).
# Logs (one per stage, plus versions) go to $OUT, else bench_out/gpu_checks; the exit status is 1 if any stage failed.
# Time: all stages together end within TOTAL_S (default 560 s, for a 10-minute call); each stage gets its own limit
# (LIMIT_TESTS, LIMIT_1B, LIMIT_8B) or what is left, whichever is less. A stage cut short keeps the rows it printed;
# rerun it alone (SKIP_INSTALL=1 on the same machine: the checkpoints in $BENCH_DIR are reused).
set -uo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
LOGS=${OUT:-bench_out/gpu_checks}
BENCH_DIR=${BENCH_DIR:-/tmp/llama_dist_bench}
mkdir -p "$LOGS" "$BENCH_DIR"
export PYTHONUNBUFFERED=1
deadline=$((SECONDS + ${TOTAL_S:-560}))
stages=("$@")
[ ${#stages[@]} -gt 0 ] || stages=(tests bench_1b bench_8b)
failed=0

if [ -z "${SKIP_INSTALL:-}" ]; then  # SKIP_INSTALL=1: already installed (a rerun on the same machine)
    if compgen -G ".whl/*.whl" >/dev/null; then
        "$PYTHON" -m pip install -q --no-deps .whl/*.whl || failed=1
    fi
    "$PYTHON" -m pip install -q --no-deps --no-build-isolation -e . || failed=1
fi
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    "$PYTHON" -c 'import torch, transformers; print("torch", torch.__version__, "CUDA", torch.version.cuda,
        "transformers", transformers.__version__, "GPUs", torch.cuda.device_count())'
} 2>&1 | tee "$LOGS/versions.log"

# stage NAME LIMIT_S COMMAND...: run it within LIMIT_S and the deadline, its output to the screen and $LOGS/NAME.log.
stage() {
    local name=$1 limit=$2 start=$SECONDS
    shift 2
    [ $((deadline - SECONDS)) -lt "$limit" ] && limit=$((deadline - SECONDS))
    if [ "$limit" -lt 30 ]; then
        echo "== $name: skipped, ${limit} s left before the deadline" | tee -a "$LOGS/$name.log"
        failed=1
        return
    fi
    echo "== $name (limit ${limit} s)" | tee -a "$LOGS/$name.log"
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOGS/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$LOGS/$name.log"
    [ "$rc" -eq 0 ] || failed=1
}

bench_shape() {  # SHAPE: write its checkpoint, then batch 1 with both transformers modes, then batch 8 and 32
    local ckpt="$BENCH_DIR/$1_shape"
    if [ ! -f "$ckpt/written" ]; then  # a write cut short by a time limit is redone, not reused
        "$PYTHON" -m llama_dist.bench make-checkpoint --shape "$1" --out "$ckpt" --device cuda && touch "$ckpt/written" ||
            return 1
    fi
    "$PYTHON" -m llama_dist.bench run --ckpt_dir "$ckpt" --batch_sizes 1 --repeats 3 --compare_hf True \
        --hf_compile True || return 1
    "$PYTHON" -m llama_dist.bench run --ckpt_dir "$ckpt" --batch_sizes 8,32 --repeats 3 --compare_hf True
}
export -f bench_shape  # run by `timeout`, which starts programs, not shell functions
export PYTHON BENCH_DIR

for name in "${stages[@]}"; do
    case $name in
        tests) stage tests "${LIMIT_TESTS:-240}" env LLAMA_DIST_GPU_TESTS=1 "$PYTHON" -m pytest -q -rs tests/gpu ;;
        bench_1b) stage bench_1b "${LIMIT_1B:-240}" bash -c 'bench_shape llama32_1b' ;;
        bench_8b) stage bench_8b "${LIMIT_8B:-420}" bash -c 'bench_shape llama3_8b' ;;
        *) echo "unknown stage $name (tests, bench_1b, bench_8b)"; failed=1 ;;
    esac
done
exit $failed
