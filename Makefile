# Two entry points (see README): `make demo` and `make test`. Both create .venv on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
# torch 2.14.1 + torchvision 0.29.1 are the pair that installs offline here (a CUDA build that also runs on CPU).
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1

.PHONY: setup test lint demo bench clean

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

# Until the full chain exists (issue 9), the demo runs what exists: see README "Status of make demo".
DEMO_MINUTES ?= 5
demo: $(STAMP)
	mkdir -p runs/demo
	$(VENV)/bin/lightgen model-info --preset shapes > runs/demo/model-info.json
	$(VENV)/bin/lightgen shapes prompts --n 60 --seed 1 --out runs/demo/prompts.jsonl
	$(VENV)/bin/lightgen shapes render --metadata runs/demo/prompts.jsonl --out runs/demo/teacher --resolution 32 --samples 2
	$(VENV)/bin/lightgen shapes score runs/demo/teacher
	$(PY) bench/shapes_learn.py --minutes $(DEMO_MINUTES) --eval-every $(DEMO_MINUTES) --temperature 0.5 --num-iter 64 \
		--save-grid runs/demo/samples --save-model runs/demo/model

bench: $(STAMP)
	$(PY) bench/model_bench.py

clean:
	rm -rf $(VENV) runs .pytest_cache
