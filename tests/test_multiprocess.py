"""Several real processes joined by jax.distributed (CPU): one global batch whatever the number of
processes, elastic resume across process counts, a signal to one process, counts over processes.

Each run is `python -m mocov2_jax.main` in its own processes, as launch/local_processes.sh starts
them, with XLA_FLAGS giving each process its number of CPU devices.
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import time

import numpy as np
import pytest

from mocov2_jax import checkpoints, cli, loop
from tests.helpers import REPO, main_cmd

# The tiny demo on a folder of 128 readable images and 3 unreadable files: 131 // 32 = 4 steps an
# epoch, 8 in all, 8 BN groups of 4 examples. Host augmentation: the step compiles in about half
# the time, and the device recipe's draws are keyed by the example's row of the global batch,
# which these runs show to be the same on any number of processes. lr 0.00075 (base_lr / 10): at
# the demo's lr this tiny network turns float32 rounding (1e-7) into loss differences of 1e-3 by
# step 8, between 1 and 4 devices of one process as much as between processes.
SMALL = {'moco.bn_groups': 8, 'data.source': 'folder', 'data.eval_split': 'train',
         'data.augment_on': 'host', 'optim.base_lr': 0.006, 'checkpoint_every_steps': 3}
UNREADABLE = ('a_truncated.jpg', 'm_empty.png', 'z_text.jpg')


@pytest.fixture(scope='module')
def data(tmp_path_factory):
  """(image folder, compilation cache): runs of the same program share their compiled steps."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp('images')
  rng = np.random.default_rng(0)
  (root / 'train').mkdir()
  for i in range(128):
    size = rng.integers(16, 25, 2)
    Image.fromarray(rng.integers(0, 256, (*size, 3), np.uint8)).save(root / 'train' / f'{i:03d}.png')
  for name, content in zip(UNREADABLE, (b'\xff\xd8\xff\xe0\x00\x10JFIF', b'', b'not an image')):
    (root / 'train' / name).write_bytes(content)
  return str(root), str(tmp_path_factory.mktemp('jax_cache'))


def _free_port():
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def start(data, workdir, processes, devices, *flags, **config):
  """`processes` processes of `devices` CPU devices each on one workdir; their stderr in
  <workdir>.<n>.<i>.log. Returns the Popen objects and the log paths."""
  folder, cache = data
  env = dict(os.environ, JAX_PLATFORMS='cpu', JAX_COMPILATION_CACHE_DIR=cache,
             XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
  cmd = main_cmd(workdir, *flags, **{**SMALL, 'data.folder': folder, **config})
  port = _free_port()
  procs, logs = [], []
  for i in range(processes):
    distributed = ([f'--coordinator=localhost:{port}', f'--num_processes={processes}',
                    f'--process_id={i}'] if processes > 1 else [])
    logs.append(f'{workdir}.{time.monotonic_ns()}.{i}.log')
    with open(logs[-1], 'w') as log:
      procs.append(subprocess.Popen(cmd + distributed, cwd=REPO, env=env, stderr=log,
                                    stdout=subprocess.DEVNULL))
  return procs, logs


def wait(run, code=0, timeout=600):
  procs, logs = run
  deadline = time.monotonic() + timeout
  try:
    codes = [p.wait(timeout=max(1, deadline - time.monotonic())) for p in procs]
  finally:
    for p in procs:   # a run that hangs (e.g. one process waiting on the other) is ended
      if p.poll() is None:
        p.kill()
  texts = [open(log).read() for log in logs]
  assert codes == [code] * len(procs), (codes, [t[-3000:] for t in texts])
  return texts


def losses(workdir):
  """{step: loss} from the workdir's TensorBoard events (every run that wrote there)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  out = {}
  for name in sorted(os.listdir(workdir)):
    if name.startswith('events.out'):
      for event in tf.compat.v1.train.summary_iterator(os.path.join(workdir, name)):
        for value in event.summary.value:
          if value.tag == 'loss':
            out[event.step] = float(tf.make_ndarray(value.tensor))
  return out


def state(workdir, step):
  return checkpoints.restore_raw(os.path.join(workdir, 'checkpoints', str(step)))


def assert_same_state(a, b, where):
  import jax  # pylint: disable=g-import-not-at-top
  for field in ('params', 'batch_stats', 'key_params', 'key_batch_stats', 'queue', 'opt_state'):
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a[field])[0],
                            jax.tree.leaves(b[field])):
      x, y = np.asarray(x), np.asarray(y)
      # Sums over the batch (gradients, momentum buffers) are reduced in another order on
      # another number of devices: float32 rounding relative to the leaf's scale.
      np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5 * np.abs(y).max() + 1e-7,
                                 err_msg=f'{where}: {field}{jax.tree_util.keystr(path)}')
  assert int(a['queue_ptr']) == int(b['queue_ptr']) and int(a['step']) == int(b['step'])


def results(workdir):
  return json.load(open(os.path.join(workdir, 'results.json')))


def test_one_global_batch_on_any_number_of_processes_and_elastic_resume(tmp_path, data):
  """2 processes x 2 devices, 1 x 1 and 1 x 4 train the same 8 steps (2 epochs); a checkpoint of
  2 processes resumes on 1 process of 4 devices, and one of 1 process on 2 processes. The
  unreadable files met are counted once over the processes, as by one process."""
  two, one, four = tmp_path / 'p2d2', tmp_path / 'p1d1', tmp_path / 'p1d4'
  runs = [start(data, two, 2, 2), start(data, one, 1, 1),
          start(data, four, 1, 4, '--config.num_train_steps=5')]
  logs = [wait(r) for r in runs]
  assert '2 processes, 4 devices' in logs[0][0] and '1 processes, 4 devices' in logs[2][0]
  # Elastic resume, both ways: 2 processes (step 6, mid-epoch) -> 1 process of 4 devices, and
  # 1 process (step 5) -> 2 processes of 2 devices.
  to_one = tmp_path / 'p2d2_then_p1d4'
  shutil.copytree(two, to_one, ignore=shutil.ignore_patterns('events.out*', 'results.json'))
  shutil.rmtree(to_one / 'checkpoints' / '8')
  runs = [start(data, to_one, 1, 4), start(data, four, 2, 2)]
  logs = [wait(r) for r in runs]
  assert 'at step 6.' in logs[0][0] and 'at step 5.' in logs[1][0]

  ref = losses(two)
  assert sorted(ref) == list(range(1, 9)) and len(set(ref.values())) == 8
  assert len([f for f in os.listdir(two) if f.startswith('events.out')]) == 1   # process 0's
  agreement = {}
  for name, workdir, steps in [('1 x 1', one, range(1, 9)), ('1 x 4, then 2 x 2', four, range(1, 9)),
                               ('2 x 2, then 1 x 4', to_one, range(7, 9))]:
    got = losses(workdir)
    assert sorted(got) == list(steps), name
    agreement[name] = max(abs(got[s] - ref[s]) / ref[s] for s in got)
    assert agreement[name] < 1e-5, (name, got, ref)
  print('largest relative loss difference from 2 processes x 2 devices:', agreement)
  final = state(two, 8)
  for name, workdir in [('1 x 1', one), ('1 x 4, then 2 x 2', four), ('2 x 2, then 1 x 4', to_one)]:
    assert_same_state(state(workdir, 8), final, name)
  # Each unreadable file is met in each epoch, by one process or another, and counted once, in a
  # run resumed on another number of processes too (the tally restored: test_faults).
  for workdir in (two, one, four):
    got = results(workdir)
    assert got['bad_images'] == len(UNREADABLE), got
    assert sorted(n.split('/')[-1] for n in got['bad_image_names']) == list(UNREADABLE)


def test_sigterm_to_one_process_stops_all_at_the_same_step(tmp_path, data):
  """SIGTERM to process 1 of 2: both save the same step (agreed every SIGNAL_SYNC_EVERY steps)
  and exit 75."""
  procs, logs = start(data, tmp_path / 'w', 2, 2, num_epochs=50, checkpoint_every_steps=100)
  deadline = time.monotonic() + 300
  while 'step 3/' not in open(logs[1]).read():
    assert time.monotonic() < deadline and procs[1].poll() is None, open(logs[1]).read()[-3000:]
    time.sleep(0.2)
  procs[1].send_signal(signal.SIGTERM)
  texts = wait((procs, logs), code=cli.EXIT_PREEMPTED, timeout=300)
  steps = set()
  for text in texts:
    stop = [l for l in text.splitlines() if 'preempted at step' in l]
    assert len(stop) == 1 and 'Traceback' not in text, text[-3000:]
    steps.add(int(stop[0].split('preempted at step ')[1].split(':')[0]))
  assert len(steps) == 1, steps
  step = steps.pop()
  assert step >= 3 and step % loop.SIGNAL_SYNC_EVERY == 0
  assert checkpoints.manager(tmp_path / 'w', 3).latest_step() == step
