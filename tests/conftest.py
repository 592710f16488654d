"""Shared test setup.

XLA reads XLA_FLAGS once, when the CPU backend starts, so the 8 fake CPU devices of the
multi-device tests must be requested here, before any test module imports jax (which reads its
cache settings on import too). Every test therefore sees 8 CPU devices; single-device tests put
their arrays on the default device.
"""
import os
import tempfile

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
# One persistent XLA cache for the whole suite, the programs it starts included (they inherit the
# environment): the tiny demo's step, compiled by dozens of runs, compiles once per machine.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR',
                      os.path.join(tempfile.gettempdir(), 'mocov2_jax_tests_xla_cache'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.5')

import ml_collections  # noqa: E402
import pytest  # noqa: E402

from mocov2_jax import defaults  # noqa: E402


def make_tiny_config(**overrides) -> ml_collections.ConfigDict:
  """defaults.base_config() at ResNet-18 width 8 with a CIFAR stem, dim 16, K = 64, 4 BN groups
  (small enough for CPU), taking finished views (host augmentation) as the step tests feed."""
  c = defaults.base_config()
  c.model.update(arch='resnet18', width=8, cifar_stem=True, dim=16)
  c.moco.update(queue_size=64, momentum=0.99, temperature=0.2, bn_groups=4)
  c.optim.lr_drop_epochs = (1,)
  c.data.augment_on = 'host'
  c.update_from_flattened_dict(overrides)
  return c


@pytest.fixture
def tiny_config():
  """A factory: `tiny_config(**{'moco.symmetric': True})` returns a fresh ConfigDict."""
  return make_tiny_config
