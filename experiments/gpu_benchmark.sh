#!/usr/bin/env bash
# The GPU goals (docs/performance.md) on one NVIDIA H100 or H200, prepared and not yet run on one.
#
#   pip install -r requirements.txt 'jax[cuda12]==0.10.2'   # and, for the peer, a CUDA torch + torchvision
#   bash experiments/gpu_benchmark.sh [outdir]              # FULL_CIFAR=1 also trains ResNet-56 for 64k steps
#
# 1. ResNet-50 bfloat16 training at batch 256, data already on the GPU, against torchvision ResNet-50 with
#    automatic mixed precision and channels-last in the same run (goal: >= 3,000 img/s and >= PyTorch).
#    torchvision's ResNet-50 strides on the 3x3, so ours runs with --stride-on 3x3 for the same network.
# 2. The same in float32 (TF32 convolutions on both sides), for reference.
# 3. With FULL_CIFAR=1: ResNet-56's whole paper schedule (64k steps at batch 128) with CIFAR-10 resident on
#    the GPU (config default data.on_device=True); the log prints img/s and the ETA, the run its wall time.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/gpu_benchmark}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
peer=(--peer-script experiments/torch_gpu_peer.py)
python -c "import torch, torchvision" 2>/dev/null || { echo "torch/torchvision not importable: no peer"; peer=(--no-peer); }

python -m resnet_jax.benchmark --model resnet50 --batch 256 --dtype bfloat16 --stride-on 3x3 --steps 50 \
  --warmup 10 --rounds 3 --no-pipelines "${peer[@]}" --json "$out/resnet50_bf16_b256.json" | tee "$out/resnet50_bf16_b256.txt"
python -m resnet_jax.benchmark --model resnet50 --batch 256 --dtype float32 --stride-on 3x3 --steps 30 \
  --warmup 5 --no-pipelines --no-peer --json "$out/resnet50_f32_b256.json" | tee "$out/resnet50_f32_b256.txt"
python -m resnet_jax.benchmark --model resnet56 --batch 128 --steps 100 --warmup 10 --no-pipelines --no-peer \
  --json "$out/resnet56_b128.json" | tee "$out/resnet56_b128.txt"

if [[ "${FULL_CIFAR:-0}" == 1 ]]; then
  start=$(date +%s)
  python launch.py --config experiments/configs/cifar10/resnet56.py --workdir "$out/resnet56_full" | tee "$out/resnet56_full.log"
  echo "ResNet-56, 64k steps: $(( $(date +%s) - start )) s wall, compile and evaluations included" | tee -a "$out/resnet56_full.log"
fi
