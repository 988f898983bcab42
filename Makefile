# Two commands do all set-up on a fresh machine:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.rmgl-installed

# The exact torch/torchvision builds that lie on this machine's disk; installing them first
# keeps pip from resolving a newer (multi-GB) release for the unpinned lower bounds.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -e ".[dev,deploy,ray,serve,milvus,track]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/rmgl demo

# One pytest-xdist worker per core (at most 4), each running whole test files, so that a
# module's shared fixtures (a trained checkpoint, a server, a Ray cluster) are built once.
test: $(STAMP)
	$(PY) -m pytest -q -n auto --maxprocesses 4 --dist loadfile

lint: $(STAMP)
	$(VENV)/bin/ruff check rmgl tests benchmarks
	$(VENV)/bin/ruff format --check rmgl tests benchmarks

clean:
	rm -rf $(VENV) runs build *.egg-info
