#!/usr/bin/env bash
# Download the wheels the engine needs on the bare benchmark GPU machine (Python 3.12, x86-64), which
# has torch, transformers, safetensors, numpy, pillow, opencv but no diffusers or pydantic and no
# network. They land in .whl/ (git-ignored) and travel with the working tree; docs/benchmarks.md has
# the one command that installs them there and runs loadtests/bench_engine_gpu.py.
# Not carried, though bench_engine_gpu.py imports them: scikit-image (benchlib.photo; with scipy and
# lazy_loader), PyYAML (benchlib), filelock (torch, huggingface_hub). They are the machine's own: the
# 2026-11-30 run there (79e6807, docs/bench_engine_gpu_rerun.json) ran every case through benchlib.photo
# with only diffusers, pydantic and their small dependencies carried (this script then), and the
# script's --smoke path imports the same packages now as then (compared on the CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
# diffusers 0.42.1 needs huggingface_hub >= 1.32 (that machine has 1.33); pydantic's core is compiled per Python.
# No importlib-metadata: diffusers reads the standard library's on Python >= 3.8, and the wheel's own
# dependency (lazy-importer) is not on that machine.
# fastapi, starlette and opentelemetry-api (fastapi imports it): loadtests/bench_open_loop_gpu.py imports
# serve.admission, whose problems (serve.problems) are fastapi responses; annotated-doc and anyio are that machine's.
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" -d .whl \
  diffusers==0.42.1 pydantic==2.14.0 pydantic-core==2.50.0 \
  annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0 \
  fastapi==0.165.0 starlette==1.10.0 opentelemetry-api==1.45.2
du -sh .whl
