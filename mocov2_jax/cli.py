"""What the programs' command lines share: one absl style, multi-host start, quiet orbax logs, and
errors as one or two lines with an exit code (no traceback, no flag help)."""
import logging as pylogging
import os
import sys

from absl import app, flags, logging
from etils import epath

EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_PREEMPTED, EXIT_INTERRUPTED = 2, 3, 75, 130


class Stop(Exception):
  """Ends a program with `code` after printing `message` (no traceback): raised by the loop on
  divergence and preemption."""

  def __init__(self, message, code):
    super().__init__(message)
    self.code = code


def _quiet_orbax(record):
  """Orbax logs every save at INFO; keep its warnings and our own progress lines."""
  return record.levelno >= pylogging.WARNING or '/orbax/' not in record.pathname


def define_distributed_flags():
  flags.DEFINE_string('coordinator', None, 'Multi-host: address:port of process 0 '
                      '(jax.distributed.initialize); see launch/README.md.')
  flags.DEFINE_integer('num_processes', None, 'Multi-host: number of processes.')
  flags.DEFINE_integer('process_id', None, 'Multi-host: this process.')


def start():
  """Logging, the multi-host start (flags or MOCO_DISTRIBUTED=1), TensorFlow off the GPUs."""
  logging.get_absl_handler().addFilter(_quiet_orbax)
  import jax  # pylint: disable=g-import-not-at-top
  fv = flags.FLAGS
  if ('coordinator' in fv and fv.coordinator) or os.environ.get('MOCO_DISTRIBUTED'):
    jax.distributed.initialize(fv.coordinator, fv.num_processes, fv.process_id)
  try:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    tf.config.set_visible_devices([], 'GPU')
  except ImportError:
    pass
  logging.info('JAX %s: %d processes, %d devices (%s).', jax.__version__, jax.process_count(),
               jax.device_count(), jax.devices()[0].platform)


def fail(message, code=EXIT_BAD_INPUT):
  print(f'{epath.Path(sys.argv[0]).stem}: {message}', file=sys.stderr, flush=True)
  sys.exit(code)


def checked(fn, *args, **kwargs):
  """fn(...) of a start-up check: bad input becomes one line and exit 2, before any long work
  (errors after the checks are bugs and keep their traceback)."""
  try:
    return fn(*args, **kwargs)
  except (ValueError, FileNotFoundError, ImportError) as e:
    fail(str(e))


def run(main):
  """app.run(main); a run stopped by the loop (preempted, diverged) ends with its line and code."""
  for arg in sys.argv[1:]:   # before absl parses it (a missing file would print a traceback)
    if arg.startswith('--config=') and not epath.Path(arg[9:].split(':')[0]).is_file():
      fail(f'{arg}: no such file: pass a config file such as configs/mocov2.py.')

  def stoppable(argv):
    try:
      return main(argv)
    except Stop as e:
      fail(str(e), e.code)
  app.run(stoppable)
