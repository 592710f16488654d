r"""Pre-trains MoCo v1/v2.

  python -m mocov2_jax.main --config=configs/mocov2.py --workdir=/tmp/mocov2 \
      [--config.batch_size=512 ...]

Starting again with the same --workdir resumes from its latest checkpoint.
"""
import logging as pylogging
import os

from absl import app, flags, logging
from ml_collections import config_flags

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               'configs', 'demo.py')
config_flags.DEFINE_config_file('config', _DEFAULT_CONFIG, 'Config file.', lock_config=True)
flags.DEFINE_string('workdir', '/tmp/mocov2_jax_demo', 'Checkpoints, logs, TensorBoard events.')
flags.DEFINE_string('coordinator', None, 'Multi-host: address:port of process 0 '
                    '(jax.distributed.initialize); see launch/README.md.')
flags.DEFINE_integer('num_processes', None, 'Multi-host: number of processes.')
flags.DEFINE_integer('process_id', None, 'Multi-host: this process.')


def _quiet_orbax(record):
  """Orbax logs every save at INFO; keep its warnings and our own progress lines."""
  return record.levelno >= pylogging.WARNING or '/orbax/' not in record.pathname


def main(argv):
  del argv
  logging.get_absl_handler().addFilter(_quiet_orbax)
  import jax  # pylint: disable=g-import-not-at-top
  if flags.FLAGS.coordinator or os.environ.get('MOCO_DISTRIBUTED'):
    jax.distributed.initialize(flags.FLAGS.coordinator, flags.FLAGS.num_processes,
                               flags.FLAGS.process_id)
  # Keep TensorFlow (input pipeline only) off the accelerators.
  try:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    tf.config.set_visible_devices([], 'GPU')
  except ImportError:
    pass
  from mocov2_jax import train  # pylint: disable=g-import-not-at-top
  logging.info('JAX %s: %d processes, %d devices (%s).', jax.__version__, jax.process_count(),
               jax.device_count(), jax.devices()[0].platform)
  try:
    steps_per_epoch = train.check(flags.FLAGS.config)
  except ValueError as e:  # bad input: say what to change, before any long work
    raise app.UsageError(str(e)) from e
  results = train.train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir, steps_per_epoch)
  if results.get('knn_top1') is not None:
    init = results.get('knn_top1_init')
    print(f'kNN top-1 (k={flags.FLAGS.config.knn.k}): {results["knn_top1"]:.2f}%'
          + (f'  (same encoder at random init: {init:.2f}%)' if init is not None else ''))


if __name__ == '__main__':
  app.run(main)
