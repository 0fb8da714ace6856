#!/usr/bin/env bash
# The GPU figures of bench/RESULTS.md in one call on a lent machine (about 9 minutes): the CUDA
# tests (the clip bound there, TF32 included), then the step table (zoo and language models
# against non-private and Opacus), the compiled steps, and what padding costs. Each part has a
# time limit so that a slow one cannot take the rest with it; logs go to $OUT (else ./gpu-out).
#
#   bash bench/gpu_run.sh
#
# Packages the machine lacks (optree, dp_accounting, opacus, ...) travel as wheels in .whl/.
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

part tests 120 python3 -m pytest -q -p no:cacheprovider -x tests/test_cuda.py
part zoo 160 python3 bench/step_time.py --models mlp cnn lstm transformer resnet18 \
    --engines nonprivate funcdp opacus-hooks opacus-ghost --warmup 5 --repeats 20 --timeout 60
part lm 140 python3 bench/step_time.py --models gpt2-lora-128 gpt2-128 gpt2-lora-512 gpt2-512 \
    bert-128 --engines nonprivate funcdp opacus-hooks opacus-ghost --warmup 3 --repeats 10 \
    --timeout 60
part padding 40 python3 bench/poisson_padding.py --device cuda --steps 15 --micro 16
part compiled 110 python3 bench/step_time.py --models mlp transformer cnn gpt2-lora-128 \
    --engines nonprivate funcdp-compiled --warmup 3 --repeats 20 --timeout 90
