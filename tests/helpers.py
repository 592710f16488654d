"""Helpers the tests share (the oracles themselves are in torch_resnet.py)."""
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(module, *args, code=0, timeout=600, env=None):
  """`python -m mocov2_jax.<module> args` in the repository; asserts its exit code."""
  result = subprocess.run([sys.executable, '-m', f'mocov2_jax.{module}', *map(str, args)],
                          cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
  assert result.returncode == code, (result.returncode, result.stderr[-3000:])
  return result
