r"""Pre-trains MoCo v1/v2 (or SimCLR, `config.method='simclr'`).

  python -m mocov2_jax.main --config=configs/mocov2.py --workdir=/tmp/mocov2 \
      [--config.batch_size=512 ...]

Starting again with the same --workdir resumes from its latest checkpoint.
"""
from absl import flags
from etils import epath

from mocov2_jax import checkpoints, cli

_DEFAULT_CONFIG = str(epath.Path(__file__).resolve().parent.parent / 'configs' / 'demo.py')
cli.define_config(_DEFAULT_CONFIG)
flags.DEFINE_string('workdir', '/tmp/mocov2_jax_demo', 'Checkpoints, logs, TensorBoard events.')
cli.define_distributed_flags()
FLAGS = flags.FLAGS


def main(argv):
  del argv
  cli.start()
  from mocov2_jax import loop, train  # pylint: disable=g-import-not-at-top  (after cli.start)
  config, workdir = FLAGS.config, FLAGS.workdir
  cli.checked(checkpoints.check_workdir, workdir)
  exp = cli.checked(train.experiment, config, workdir)   # every check, before any long work
  _, results = loop.run(exp, workdir)
  if results.get('knn_top1') is not None:
    init = results.get('knn_top1_init')
    final = results['knn_top1']
    print(f'kNN top-1 (k={config.knn.k}, {config.knn.feature}): {final:.2f}%'
          + (f'  (same encoder at random init: {init:.2f}%, {final - init:+.1f} points)'
             if init is not None else ''))


if __name__ == '__main__':
  cli.run(main)
