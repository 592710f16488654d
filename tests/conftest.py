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
# environment): the tiny demo's step, compiled by dozens of runs, compiles once per machine, and
# so do the small programs (min 0 s: a warm tiny run took 12.3-14.0 CPU-seconds, 15.4 at 0.5 s).
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR',
                      os.path.join(tempfile.gettempdir(), 'mocov2_jax_tests_xla_cache'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')

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


# The slowest modules first (one `--durations=0` run on 2 cores: 290, 245, 170, 150, 110, 90, 65,
# 45 s), so that the two workers of `pytest -n 2` start with the longest tests, end on short ones.
SLOWEST_FIRST = ('test_faults.py', 'test_multiprocess.py', 'test_long_runs.py', 'test_main.py',
                 'test_multidevice.py', 'test_simclr.py', 'test_convert.py', 'test_linear_eval.py')
# Modules whose tests share a module-scoped fixture (a trained workdir, a compilation cache): one
# worker runs each of them, so that the fixture is built once.
SHARED_FIXTURES = ('test_multiprocess.py', 'test_faults.py', 'test_convert.py',
                   'test_linear_eval.py')


def pytest_collection_modifyitems(items):
  rank = lambda item: (SLOWEST_FIRST.index(item.path.name) if item.path.name in SLOWEST_FIRST
                       else len(SLOWEST_FIRST))
  items.sort(key=rank)   # stable: tests keep their order within a module


def pytest_xdist_make_scheduler(config, log):
  """xdist's load scheduling, but a module of SHARED_FIXTURES goes to one worker whole. (xdist's
  own `--dist loadgroup` tags node ids, which pytest 9 no longer lets it change.)"""
  from xdist.scheduler import LoadScopeScheduling  # pylint: disable=g-import-not-at-top

  class SharedFixturesTogether(LoadScopeScheduling):
    def _split_scope(self, nodeid):
      module = nodeid.split('::', 1)[0]
      return module if os.path.basename(module) in SHARED_FIXTURES else nodeid

  return SharedFixturesTogether(config, log)
