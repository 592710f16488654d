"""Shared test setup.

XLA reads XLA_FLAGS once, when the CPU backend starts, so the 8 fake CPU devices of the
multi-device tests must be requested here, before any test module imports jax. Every test
therefore sees 8 CPU devices; single-device tests put their arrays on the default device.
"""
import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')

import ml_collections  # noqa: E402
import pytest  # noqa: E402


def make_tiny_config(**overrides) -> ml_collections.ConfigDict:
  """ResNet-18 at width 8 with a CIFAR stem, dim 16, K = 64, 4 BN groups: small enough for CPU."""
  c = ml_collections.ConfigDict(dict(
      method='moco',
      model=dict(arch='resnet18', width=8, cifar_stem=True, head='mlp', dim=16,
                 dtype='float32'),
      moco=dict(queue_size=64, momentum=0.99, temperature=0.2, bn_groups=4, symmetric=False),
      simclr=dict(temperature=0.1),
      optim=dict(optimizer='sgd', base_lr=0.03, lr_batch_base=256, lr_scaling='linear',
                 momentum=0.9, weight_decay=1e-4, schedule='cosine', lr_drop_epochs=(1,),
                 warmup_epochs=0, trust_coefficient=0.001),
  ))
  for path, value in overrides.items():
    if '.' in path:
      section, field = path.split('.')
      c[section][field] = value
    else:
      c[path] = value
  return c


@pytest.fixture
def tiny_config():
  """A factory: `tiny_config(**{'moco.symmetric': True})` returns a fresh ConfigDict."""
  return make_tiny_config
