# `make serve` and `make test` create the environment themselves (.venv, CPU torch 2.13.0).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# PyPI's Linux torch 2.13.0 is the CUDA build (gigabytes of nvidia-* packages): PyTorch's CPU index is added where it
# answers (its 2.13.0+cpu then wins); where it does not (an offline mirror that holds the CPU wheel), the configured
# index alone. TORCH_CPU_INDEX= (empty) skips it.
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH_CPU_PROBE := import urllib.request as u; u.urlopen('$(TORCH_CPU_INDEX)/torch/', timeout=5); print('--extra-index-url $(TORCH_CPU_INDEX)')
PYTEST_ARGS ?=

.PHONY: venv serve test test-fast proto clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@echo "make: installing the environment in $(VENV) (torch CPU, Ray, diffusers: a few minutes, quietly)"
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0 $$($(PY) -c "$(TORCH_CPU_PROBE)" 2>/dev/null)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

serve: venv
	$(PY) -m serve run $(ARGS)

# Bytecode is written even where the environment says not to (PYTHONDONTWRITEBYTECODE): otherwise every pytest
# run re-rewrites ~250 plugin modules (schemathesis, hypothesis, anyio) and every Ray worker recompiles serve/
# and engines/ (docs/benchmarks.md "The test suite's time").
TEST_ENV := PYTHONDONTWRITEBYTECODE=

# Two runs, both whatever the other's outcome, side by side: in the foreground the e2e tests one at a time against
# their one Serve (a second stream of them would share it), after the `timing` tests (wall-clock bounds without
# Ray); in the background the other tests without Ray on every core (pytest-xdist: they share nothing) at nice 19,
# one torch thread per worker, in their own session and cache folder. The e2e tests leave ~40% of the CPU idle (they
# wait on the service); at nice 19 the background takes that and little else, and Ray's workers run at the tests'
# priority (RAY_worker_niceness=0; at Ray's default 15 a nice-19 process takes ~30% of a core from a replica).
# docs/benchmarks.md "The test suite's time" has the figures. The foreground prints as it runs; the background's
# report follows. MARKS selects by marker in both (pytest's -m would pick the same tests for both runs, so -m in
# PYTEST_ARGS is refused); a run that selects no test (exit 5) is not a failure unless both select none.
# WORKERS=0 runs the tests without Ray first, in one process in the foreground (for --pdb, which xdist refuses),
# then the e2e tests. Ctrl-C or a TERM stops both.
MARKS ?= e2e or not e2e
WORKERS ?= auto
WITHOUT_RAY_CACHE := -o cache_dir=.pytest_cache/without-ray
WITH_RAY = $(TEST_ENV) RAY_worker_niceness=0 $(PY) -m pytest -q -m "$(1) and ($(MARKS))" $(PYTEST_ARGS)
test: venv
	$(if $(filter -m -m%,$(PYTEST_ARGS)),$(error make test: pick tests by marker with MARKS='...', not -m in PYTEST_ARGS))
	@if [ "$(WORKERS)" = 0 ]; then \
	  $(TEST_ENV) $(PY) -m pytest -q -m "not e2e and ($(MARKS))" $(WITHOUT_RAY_CACHE) $(PYTEST_ARGS); without_ray=$$?; \
	  $(call WITH_RAY,e2e); with_ray=$$?; \
	else \
	  report=$$(mktemp); \
	  echo "make test: the tests without Ray run beside the e2e tests at nice 19; their report follows the e2e tests'"; \
	  setsid nice -n 19 env OMP_NUM_THREADS=1 $(TEST_ENV) $(PY) -m pytest -q -n $(WORKERS) \
	    -m "not e2e and not timing and ($(MARKS))" $(WITHOUT_RAY_CACHE) $(PYTEST_ARGS) > $$report 2>&1 & beside=$$!; \
	  trap 'kill -TERM -$$beside 2>/dev/null; rm -f $$report; exit 130' INT; \
	  trap 'kill -TERM -$$beside 2>/dev/null; rm -f $$report; exit 143' TERM; \
	  $(call WITH_RAY,(e2e or timing)); with_ray=$$?; \
	  wait $$beside; without_ray=$$?; \
	  echo "make test: the tests without Ray:"; cat $$report; rm -f $$report; \
	fi; \
	echo "make test: tests without Ray exit $$without_ray, e2e (and timing) tests exit $$with_ray"; \
	for rc in $$without_ray $$with_ray; do [ $$rc = 0 ] || [ $$rc = 5 ] || exit $$rc; done; \
	[ $$without_ray = 0 ] || [ $$with_ray = 0 ] || exit 5

# no Ray (every test that starts a local Serve or the CLI is marked e2e, tests/conftest.py), no export or training;
# on every core (pytest-xdist): these tests share no service, where `make test`'s e2e tests share one Serve
test-fast: venv
	$(TEST_ENV) $(PY) -m pytest -q -n auto -m "not e2e and not slow" $(PYTEST_ARGS)

# Regenerate the gRPC stubs from serve/rorem.proto (grpcio-tools is in the dev extra; the output is committed).
proto: venv
	$(PY) -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. serve/rorem.proto

clean:
	rm -rf $(VENV) .pytest_cache
