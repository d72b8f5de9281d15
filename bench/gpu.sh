#!/usr/bin/env bash
# The prepared GPU run of issue 19: the iGAT step and one CIFAR-10-shaped iGAT epoch (ResNet-20, N = 8, batch 512,
# PGD-20) for loop, fused and fused+bf16, then fused+graphs on its own (CUDA graphs are untested before this run).
# Every part runs under `timeout`; the tables land in $OUT (the device machine's result folder) or bench/out/.
#
#   bench/gpu.sh            # on the GPU machine, about 8 minutes at most (GPU_BENCH_LIMIT_S, default 450)
#   bench/gpu.sh --smoke    # anywhere: tiny sizes on the CPU, to check that the script runs
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
DEST=${OUT:-bench/out}
mkdir -p "$DEST"
LIMIT=${GPU_BENCH_LIMIT_S:-450}
export PYTHONPATH=$PWD

if [ "${1:-}" = "--smoke" ]; then
    main=(--smoke --settings loop,fused,fused+bf16)
    graphs=(--smoke --settings loop,fused+graphs)
    main_limit=$LIMIT graphs_limit=$LIMIT
else
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$DEST/gpu.txt" 2>&1 || true
    main=(--device cuda --members 8 --batch 512 --steps 20 --examples 50000 --reps 5 --epoch-budget 90
          --settings loop,fused,fused+bf16)
    graphs=(--device cuda --members 8 --batch 512 --steps 20 --examples 5120 --reps 3 --epoch-budget 20
            --settings loop,fused,fused+graphs)
    main_limit=$((LIMIT * 4 / 5)) graphs_limit=$((LIMIT / 5))
fi

status=0
timeout -k 10 "$main_limit" "$PY" -m bench.engine "${main[@]}" --out "$DEST/gpu_engine.md" \
    > "$DEST/gpu_engine.log" 2>&1 || status=$?
timeout -k 10 "$graphs_limit" "$PY" -m bench.engine "${graphs[@]}" --out "$DEST/gpu_graphs.md" \
    > "$DEST/gpu_graphs.log" 2>&1 || status=$((status ? status : $?))
cat "$DEST"/gpu_engine.md "$DEST"/gpu_graphs.md 2>/dev/null || true
echo "tables and logs in $DEST (exit status $status; 124: a part reached its time limit, its table keeps what it measured)"
exit "$status"
