#!/usr/bin/env bash
# The demo pipeline on Fashion-MNIST (Debian's dataset-fashion-mnist), on CPU.
set -euo pipefail
VENV=${1:-.venv}
cd "$(dirname "$0")/.."
export PATH="$PWD/$VENV/bin:$PATH"
start=$(date +%s)
mugs demo-data --config params.yaml
mugs prepare --config params.yaml
mugs pretrain --config params.yaml
echo "[demo] finished in $(( $(date +%s) - start )) s; run directory: $(python -c 'import yaml; print(yaml.safe_load(open("params.yaml"))["train"]["output_dir"])')"
