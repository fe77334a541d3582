#!/usr/bin/env bash
# The single-GPU checks of a release, in two parts that each fit one device call (≤ 10 min):
#   benchmarks/gpu_session.sh checks   # GPU-only tests, kernel checks, quantizer + anchor, CUDA-graph capture, checksums
#   benchmarks/gpu_session.sh stage    # shard regression vs an earlier commit, the whole stage
#   benchmarks/gpu_session.sh evaluate # the cost of `requant evaluate --offline` at DeepSeek-V4-Flash shapes
# Run from the repo root on the GPU machine (torch + Triton there, no install of this project).
# Needs: the wheels of benchmarks/README.md ("GPU machine") in .whl/; for `stage`, a plain export of
# the earlier commit in .old/ (git archive <commit> | tar -x -C .old). Results go to $OUT (or ./gpu-out).
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
# `requant.*` onto this checkout's folders, as pyproject maps them (nothing is installed here)
mkdir -p /tmp/rq/requant
python3 -c "import sys; sys.path.insert(0, 'benchmarks'); import _path
for name, folder in _path.package_dirs().items(): print(name, folder)" |
    while read -r name folder; do ln -sfn "$PWD/$folder" "/tmp/rq/requant/$name"; done
export PYTHONPATH=/tmp/rq:/tmp/site
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cores', __import__('os').cpu_count())" \
    | tee -a "$OUT/device.txt"
step() {  # name, seconds, command...: one step, its output kept, a failure reported, the rest still run
    local name=$1 secs=$2; shift 2
    echo "=== $name ($(date -u +%T))"
    timeout "$secs" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$OUT/$name.log"
    echo "=== $name rc=$rc"
}
case "${1:-}" in
checks)
    step tests 200 python3 -m pytest -q -p no:cacheprovider -rs tests/quantizer/test_cuda_stage.py \
        tests/quantizer/test_replay.py tests/quantizer/test_weights.py tests/capture/test_cuda_staging.py
    step gpu_checks 90 python3 benchmarks/gpu_checks.py
    step quantizer 170 python3 benchmarks/quantizer_bench.py --variants actorder --policies token_damp,shrink \
        --out "$OUT/quantizer_h200.json"
    step cuda_graph 40 python3 benchmarks/cuda_graph_capture_check.py
    step checksums 60 python3 benchmarks/storage_bench.py --rows 32768 --checksums-only --repeat 3 --dir /tmp \
        --out "$OUT/storage_checksums_h200host.json"
    ;;
stage)
    step regression 230 python3 benchmarks/shard_regression.py --old .old --out "$OUT/shard_regression_h200.json"
    step stage 330 python3 benchmarks/quantize_stage.py --out "$OUT/quantize_stage_h200.json"
    ;;
evaluate)  # the offline evaluation's cost at DeepSeek-V4-Flash shapes (~4 min)
    step evaluate 400 python3 benchmarks/quantize_stage.py --skip-full --evaluate --out "$OUT/quantize_stage_evaluate_h200.json"
    ;;
*)
    echo "usage: $0 checks|stage|evaluate" >&2
    exit 2
    ;;
esac
