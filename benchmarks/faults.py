r"""Ordinary faults, tried as a user meets them: what each ends in (exit code, the last line of
stderr, tracebacks, what is left in the workdir). Prints one Markdown table (docs/results.md).

  python benchmarks/faults.py [--workdir=/tmp/faults]

Small runs of configs/demo.py (width 4, 16 px, 8 steps); about 10 minutes on 2 CPU cores. The
full-disk row needs root (a 8 MiB tmpfs); without it that row says so. tests/test_faults.py
holds each row as a test.
"""
import argparse
import os
import shutil
import signal
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--config.batch_size=32', '--config.num_epochs=2', '--config.model.width=4',
        '--config.moco.queue_size=128', '--config.moco.bn_groups=4',
        '--config.data.num_train=128', '--config.data.num_eval=64', '--config.data.image_size=16',
        '--config.knn.every_epochs=0', '--config.num_summary_pairs=0',
        '--config.log_every_steps=1', '--config.checkpoint_every_steps=2']


def program(name, *args, env=None):
  started = time.time()
  r = subprocess.run([sys.executable, '-m', f'mocov2_jax.{name}', *map(str, args)], cwd=REPO,
                     capture_output=True, text=True, env=env, timeout=1200)
  return r.returncode, r.stderr, time.time() - started


def main_run(workdir, *flags):
  return program('main', f'--config={REPO}/configs/demo.py', f'--workdir={workdir}', *TINY,
                 *flags)


def cut(path):
  os.truncate(path, os.path.getsize(path) // 2)


def largest_file(folder):
  files = [os.path.join(r, n) for r, _, ns in os.walk(folder) for n in ns]
  return max(files, key=os.path.getsize)


def fresh(base, trained, name):
  workdir = os.path.join(base, name)
  shutil.rmtree(workdir, ignore_errors=True)
  shutil.copytree(trained, workdir)
  return workdir


def row(fault, result, left='', show=None):
  """A table row: exit code, tracebacks, time and the last line of stderr (or, with `show`,
  the last line containing it, past the log's prefix)."""
  code, stderr, seconds = result
  lines = [l for l in stderr.strip().splitlines() if l.strip() and (show is None or show in l)]
  last = lines[-1] if lines else ''
  if show is not None and '] ' in last:
    last = last.split('] ', 1)[1]
  if len(last) > 160:
    last = last[:157] + '...'
  tracebacks = stderr.count('Traceback (most recent call last)')
  return (f'| {fault} | {code} | {tracebacks} | {seconds:.0f} s | `{last}`'
          + (f' {left}' if left else '') + ' |')


def _last(stderr, text):
  lines = [l for l in stderr.splitlines() if text in l]
  return (lines[-1].split('] ', 1)[-1] if lines else '')[:80]


def image_folder(root, link_loop=False, text_as_jpg=None):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  for split in ('train', 'test'):
    for c, colour in (('a', (200, 0, 0)), ('b', (0, 0, 200))):
      d = os.path.join(root, split, c)
      os.makedirs(d, exist_ok=True)
      for i in range(20):
        Image.new('RGB', (16, 16), colour).save(os.path.join(d, f'{i:02d}.jpg'))
  if link_loop:
    os.symlink('..', os.path.join(root, 'train', 'a', 'loop'))
  if text_as_jpg:
    with open(os.path.join(root, 'train', 'a', text_as_jpg), 'w') as f:
      f.write('not an image')


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', default='/tmp/mocov2_faults')
  base = parser.parse_args().workdir
  shutil.rmtree(base, ignore_errors=True)
  os.makedirs(base)
  trained = os.path.join(base, 'trained')
  assert main_run(trained)[0] == 0, 'the reference run failed'
  rows = []

  w = fresh(base, trained, 'cut_data')
  cut(largest_file(os.path.join(w, 'checkpoints', '8')))
  r = main_run(w, '--config.num_epochs=3')
  rows.append(row('newest checkpoint damaged (largest data file cut in half)', r,
                  f'(exit {r[0]}, resumed; left: '
                  f'{sorted(os.listdir(os.path.join(w, "checkpoints")))})', show='cannot be read'))

  w = fresh(base, trained, 'cut_metadata')
  cut(os.path.join(w, 'checkpoints', '8', 'default', '_METADATA'))
  r = main_run(w, '--config.num_epochs=3')
  rows.append(row("newest checkpoint's `_METADATA` cut in half", r, f'(exit {r[0]}, resumed)',
                  show='cannot be read'))

  w = fresh(base, trained, 'all_cut')
  for s in ('4', '6', '8'):
    cut(largest_file(os.path.join(w, 'checkpoints', s)))
  rows.append(row('every checkpoint damaged', main_run(w, '--config.num_epochs=3')))

  disk = os.path.join(base, 'disk')
  os.makedirs(disk)
  if subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=8m', 'tmpfs', disk],
                    capture_output=True).returncode == 0:
    try:
      w = os.path.join(disk, 'w')
      shutil.copytree(trained, w, ignore=shutil.ignore_patterns('events.*'))
      for s in ('4', '8'):
        shutil.rmtree(os.path.join(w, 'checkpoints', s))
      filler = os.path.join(disk, 'filler')
      with open(filler, 'wb') as f:
        f.write(b'\0' * (shutil.disk_usage(disk).free - 64 * 1024))
      r = main_run(w, '--config.num_epochs=3')
      os.remove(filler)
      again = main_run(w, '--config.num_epochs=3')
      rows.append(row('disk full during a save (8 MiB tmpfs)', r,
                      f'(then, with room: exit {again[0]})'))
    finally:
      subprocess.run(['umount', '-l', disk], check=False)
  else:
    rows.append('| disk full during a save | - | - | - | not measured: no tmpfs mount here |')

  w = os.path.join(base, 'second')
  first = subprocess.Popen([sys.executable, '-m', 'mocov2_jax.main',
                            f'--config={REPO}/configs/demo.py', f'--workdir={w}', *TINY,
                            '--config.num_epochs=100'], cwd=REPO, stderr=subprocess.PIPE,
                           text=True)
  for line in first.stderr:
    if 'step 1/' in line:
      break
  r = main_run(w)
  first.send_signal(signal.SIGTERM)
  first_code = first.wait(timeout=600)
  rows.append(row('a second run started on the same workdir', r,
                  f'(the first run went on; SIGTERM then: exit {first_code})'))

  for flags in (['--config.optim.base_lr=-0.1'], ['--config.moco.momentum=1.5'],
                ['--config.moco.temperature=0'], ['--config.foo=1'],
                ['--config.optim.base_lrr=0.1'], ['--config.batch_size=abc']):
    w = os.path.join(base, 'config')
    r = main_run(w, *flags)
    rows.append(row(f'`{" ".join(flags)}`', r, '(workdir written)' if os.path.exists(w) else ''))

  folder = os.path.join(base, 'loop_images')
  image_folder(folder, link_loop=True)
  w = os.path.join(base, 'loop')
  r = main_run(w, '--config.data.source=folder', f'--config.data.folder={folder}',
               '--config.data.num_train=0', '--config.data.num_eval=0', '--config.batch_size=8',
               '--config.moco.queue_size=32', '--config.moco.bn_groups=2',
               '--config.num_train_steps=2')
  rows.append(row('a symlink `train/a/loop -> ..` in an image folder (40 images)', r,
                  show='Skipped the folder'))

  for name in ('aaa.jpg', 'zzz.jpg'):
    folder = os.path.join(base, f'text_{name}')
    image_folder(folder, text_as_jpg=name)
    r = main_run(os.path.join(base, f'text_{name}_run'), '--config.data.source=folder',
                 f'--config.data.folder={folder}', '--config.data.num_train=0',
                 '--config.data.num_eval=0', '--config.batch_size=8',
                 '--config.moco.queue_size=32', '--config.moco.bn_groups=2')
    rows.append(row(f'a text file named `{name}` in a folder (2 epochs)', r,
                    f'(exit {r[0]}; last log: `{_last(r[1], "bad_images=")}`)',
                    show='Cannot decode'))

  w = os.path.join(base, 'diverge')   # the demo at its own size (the tests' size does not)
  r = program('main', f'--config={REPO}/configs/demo.py', f'--workdir={w}',
              '--config.optim.base_lr=1e5', '--config.checkpoint_every_steps=4',
              '--config.num_train_steps=32', '--config.knn.every_epochs=0')
  rows.append(row('divergence, demo, `base_lr=1e5`, checkpoints every 4 steps', r,
                  f'(checkpoints left: {sorted(os.listdir(os.path.join(w, "checkpoints")))})'
                  if os.path.isdir(os.path.join(w, 'checkpoints')) else '(no checkpoint)'))

  w = fresh(base, trained, 'linear_cut')
  cut(largest_file(os.path.join(w, 'checkpoints', '8')))
  r = program('linear_eval', f'--config={REPO}/configs/linear_eval_cifar10.py',
              f'--config.pretrained={w}', '--config.fast=True',
              f'--workdir={os.path.join(base, "linear")}')
  rows.append(row('linear eval on a damaged checkpoint', r))

  pth = os.path.join(base, 'w.pth')
  with open(pth, 'wb') as f:
    f.write(b'PK\x03\x04' + b'\0' * 100)   # the start of a zip, cut short
  r = program('convert', '--from=torchvision', pth, f'--out={os.path.join(base, "imported")}')
  rows.append(row('`convert --from=torchvision` on a truncated `.pth`', r))

  print('| fault | exit | tracebacks | time | last line of stderr |')
  print('|---|---|---|---|---|')
  print('\n'.join(rows))


if __name__ == '__main__':
  main()
