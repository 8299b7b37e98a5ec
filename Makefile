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

.PHONY: all venv build demo test test-py test-cpp bench lint format info clean

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

demo: build
	$(PY) -m bitpress demo

# The torch-free kernel library with CMake: the library, its install and package config, and the
# C++ tests (ctest), including a separate project that links it with find_package(bitpress).
test-cpp: $(VENV)/.deps
	cmake -S . -B $(CMAKE_BUILD) -G Ninja -DCMAKE_BUILD_TYPE=Release -DBITPRESS_BUILD_TESTS=ON \
	  -DCMAKE_MAKE_PROGRAM=$(abspath $(VENV))/bin/ninja
	cmake --build $(CMAKE_BUILD) -j $(JOBS)
	cd $(CMAKE_BUILD) && ctest --output-on-failure

test-py: build
	$(PY) -m pytest -q tests

test: build lint test-cpp test-py

bench: build
	$(PY) -m pytest bench --benchmark-only -q -s

lint: $(VENV)/.deps
	$(VENV)/bin/ruff check python triton_kernels tests bench setup.py
	$(VENV)/bin/ruff format --check python triton_kernels tests bench setup.py
	find csrc tests/cpp -name '*.h' -o -name '*.cuh' -o -name '*.cpp' -o -name '*.cu' | xargs $(VENV)/bin/clang-format --dry-run --Werror

format: $(VENV)/.deps
	$(VENV)/bin/ruff format python triton_kernels tests bench setup.py
	$(VENV)/bin/ruff check --fix python triton_kernels tests bench setup.py
	find csrc tests/cpp -name '*.h' -o -name '*.cuh' -o -name '*.cpp' -o -name '*.cu' | xargs $(VENV)/bin/clang-format -i

info: build
	$(PY) -m bitpress info

clean:
	rm -rf build python/bitpress/*.so *.egg-info python/*.egg-info
