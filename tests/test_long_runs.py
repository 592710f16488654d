"""Long runs survive: preemption, divergence, changed configs on resume, exact resume, clear
errors before anything is written. Programs run as real subprocesses where signals and exit
codes matter."""
import json
import os
import signal
import subprocess

import numpy as np
import pytest

from mocov2_jax import checkpoints, cli, main, train
from tests.helpers import REPO, all_finite, demo_config, demo_flags, jax_leaves, main_cmd, run_cli

@pytest.mark.parametrize('signum, code', [(signal.SIGTERM, cli.EXIT_PREEMPTED),
                                          (signal.SIGINT, cli.EXIT_INTERRUPTED)])
def test_a_signal_saves_the_current_step_and_the_same_command_resumes(tmp_path, signum, code):
  cmd = main_cmd(tmp_path, '--config.num_epochs=50')   # 200 steps: far more than it will run
  proc = subprocess.Popen(cmd, cwd=REPO, stderr=subprocess.PIPE, text=True)
  lines = []
  for line in proc.stderr:   # wait until it trains, then signal it twice (the 2nd mid-save)
    lines.append(line)
    if 'step 3/200' in line:
      proc.send_signal(signum)
      proc.send_signal(signum)
      break
  rest = proc.stderr.read()
  assert proc.wait(timeout=300) == code, rest[-3000:]
  stop = [l for l in rest.splitlines() if 'preempted at step' in l]
  assert len(stop) == 1 and 'Traceback' not in rest, rest[-3000:]
  step = int(stop[0].split('preempted at step ')[1].split(':')[0])
  assert step >= 3 and f'checkpoints/{step}; run the same command to resume' in stop[0]
  assert checkpoints.manager(tmp_path, 3).latest_step() == step and all_finite(
      tmp_path / 'checkpoints' / str(step))
  if signum == signal.SIGINT:
    return   # the resume is the SIGTERM case's
  again = subprocess.run(main_cmd(tmp_path, f'--config.num_train_steps={step + 1}'), cwd=REPO,
                         capture_output=True, text=True, timeout=600)
  assert again.returncode == 0, again.stderr[-3000:]
  assert f'at step {step}.' in again.stderr and f'step {step + 1}/' in again.stderr


def test_divergence_stops_at_once_and_keeps_the_last_good_checkpoint(tmp_path):
  result = subprocess.run(main_cmd(tmp_path, '--config.optim.base_lr=1e20',   # tiny: needs more
                                   '--config.checkpoint_every_steps=1'),
                          cwd=REPO, capture_output=True, text=True, timeout=600)
  assert result.returncode == cli.EXIT_DIVERGED, result.stderr[-3000:]
  last = result.stderr.strip().splitlines()[-1]
  assert 'diverged at step' in last and ('loss' in last or 'train state' in last), last
  assert 'Traceback' not in result.stderr
  saved = sorted(int(d) for d in os.listdir(tmp_path / 'checkpoints')) if (
      tmp_path / 'checkpoints').exists() else []
  diverged = int(last.split('diverged at step ')[1].split(':')[0])
  assert all(s < diverged for s in saved)
  assert saved and all(all_finite(tmp_path / 'checkpoints' / str(s)) for s in saved)


def test_resume_refuses_a_changed_model_and_keeps_the_old_config_on_other_changes(tmp_path):
  main.train_and_evaluate(demo_config(num_train_steps=2), str(tmp_path))
  saved = (tmp_path / 'config.json').read_text()
  check = lambda **changes: train.check(demo_config(**changes), main.data_of(demo_config()),
                                        str(tmp_path))
  with pytest.raises(ValueError, match=r'model.width \(saved 4, now 8\)'):
    check(**{'model.width': 8, 'moco.queue_size': 256})
  with pytest.raises(ValueError, match=r'moco.queue_size \(saved 128, now 256\)'):
    check(**{'moco.queue_size': 256})
  assert (tmp_path / 'config.json').read_text() == saved
  refused = run_cli('main', f'--config={REPO}/configs/demo.py', f'--workdir={tmp_path}',
                    *demo_flags(), '--config.model.width=8', code=cli.EXIT_BAD_INPUT)
  assert 'model.width (saved 4, now 8)' in refused.stderr and 'Traceback' not in refused.stderr
  assert (tmp_path / 'config.json').read_text() == saved
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['2']
  # Other changes are accepted (check returns the steps per epoch).
  assert check(**{'optim.base_lr': 0.1, 'num_train_steps': 3}) == 4
  main.train_and_evaluate(demo_config(**{'optim.base_lr': 0.1, 'num_train_steps': 3}),
                           str(tmp_path))
  assert json.loads((tmp_path / 'config.1.json').read_text())['optim']['base_lr'] == 0.06
  assert json.loads((tmp_path / 'config.json').read_text())['optim']['base_lr'] == 0.1


def test_a_resumed_run_is_bitwise_the_run_that_never_stopped(tmp_path):
  """Stop after 3 steps (mid-epoch), resume to the end (8 steps, 2 epochs), compare leaves.
  Device augmentation (its draws keyed by the step; the host-augmented stream's re-entry is
  test_pipeline's)."""
  cfg = lambda **changes: demo_config(**{'data.augment_on': 'device', **changes})
  main.train_and_evaluate(cfg(), str(tmp_path / 'whole'))
  main.train_and_evaluate(cfg(num_train_steps=3), str(tmp_path / 'parts'))
  assert checkpoints.manager(tmp_path / 'parts', 3).latest_step() == 3
  main.train_and_evaluate(cfg(), str(tmp_path / 'parts'))
  whole, parts = (checkpoints.restore_raw(tmp_path / w / 'checkpoints' / '8')
                  for w in ('whole', 'parts'))
  assert int(whole['step']) == int(parts['step']) == 8
  for field in ('params', 'batch_stats', 'key_params', 'key_batch_stats', 'queue', 'queue_ptr',
                'opt_state', 'rng'):
    a, b = jax_leaves(whole[field]), jax_leaves(parts[field])
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=field)


def test_clear_errors_before_anything_is_written(tmp_path, monkeypatch):
  config = f'--config={REPO}/configs/demo.py'
  for flags, message in [
      ((config, '--config.batch_size=0'), '--config.batch_size=0: must be a positive integer'),
      ((config, '--config.num_epochs=0'), '--config.num_epochs=0: must be a positive integer'),
      (('--config=configs/no_such_config.py',), 'no_such_config.py: no such file'),
      ((config, '--config.data.on_bad_image=maybe'), 'data.on_bad_image'),
  ]:
    workdir = tmp_path / 'w'
    result = run_cli('main', *flags, f'--workdir={workdir}', code=cli.EXIT_BAD_INPUT)
    last = result.stderr.strip().splitlines()[-1]
    assert message in last and 'Traceback' not in result.stderr and '--helpfull' not in last
    assert not workdir.exists()
  (tmp_path / 'a_file').write_text('')
  result = run_cli('main', config, f'--workdir={tmp_path / "a_file"}', code=cli.EXIT_BAD_INPUT)
  assert 'is a file, not a folder' in result.stderr
  monkeypatch.setattr(checkpoints.os, 'access', lambda *_: False)   # root ignores chmod
  with pytest.raises(ValueError, match='is not writable'):
    checkpoints.check_workdir(tmp_path / 'new' / 'run')
