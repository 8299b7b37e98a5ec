# Everything a fresh machine needs: `make demo` runs the main job, `make test` the whole suite.
# Both create .venv (Python 3.11 venv, torch==2.14.1 and the dev tools), build the extension
# (CPU kernels, and CUDA kernels for sm_80/sm_90a when the toolkit at /usr/local/cuda is there),
# install bitpress editable, and run.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
JOBS ?= 2
CMAKE_BUILD := build/cmake
export MAX_JOBS ?= $(JOBS)

SOURCES := $(shell find csrc -type f) setup.py pyproject.toml

.PHONY: all venv build demo test test-py test-cpp bench lint format info clean gpu-check \
	gpu-check-plan test-older-torch

all: build

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.deps: requirements-dev.txt | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

venv: $(VENV)/.deps

# The editable install is made once; later builds recompile only what changed (ninja, build/).
$(VENV)/.installed: $(VENV)/.deps
	$(PY) -m pip install --quiet --no-build-isolation --no-deps -e .
	touch $@

build: $(VENV)/.installed
	$(PY) setup.py --quiet build_ext --inplace

# The demo runs on this machine's device: without a GPU (nvidia-smi lists none) it builds the CPU
# kernels only, unless BITPRESS_CUDA says otherwise (`make test` builds the CUDA kernels too).
HAVE_GPU := $(shell nvidia-smi -L 2>/dev/null | grep -q GPU && echo 1)
demo: export BITPRESS_CUDA ?= $(if $(HAVE_GPU),,0)
demo: build
	$(PY) -m bitpress demo $(DEMO_ARGS)

# The torch-free kernel library with CMake: the library, its install and package config, and the
# C++ tests (ctest), including a separate project that links it with find_package(bitpress).
test-cpp: $(VENV)/.deps
	cmake -S . -B $(CMAKE_BUILD) -G Ninja -DCMAKE_BUILD_TYPE=Release -DBITPRESS_BUILD_TESTS=ON \
	  -DCMAKE_MAKE_PROGRAM=$(abspath $(VENV))/bin/ninja
	cmake --build $(CMAKE_BUILD) -j $(JOBS)
	cd $(CMAKE_BUILD) && ctest --output-on-failure

test-py: build
	$(PY) -m pytest -q tests

# The build against an older torch (test-older-torch, below; ~3-4 min) is part of the suite;
# BITPRESS_SKIP_OLDER_TORCH=1 leaves it out.
test: build lint test-cpp test-py $(if $(BITPRESS_SKIP_OLDER_TORCH),,test-older-torch)

bench: build
	$(PY) -m pytest bench --benchmark-only -q -s

lint: $(VENV)/.deps
	$(VENV)/bin/ruff check python triton_kernels tests bench scripts setup.py
	$(VENV)/bin/ruff format --check python triton_kernels tests bench scripts setup.py
	find csrc tests/cpp -name '*.h' -o -name '*.cuh' -o -name '*.cpp' -o -name '*.cu' | xargs $(VENV)/bin/clang-format --dry-run --Werror

format: $(VENV)/.deps
	$(VENV)/bin/ruff format python triton_kernels tests bench scripts setup.py
	$(VENV)/bin/ruff check --fix python triton_kernels tests bench scripts setup.py
	find csrc tests/cpp -name '*.h' -o -name '*.cuh' -o -name '*.cpp' -o -name '*.cu' | xargs $(VENV)/bin/clang-format -i

info: build
	$(PY) -m bitpress info

# GPU first-run kit (bench/NOTES_gpu_check.md): on a lent GPU machine, with its preinstalled
# python3, torch and triton (no venv, no registry): build for that GPU's arch, selftest, gpu tests,
# compute-sanitizer memcheck/racecheck, GPU benches; one report in $(GPU_CHECK_OUT)/report.md.
GPU_PYTHON ?= python3
GPU_CHECK_OUT ?= build/gpu-check
GPU_JOBS ?= $(shell nproc)
gpu-check:
	GPU_CHECK_OUT=$(GPU_CHECK_OUT) $(GPU_PYTHON) scripts/gpu_check.py --jobs $(GPU_JOBS)

# Its plan, without a GPU (what would run, with which TORCH_CUDA_ARCH_LIST and budgets).
gpu-check-plan:
	$(GPU_PYTHON) scripts/gpu_check.py --dry-run --fake-capability 9.0 --out build/gpu-check-plan

# A CPU-only build of bitpress against an older torch (the GPU machines run torch 2.11; this
# registry's oldest usable build is 2.13.0, CPU), in its own venv, out of tree, then `python -m
# bitpress selftest` and the sanitizer cases on the CPU: scripts/gpu_check.py --cpu.
OLDER_TORCH ?= 2.13.0
OLDER_VENV := build/venv-torch$(OLDER_TORCH)
$(OLDER_VENV)/.deps:
	$(PYTHON) -m venv $(OLDER_VENV)
	$(OLDER_VENV)/bin/python -m pip install --quiet torch==$(OLDER_TORCH) numpy==2.4.6 \
	  setuptools wheel ninja==1.13.2 safetensors==0.8.0
	touch $@

test-older-torch: $(OLDER_VENV)/.deps
	$(OLDER_VENV)/bin/python scripts/gpu_check.py --cpu --out build/older-torch \
	  --build-dir build/older-torch/setup --jobs $(JOBS)

clean:
	rm -rf build python/bitpress/*.so *.egg-info python/*.egg-info
