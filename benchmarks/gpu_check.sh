#!/usr/bin/env bash
# The GPU numbers in one command (< 8 minutes on one H100/H200): our step and end-to-end img/s,
# bf16 memory (benchmarks/throughput.py at ResNet-50, 224 px, batch 256), Table 3's memory and
# time (benchmarks/table3.py), and the PyTorch MoCo v2 step with AMP on the same GPU
# (benchmarks/torch_moco_step.py). Without TensorFlow the host-input rows are skipped, saying so.
#
#   bash benchmarks/gpu_check.sh            # from the repository root, on the GPU machine
#
# A machine without clu / ml-collections / dm-pix takes them as wheels in .whl/ (see
# docs/results.md, 'GPU check'): they are installed to /tmp/site first when present.
set -euo pipefail
cd "$(dirname "$0")/.."
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c 'import jax; print("jax", jax.__version__, jax.devices())'
timeout 300 python3 benchmarks/throughput.py --steps=10 --images=256 || echo "throughput.py failed: $?"
timeout 150 python3 benchmarks/table3.py --steps=5 || echo "table3.py failed: $?"
timeout 90 python3 benchmarks/torch_moco_step.py --batch=256 --steps=20 || echo "torch_moco_step.py failed: $?"
