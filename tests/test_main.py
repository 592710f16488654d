"""The program end to end: a few steps, a checkpoint, a resume; bad input fails at start."""
import json
import os
import re
import subprocess
import sys

import pytest

from mocov2_jax import main, train
from tests.helpers import REPO, demo_flags

# The tiny demo with its kNN monitor, a checkpoint every 2 steps and augmented pairs logged, on
# the device-augmented path (the host path is the default, which most program tests run).
TINY = demo_flags(**{'knn.every_epochs': 1, 'log_every_steps': 2, 'num_summary_pairs': 2,
                     'data.augment_on': 'device'})


def run_main(workdir, *overrides):
  cmd = [sys.executable, '-m', 'mocov2_jax.main', f'--config={REPO}/configs/demo.py',
         f'--workdir={workdir}', *TINY, *overrides]
  return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)


def test_runs_checkpoints_and_resumes(tmp_path):
  first = run_main(tmp_path, '--config.num_train_steps=3')
  assert first.returncode == 0, first.stderr[-3000:]
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['2', '3']
  assert json.load(open(tmp_path / 'config.json'))['batch_size'] == 32
  assert any(f.startswith('events.out.tfevents') for f in os.listdir(tmp_path))
  assert json.load(open(tmp_path / 'results.json'))['step'] == 3
  assert 'kNN top-1 (k=200, backbone)' in first.stdout and 'random init' in first.stdout
  assert re.search(r'random init: [0-9.]+%, [+-][0-9.]+ points\)', first.stdout), first.stdout

  assert not os.path.exists(tmp_path / 'plugins')  # no profile unless asked for

  second = run_main(tmp_path, '--config.profile_steps=2')  # 2 epochs of 128 / 32 = 8 steps
  assert second.returncode == 0, second.stderr[-3000:]
  # clu's Profile action starts at the run's 5th step (step 8 here); the end of the run closes it.
  assert list((tmp_path / 'plugins' / 'profile').glob('*/*.xplane.pb'))
  assert 'Resumed from' in second.stderr and 'at step 3' in second.stderr
  assert 'step 4/8' in second.stderr and 'step 2/8' not in second.stderr
  assert 'kNN top-1 at step 0' not in second.stderr  # measured once, by the first run ...
  assert 'random init' in second.stdout             # ... and still reported at the end
  results = json.load(open(tmp_path / 'results.json'))
  assert results['step'] == 8 and 'knn_top1_init' in results
  assert '8' in os.listdir(tmp_path / 'checkpoints')


@pytest.mark.parametrize('overrides, message', [
    (['--config.model.arch=resnet42'], "unknown model.arch 'resnet42'"),
    (['--config.data.source=folder', '--config.data.folder=/nonexistent/images'],
     "data.folder='/nonexistent/images' is not a directory"),
])
def test_bad_input_fails_before_work_with_a_message(tmp_path, overrides, message):
  result = run_main(tmp_path, *overrides)
  assert result.returncode != 0
  assert message in result.stderr
  assert 'Traceback' not in result.stderr
  assert not os.path.exists(tmp_path / 'checkpoints')


def _config(**changes):
  from configs import demo  # pylint: disable=g-import-not-at-top
  c = demo.get_config()
  c.update_from_flattened_dict(changes)
  return c


@pytest.mark.parametrize('changes, message', [
    ({'batch_size': 36}, 'not a multiple of the 8 devices'),
    ({'moco.queue_size': 1000}, 'not a multiple of the 128 keys'),
    ({'moco.queue_size': 128, 'moco.symmetric': True}, 'not a multiple of the 256 keys'),
    ({'moco.bn_groups': 3}, 'does not split into moco.bn_groups=3'),
    ({'model.arch': 'vgg16'}, 'unknown model.arch'),
    ({'model.head': 'deep'}, 'unknown model.head'),
    ({'data.source': 'folder', 'data.folder': '/nonexistent/images'}, '/nonexistent/images'),
    ({'data.num_train': 64}, 'make no full batch of 128'),
])
def test_check_messages(changes, message):
  c = _config(**changes)
  with pytest.raises(ValueError, match=message):
    train.check(c, main.data_of(c))


SYNTHETIC = ['--config.data.source=synthetic', '--config.data.name=shapes',
             '--config.data.train_split=train', '--config.data.eval_split=test',
             '--config.data.eval_crop_frac=1.0', '--config.model.arch=resnet18',
             '--config.model.cifar_stem=True']


def test_table2_simclr_row_runs_exports_and_reports(tmp_path):
  """A Table 2 SimCLR row, shrunk: pre-train (the end-to-end state), resume, export the backbone,
  refuse the MoCo layout, evaluate, and the report puts the run in its row."""
  pre, lin = tmp_path / 'pre', tmp_path / 'lin'
  cmd = [sys.executable, '-m', 'mocov2_jax.main',
         f'--config={REPO}/configs/table2.py:simclr_b256_e200', f'--workdir={pre}', *TINY,
         *SYNTHETIC, '--config.optim.warmup_epochs=1.0', '--config.num_train_steps=3']
  first = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert first.returncode == 0, first.stderr[-3000:]
  assert 'simclr: 4 steps per epoch' in first.stderr and 'lars lr 0.0375' in first.stderr
  second = subprocess.run(cmd[:-1], cwd=REPO, capture_output=True, text=True, timeout=600)
  assert second.returncode == 0, second.stderr[-3000:]
  assert 'at step 3' in second.stderr and 'step 8/8' in second.stderr

  from mocov2_jax import torch_io  # pylint: disable=g-import-not-at-top
  torch_io.export(str(pre), 'safetensors', str(tmp_path / 'b.safetensors'))
  with pytest.raises(ValueError, match='no key encoder'):
    torch_io.export(str(pre), 'moco', str(tmp_path / 'm.pth'))
  cmd = [sys.executable, '-m', 'mocov2_jax.linear_eval',
         f'--config={REPO}/configs/linear_eval_cifar10.py', f'--config.pretrained={pre}',
         f'--workdir={lin}', '--config.fast=True', '--config.batch_size=32',
         '--config.num_epochs=2']
  linear = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert linear.returncode == 0, linear.stderr[-3000:]
  out = subprocess.run([sys.executable, '-m', 'mocov2_jax.report', str(lin)], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  top1 = json.load(open(lin / 'results.json'))['top1']
  row = [l for l in out.stdout.splitlines() if l.startswith('| simclr_b256_e200 |')]
  assert row and f'| 61.9 | {top1:.2f} | {top1 - 61.9:+.1f} |' in row[0]
  assert '| 2 | 32 | resnet18/4 | shapes | fast |' in row[0]
