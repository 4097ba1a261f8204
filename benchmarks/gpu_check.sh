#!/usr/bin/env bash
# The GPU checks in one script (docs/performance.md, "GPU"). On a CUDA machine, from the
# repository root:
#
#   bash benchmarks/gpu_check.sh                     # everything, about 10 minutes on one GPU
#   bash benchmarks/gpu_check.sh --device cpu --quick  # the same steps, reduced, on CPU (CI-sized)
#
# Steps, each writing JSON/logs to benchmarks/results/ (or $RESULTS):
#   0. install what is missing: the project and `higher` (from $WHEELS with --no-index when set)
#   1. float32 vs float64 on the device: tests/test_precision.py with BILEVEL_TEST_DEVICE
#   2. meta_step.py: the 48-cell grid (meta-batch 4/16/32) against higher and the autograd loop,
#      every execution path (vmap, loop, shared), peak memory, error vs float64 per method
#   3. the switches as measurements: TF32 on (accuracy cost in the same error columns) and
#      cudnn.benchmark, on the quick grid
#   4. decomposition_cost.py: what the decomposition adds, on the quick grid
#   5. mixed precision: precision.py (bf16 and fp16 meta-gradient error vs float64 per algorithm and
#      path, identity, speed vs fp32) and, on a GPU, the default run at precision=fp32|bf16|fp16
#   6. memory.py: peak memory and time of memory=store vs recompute against the inner steps
# Steps 1-4 and 6 use no mixed precision: inner-loop gradients stay in the run's dtype.
set -euo pipefail
cd "$(dirname "$0")/.."

DEVICE=cuda
QUICK=0
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --quick) QUICK=1; shift ;;
    *) echo "usage: bash benchmarks/gpu_check.sh [--device cuda|cpu] [--quick]" >&2; exit 2 ;;
  esac
done
RESULTS="${RESULTS:-benchmarks/results}"
mkdir -p "$RESULTS"
TAG="$DEVICE$([ "$QUICK" = 1 ] && echo _quick || true)"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

echo "== 0. environment"
if ! python -c "import bilevel, higher, hydra" 2>/dev/null; then
  if [ -n "${WHEELS:-}" ]; then
    python -m pip install -q --no-index --find-links "$WHEELS" higher hydra-core omegaconf tensorboard tqdm
    python -m pip install -q --no-deps --no-build-isolation -e .
  else
    python -m pip install -q -e ".[test]"
  fi
fi
python - <<'EOF'
import torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, devices: "
      + (", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())) or "none"))
EOF
if [ "$DEVICE" = cuda ] && ! python -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  echo "gpu_check: torch sees no CUDA device; run with --device cpu to exercise the script" >&2
  exit 2
fi

echo "== 1. float32 vs float64 on $DEVICE"
BILEVEL_TEST_DEVICE="$DEVICE" python -m pytest -q tests/test_precision.py 2>&1 | tee "$RESULTS/precision_$TAG.log"

GRID=()
QUICK_GRID=(--quick)
if [ "$QUICK" = 1 ]; then
  GRID=(--quick --repeats 1 --target-s 0 --order SO --adapt head)
  QUICK_GRID=("${GRID[@]}")
fi
echo "== 2. meta_step.py grid on $DEVICE"
python benchmarks/meta_step.py --device "$DEVICE" --repeats 3 --target-s 0.5 "${GRID[@]}" \
  --out "$RESULTS/meta_step_$TAG.json"

echo "== 3. switches: TF32, cudnn.benchmark"
python benchmarks/meta_step.py --device "$DEVICE" "${QUICK_GRID[@]}" --tf32 --out "$RESULTS/meta_step_${TAG}_tf32.json"
python benchmarks/meta_step.py --device "$DEVICE" "${QUICK_GRID[@]}" --cudnn-benchmark \
  --out "$RESULTS/meta_step_${TAG}_cudnn_benchmark.json"

echo "== 4. decomposition cost on $DEVICE"
OTHERS=()
[ "$QUICK" = 1 ] && OTHERS=(--algorithms)  # quick: MAML only; full: every registered algorithm too
python benchmarks/decomposition_cost.py --device "$DEVICE" "${QUICK_GRID[@]}" "${OTHERS[@]}" \
  --out "$RESULTS/decomposition_cost_$TAG.json"

echo "== 5. mixed precision on $DEVICE"
PRECISIONS=(bf16 fp16)
[ "$DEVICE" = cpu ] && PRECISIONS=(bf16)  # CPU fp16 kernels are reference code (~17x slower than fp32)
python benchmarks/precision.py --device "$DEVICE" --precisions "${PRECISIONS[@]}" \
  $([ "$QUICK" = 1 ] && echo "--quick --repeats 1 --target-s 0 --meta-batch 2") --out "$RESULTS/precision_$TAG.json"
if [ "$QUICK" = 0 ]; then
  for P in fp32 "${PRECISIONS[@]}"; do
    python -m bilevel.app.train device="$DEVICE" precision="$P" hydra.run.dir="$RESULTS/train_${P}_$TAG" \
      2>&1 | tail -n 12 | tee "$RESULTS/train_${P}_$TAG.log"
  done
fi
echo "== 6. memory: store vs recompute on $DEVICE"
MEMORY_GRID=(--backbones conv4 resnet12 --shots 1 --meta-batch 2)
[ "$QUICK" = 1 ] && MEMORY_GRID=(--quick --backbones conv4 --paths loop --baselines --repeats 1)
python benchmarks/memory.py --device "$DEVICE" "${MEMORY_GRID[@]}" --out "$RESULTS/memory_$TAG.json"

echo "gpu_check: done; results in $RESULTS/*_$TAG*"
