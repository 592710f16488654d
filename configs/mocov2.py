"""MoCo v2 on ImageNet: ResNet-50, MLP head, aug+, cosine, tau 0.2, 200 epochs, batch 256.

python -m mocov2_jax.main --config=configs/mocov2.py --workdir=DIR \
    --config.data.manual_dir=/path/to/imagenet/tars
"""
from mocov2_jax import defaults


def get_config():
  return defaults.base_config()
