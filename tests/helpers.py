"""Helpers the tests share (the oracles themselves are in torch_resnet.py)."""
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# configs/demo.py shrunk to seconds a run on 2 cores: width 4, 16 px, 2 epochs of 128 synthetic
# images in batches of 32. Tests that run the program start from it and change what they test.
TINY_DEMO = {'batch_size': 32, 'num_epochs': 2, 'model.width': 4, 'moco.queue_size': 128,
             'moco.bn_groups': 4, 'data.num_train': 128, 'data.num_eval': 64,
             'data.image_size': 16, 'data.shuffle_buffer': 128, 'knn.every_epochs': 0,
             'num_summary_pairs': 0, 'log_every_steps': 1, 'checkpoint_every_steps': 2}


def demo_flags(**changes):
  """TINY_DEMO (with `changes`) as the program's --config.x=y flags."""
  return [f'--config.{k}={v}' for k, v in {**TINY_DEMO, **changes}.items()]


def demo_config(**changes):
  """configs/demo.py with TINY_DEMO and `changes` (dotted field names)."""
  from configs import demo  # pylint: disable=g-import-not-at-top
  c = demo.get_config()
  c.update_from_flattened_dict({**TINY_DEMO, **changes})
  return c


def main_cmd(workdir, *flags, **changes):
  """`python -m mocov2_jax.main` on the tiny demo in `workdir`, `flags` appended."""
  return [sys.executable, '-m', 'mocov2_jax.main', f'--config={REPO}/configs/demo.py',
          f'--workdir={workdir}', *demo_flags(**changes), *flags]


def run_cli(module, *args, code=0, timeout=600, env=None):
  """`python -m mocov2_jax.<module> args` in the repository; asserts its exit code."""
  result = subprocess.run([sys.executable, '-m', f'mocov2_jax.{module}', *map(str, args)],
                          cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
  assert result.returncode == code, (result.returncode, result.stderr[-3000:])
  return result


def all_finite(step_dir):
  """Every floating-point array of the checkpoint at `step_dir` is finite."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from mocov2_jax import checkpoints  # pylint: disable=g-import-not-at-top  (after conftest)
  leaves = [np.asarray(x) for x in jax_leaves(checkpoints.restore_raw(step_dir))]
  return all(np.isfinite(x).all() for x in leaves if np.issubdtype(x.dtype, np.floating))


def jax_leaves(tree):
  import jax  # pylint: disable=g-import-not-at-top  (after conftest sets the device count)
  return jax.tree.leaves(tree)
