"""What the programs' command lines share: one absl style, multi-host start, quiet orbax logs, and
errors as one or two lines with an exit code (no traceback, no flag help).

Exit codes (README, 'Long runs'): 0 done; 2 bad input (command line, config, data, workdir in use,
no readable checkpoint: nothing was written or lost); 3 diverged; 74 the workdir could not be
written (disk full, permissions; earlier checkpoints intact); 75 preempted by SIGTERM and 130
interrupted by SIGINT (the current step was saved).
"""
import difflib
import logging as pylogging
import os
import sys
import threading

from absl import app, flags, logging
from etils import epath
from ml_collections import config_flags

from mocov2_jax import errors

EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_CANNOT_WRITE, EXIT_PREEMPTED, EXIT_INTERRUPTED = (
    2, 3, 74, 75, 130)
_EXIT_CODES = ((errors.BadInput, EXIT_BAD_INPUT), (errors.CannotWrite, EXIT_CANNOT_WRITE))


class Stop(Exception):
  """Ends a program with `code` after printing `message` (no traceback): raised by the loop on
  divergence and preemption."""

  def __init__(self, message, code):
    super().__init__(message)
    self.code = code


def _quiet_orbax(record):
  """Orbax logs every save at INFO; keep its warnings and our own progress lines, but not the
  tracebacks of a save the storage refused, from orbax's threads or asyncio's tasks (the
  program says that in one line)."""
  if record.exc_info and errors.storage_cause(record.exc_info[1]) is not None:
    return False
  return '/orbax/' not in record.pathname or record.levelno >= pylogging.WARNING


def _benign(exc):
  """TensorStore's callbacks into an asyncio loop orbax has closed, after a failed read or
  write: nothing is lost, and the program has said what failed in one line."""
  return isinstance(exc, RuntimeError) and str(exc) == 'Event loop is closed'


def _quiet_closed_loops():
  thread_hook, unraisable_hook = threading.excepthook, sys.unraisablehook
  threading.excepthook = lambda a: None if _benign(a.exc_value) else thread_hook(a)
  sys.unraisablehook = lambda u: None if _benign(u.exc_value) else unraisable_hook(u)


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


def fail(message, code=EXIT_BAD_INPUT, now=False):
  """Prints `program: message` and exits with `code`. `now`: without the interpreter's shutdown,
  where a failed read or write leaves TensorStore's event loop to print tracebacks at exit."""
  print(f'{epath.Path(sys.argv[0]).stem}: {message}', file=sys.stderr, flush=True)
  if now:
    logging.flush()
    sys.stdout.flush()
    os._exit(code)  # pylint: disable=protected-access
  sys.exit(code)


def checked(fn, *args, **kwargs):
  """fn(...) of a start-up check: bad input becomes one line and exit 2, before any long work
  (errors after the checks are bugs and keep their traceback)."""
  try:
    return fn(*args, **kwargs)
  except (ValueError, FileNotFoundError, ImportError) as e:
    fail(str(e), now=isinstance(e, errors.BadInput))


def _flat_fields(config, prefix=''):
  out = []
  for k, v in config.items():
    out.append(f'{prefix}{k}')
    if hasattr(v, 'items'):
      out += _flat_fields(v, f'{prefix}{k}.')
  return out


def _load_config(spec):
  """The ConfigDict of `path[:arg]`, as config_flags loads it."""
  from mocov2_jax import defaults  # pylint: disable=g-import-not-at-top
  path, *args = spec.split(':', 1)
  return defaults.sibling_config(path, epath.Path(path).stem).get_config(*args)


def check_config_overrides(default=None, argv=None):
  """Before absl parses the command line: the --config file exists and every --config.a.b
  override names one of its fields (else one line with the closest field names, exit 2)."""
  argv = sys.argv[1:] if argv is None else argv
  spec = default
  for arg in argv:   # a missing file would otherwise print a traceback
    if arg.startswith('--config='):
      spec = arg[len('--config='):]
      if not epath.Path(spec.split(':')[0]).is_file():
        fail(f'{arg}: no such file: pass a config file such as configs/mocov2.py.')
  overrides = [a[len('--config.'):].split('=')[0] for a in argv if a.startswith('--config.')]
  if not overrides:
    return
  if spec is None:
    fields = _flat_fields(_default_config())
  else:
    try:
      fields = _flat_fields(_load_config(spec))
    except Exception as e:  # pylint: disable=broad-except  (the config file's own error)
      fail(f'--config={spec}: {type(e).__name__}: {e}')
  for name in overrides:
    if name not in fields:
      close = difflib.get_close_matches(name, fields, n=2, cutoff=0.8)
      fail(f'--config.{name}: no such field in {spec or "the default config"}'
           + (f'; did you mean {" or ".join("--config." + c for c in close)}?' if close else
              '; see the config file for the fields.'))


def _default_config():
  from mocov2_jax import defaults  # pylint: disable=g-import-not-at-top
  return defaults.base_config()


def define_config(default, lock=True, help_text='Config file.'):
  """config_flags.DEFINE_config_file, after `check_config_overrides` (config_flags applies the
  overrides while defining the flag and would raise a traceback on a misspelt field)."""
  check_config_overrides(default)
  config_flags.DEFINE_config_file('config', default, help_text, lock_config=lock)


def _parse_flags(argv):
  """absl's parser; a bad value (`--config.batch_size=abc`, a missing required flag) is one
  line and exit 2, where absl would print its flag help and exit 1."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    fail(str(e).splitlines()[0])


def run(main):
  """app.run(main); a run stopped by the loop (preempted, diverged) or by an `errors` kind ends
  with its line and code."""
  _quiet_closed_loops()

  def stoppable(argv):
    try:
      return main(argv)
    except Stop as e:
      fail(str(e), e.code)
    except tuple(kind for kind, _ in _EXIT_CODES) as e:
      fail(str(e), next(code for kind, code in _EXIT_CODES if isinstance(e, kind)), now=True)
  app.run(stoppable, flags_parser=_parse_flags)
