#!/usr/bin/env bash
# The GPU figures of bench/RESULTS.md on a lent machine, in parts that fit its calls:
#
#   bash bench/gpu_run.sh                     # every part (about 9 minutes on an H200)
#   bash bench/gpu_run.sh tests zoo           # some of them
#
# tests: the CUDA tests (the clip bound with cuBLAS/cuDNN, TF32 included; 35 s); zoo, lm: the step
# table of the zoo and of the language models against non-private and Opacus; compiled: the
# default step under torch.compile; padding: real Poisson batches against exact-size ones. Each
# part has a time limit so that a slow one cannot take the rest with it; logs go to $OUT (else
# ./gpu-out). Packages the machine lacks (optree, dp_accounting, opacus, ...) travel as wheels in
# .whl/. The step tables run in one process (`--in-process`): on that machine a process start
# costs about 10 s.
set -u
out=${OUT:-gpu-out}
mkdir -p "$out"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee "$out/gpu.txt"

part() {  # part NAME SECONDS COMMAND...: run with a limit, log to $OUT/NAME.txt
    local name=$1 limit=$2
    shift 2
    echo "## $name: $*"
    timeout "$limit" "$@" 2>&1 | tee "$out/$name.txt" | grep -v Warning
}

step_time=(python3 bench/step_time.py --device cuda --in-process)
parts=("$@")
[ $# -eq 0 ] && parts=(tests zoo lm compiled padding)
for name in "${parts[@]}"; do
    case $name in
    tests) part tests 90 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py ;;
    zoo) part zoo 150 "${step_time[@]}" --models mlp cnn lstm transformer resnet18 \
        --engines nonprivate funcdp opacus-hooks opacus-ghost --warmup 5 --repeats 20 ;;
    lm) part lm 150 "${step_time[@]}" --models gpt2-lora-128 gpt2-128 gpt2-lora-512 gpt2-512 bert-128 \
        --engines nonprivate funcdp opacus-hooks opacus-ghost --warmup 3 --repeats 10 ;;
    compiled) part compiled 180 "${step_time[@]}" --models mlp cnn transformer gpt2-lora-128 \
        --engines nonprivate funcdp-compiled --warmup 3 --repeats 20 ;;
    padding) part padding 60 python3 bench/poisson_padding.py --device cuda --steps 30 --micro 16 ;;
    *) echo "unknown part $name" >&2 ;;
    esac
done
