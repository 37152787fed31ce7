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
# glibc's malloc keeps freed blocks up to 256 MiB for reuse instead of unmapping each: the tests without Ray make
# and drop photo-sized arrays by the thousand, and faulting their pages in again was ~10 s of the kernel's CPU. The
# price: each worker holds on to what it freed (up to 1 GiB at the top of its heap).
HEAP_REUSE := MALLOC_MMAP_THRESHOLD_=268435456 MALLOC_TRIM_THRESHOLD_=1073741824

# Two runs side by side, each whatever the other's outcome: $(1) in the foreground, printing as it runs, and $(2)
# in the background at nice 19, one torch thread per xdist worker, reusing heap blocks (HEAP_REUSE), in its own
# session (Ctrl-C or a TERM stops both), its report printed after; `front` and `back` hold their exit codes. Where
# the kernel has autogroups a new session is a scheduler group of its own and nice 19 counts only inside it (the
# part beside gets a third of the CPU beside the tests' and Ray's groups); an autogroup at 19 starved it for minutes,
# one at 5 made it 50 s slower and the foreground no faster (docs/benchmarks.md "The test suite's time"), so it is
# left at 0.
define BESIDE
report=$$(mktemp); \
echo "make $@: $(3) run beside at nice 19; their report follows"; \
setsid nice -n 19 env OMP_NUM_THREADS=1 $(HEAP_REUSE) $(2) > $$report 2>&1 & beside=$$!; \
trap 'kill -TERM -$$beside 2>/dev/null; rm -f $$report; exit 130' INT; \
trap 'kill -TERM -$$beside 2>/dev/null; rm -f $$report; exit 143' TERM; \
$(1); front=$$?; \
wait $$beside; back=$$?; \
echo "make $@: $(3):"; cat $$report; rm -f $$report
endef

# Fails with the first failing run's code; a run that selects no test (exit 5) is not a failure unless both do.
define BOTH_PASSED
echo "make $@: $(1) exit $$front, $(2) exit $$back"; \
for rc in $$front $$back; do [ $$rc = 0 ] || [ $$rc = 5 ] || exit $$rc; done; \
[ $$front = 0 ] || [ $$back = 0 ] || exit 5
endef

# In the foreground the e2e tests one at a time against their one Serve (a second stream of them would share it),
# after the `timing` tests (wall-clock bounds without Ray, never at nice 19; the Serve starts with the first of them,
# which run ahead of it: tests/conftest.py); beside them the other tests without
# Ray on every core (pytest-xdist: they share nothing), in their own pytest cache folder. The e2e tests leave ~40% of
# the CPU idle (they wait on the service); at nice 19 the other tests take that and little else, and Ray's workers
# run at the tests' priority (RAY_worker_niceness=0; at Ray's default 15 a nice-19 process takes ~30% of a core
# from a replica). docs/benchmarks.md "The test suite's time" has the figures. MARKS selects by marker in both
# (pytest's -m would pick the same tests for both runs, so -m in PYTEST_ARGS is refused). WORKERS=0 runs the tests
# without Ray first, in one process in the foreground (for --pdb, which xdist refuses), then the e2e tests.
MARKS ?= e2e or not e2e
WORKERS ?= auto
WITHOUT_RAY_CACHE := -o cache_dir=.pytest_cache/without-ray
WITH_RAY = $(TEST_ENV) RAY_worker_niceness=0 $(PY) -m pytest -q -m "$(1) and ($(MARKS))" $(PYTEST_ARGS)
test: venv
	$(if $(filter -m -m%,$(PYTEST_ARGS)),$(error make test: pick tests by marker with MARKS='...', not -m in PYTEST_ARGS))
	@if [ "$(WORKERS)" = 0 ]; then \
	  $(TEST_ENV) $(PY) -m pytest -q -m "not e2e and ($(MARKS))" $(WITHOUT_RAY_CACHE) $(PYTEST_ARGS); back=$$?; \
	  $(call WITH_RAY,e2e); front=$$?; \
	else \
	  $(call BESIDE,$(call WITH_RAY,(e2e or timing)),$(TEST_ENV) $(PY) -m pytest -q -n $(WORKERS) \
	    -m "not e2e and not timing and ($(MARKS))" $(WITHOUT_RAY_CACHE) $(PYTEST_ARGS),the tests without Ray); \
	fi; \
	$(call BOTH_PASSED,e2e (and timing) tests,tests without Ray)

# No Ray (every test that starts a local Serve or the CLI is marked e2e, tests/conftest.py), no Chromium (`browser`),
# nothing `slow` (export, training stages, locust and the load-test scripts' timed runs): the `timing` tests in the
# foreground, collected from the files that mark any unless PYTEST_ARGS names paths (the others import torch and
# diffusers: ~7 s of CPU), the others beside them on one xdist worker more than there are cores (docs/benchmarks.md
# "The test suite's time").
FAST_WORKERS ?= $(shell echo $$(( $$(nproc) + 1 )))
TIMING_FILES := $(shell grep -l 'mark\.timing' tests/test_*.py)
test-fast: venv
	@$(call BESIDE,$(TEST_ENV) $(PY) -m pytest -q -m "timing and not e2e and not slow and not browser" \
	  $(if $(filter tests% ./tests% /% %.py,$(PYTEST_ARGS)),,$(TIMING_FILES)) $(PYTEST_ARGS),$(TEST_ENV) \
	  $(PY) -m pytest -q -n $(FAST_WORKERS) -m "not e2e and not slow and not browser and not timing" $(WITHOUT_RAY_CACHE) \
	  $(PYTEST_ARGS),the other tests); \
	$(call BOTH_PASSED,timing tests,the other tests)

# Regenerate the gRPC stubs from serve/rorem.proto (grpcio-tools is in the dev extra; the output is committed).
proto: venv
	$(PY) -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. serve/rorem.proto

clean:
	rm -rf $(VENV) .pytest_cache
