r"""Pre-trains MoCo v1/v2 (or SimCLR, `config.method='simclr'`).

  python -m mocov2_jax.main --config=configs/mocov2.py --workdir=/tmp/mocov2 \
      [--config.batch_size=512 ...]

Starting again with the same --workdir resumes from its latest checkpoint.
"""
import ml_collections
from absl import flags
from etils import epath

from mocov2_jax import checkpoints, cli, loop, train
from mocov2_jax.data import pipeline

_DEFAULT_CONFIG = str(epath.Path(__file__).resolve().parent.parent / 'configs' / 'demo.py')


def data_of(config: ml_collections.ConfigDict) -> pipeline.Input:
  """The program's input: what it hands to its experiment."""
  return pipeline.Input(config.data, config.batch_size, config.seed)


def experiment(config: ml_collections.ConfigDict, workdir=None) -> train.Pretraining:
  """The pre-training of `config` on its data, after every start-up check."""
  return train.experiment(config, data_of(config), workdir)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir):
  """Pre-trains; resumes from the latest checkpoint in `workdir`. Returns the results."""
  _, results = loop.run(experiment(config, workdir), workdir)
  return results


def main(argv):
  del argv
  cli.start()
  config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
  cli.checked(checkpoints.check_workdir, workdir)
  exp = cli.checked(experiment, config, workdir)   # every check, before any long work
  _, results = loop.run(exp, workdir)
  if results.get('knn_top1') is not None:
    init = results.get('knn_top1_init')
    final = results['knn_top1']
    print(f'kNN top-1 (k={config.knn.k}, {config.knn.feature}): {final:.2f}%'
          + (f'  (same encoder at random init: {init:.2f}%, {final - init:+.1f} points)'
             if init is not None else ''))


if __name__ == '__main__':
  cli.define_config(_DEFAULT_CONFIG)
  flags.DEFINE_string('workdir', '/tmp/mocov2_jax_demo', 'Checkpoints, logs, TensorBoard events.')
  cli.define_distributed_flags()
  cli.run(main)
