# Two entry points (see README): `make demo` and `make test`. Both create .venv on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
# torch 2.14.1 + torchvision 0.29.1 are the pair that installs offline here (a CUDA build that also runs on CPU).
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1

.PHONY: setup test lint demo ablation bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -e '.[dev]'
	rm -f $(VENV)/.installed-* && touch $@

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q

# The whole LightGen chain on ShapesWorld, on the CPU (README "The demo"). Rerun to resume after Ctrl-C.
DEMO_ARGS ?=
demo: $(STAMP)
	$(PY) -m recipes.shapes --out runs/demo $(DEMO_ARGS)

# The paper's data ablation in miniature: as many diverse as low-diversity captions (all scenes vs 4 per category), same budget.
ABLATION_ARGS ?=
ablation: $(STAMP)
	$(PY) -m recipes.shapes --ablation --out runs/ablation $(ABLATION_ARGS)

bench: $(STAMP)
	$(PY) bench/model_bench.py
	$(PY) bench/train_bench.py --preset shapes

clean:
	rm -rf $(VENV) runs .pytest_cache
