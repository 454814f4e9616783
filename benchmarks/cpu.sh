#!/usr/bin/env bash
# Every CPU figure at its reference setting (the settings docs/benchmarks.md reports; long on 2 cores):
#   the training step (vit_small, batch 4, 2 x 224 + 2 x 96); where the training loop's wall time goes,
#   at that target setting and for the demo preset; multi-crop augmentation, paper crops (2 x 224 +
#   10 x 96 of 256 JPEGs, 2 loader workers) and demo crops, with the loader processes the GPU step
#   needs; neighbour memory and InfoNCE queue at 65,536 entries; kNN (100,000 x 384 bank, 10,000
#   queries); the evaluation's feature extraction (vit_small at 224 px, 256 JPEGs); one epoch of the
#   augmented linear probe (the same images and network, 14 heads); `mugs prepare` on
#   20,000 JPEGs; `snakemake -n` and `dvc status` on PIPELINE_ROOT.
# Writes each measurement's output (NAME.txt) and its figures (NAME.json) under $OUT (default:
# benchmark-results/).
#   bash benchmarks/cpu.sh            # full size
#   bash benchmarks/cpu.sh --quick    # the same steps, tiny (the test suite runs this)
# STEP_JSON: a train_step.py JSON (e.g. gpu.sh's step-vit_base-bf16-compile.json) whose step time the
#   paper-crop loader must keep up with; default: that figure, 0.104 s per batch of 64 on an H200.
# PIPELINE_ROOT: the project whose pipeline overhead is measured (default: this one; read-only).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmark-results}
mkdir -p "$OUT"
PYTHON=${PYTHON:-python3}
PIPELINE_ROOT=${PIPELINE_ROOT:-$PWD}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1

if [ -n "${STEP_JSON:-}" ]; then
  gpu_step=(--step-json "$STEP_JSON")
else
  gpu_step=(--step-seconds 0.104 --batch 64)
fi
demo_step=(--step-seconds 0.8 --batch 64)  # the demo preset's CPU step, docs/benchmarks.md

if [ "${1:-}" = "--quick" ]; then
  step=(--arch vit_tiny --depth 1 --patch-size 8 --batch 2 --global-size 32 --local-size 16 --n-local 2
    --queue 64 --group-out-dim 64 --warmup 0 --iters 1 --threads 2)
  paper=(--images 4 --batches 1 --repeats 1 --workers 1 --step-seconds 1 --batch 2)
  demo=(--images 16 --batches 1 --repeats 1 --workers 1 --step-seconds 1 --batch 4)
  loop=(--iters 1 --warmup 1 --image-side 40 --threads 2 --set model.arch=vit_tiny --set model.depth=1
    --set augment.global_size=32 --set augment.local_size=16)
  loop_demo=(--iters 1 --warmup 1 --threads 2 --set model.depth=1 --set optim.batch_size=8)
  memory=(--size 1024 --batch 8 --warmup 1 --iters 2)
  features=(--arch vit_tiny --depth 1 --patch-size 8 --image-size 32 --images 16 --batch-size 8
    --workers 1 --threads 2)
  knn=(--bank 2000 --queries 200 --dim 64 --classes 10)
  probe=(--arch vit_tiny --depth 4 --patch-size 8 --image-size 32 --images 16 --batch-size 4 --workers 1
    --threads 2)
  prepare=(--images 50 --classes 5 --workers 1)
  pipeline=(--repeats 1)
else
  step=(--arch vit_small --batch 4 --global-size 224 --local-size 96 --n-local 2 --queue 1024
    --group-out-dim 4096 --threads 2)
  paper=(--images 256 --batches 2 --repeats 3 --workers 2 "${gpu_step[@]}")
  demo=(--images 1024 --batches 4 --repeats 3 --workers 1 "${demo_step[@]}")
  loop=()
  loop_demo=()
  memory=()
  features=(--arch vit_small --image-size 224 --images 256 --batch-size 64 --workers 2 --threads 2)
  knn=()
  probe=(--arch vit_small --image-size 224 --images 256 --batch-size 64 --workers 2 --threads 2)
  prepare=(--images 20000 --workers 2)
  pipeline=(--repeats 3)
fi
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'threads', torch.get_num_threads())" \
  | tee "$OUT/torch.txt"

# run NAME SCRIPT ARGS...: one measurement, its output also in $OUT/NAME.txt; a failure is noted in
# $OUT/failures.txt and the other measurements still run
run() {
  local name=$1 script=$2
  shift 2
  echo "== $name"
  "$PYTHON" "benchmarks/$script" "$@" 2>&1 | tee "$OUT/$name.txt" || echo "$name failed" | tee -a "$OUT/failures.txt"
}
run step-cpu train_step.py "${step[@]}" --json "$OUT/step-cpu.json"
run loop-target loop.py --no-progress "${loop[@]}" --json "$OUT/loop-target.json"
run loop-demo loop.py --demo --no-progress "${loop_demo[@]}" --json "$OUT/loop-demo.json"
run augment-paper augment.py --setting paper "${paper[@]}" --breakdown 8 --json "$OUT/augment-paper.json"
run augment-demo augment.py --setting demo "${demo[@]}" --json "$OUT/augment-demo.json"
run memory-cpu memory.py --device cpu "${memory[@]}" --json "$OUT/memory-cpu.json"
run knn knn.py --device cpu "${knn[@]}" --json "$OUT/knn.json"
run features-cpu features.py --device cpu "${features[@]}" --json "$OUT/features-cpu.json"
run probe-cpu probe.py --device cpu "${probe[@]}" --json "$OUT/probe-cpu.json"
run prepare prepare.py "${prepare[@]}" --json "$OUT/prepare.json"
run pipeline pipeline.py --root "$PIPELINE_ROOT" "${pipeline[@]}" --json "$OUT/pipeline.json"
echo "results in $OUT"
if [ -s "$OUT/failures.txt" ]; then
  echo "failed:" && cat "$OUT/failures.txt"
  exit 1
fi
