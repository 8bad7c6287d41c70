#!/usr/bin/env bash
# The GPU checks, in one call on a machine with one GPU (the device tool's: one H200, Python 3.12, torch with CUDA,
# transformers and a few more, nothing to fetch from there), from a copy of the checkout:
#
#   bash launch/run_on_gpu.sh              # on the GPU machine: install the carried wheels, run tests/gpu, then the
#                                          # benchmark sections; logs in $OUT (else bench_out/gpu_checks)
#   bash launch/run_on_gpu.sh --dry-run    # on any machine: check all that can be checked without a GPU (exit 0:
#                                          # all passed)
#   bash launch/run_on_gpu.sh --wheels     # on a machine with a package index: fill .whl/ (git-ignored) to carry
#
# What the GPU machine lacks comes as wheels in .whl/ (built for Python 3.12 by --wheels, at the versions this
# environment runs; the device tool carries them with `carry: [".whl"]`, 13 MiB), installed with `pip install --no-deps --no-index --target` into a scratch directory put first
# on PYTHONPATH, with this checkout: the machine's own torch stays. Models are drawn at load where they run
# (--ckpt_dir random:NAME: random weights of a preset, in GPU memory; nothing written to disk).
#
# Sections, in this order, each bounded by `timeout` (its own limit, LIMIT_<name> to change it, or what is left of
# TOTAL_S, default 480 s, if less; one with under 30 s left is skipped; SECTIONS="8b_int8 8b_int4" runs only those,
# e.g. in a second call on the same machine, whose compile caches are then warm); the mandatory ones first:
#   tests         LLAMA_DIST_GPU_TESTS=1 pytest tests/gpu: world size 1 on NCCL (tensor parallelism over NCCL
#                 needs one GPU per rank: on one GPU it cannot be tested; 2 and 4 ranks share it over gloo)
#   1b_compiled   bf16 decode, batch 1, Llama-3.2-1B shape: ours compiled (% of the measured copy bandwidth), then
#                 transformers' default generate and its static cache + compile on the same weights
#   1b_eager      the same, ours eager
#   best effort:  8b_bf16, 8b_int8, 8b_int4 (Llama-3-8B shape, batch 1), 8b_batches (bf16 at batch 8 and 32),
#                 serve (the server's load test on the 1B shape, 1/4/16 clients; eager: a compiled server first
#                 compiles every batch bucket, minutes)
# Exit status: 1 if a mandatory section failed or was cut; the best-effort ones only report.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PYTHON=${PYTHON:-python3}
WHEEL_DIR=${WHEEL_DIR:-.whl}
# What the GPU machine lacks (the device tool's KINDS.md: fairscale, fire, termcolor, fastapi, starlette, uvicorn,
# pydantic-core, openai, llguidance) and what those import there (pydantic and pydantic-core go together; openai
# is a test-only client, not run here), and llama-models for its Llama 3 tokenizer file (the server needs a
# tokenizer; the package itself is not imported).
WHEELS=(fairscale fire termcolor fastapi starlette uvicorn click h11 anyio idna pydantic pydantic-core annotated-types
        typing-inspection typing-extensions annotated-doc opentelemetry-api llguidance llama-models)
export PYTHONUNBUFFERED=1

mode=run
case ${1:-} in
    --dry-run) mode=dry ;;
    --wheels) mode=wheels ;;
    "") ;;
    *) echo "usage: bash launch/run_on_gpu.sh [--dry-run | --wheels]" >&2; exit 2 ;;
esac

wheel_file() {  # NAME -> its wheel in $WHEEL_DIR, if any (wheel file names spell - as _)
    compgen -G "$WHEEL_DIR/${1//-/_}-[0-9]*.whl" | head -n 1
}

if [ "$mode" = wheels ]; then
    mkdir -p "$WHEEL_DIR"
    for name in "${WHEELS[@]}"; do
        version=$("$PYTHON" -c "import importlib.metadata as m; print(m.version('$name'))") || exit 1
        # fairscale is published as a source archive only: built here into a (pure Python) wheel.
        "$PYTHON" -m pip download -q --python-version 3.12 --only-binary :all: --no-deps "$name==$version" \
            -d "$WHEEL_DIR" 2>/dev/null ||
            "$PYTHON" -m pip wheel -q --no-deps --no-build-isolation "$name==$version" -w "$WHEEL_DIR" || exit 1
    done
    ls -l "$WHEEL_DIR"
    exit 0
fi

missing=()
for name in "${WHEELS[@]}"; do
    [ -n "$(wheel_file "$name")" ] || missing+=("$name")
done
if [ -z "${SCRATCH:-}" ]; then  # where the wheels are installed: a fresh directory, removed at the end
    SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/llama_dist_gpu.XXXXXX")
    trap 'rm -rf "$SCRATCH"' EXIT
fi
SITE=$SCRATCH/site
install_wheels() {  # for CPython 3.12 whatever runs it (on another Python, a dry run checks the wheels' tags)
    local files=()
    for name in "${WHEELS[@]}"; do files+=("$(wheel_file "$name")"); done
    "$PYTHON" -m pip install -q --no-deps --no-index --python-version 3.12 --only-binary :all: --target "$SITE" \
        "${files[@]}"
}

# The sections: name, limit in seconds, mandatory or not, the command (run with bash -c: $PYTHON, $TOKENIZER).
NAMES=() LIMITS=() MANDATORY=() COMMANDS=()
section() { NAMES+=("$1"); LIMITS+=("$2"); MANDATORY+=("$3"); COMMANDS+=("$4"); }
BENCH='$PYTHON -m llama_dist.bench'
B1="$BENCH run --ckpt_dir random:Llama-3.2-1B --dtype bfloat16 --batch_sizes 1 --prompt_len 64 --gen_len 32 --repeats 3"
B8="$BENCH run --ckpt_dir random:Llama-3-8B --dtype bfloat16 --prompt_len 64 --gen_len 32 --repeats 3"
section tests 180 yes 'LLAMA_DIST_GPU_TESTS=1 $PYTHON -m pytest -q -rs tests/gpu'
section 1b_compiled 170 yes "$B1 --compile True --compare_hf True --hf_compile True"
section 1b_eager 40 yes "$B1 --compile False --nomachine_limits"
section 8b_bf16 120 no "$B8 --batch_sizes 1 --compile True"
section 8b_int8 120 no "$B8 --batch_sizes 1 --compile True --quantize int8"
section 8b_int4 120 no "$B8 --batch_sizes 1 --compile True --quantize int4"
section 8b_batches 150 no "$B8 --batch_sizes 8,32 --compile True --nomachine_limits"
section serve 150 no "$BENCH serve --ckpt_dir random:Llama-3.2-1B --tokenizer_path \$TOKENIZER --nproc 1 --clients 1,4,16 --max_batch_size 16 --server_flags='--compile False'"

tokenizer_path() {  # llama-models' Llama 3 tokenizer, found without importing the package
    "$PYTHON" -c 'import importlib.util as u, pathlib
spec = u.find_spec("llama_models")
print(pathlib.Path(spec.submodule_search_locations[0], "llama3", "tokenizer.model") if spec else "")'
}

if [ "$mode" = dry ]; then
    echo "== dry run: what the GPU run needs and does, checked without a GPU"
    for tool in "$PYTHON" timeout nvidia-smi; do
        if command -v "$tool" >/dev/null; then echo "ok   $tool: $(command -v "$tool")"
        else echo "--   $tool: not here (the GPU machine has it)"; fi
    done
    site_flag=() status=0
    if [ ${#missing[@]} -gt 0 ]; then
        echo "--   wheels to carry, missing from $WHEEL_DIR/ (bash launch/run_on_gpu.sh --wheels builds them):"
        printf '       %s\n' "${missing[@]}"
        echo "     (checked below with this environment's packages instead)"
    elif install_wheels; then
        echo "ok   ${#WHEELS[@]} wheels for CPython 3.12 installed from $WHEEL_DIR/ into $SITE (pip --no-deps --target)"
        if "$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))'; then
            site_flag=(--site "$SITE")
        else
            echo "--   importing them needs Python 3.12 (the GPU machine's): the commands are checked with this" \
                 "environment's packages"
        fi
    else
        echo "FAIL installing the wheels of $WHEEL_DIR/ into $SITE"
        status=1
    fi
    export PYTHONPATH="${site_flag[1]:+${site_flag[1]}:}$REPO${PYTHONPATH:+:$PYTHONPATH}"
    TOKENIZER=$(tokenizer_path)
    budget=0
    for i in "${!NAMES[@]}"; do
        budget=$((budget + LIMITS[i]))
        echo "     section ${NAMES[i]}: limit ${LIMITS[i]} s, $([ "${MANDATORY[i]}" = yes ] && echo mandatory || echo best effort)"
    done
    echo "     sections' limits add up to $budget s; the run stops at TOTAL_S=${TOTAL_S:-480} s"
    echo "     the server load test's tokenizer: ${TOKENIZER:-none found (llama-models missing: that section is skipped)}"
    resolved=()
    for command in "${COMMANDS[@]}"; do resolved+=("${command//\$TOKENIZER/$TOKENIZER}"); done
    "$PYTHON" launch/check_gpu_run.py "${site_flag[@]}" ${TOKENIZER:+--tokenizer "$TOKENIZER"} -- "${resolved[@]}" ||
        status=1
    echo "== dry run done ($([ $status -eq 0 ] && echo "every check passed" || echo "some checks FAILED: see above"))"
    exit $status
fi

# ---- the run on the GPU machine ------------------------------------------------------------------------------------
LOGS=${OUT:-bench_out/gpu_checks}
mkdir -p "$LOGS"
deadline=$((SECONDS + ${TOTAL_S:-480}))
if [ ${#missing[@]} -gt 0 ]; then
    echo "missing wheels in $WHEEL_DIR/: ${missing[*]} (bash launch/run_on_gpu.sh --wheels on a machine with an index)"
    exit 1
fi
install_wheels || { echo "installing the wheels failed"; exit 1; }
export PYTHONPATH="$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHON
TOKENIZER=$(tokenizer_path)
export TOKENIZER
{
    date -u "+%Y-%m-%d %H:%M UTC"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    "$PYTHON" -c 'import torch, transformers; print("torch", torch.__version__, "CUDA", torch.version.cuda,
        "transformers", transformers.__version__, "GPUs", torch.cuda.device_count())'
    echo "Tensor parallelism over NCCL needs one GPU per rank: with one GPU it cannot be tested here (tests/gpu runs"
    echo "world size 1 on NCCL; its 2 and 4 ranks share the GPU over gloo)."
} 2>&1 | tee "$LOGS/versions.log"

failed=0
summary=()
for i in "${!NAMES[@]}"; do
    name=${NAMES[i]} start=$SECONDS
    if [ -n "${SECTIONS:-}" ] && [[ " $SECTIONS " != *" $name "* ]]; then
        continue
    fi
    override=LIMIT_$name
    limit=${!override:-${LIMITS[i]}}
    if [ "$name" = serve ] && [ -z "$TOKENIZER" ]; then
        summary+=("$name: skipped, no Llama 3 tokenizer (the llama-models wheel)")
        continue
    fi
    left=$((deadline - SECONDS))
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -lt 30 ]; then
        summary+=("$name: skipped, ${left} s left")
        [ "${MANDATORY[i]}" = yes ] && failed=1
        continue
    fi
    echo "== $name (limit $limit s): ${COMMANDS[i]}" | tee "$LOGS/$name.log"
    timeout --kill-after=10 "$limit" bash -c "${COMMANDS[i]}" 2>&1 | tee -a "$LOGS/$name.log"
    rc=${PIPESTATUS[0]}
    summary+=("$name: exit $rc after $((SECONDS - start)) s$([ "$rc" -eq 124 ] && echo " (cut at its limit)")")
    [ "$rc" -ne 0 ] && [ "${MANDATORY[i]}" = yes ] && failed=1
done
printf '%s\n' "== summary" "${summary[@]}" | tee "$LOGS/summary.log"
exit $failed
