#!/usr/bin/env bash
# The GPU numbers in one command (< 8 minutes on one H100/H200): our step img/s in bfloat16 with
# host and device augmentation, f32/bf16 memory (benchmarks/throughput.py at ResNet-50, 224 px,
# batch 256), Table 3's memory and time (benchmarks/table3.py), and the PyTorch MoCo v2 step with
# AMP on the same GPU (benchmarks/torch_moco_step.py). Without TensorFlow the host-input rows are
# skipped, saying so; the collective rows (the same on any backend) are left to the CPU run.
#
#   bash benchmarks/gpu_check.sh [LOG_DIR]   # from anywhere, on the GPU machine
#
# A machine without clu / ml-collections / dm-pix takes them as wheels in .whl/
# (`pip download --no-deps ml-collections==1.1.0 clu==0.0.12 dm-pix==0.4.5 -d .whl`): they are
# installed to /tmp/site first when present.
set -uo pipefail
cd "$(dirname "$0")/.."
log=${1:-/tmp/gpu_check}
mkdir -p "$log"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c 'import jax, flax, optax, torch; print("jax", jax.__version__, "flax", flax.__version__,
  "optax", optax.__version__, "torch", torch.__version__, jax.devices())'
timeout 240 python3 benchmarks/throughput.py --dtype=bfloat16 --steps=20 --no-collectives \
    2>&1 | tee "$log/throughput.txt"
timeout 90 python3 benchmarks/torch_moco_step.py --batch=256 --steps=20 2>&1 | tee "$log/torch.txt"
timeout 150 python3 benchmarks/table3.py --steps=5 2>&1 | tee "$log/table3.txt"
