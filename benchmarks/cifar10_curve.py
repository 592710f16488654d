r"""The reference CIFAR-10 demo's kNN curve, epoch by epoch, beside ours.

Pre-trains `configs/cifar10.py` (ResNet-18 at full width, CIFAR stem, batch 512, lr 0.06 cosine
over 200 epochs, wd 5e-4, K 4096, m 0.99, tau 0.1, 8 BN groups, asymmetric loss) on the shared
CIFAR-10 JPEGs and runs the kNN monitor (k 200, tau 0.1, test against all of train) after every
epoch on the reference's feature, the L2-normalised 128-d head output, and on the pooled backbone
features. `--epochs N` stops after N epochs of the 200-epoch schedule (the curve's first points).

  python benchmarks/cifar10_curve.py --workdir=/tmp/cifar10_curve --epochs=1 [-- --config.x=y]

Writes WORKDIR/curve.csv, curve.json and curve.png (the plot needs matplotlib: pip install -e
'.[bench]'); the last line printed is
`epoch E: kNN top-1 X (reference Y)`. Running it again with the same workdir resumes.

The reference curve is one run. Our epoch-1 point moves by several points between seeds
(`-- --config.seed=S`; docs/results.md), so compare early epochs over a few seeds, not one run.
"""
import argparse
import csv
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cifar10_knn import ARCHIVE, REPO, extract  # noqa: E402  pylint: disable=g-import-not-at-top

# The reference notebook's published per-epoch kNN top-1 (asymmetric loss), epoch -> %.
REFERENCE = {1: 31.98, 2: 33.52, 3: 34.71, 10: 48.03, 20: 61.38, 50: 73.3, 100: 78.06,
             200: 82.58}
STEPS_PER_EPOCH = 50_000 // 512


def plot(rows, path):
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError:
    print("matplotlib not installed: no plot (pip install -e '.[bench]')")
    return
  fig, ax = plt.subplots(figsize=(6, 4))
  ax.plot(list(REFERENCE), list(REFERENCE.values()), 'o--', color='gray', label='reference')
  ax.plot([r['epoch'] for r in rows], [r['head'] for r in rows], 'o-', label='ours (head)')
  ax.plot([r['epoch'] for r in rows], [r['backbone'] for r in rows], 's:',
          label='ours (backbone)')
  ax.set(xlabel='epoch', ylabel='kNN top-1 (%)', title='CIFAR-10 MoCo demo, kNN on test')
  ax.set_xscale('symlog', linthresh=10)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--epochs', type=int, default=200)
  parser.add_argument('--data_root', default='/tmp/mocov2_jax_data')
  parser.add_argument('--archive', default=ARCHIVE)
  args, overrides = parser.parse_known_args()
  folder = extract(args.archive, args.data_root)
  cmd = [sys.executable, '-m', 'mocov2_jax.main', f'--config={REPO}/configs/cifar10.py',
         f'--workdir={args.workdir}', '--config.data.source=folder',
         f'--config.data.folder={folder}', '--config.knn.every_epochs=1',
         '--config.knn.feature=head', f'--config.num_train_steps={args.epochs * STEPS_PER_EPOCH}',
         *[o for o in overrides if o != '--']]
  print('$', ' '.join(cmd), flush=True)
  subprocess.run(cmd, check=True, cwd=REPO)
  with open(os.path.join(args.workdir, 'results.json')) as f:
    history = json.load(f)['knn_history']
  rows = [dict(epoch=round(h['epoch']), head=h['head'], backbone=h['backbone'],
               reference=REFERENCE.get(round(h['epoch'])), seconds=h['train_seconds'])
          for h in history]
  with open(os.path.join(args.workdir, 'curve.csv'), 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  with open(os.path.join(args.workdir, 'curve.json'), 'w') as f:
    json.dump(dict(reference=REFERENCE, ours=rows), f, indent=2)
  plot(rows, os.path.join(args.workdir, 'curve.png'))
  fmt = lambda v, spec: 'n/a' if v is None else format(v, spec)
  print('\n| epoch | kNN head (ours) | kNN backbone (ours) | reference | wall s (epoch) |')
  print('|---|---|---|---|---|')
  for r in rows:
    print(f"| {r['epoch']} | {r['head']:.2f} | {r['backbone']:.2f} | "
          f"{fmt(r['reference'], '.2f')} | {r['seconds']:.0f} |")
  last = rows[-1]
  print(f"epoch {last['epoch']}: kNN top-1 {last['head']:.2f} "
        f"(reference {fmt(last['reference'], '.2f')})")


if __name__ == '__main__':
  main()
