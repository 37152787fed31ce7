#!/usr/bin/env bash
# The whole GPU check in one command, for the bare benchmark machine (see docs/benchmarks.md):
# install the carried wheels (loadtests/gpu_wheels.sh) into a temporary path, run the gpu-marked
# tests, then the open-loop load on the engine's batch queues and admission (bench_open_loop_gpu.py), then,
# when BENCH_S is set (seconds, e.g. 240), the engine benchmark (bench_engine_gpu.py); logs and results go to
# $OUT (or out/gpu_run). Each part has its own limit (GPU_TESTS_S 90, OPEN_LOOP_S 300, BENCH_S; 0 leaves a
# part out): the default run (~400 s) fits one device call (at most 600 s) and leaves room in the session's
# 900 s of device time for the machine's start and a short rerun; with BENCH_S=240 it needs ~640 s, so give
# the engine benchmark a call of its own (GPU_TESTS_S=0 OPEN_LOOP_S=0 BENCH_S=240).
# Each benchmark saves as it goes, so a cut keeps what was measured. The benchmarks run even when the tests
# failed (this is the only device run: every output is kept); the exit code is non-zero, with a line saying
# which, when any failed. Arguments go to the engine benchmark.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-out/gpu_run}"
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.used,memory.total,temperature.gpu --format=csv | tee "$OUT/nvidia_smi.csv"
tests_rc=0 open_loop_rc=0 bench_rc=0  # a part whose limit is 0 is left out
if [ "${GPU_TESTS_S:=90}" != 0 ]; then
  timeout "$GPU_TESTS_S" python3 -m pytest -q -p no:cacheprovider -m gpu \
    tests/test_engine_fast_path.py tests/test_remover.py 2>&1 | tee "$OUT/gpu_tests.log"
  tests_rc=${PIPESTATUS[0]}
fi
if [ "${OPEN_LOOP_S:=300}" != 0 ]; then
  timeout "$OPEN_LOOP_S" python3 loadtests/bench_open_loop_gpu.py --out-dir "$OUT" \
    --budget-s "${OPEN_LOOP_BUDGET_S:-250}" 2>&1 | tee "$OUT/open_loop.log"
  open_loop_rc=${PIPESTATUS[0]}
fi
if [ "${BENCH_S:=0}" != 0 ]; then
  timeout "$BENCH_S" python3 loadtests/bench_engine_gpu.py --out-dir "$OUT" --budget-s "${BUDGET_S:-210}" "$@" \
    2>&1 | tee "$OUT/bench.log"
  bench_rc=${PIPESTATUS[0]}
fi
failed=()
[ "$tests_rc" -eq 0 ] || failed+=("gpu tests exited $tests_rc (see $OUT/gpu_tests.log)")
[ "$open_loop_rc" -eq 0 ] || failed+=("the open-loop benchmark exited $open_loop_rc (see $OUT/open_loop.log)")
[ "$bench_rc" -eq 0 ] || failed+=("the benchmark exited $bench_rc (see $OUT/bench.log)")
[ ${#failed[@]} -eq 0 ] || { printf 'gpu_run.sh: %s\n' "${failed[@]}" >&2; exit 1; }
