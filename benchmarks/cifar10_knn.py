r"""Does it learn on real data? Pre-trains on CIFAR-10 `train` and reports kNN top-1 on `test`.

Reads the JPEG folders of ../shared/data/cifar10_jpg.tar.gz (extracted once to --data_root), runs
the program with configs/cifar10.py on an image folder, and prints kNN top-1 (k = 200, tau = 0.1,
backbone features) of the pre-trained encoder against the same encoder at random init.

  python benchmarks/cifar10_knn.py --workdir=/tmp/cifar10_knn -- --config.num_epochs=20 \
      --config.model.width=16

Everything after `--` goes to `python -m mocov2_jax.main` as config overrides.
"""
import argparse
import json
import os
import subprocess
import sys
import tarfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCHIVE = os.path.join(REPO, '..', 'shared', 'data', 'cifar10_jpg.tar.gz')


def extract(archive, root):
  folder = os.path.join(root, 'cifar10')
  if not os.path.isdir(os.path.join(folder, 'test')):
    if not os.path.exists(archive):
      sys.exit(f'{archive} not found: this benchmark needs the shared CIFAR-10 JPEG archive.')
    os.makedirs(root, exist_ok=True)
    with tarfile.open(archive) as tar:
      tar.extractall(root, filter='data')
  return folder


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--data_root', default='/tmp/mocov2_jax_data')
  parser.add_argument('--archive', default=ARCHIVE)
  args, overrides = parser.parse_known_args()
  overrides = [o for o in overrides if o != '--']
  folder = extract(args.archive, args.data_root)
  cmd = [sys.executable, '-m', 'mocov2_jax.main', f'--config={REPO}/configs/cifar10.py',
         f'--workdir={args.workdir}', '--config.data.source=folder',
         f'--config.data.folder={folder}', *overrides]
  print('$', ' '.join(cmd), flush=True)
  start = time.time()
  subprocess.run(cmd, check=True, cwd=REPO)
  results = json.load(open(os.path.join(args.workdir, 'results.json')))
  print('\n| encoder | epochs | kNN top-1 (CIFAR-10 test) |\n|---|---|---|')
  if results.get('knn_top1_init') is not None:
    print(f"| random init | 0 | {results['knn_top1_init']:.2f} |")
  print(f"| MoCo pre-trained | {results['epochs']:.1f} | {results['knn_top1']:.2f} |")
  print(f'\nwall time {(time.time() - start) / 60:.1f} min')


if __name__ == '__main__':
  main()
