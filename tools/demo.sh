#!/usr/bin/env bash
# The whole pipeline on the Fashion-MNIST demo (Debian's dataset-fashion-mnist), on CPU, through the
# same Snakemake DAG a cluster runs, with the local profile. Arguments after the venv go to Snakemake
# (`make demo-long` passes `--configfile configs/demo-long.yaml`). Each job's output, with a progress
# line (position, rate, time left) every 10 s, reaches this terminal as well as its log.
set -euo pipefail
VENV=${1:-.venv}
shift || true
cd "$(dirname "$0")/.."
export PATH="$PWD/$VENV/bin:$PATH"
start=$(date +%s)
snakemake --profile profiles/local all "$@"
echo "[demo] finished in $(($(date +%s) - start)) s"
echo "[demo] report: $PWD/results/report/summary.md (figures beside it)"
echo
cat results/report/summary.md
