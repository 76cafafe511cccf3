#!/usr/bin/env bash
# Everything this project measures on a lent GPU machine, in one call (device time is scarce).
# Usage on the device (repo root, megatron-core's cp312 wheel carried in .whl/):
#   bash benchmarks/run_device.sh [tests|layer|speed|all]
# Results and logs go to $OUT (or ./benchmarks/results/device when OUT is unset).
set -uo pipefail
OUT=${OUT:-benchmarks/results/device}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 CUDA_DEVICE_MAX_CONNECTIONS=1
what=${1:-all}
ngpu=$(python3 -c 'import torch; print(torch.cuda.device_count())')
nvidia-smi -L | tee "$OUT/gpus.txt"
run() { echo "+ $*"; timeout "${STEP_TIMEOUT:-420}" "$@"; echo "exit $?"; }

if [[ $what == tests || $what == all ]]; then
  run python3 -m pytest -q -p no:cacheprovider tests/test_moe_equivalence.py -k "gpu or gpus" 2>&1 | tail -15 | tee "$OUT/gpu_tests.txt"
fi
if [[ $what == layer || $what == all ]]; then
  run python3 benchmarks/moe_layer.py --out "$OUT/moe_layer.json" 2>&1 | grep -v Warn | tail -5
fi
if [[ ($what == speed || $what == all) && $ngpu -ge 2 ]]; then
  common="--hidden ${HIDDEN:-1024} --topk ${TOPK:-8} --steps ${STEPS:-20}"
  run torchrun --nproc_per_node 2 benchmarks/moe_speed.py $common --out "$OUT/speed_nvlink_h${HIDDEN:-1024}_top${TOPK:-8}.json" 2>&1 | grep -v -i warn | tail -8
  NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1 run torchrun --nproc_per_node 2 benchmarks/moe_speed.py $common --out "$OUT/speed_sockets_h${HIDDEN:-1024}_top${TOPK:-8}.json" 2>&1 | grep -v -i warn | tail -8
  run torchrun --nproc_per_node 1 benchmarks/moe_speed.py $common --no-inference --out "$OUT/speed_ep1_h${HIDDEN:-1024}_top${TOPK:-8}.json" 2>&1 | grep -v -i warn | tail -6
fi
