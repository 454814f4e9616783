# Two commands on a fresh machine:
#   make demo   - the whole demo pipeline on Fashion-MNIST, on CPU
#                 (make demo-long: the same plus a 6-epoch run on all the training images, ~1.5 h)
#   make test   - lint and the full test suite (starts and stops a throw-away SLURM cluster)
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo demo-long test lint

$(STAMP): pyproject.toml tools/setup.sh
	bash tools/setup.sh $(VENV)
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	bash tools/demo.sh $(VENV)

demo-long: $(STAMP)
	bash tools/demo.sh $(VENV) --configfile configs/demo-long.yaml

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: $(STAMP) lint
	MUGS_REQUIRE_SLURM=$${MUGS_REQUIRE_SLURM:-1} $(PY) -m pytest -p no:cacheprovider -q --durations=15 tests
