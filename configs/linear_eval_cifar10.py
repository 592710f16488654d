r"""Linear evaluation at 32x32 (CIFAR-10, or the offline demo's shapes): the protocol of
`configs/linear_eval.py` with crop + flip at 32, evaluation on the whole 32x32 image
(eval_crop_frac 1.0) and CIFAR mean/std.

The data defaults to the pre-training's (data_from_pretrained=True), so the offline demo's
checkpoint is evaluated with

python -m mocov2_jax.linear_eval --config=configs/linear_eval_cifar10.py \
    --config.pretrained=/tmp/mocov2_demo --config.fast=True --workdir=/tmp/mocov2_demo_linear
"""
from mocov2_jax import defaults


def get_config():
  linear_eval = defaults.sibling_config(__file__, 'linear_eval')
  c = linear_eval.get_config()
  c.data_from_pretrained = True
  c.data.update(name='cifar10', train_split='train', eval_split='test', image_size=32,
                eval_crop_frac=1.0, shuffle_buffer=50000,
                augment=linear_eval.linear_recipe('cifar'))
  c.log_every_steps = 50
  return c
