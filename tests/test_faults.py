"""Faults end in one line with their exit code and lose nothing: damaged checkpoints, a full
disk, a second run on a workdir, impossible config values, signals through the launcher."""
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from mocov2_jax import checkpoints, cli, config_check, errors, loop, main
from tests.helpers import REPO, all_finite, demo_config, demo_flags, run_cli


def _one_line_error(result, program='main'):
  """The stderr's last line is the program's message and no traceback was printed."""
  assert 'Traceback' not in result.stderr, result.stderr[-3000:]
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith(f'{program}: '), last
  return last


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """A workdir with checkpoints at steps 4, 6 and 8 (the demo at the tests' size)."""
  workdir = tmp_path_factory.mktemp('trained')
  main.train_and_evaluate(demo_config(), str(workdir))
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['4', '6', '8']
  return workdir


def _copy(trained, tmp_path):
  workdir = tmp_path / 'w'
  shutil.copytree(trained, workdir)
  return workdir


def _damage(step_dir, which='data'):
  """Cuts files of a saved step in half: every array data file (one alone may hold nothing the
  restore reads: a step's largest once restored intact in CI), or its _METADATA."""
  if which == 'data':
    targets = [p for p in step_dir.rglob('*') if p.is_file() and p.parent.name == 'd']
  else:
    targets = [step_dir / 'default' / '_METADATA']
  assert targets, list(step_dir.rglob('*'))
  for target in targets:
    os.truncate(target, target.stat().st_size // 2)


@pytest.mark.parametrize('which', ['data', 'metadata'])
def test_a_damaged_newest_checkpoint_is_set_aside_and_the_one_before_resumes(
    trained, tmp_path, which, caplog):
  caplog.set_level('INFO')
  workdir = _copy(trained, tmp_path)
  _damage(workdir / 'checkpoints' / '8', which)
  results = main.train_and_evaluate(demo_config(num_epochs=3), str(workdir))
  assert results['step'] == 12
  assert (workdir / 'checkpoints' / '8.unreadable').is_dir()   # kept, not deleted
  assert 'checkpoints/8 cannot be read' in caplog.text and 'moved to 8.unreadable' in caplog.text
  assert 'at step 6.' in caplog.text   # resumed from the step before
  assert all_finite(workdir / 'checkpoints' / '12')


def test_no_readable_checkpoint_stops_in_one_line_and_never_starts_afresh(trained, tmp_path):
  workdir = _copy(trained, tmp_path)
  for step in (4, 6, 8):
    _damage(workdir / 'checkpoints' / str(step), 'data' if step != 6 else 'metadata')
  config_before = (workdir / 'config.json').read_text()
  with pytest.raises(errors.BadInput, match='no checkpoint in .* can be read'):
    main.train_and_evaluate(demo_config(num_epochs=3), str(workdir))
  assert (workdir / 'config.json').read_text() == config_before
  assert sorted(os.listdir(workdir / 'checkpoints')) == [
      '4.unreadable', '6.unreadable', '8.unreadable']
  result = run_cli('main', f'--config={REPO}/configs/demo.py', f'--workdir={workdir}',
                   *demo_flags(), '--config.num_epochs=3', code=cli.EXIT_BAD_INPUT)
  assert 'no checkpoint in' in _one_line_error(result) and 'new --workdir' in result.stderr
  assert (workdir / 'config.json').read_text() == config_before
  assert not any(n.isdigit() for n in os.listdir(workdir / 'checkpoints'))   # no fresh start


def test_export_and_linear_eval_of_a_damaged_step_are_one_line(trained, tmp_path):
  workdir = _copy(trained, tmp_path)
  _damage(workdir / 'checkpoints' / '8', 'data')
  with pytest.raises(errors.BadInput, match='checkpoints/8 is not a readable checkpoint'):
    checkpoints.restore_raw(workdir / 'checkpoints' / '8')
  result = run_cli('convert', f'--checkpoint={workdir}', '--format=safetensors',
                   f'--out={tmp_path / "x.safetensors"}', code=cli.EXIT_BAD_INPUT)
  assert 'not a readable checkpoint' in _one_line_error(result, 'convert')
  assert not (tmp_path / 'x.safetensors').exists()
  result = run_cli('linear_eval', f'--config={REPO}/configs/linear_eval_cifar10.py',
                   f'--config.pretrained={workdir}', '--config.fast=True',
                   f'--workdir={tmp_path / "linear"}', code=cli.EXIT_BAD_INPUT)
  assert 'not a readable checkpoint' in _one_line_error(result, 'linear_eval')
  assert not (tmp_path / 'linear').exists()


def test_a_truncated_torch_file_is_named_as_damaged(tmp_path):
  torch = pytest.importorskip('torch')
  from mocov2_jax import torch_io  # pylint: disable=g-import-not-at-top
  torch.save({'w': torch.zeros(64, 64)}, tmp_path / 'w.pth')
  data = (tmp_path / 'w.pth').read_bytes()
  (tmp_path / 'w.pth').write_bytes(data[:len(data) // 2])
  with pytest.raises(ValueError, match='not a readable PyTorch file.*truncated or damaged'):
    torch_io.read_checkpoint(tmp_path / 'w.pth')


def _mount_tmpfs(where, size):
  where.mkdir()
  if subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs', str(where)],
                    capture_output=True).returncode:
    pytest.skip('cannot mount a tmpfs here (not root): the injected ENOSPC test covers the save')


def test_a_full_disk_stops_in_one_line_keeps_the_checkpoints_and_resumes(trained, tmp_path):
  disk = tmp_path / 'disk'
  _mount_tmpfs(disk, '16m')
  try:
    workdir = disk / 'w'
    shutil.copytree(trained, workdir, ignore=shutil.ignore_patterns('events.*'))
    shutil.rmtree(workdir / 'checkpoints' / '8')
    shutil.rmtree(workdir / 'checkpoints' / '4')   # step 6 left: saves at 8, 10, 12 to come
    free = shutil.disk_usage(disk).free
    (disk / 'filler').write_bytes(b'\0' * (free - 64 * 1024))   # room for logs, not a step
    result = run_cli('main', f'--config={REPO}/configs/demo.py', f'--workdir={workdir}',
                     *demo_flags(), '--config.num_epochs=3', code=cli.EXIT_CANNOT_WRITE)
    last = _one_line_error(result)
    assert 'No space left on device' in last and 'checkpoints/8' in last, last
    assert 'intact (latest: step 6)' in last and 'run the same command' in last
    # Step 8 is no checkpoint; its partial folder is removed (one that TensorStore's last
    # writes recreate after the program ends goes at the next run's first save, below).
    assert [p for p in os.listdir(workdir / 'checkpoints') if 'tmp' not in p] == ['6']
    assert all_finite(workdir / 'checkpoints' / '6')
    (disk / 'filler').unlink()
    results = main.train_and_evaluate(demo_config(num_epochs=3), str(workdir))
    assert results['step'] == 12 and all_finite(workdir / 'checkpoints' / '12')
    assert not [p for p in os.listdir(workdir / 'checkpoints') if 'tmp' in p]
  finally:
    subprocess.run(['umount', '-l', str(disk)], check=False)


def test_a_refused_save_names_its_cause_and_keeps_the_earlier_steps(trained, tmp_path,
                                                                     monkeypatch):
  """The same without a tmpfs: the OS's ENOSPC injected where orbax writes."""
  workdir = _copy(trained, tmp_path)
  shutil.rmtree(workdir / 'checkpoints' / '8')
  from orbax.checkpoint import checkpoint_manager  # pylint: disable=g-import-not-at-top

  def full(*args, **kwargs):
    raise RuntimeError('save failed') from OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
  monkeypatch.setattr(checkpoint_manager.CheckpointManager, 'save', full)
  with pytest.raises(errors.CannotWrite, match='cannot save checkpoint .*checkpoints/8: No '
                     r'space left on device. The earlier checkpoints are intact \(latest: step 6'):
    main.train_and_evaluate(demo_config(), str(workdir))
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['4', '6']
  assert all_finite(workdir / 'checkpoints' / '6')


def test_a_partial_step_left_by_a_killed_save_is_removed_on_start(tmp_path):
  """SIGKILL mid-save leaves <step>.orbax-checkpoint-tmp: never a checkpoint; removed when the
  resumed run first saves."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  mgr = checkpoints.manager(tmp_path, 3)
  mgr.save(2, args=ocp.args.StandardSave({'w': np.ones(3)}))
  mgr.close()
  partial = tmp_path / 'checkpoints' / '4.orbax-checkpoint-tmp' / 'default'
  partial.mkdir(parents=True)
  (partial / 'data').write_bytes(b'\0' * 1024)
  mgr = checkpoints.manager(tmp_path, 3)
  assert mgr.all_steps() == [2]
  mgr.save(6, args=ocp.args.StandardSave({'w': np.ones(3)}))   # (orbax awaits its clean-up here)
  mgr.close()
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['2', '6']


def test_one_run_per_workdir(tmp_path, caplog):
  workdir = tmp_path / 'w'
  lock = checkpoints.WorkdirLock(workdir)
  lock.acquire()
  try:
    started = time.time()
    result = run_cli('main', f'--config={REPO}/configs/demo.py', f'--workdir={workdir}',
                     *demo_flags(), code=cli.EXIT_BAD_INPUT)
    last = _one_line_error(result)
    assert f'is in use by another run (host {os.uname().nodename}, pid {os.getpid()}' in last
    assert time.time() - started < 120
    assert sorted(os.listdir(workdir)) == ['lock']   # the second run wrote nothing
  finally:
    lock.release()
  # A lock left by a process that died (SIGKILL: no clean-up) is taken over, with a warning.
  dead = subprocess.run([sys.executable, '-c', 'import os, signal\n'
                         'from mocov2_jax import checkpoints\n'
                         f'checkpoints.WorkdirLock({str(workdir)!r}).acquire()\n'
                         'os.kill(os.getpid(), signal.SIGKILL)'], cwd=REPO)
  assert dead.returncode == -signal.SIGKILL
  holder = json.loads((workdir / 'lock').read_text())
  assert holder['pid'] != os.getpid()
  lock = checkpoints.WorkdirLock(workdir)
  lock.acquire()
  lock.release()
  assert f'pid {holder["pid"]}' in caplog.text and 'no longer running' in caplog.text


@pytest.mark.parametrize('field, value, message', [
    ('optim.base_lr', -0.1, 'must be > 0'),
    ('moco.momentum', 1.5, 'must be in [0, 1)'),
    ('moco.momentum', 1.0, 'must be in [0, 1)'),
    ('moco.temperature', 0.0, 'must be > 0'),
    ('moco.queue_size', 0, 'must be a positive integer'),
    ('batch_size', -8, 'must be a positive integer'),
    ('num_epochs', 0, 'must be a positive integer'),
    ('optim.weight_decay', -1e-4, 'must be >= 0'),
    ('data.augment.crop_scale', (0.5, 0.2), 'with 0 < low <= high <= 1'),
    ('data.augment.crop_scale', (0.2,), 'with 0 < low <= high <= 1'),
    ('data.augment.blur_p', 1.5, 'a probability in [0, 1]'),
    ('data.augment.jitter', (0.4, 0.4, 0.4, 0.7), 'hue <= 0.5'),
    ('data.eval_crop_frac', 0.0, 'in (0, 1]'),
    ('knn.k', 0, 'must be a positive integer'),
    ('optim.base_lr', float('nan'), 'must be > 0'),
])
def test_config_ranges(field, value, message):
  config = demo_config()
  config.update_from_flattened_dict({field: value})
  with pytest.raises(errors.BadInput, match=f'--config.{field}=.*' + message.replace(
      '[', r'\[').replace('(', r'\(').replace(')', r'\)')):
    config_check.check(config)


def test_every_shipped_config_is_in_range():
  import glob  # pylint: disable=g-import-not-at-top
  from mocov2_jax import defaults  # pylint: disable=g-import-not-at-top
  for path in glob.glob(os.path.join(REPO, 'configs', '*.py')):
    name = os.path.basename(path)[:-3]
    rows = getattr(defaults.sibling_config(path, name), 'ROWS', None)
    for spec in [f'{path}:{row}' for row in rows] if rows else [path]:
      config_check.check(cli._load_config(spec))  # pylint: disable=protected-access


@pytest.mark.parametrize('program, args, message', [
    ('main', ('--config.optim.base_lrr=0.1',), 'did you mean --config.optim.base_lr?'),
    ('main', ('--config.foo=1',), '--config.foo: no such field in'),
    ('main', ('--config.batch_size=abc',), "--config.batch_size=abc: invalid literal"),
    ('main', ('--config.optim.base_lr=-0.1',), '--config.optim.base_lr=-0.1: must be > 0'),
    ('linear_eval', ('--config.sweep_lr=1',), 'did you mean --config.sweep_lrs?'),
    ('convert', ('--from=torchvision', 'x.pth', '--config.model.widht=8'),
     'did you mean --config.model.width?'),
])
def test_bad_command_lines_are_one_line_and_exit_2(tmp_path, program, args, message):
  workdir = tmp_path / 'w'
  config = {'main': (f'--config={REPO}/configs/demo.py', f'--workdir={workdir}'),
            'linear_eval': (f'--workdir={workdir}',),
            'convert': (f'--out={workdir}',)}[program]
  result = run_cli(program, *config, *args, code=cli.EXIT_BAD_INPUT)
  assert message in _one_line_error(result, program)
  assert not workdir.exists()


def test_no_checkpoint_holds_a_non_finite_value(tmp_path):
  """The loss lags a step behind and BN in training uses batch statistics, so the state can go
  non-finite (here its BN running variances, at step 3) while every loss is finite: the save
  checks the whole state."""
  import jax  # pylint: disable=g-import-not-at-top
  config = demo_config(num_train_steps=4)
  exp = main.experiment(config)
  step = exp.train_step

  def poisoned(state, batch):
    state, metrics = step(state, batch)
    if int(state.step) == 3:
      state = state.replace(batch_stats=jax.tree.map(lambda x: x * np.inf, state.batch_stats))
    return state, metrics
  exp.train_step = poisoned
  with pytest.raises(cli.Stop, match='diverged at step 4: the train state holds a non-finite'):
    loop.run(exp, str(tmp_path))
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['2']
  assert all_finite(tmp_path / 'checkpoints' / '2')


def test_launch_scripts_are_valid_bash():
  for name in ('slurm.sbatch', 'tpu_pod.sh', 'local_processes.sh'):
    path = os.path.join(REPO, 'launch', name)
    assert subprocess.run(['bash', '-n', path]).returncode == 0, name
  slurm = open(os.path.join(REPO, 'launch', 'slurm.sbatch')).read()
  assert '#SBATCH --signal=TERM@' in slurm and '#SBATCH --requeue' in slurm
  assert '--ntasks-per-node=1' in slurm and 'scontrol requeue' in slurm


def test_the_launcher_forwards_sigterm_to_every_worker(tmp_path):
  """launch/local_processes.sh: SIGTERM to the launcher reaches both workers, which save the
  same step; it exits 75 when they have, leaving no worker behind."""
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1',
             PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ['PATH'])
  cmd = ['bash', 'launch/local_processes.sh', '2', f'--config={REPO}/configs/demo.py',
         f'--workdir={tmp_path}', *demo_flags(), '--config.num_epochs=500',
         '--config.log_every_steps=1']
  proc = subprocess.Popen(cmd, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True,
                          start_new_session=True)
  lines = []
  for line in proc.stderr:
    lines.append(line)
    if 'step 2/' in line:
      proc.send_signal(signal.SIGTERM)   # the launcher alone, not its process group
      break
  rest = proc.stderr.read()
  code = proc.wait(timeout=300)
  try:
    assert code == cli.EXIT_PREEMPTED, rest[-3000:]
    assert any('2 processes, 2 devices' in l for l in lines), ''.join(lines)[-3000:]
    stops = [l for l in rest.splitlines() if 'preempted at step' in l]
    assert len(stops) == 2 and len({l.split('preempted at step ')[1].split(':')[0]
                                     for l in stops}) == 1, rest[-3000:]
    left = subprocess.run(['pgrep', '-f', '--', f'--workdir={tmp_path}'], capture_output=True)
    assert left.returncode == 1, left.stdout   # no orphaned worker
  finally:
    try:
      os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
      pass


def _stub(bin_dir, name, body):
  path = bin_dir / name
  path.write_text('#!/usr/bin/env bash\n' + body)
  path.chmod(0o755)


# A stand-in for the trainer: saves on SIGTERM (a second after it) and exits 75, as main does.
_WORKER = ('echo $$ > "$LOG/worker.pid"\n'
           'trap \'sleep 1; echo saved >> "$LOG/worker.log"; exit 75\' TERM\n'
           'echo started >> "$LOG/worker.log"\n'
           'for i in $(seq 600); do sleep 0.1; done\nexit 0\n')


def _signal_when_started(cmd, log, env):
  proc = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True)
  for _ in range(300):
    if (log / 'worker.log').exists():
      break
    time.sleep(0.1)
  proc.send_signal(signal.SIGTERM)   # the script alone, not its process group
  try:
    return proc.wait(timeout=60)
  finally:
    try:
      os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
      pass


def test_slurm_script_forwards_sigterm_and_requeues(tmp_path):
  bin_dir, log = tmp_path / 'bin', tmp_path / 'log'
  bin_dir.mkdir()
  log.mkdir()
  _stub(bin_dir, 'srun', _WORKER)
  _stub(bin_dir, 'scontrol', 'echo "$@" >> "$LOG/scontrol.log"\n')
  env = dict(os.environ, LOG=str(log), SLURM_JOB_ID='42',
             PATH=f'{bin_dir}{os.pathsep}{os.environ["PATH"]}')
  code = _signal_when_started(['bash', 'launch/slurm.sbatch', '--workdir=x'], log, env)
  assert code == cli.EXIT_PREEMPTED
  assert (log / 'worker.log').read_text().split() == ['started', 'saved']
  assert (log / 'scontrol.log').read_text().split() == ['requeue', '42']


def test_tpu_pod_script_forwards_sigterm_to_the_workers_and_stops(tmp_path):
  bin_dir, log = tmp_path / 'bin', tmp_path / 'log'
  bin_dir.mkdir()
  log.mkdir()
  # gcloud ssh: the training command runs the stand-in; the forwarded pkill signals it.
  _stub(bin_dir, 'gcloud', 'case "$*" in\n'
        '  *pkill*) echo "$@" >> "$LOG/forwarded.log"; kill -TERM "$(cat "$LOG/worker.pid")";;\n'
        '  *) ' + _WORKER.replace('\n', '\n     ') + ';;\nesac\n')
  env = dict(os.environ, LOG=str(log), PATH=f'{bin_dir}{os.pathsep}{os.environ["PATH"]}')
  code = _signal_when_started(['bash', 'launch/tpu_pod.sh', 'tpu', 'zone', '--workdir=x'], log,
                              env)
  assert code == cli.EXIT_PREEMPTED   # the workers' code, and no restart after a signal here
  assert (log / 'worker.log').read_text().split() == ['started', 'saved']
  assert '-TERM' in (log / 'forwarded.log').read_text()


def test_bad_images_are_counted_once_across_a_resume(tmp_path):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  for c, colour in (('a', (200, 0, 0)), ('b', (0, 0, 200))):
    (tmp_path / 'images' / 'train' / c).mkdir(parents=True)
    for i in range(8):
      Image.new('RGB', (16, 16), colour).save(tmp_path / 'images' / 'train' / c / f'{i}.png')
  (tmp_path / 'images' / 'train' / 'a' / 'text.jpg').write_text('not an image')
  changes = {'data.source': 'folder', 'data.folder': str(tmp_path / 'images'),
             'data.eval_split': 'train', 'data.num_train': 0, 'data.num_eval': 0,
             'batch_size': 8, 'moco.queue_size': 32, 'moco.bn_groups': 2}
  first = main.train_and_evaluate(demo_config(num_train_steps=2, **changes),
                                   str(tmp_path / 'w'))   # epoch 0 (17 images: 2 steps)
  assert first['bad_images'] == 1 and first['bad_image_names'][0].endswith('text.jpg')
  again = main.train_and_evaluate(demo_config(**changes), str(tmp_path / 'w'))   # epoch 1
  assert again['step'] == 4 and again['bad_images'] == 1, again['bad_image_names']
