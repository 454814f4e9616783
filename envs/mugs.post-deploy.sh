#!/usr/bin/env bash
# Snakemake runs this in the new conda environment (envs/mugs.yaml), from the workflow's directory: this
# checkout's package, editable (rules run the checkout's code, and provenance finds its git commit), without
# dependencies (the environment has every locked one).
set -euo pipefail
python -m pip install --no-deps --editable .
