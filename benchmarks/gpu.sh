#!/usr/bin/env bash
# Every GPU figure in one go, well under 8 minutes on one H100 or H200:
#   CUDA check; the training step of vit_small and vit_base at the paper's crops (2 x 224 + 10 x 96,
#   batch 64, queues and memories of 65536, 65536 prototypes) in fp32 and bf16, with and without
#   torch.compile, and vit_base bf16 without each of fused attention, fused AdamW and foreach
#   clipping (their before/after); kNN (100,000 x 384 bank, 10,000 queries); the evaluation's feature
#   extraction of vit_small and vit_base at 224 px (2048 JPEGs, batch 256, 8 loader workers); fine-tuning
#   throughput of vit_small and vit_base (224 px, batch 128, 15 loader processes, fp32); whether
#   15 loader processes of the paper's multi-crop augmentation keep up with the compiled vit_base bf16
#   step just measured, with each augmentation backend (augment.backend: cpu, device), the device
#   backend's rendering time per batch among its figures; the full training loop (512 real JPEGs, 15
#   loader processes, paper crops, batch 64) of vit_small and vit_base in bf16, compiled, with each
#   backend (benchmarks/loop.py: images/s and the data-wait share, to set against the step alone); the
#   test that the training step never waits for the GPU (sync-debug mode, both backends); and one end-to-
#   end demo pipeline on the GPU (mugs prepare, pretrain in bf16 compiled with the device backend,
#   select, knn) as a smoke test of the CUDA path. The demo data comes from DEMO_DATA (a directory with
#   the four Fashion-MNIST IDX files) or Debian's dataset-fashion-mnist (`mugs demo-data`).
# Writes one JSON per measurement and a log under $OUT (default: benchmark-results/).
#   bash benchmarks/gpu.sh          # on a GPU machine
#   bash benchmarks/gpu.sh --cpu    # the same steps, tiny, on CPU (CI runs this)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmark-results}
mkdir -p "$OUT"
PYTHON=${PYTHON:-python3}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1

if [ "${1:-}" = "--cpu" ]; then
  device=cpu
  step=(--device cpu --arch vit_tiny --depth 1 --patch-size 8 --batch 2 --global-size 32 --local-size 16
    --n-local 2 --queue 64 --group-out-dim 64 --warmup 0 --iters 1 --threads 2)
  knn=(--device cpu --bank 2000 --queries 200 --dim 64 --classes 10)
  features=(--device cpu --depth 1 --patch-size 8 --image-size 32 --images 16 --batch-size 8 --workers 1
    --threads 2)
  probe=(--device cpu --depth 4 --patch-size 8 --image-size 32 --images 16 --batch-size 4 --workers 1
    --threads 2)
  augment=(--images 4 --batches 1 --repeats 1 --workers 1)
  finetune=(--device cpu --arch vit_tiny --depth 1 --patch-size 8 --image-size 32 --images 4 --batch-size 2
    --workers 1 --warmup 1 --iters 1 --threads 2)
  loop=(--device cpu --threads 2 --num-workers 1 --jpegs 4 --warmup 1 --iters 1 --set model.depth=1
    --set model.patch_size=8 --set augment.global_size=32 --set augment.local_size=16 --set optim.batch_size=2)
  shorter=()  # the steps are one iteration already
  feeds=step-vit_tiny-fp32
  archs=(vit_tiny)
  precisions=(fp32)
  compiles=("")  # compiling on a CPU takes minutes of C++ builds; the GPU run measures it
else
  device=cuda
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
  step=(--device cuda --batch 64 --global-size 224 --local-size 96 --n-local 10 --queue 65536
    --group-out-dim 65536 --warmup 3 --iters 10)
  knn=(--device cuda)
  features=(--device cuda --image-size 224 --images 2048 --batch-size 256 --workers 8)
  probe=(--device cuda --image-size 224 --images 2048 --batch-size 256 --workers 15)
  augment=(--images 512 --workers 15 --breakdown 8)
  finetune=(--device cuda --image-size 224 --images 1664 --batch-size 128 --workers 15 --warmup 3 --iters 10)
  loop=(--device cuda --num-workers 15 --jpegs 512 --warmup 3 --iters 20 --set optim.batch_size=64
    --set augment.n_local=10 --set model.group_out_dim=65536 --set loss.instance_queue_size=65536
    --set loss.local_group_queue_size=65536 --set train.precision=bf16 --set train.compile=true)
  demo=(--set train.precision=bf16 --set train.compile=true --set evaluate.device=cuda)
  shorter=(--warmup 2 --iters 5)  # enough to compare, and the script stays under 8 minutes
  feeds=step-vit_base-bf16-compile
  archs=(vit_small vit_base)
  precisions=(fp32 bf16)
  compiles=("" --compile)
fi
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" | tee "$OUT/torch.txt"

for arch in "${archs[@]}"; do
  for precision in "${precisions[@]}"; do
    for compile in "${compiles[@]}"; do
      [ "$precision" = fp32 ] && [ -n "$compile" ] && continue  # compile is measured where it matters
      name="step-$arch-$precision${compile:+-compile}"
      echo "== $name"
      if [ "$device" = cpu ]; then arch_args=(); else arch_args=(--arch "$arch"); fi
      "$PYTHON" benchmarks/train_step.py "${step[@]}" "${arch_args[@]}" --precision "$precision" $compile \
        --json "$OUT/$name.json" || echo "$name failed" | tee -a "$OUT/failures.txt"
    done
  done
done
# the step before each of its optimisations, for the before/after figures (eager, where they apply)
for without in attention adamw clipping; do
  name="step-${archs[-1]}-${precisions[-1]}-without-$without"
  echo "== $name"
  if [ "$device" = cpu ]; then arch_args=(); else arch_args=(--arch "${archs[-1]}"); fi
  "$PYTHON" benchmarks/train_step.py "${step[@]}" "${arch_args[@]}" --precision "${precisions[-1]}" \
    --without "$without" "${shorter[@]}" --json "$OUT/$name.json" \
    || echo "$name failed" | tee -a "$OUT/failures.txt"
done
echo "== knn"
"$PYTHON" benchmarks/knn.py "${knn[@]}" --json "$OUT/knn.json" | tee "$OUT/knn.txt" \
  || echo "knn failed" | tee -a "$OUT/failures.txt"
for arch in "${archs[@]}"; do
  name="features-$arch"
  echo "== $name"
  "$PYTHON" benchmarks/features.py "${features[@]}" --arch "$arch" --json "$OUT/$name.json" \
    || echo "$name failed" | tee -a "$OUT/failures.txt"
done
for arch in "${archs[@]}"; do
  name="probe-$arch"
  echo "== $name"
  "$PYTHON" benchmarks/probe.py "${probe[@]}" --arch "$arch" --json "$OUT/$name.json" \
    || echo "$name failed" | tee -a "$OUT/failures.txt"
done
for arch in "${archs[@]}"; do
  name="finetune-$arch"
  echo "== $name"
  "$PYTHON" benchmarks/finetune.py "${finetune[@]}" --arch "$arch" --json "$OUT/$name.json" \
    || echo "$name failed" | tee -a "$OUT/failures.txt"
done
for backend in cpu device; do
  name=augment-paper
  [ "$backend" = device ] && name=augment-paper-device
  echo "== $name (does the loader feed $feeds?)"
  "$PYTHON" benchmarks/augment.py --setting paper --backend "$backend" "${augment[@]}" \
    --step-json "$OUT/$feeds.json" --json "$OUT/$name.json" || echo "$name failed" | tee -a "$OUT/failures.txt"
done
for arch in "${archs[@]}"; do
  for backend in cpu device; do
    name="loop-$arch-$backend"
    echo "== $name"
    "$PYTHON" benchmarks/loop.py --no-progress "${loop[@]}" --set model.arch="$arch" --backend "$backend" \
      --json "$OUT/$name.json" > "$OUT/$name.txt" 2>&1 || echo "$name failed" | tee -a "$OUT/failures.txt"
  done
done
if [ "$device" = cuda ]; then  # a smoke test of the CUDA path; on CPU the workflow tests run it
echo "== demo pipeline: prepare, pretrain (device backend), select, knn"
demo_dir="$OUT/demo-pipeline"
rm -rf "$demo_dir"
demo_config=(--preset demo --set data.root="$demo_dir/data" --set data.prepared_dir="$demo_dir/prepared"
  --set train.output_dir="$demo_dir/pretrain" --set train.device="$device" --set augment.backend=device
  --set evaluate.cache_dir="$demo_dir/features" "${demo[@]}")
if [ -n "${DEMO_DATA:-}" ]; then
  mkdir -p "$demo_dir/data" && cp "$DEMO_DATA"/*-ubyte.gz "$demo_dir/data/"
fi
{
  { [ -n "${DEMO_DATA:-}" ] || "$PYTHON" -m mugs demo-data "${demo_config[@]}"; } \
    && "$PYTHON" -m mugs prepare "${demo_config[@]}" --no-progress \
    && "$PYTHON" -m mugs pretrain "${demo_config[@]}" --no-progress \
    && "$PYTHON" -m mugs select "$demo_dir/pretrain" --out-dir "$demo_dir/eval" "${demo_config[@]}" \
    && "$PYTHON" -m mugs knn "$demo_dir/eval/selected.pt" --out "$OUT/demo-knn.json" "${demo_config[@]}" \
      --no-progress
} > "$OUT/demo-pipeline.txt" 2>&1 || echo "demo pipeline failed" | tee -a "$OUT/failures.txt"
fi
if [ "$device" = cuda ]; then
  echo "== the training step never waits for the GPU"
  "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_engine.py -k never_waits_for_the_gpu 2>&1 \
    | tee "$OUT/sync-test.txt" || echo "sync test failed" | tee -a "$OUT/failures.txt"
fi
echo "results in $OUT"
if [ -s "$OUT/failures.txt" ]; then
  echo "failed:" && cat "$OUT/failures.txt"
  exit 1
fi
