# Two commands on a fresh machine:
#   make demo   - the whole demo pipeline on Fashion-MNIST, on CPU
#                 (make demo-long: the same plus a 6-epoch run on all the training images, ~1.5 h)
#   make test   - lint and the full test suite (starts and stops a throw-away SLURM cluster)
#   make image  - the container image (podman, as root) as an OCI archive, mugs.tar; on a cluster
#                 `apptainer build mugs.sif oci-archive://mugs.tar` makes the SIF. Without registry access:
#                 make image BASE_IMAGE="$(tools/debian-base.sh)"
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

IMAGE ?= localhost/mugs-pipeline
IMAGE_ARCHIVE ?= mugs.tar
BASE_IMAGE ?=

.PHONY: setup demo demo-long test lint image

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

image:
	bash tools/build-image.sh $(IMAGE) $(BASE_IMAGE)
	podman save --format oci-archive -o $(IMAGE_ARCHIVE).partial $(IMAGE)
	mv $(IMAGE_ARCHIVE).partial $(IMAGE_ARCHIVE)
	@echo "[image] $(IMAGE_ARCHIVE): apptainer build mugs.sif oci-archive://$(IMAGE_ARCHIVE)"
