r"""Does device augmentation learn as well as the host recipe? The same pre-training both ways.

Pre-trains MoCo v2 (configs/cifar10.py at a reduced width) on a CIFAR-10 subset of the shared JPEGs
(../shared/data/cifar10_jpg.tar.gz: `--per_class` train images per class, 200 test images per
class for the kNN check), with `data.augment_on=device` and `=host`, for each seed, and prints the
kNN top-1 gain (backbone, k = 200, the test subset) of each run over the same encoder at random
init, then each mode's mean and spread (sample standard deviation over the seeds).

  python benchmarks/augment_parity.py --workdir=/tmp/augment_parity            # 3 seeds x 2
  python benchmarks/augment_parity.py --workdir=/tmp/augment_parity --seeds=0 -- \
      --config.num_epochs=2                                                     # a smoke run

Everything after `--` goes to every run as config overrides. A finished run is not run again
(its results.json is read), so a stopped benchmark resumes.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

import cifar10_knn  # benchmarks/, the script's own folder

REPO, ARCHIVE = cifar10_knn.REPO, cifar10_knn.ARCHIVE
# The protocol: width 16, batch 256, K 4096, m 0.99, tau 0.1, constant lr 0.06, 15 epochs.
RECIPE = ['--config.model.width=16', '--config.batch_size=256', '--config.optim.base_lr=0.06',
          '--config.optim.schedule=constant', '--config.num_epochs=15',
          '--config.knn.every_epochs=15', '--config.num_summary_pairs=0',
          '--config.checkpoint_every_steps=200']


def subset(archive, root, per_class, test_per_class=200):
  """DIR/train/<class>/ with `per_class` images per class and DIR/test/ with `test_per_class`:
  the first in sorted order, copied from the archive (extracted once, as cifar10_knn does)."""
  folder = os.path.join(root, f'cifar10_{per_class}')
  if os.path.isdir(os.path.join(folder, 'test')):
    return folder
  full = cifar10_knn.extract(archive, root)
  tmp = folder + '.tmp'
  shutil.rmtree(tmp, ignore_errors=True)
  for split, n in (('train', per_class), ('test', test_per_class)):
    for label in sorted(os.listdir(os.path.join(full, split))):
      os.makedirs(os.path.join(tmp, split, label))
      for name in sorted(os.listdir(os.path.join(full, split, label)))[:n]:
        shutil.copy(os.path.join(full, split, label, name), os.path.join(tmp, split, label))
  os.rename(tmp, folder)
  return folder


def run(workdir, folder, augment_on, seed, overrides):
  results = os.path.join(workdir, 'results.json')
  if not os.path.exists(results) or 'knn_top1' not in json.load(open(results)):
    cmd = [sys.executable, '-m', 'mocov2_jax.main', f'--config={REPO}/configs/cifar10.py',
           f'--workdir={workdir}', '--config.data.source=folder', f'--config.data.folder={folder}',
           f'--config.data.augment_on={augment_on}', f'--config.seed={seed}', *RECIPE, *overrides]
    print('$', ' '.join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
  r = json.load(open(results))
  return r['knn_top1_init'], r['knn_top1']


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--data_root', default='/tmp/mocov2_jax_data')
  parser.add_argument('--archive', default=ARCHIVE)
  parser.add_argument('--per_class', type=int, default=950)
  parser.add_argument('--seeds', default='0,1,2')
  args, overrides = parser.parse_known_args()
  overrides = [o for o in overrides if o != '--']
  folder = subset(args.archive, args.data_root, args.per_class)
  seeds = [int(s) for s in args.seeds.split(',')]
  rows, gains = [], {'device': [], 'host': []}
  for seed in seeds:
    for mode in ('device', 'host'):
      tick = time.time()
      init, final = run(os.path.join(args.workdir, f'{mode}_seed{seed}'), folder, mode, seed,
                        overrides)
      gains[mode].append(final - init)
      rows.append(f'| {mode} | {seed} | {init:.2f} | {final:.2f} | {final - init:+.2f} | '
                  f'{(time.time() - tick) / 60:.1f} |')
      print(rows[-1], flush=True)
  print('\n| augmentation | seed | kNN at init | after | gain | minutes |')
  print('|---|---|---|---|---|---|')
  print('\n'.join(rows))
  spread = lambda g: statistics.stdev(g) if len(g) > 1 else float('nan')
  for mode, g in gains.items():
    print(f'{mode}: mean gain {statistics.mean(g):+.2f}, spread (sd over {len(g)} seeds) '
          f'{spread(g):.2f}')
  diff = statistics.mean(gains['device']) - statistics.mean(gains['host'])
  tolerance = max(spread(gains['device']), spread(gains['host']))
  verdict = 'within' if diff >= -tolerance else 'BELOW by more than'
  print(f'augment-parity: device - host mean gain {diff:+.2f} points, {verdict} the seeds\' '
        f'spread ({tolerance:.2f})')


if __name__ == '__main__':
  main()
