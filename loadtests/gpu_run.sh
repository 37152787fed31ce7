#!/usr/bin/env bash
# The whole GPU check in one command, for the bare benchmark machine (see docs/benchmarks.md):
# install the carried wheels (loadtests/gpu_wheels.sh) into a temporary path, run the gpu-marked
# tests, then the engine benchmark; logs and results go to $OUT (or out/gpu_run). The default limits
# (90 + 240 s) leave room in the session's 900 s of device time for the machine's start and one rerun;
# the benchmark saves each case as it ends, so a cut keeps the rows already done. The benchmark runs even
# when the tests failed (this is the only device run: both outputs are kept); the exit code is non-zero,
# with a line saying which, when either failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-out/gpu_run}"
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.used,memory.total,temperature.gpu --format=csv | tee "$OUT/nvidia_smi.csv"
timeout "${GPU_TESTS_S:-90}" python3 -m pytest -q -p no:cacheprovider -m gpu \
  tests/test_engine_fast_path.py tests/test_remover.py 2>&1 | tee "$OUT/gpu_tests.log"
tests_rc=${PIPESTATUS[0]}
timeout "${BENCH_S:-240}" python3 loadtests/bench_engine_gpu.py --out-dir "$OUT" --budget-s "${BUDGET_S:-210}" "$@" 2>&1 | tee "$OUT/bench.log"
bench_rc=${PIPESTATUS[0]}
failed=()
[ "$tests_rc" -eq 0 ] || failed+=("gpu tests exited $tests_rc (see $OUT/gpu_tests.log)")
[ "$bench_rc" -eq 0 ] || failed+=("the benchmark exited $bench_rc (see $OUT/bench.log)")
[ ${#failed[@]} -eq 0 ] || { printf 'gpu_run.sh: %s\n' "${failed[@]}" >&2; exit 1; }
