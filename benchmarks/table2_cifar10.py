r"""Table 2 at small scale: MoCo v2 and SimCLR pre-trained on CIFAR-10 with the same encoder,
batch and epochs, then kNN and linear top-1 on the test set, printed by `mocov2_jax.report`.

Reads the JPEG folders of ../shared/data/cifar10_jpg.tar.gz (extracted once to --data_root).
For each row of configs/table2_cifar10.py: pre-train (kNN at init and at the end), then linear
evaluation (configs/linear_eval_cifar10.py; --linear_fast for the cached-feature mode).

  python benchmarks/table2_cifar10.py --workdir=/tmp/table2_cifar10 --epochs=2 --linear_fast \
      --linear_lr=1.0 -- --config.model.width=8

Everything after `--` goes to both pre-training runs as config overrides. SimCLR's 10 warm-up
epochs (of 200) are scaled to the run: --warmup_frac (default 0.05) x epochs.
"""
import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS = ('mocov2', 'simclr')


def _extract():
  spec = importlib.util.spec_from_file_location(
      'cifar10_knn', os.path.join(REPO, 'benchmarks', 'cifar10_knn.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.extract, module.ARCHIVE


def run(cmd):
  print('$', ' '.join(cmd), flush=True)
  start = time.time()
  subprocess.run(cmd, check=True, cwd=REPO)
  return (time.time() - start) / 60


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--epochs', type=int, default=200)
  parser.add_argument('--warmup_frac', type=float, default=0.05)
  parser.add_argument('--linear_fast', action='store_true')
  parser.add_argument('--linear_lr', type=float, default=None,
                      help="linear layer's base lr (default: the protocol's 30)")
  parser.add_argument('--data_root', default='/tmp/mocov2_jax_data')
  parser.add_argument('--rows', default=','.join(ROWS))
  args, overrides = parser.parse_known_args()
  overrides = [o for o in overrides if o != '--']
  extract, archive = _extract()
  folder = extract(archive, args.data_root)
  minutes, linear_dirs = {}, []
  for row in args.rows.split(','):
    pre, lin = (os.path.join(args.workdir, f'{row}_{part}') for part in ('pretrain', 'linear'))
    cmd = [sys.executable, '-m', 'mocov2_jax.main',
           f'--config={REPO}/configs/table2_cifar10.py:{row}', f'--workdir={pre}',
           '--config.data.source=folder', f'--config.data.folder={folder}',
           f'--config.num_epochs={args.epochs}', f'--config.knn.every_epochs={args.epochs}']
    if row == 'simclr':
      cmd.append(f'--config.optim.warmup_epochs={args.warmup_frac * args.epochs}')
    minutes[f'{row} pre-training'] = run(cmd + overrides)
    cmd = [sys.executable, '-m', 'mocov2_jax.linear_eval',
           f'--config={REPO}/configs/linear_eval_cifar10.py', f'--config.pretrained={pre}',
           f'--workdir={lin}']
    if args.linear_fast:
      cmd.append('--config.fast=True')
    if args.linear_lr is not None:
      cmd.append(f'--config.optim.base_lr={args.linear_lr}')
    minutes[f'{row} linear'] = run(cmd)
    linear_dirs.append(lin)
  subprocess.run([sys.executable, '-m', 'mocov2_jax.report', *linear_dirs], check=True, cwd=REPO)
  print('\n| run | minutes |\n|---|---|')
  for k, v in minutes.items():
    print(f'| {k} | {v:.1f} |')
  with open(os.path.join(args.workdir, 'minutes.json'), 'w') as f:
    json.dump(minutes, f, indent=2)


if __name__ == '__main__':
  main()
