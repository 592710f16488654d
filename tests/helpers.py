"""Helpers the tests share (the oracles themselves are in torch_resnet.py)."""
import os
import subprocess
import sys

import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def shardings(devices):
  """(replicated, batch-sharded) shardings over a 1-D `data` mesh of `devices`."""
  mesh = Mesh(np.array(devices), ('data',))
  return NamedSharding(mesh, P()), NamedSharding(mesh, P('data'))


def run_cli(module, *args, code=0, timeout=600, env=None):
  """`python -m mocov2_jax.<module> args` in the repository; asserts its exit code."""
  result = subprocess.run([sys.executable, '-m', f'mocov2_jax.{module}', *map(str, args)],
                          cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
  assert result.returncode == code, (result.returncode, result.stderr[-3000:])
  return result
