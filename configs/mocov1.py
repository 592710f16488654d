"""MoCo v1 on ImageNet: ResNet-50, linear head, v1 augmentation, tau 0.07, lr x0.1 at 120/160."""
from mocov2_jax import defaults
from mocov2_jax.data import recipes


def get_config():
  c = defaults.base_config()
  c.model.head = 'linear'
  c.moco.temperature = 0.07
  c.optim.schedule = 'step'
  c.optim.lr_drop_epochs = (120, 160)
  c.data.augment = recipes.recipe('mocov1')
  return c
