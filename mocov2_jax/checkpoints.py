"""The workdir of every program, on etils.epath (local folders, gs://, any fsspec URL):

  WORKDIR/config.json       the resolved config of the run (earlier ones kept as config.N.json)
  WORKDIR/checkpoints/<s>   orbax checkpoints of the train state at step s
  WORKDIR/results.json      what the run measured

This is the one module that makes orbax CheckpointManagers and restores checkpoints.
"""
import fcntl
import json
import os
import socket
import threading
import time

import jax
from absl import logging
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import traverse_util

from mocov2_jax import errors


# Replicated arrays are written whole by their first replica, in every save of the process.
# Orbax's replica-parallel saving (its default off GPUs) slices each one across its replicas,
# which compiles a slicing program per leaf shape at every run's first save: in a tiny run on 8
# CPU devices the step after the first save took 5.4-5.7 s with it, 1.0-1.1 s without (two runs
# each); our state (a few hundred MB at most) gains nothing from being shared out.
def _write_replicated_arrays_once():
  silence = lambda record: False       # orbax warns of every override it is asked for
  logging.get_absl_logger().addFilter(silence)
  try:
    ocp.type_handlers.register_type_handler(
        jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True)
  finally:
    logging.get_absl_logger().removeFilter(silence)


_write_replicated_arrays_once()


def path(workdir) -> epath.Path:
  """Local folders made absolute (orbax wants that); URLs such as gs://bucket/run as they are."""
  p = epath.Path(workdir)
  return p if '://' in str(workdir) else epath.Path(p.resolve())


def write_config(config, workdir):
  (path(workdir) / 'config.json').write_text(config.to_json_best_effort(indent=2, sort_keys=True))


def read_config(workdir):
  """The config.json a run wrote into `workdir`, or None."""
  p = path(workdir) / 'config.json'
  return ml_collections.ConfigDict(json.loads(p.read_text())) if p.exists() else None


def keep_previous_config(workdir):
  """Moves config.json aside to the first free config.N.json (a resumed run with a new config)."""
  p = path(workdir) / 'config.json'
  n = 1
  while (path(workdir) / f'config.{n}.json').exists():
    n += 1
  (path(workdir) / f'config.{n}.json').write_text(p.read_text())


def read_results(workdir) -> dict:
  p = path(workdir) / 'results.json'
  return json.loads(p.read_text()) if p.exists() else {}


def write_results(workdir, results):
  (path(workdir) / 'results.json').write_text(json.dumps(results, indent=2))


def manager(workdir, keep: int) -> ocp.CheckpointManager:
  """Partial steps a killed run left behind (<step>.orbax-checkpoint-tmp) go at its first save."""
  return ocp.CheckpointManager(
      path(workdir) / 'checkpoints',
      options=ocp.CheckpointManagerOptions(max_to_keep=keep, cleanup_tmp_directories=True))


def save(mgr, state, *, force=False):
  """Saves `state` at its step (unless saved already) and waits until it is on disk. A save the
  storage refuses (disk full, quota, permissions) is errors.CannotWrite, naming the cause."""
  step = int(state.step)
  try:
    if mgr.latest_step() != step:
      mgr.save(step, args=ocp.args.StandardSave(state), force=force)
    mgr.wait_until_finished()
  except Exception as e:  # pylint: disable=broad-except  (orbax wraps the OS's error)
    cause = errors.storage_cause(e)
    if cause is None:
      raise
    where = epath.Path(mgr.directory) / str(step)
    if jax.process_index() == 0:
      _remove_partial(mgr, step)
    kept = [s for s in mgr.all_steps() if s != step]
    raise errors.CannotWrite(
        f'cannot save checkpoint {where}: {cause.strerror}. '
        + (f'The earlier checkpoints are intact (latest: step {max(kept)}); ' if kept else
           'No earlier checkpoint exists; ')
        + 'free space or fix the permissions, then run the same command to resume.') from e


def _remove_partial(mgr, step, limit_s=60.0, quiet_s=1.0):
  """Gives back the room of a failed save's partial step (never a checkpoint). The first error
  surfaces while orbax's other writer threads may still run; they would recreate the folder
  (or fail on its removal), so they are waited for first. TensorStore's own writes still in
  flight may recreate it too: it is removed until it stays gone for `quiet_s`. Whatever is left
  goes at the next run's first save (`manager`)."""
  deadline = time.monotonic() + limit_s
  for thread in threading.enumerate():
    if type(thread).__module__.startswith('orbax.') and thread is not threading.current_thread():
      threading.Thread.join(thread, max(0.0, deadline - time.monotonic()))   # (orbax's re-raises)
  pattern, quiet_since = f'{step}.orbax-checkpoint-tmp*', None
  while time.monotonic() < deadline:
    partials = list(epath.Path(mgr.directory).glob(pattern))
    for partial in partials:
      try:
        partial.rmtree(missing_ok=True)
      except OSError:   # a file appeared while removing: the next round takes it
        pass
    if partials:
      quiet_since = None
    elif quiet_since is None:
      quiet_since = time.monotonic()
    elif time.monotonic() - quiet_since >= quiet_s:
      return
    time.sleep(0.1)


UNREADABLE = '.unreadable'   # suffix of a checkpoint moved aside because it failed to restore


def _set_aside(step_dir) -> epath.Path:
  """Renames a step that failed to restore to <step>.unreadable (never deletes it)."""
  step_dir = epath.Path(step_dir)
  target, n = step_dir.parent / f'{step_dir.name}{UNREADABLE}', 1
  while target.exists():
    target, n = step_dir.parent / f'{step_dir.name}{UNREADABLE}.{n}', n + 1
  step_dir.rename(target)
  return target


def _first_line(e):
  text = str(e).strip().split(' See full TensorStore details')[0].splitlines()
  return f'{type(e).__name__}: {text[0] if text else ""}'[:300]


def _all_processes(ok: bool) -> bool:
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(np.min(multihost_utils.process_allgather(np.int32(ok))))


def restore_newest(mgr, like):
  """`like` (a train state of the right shapes and shardings) restored from the newest step that
  restores, or None when there is none. A step that fails to read is named in the log and set
  aside as <step>.unreadable; if none is left, errors.BadInput (never a fresh start over them)."""
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
  ckdir = epath.Path(mgr.directory)
  for step in sorted(mgr.all_steps(), reverse=True):
    try:
      state, error = mgr.restore(step, args=ocp.args.StandardRestore(abstract)), None
    except Exception as e:  # pylint: disable=broad-except  (any failure to read is the step's)
      state, error = None, e
    if _all_processes(error is None):
      return state
    if jax.process_index() == 0:
      aside = _set_aside(ckdir / str(step))
      logging.warning('Checkpoint %s cannot be read (%s): moved to %s; trying the one before.',
                      ckdir / str(step), _first_line(error) if error else 'on another process',
                      aside.name)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices(f'set aside {step}')
    mgr.reload()
  unreadable = sorted(p.name for p in ckdir.iterdir() if UNREADABLE in p.name) if (
      ckdir.is_dir()) else []
  if unreadable:
    raise errors.BadInput(
        f'no checkpoint in {ckdir} can be read ({", ".join(unreadable)} failed to restore and '
        'are kept there): start afresh with a new --workdir, or move them out of checkpoints/ '
        'to start this one from step 0.')
  return None


def find(checkpoint) -> tuple[epath.Path, epath.Path]:
  """(step dir, workdir) of a workdir (its latest step) or of one WORKDIR/checkpoints/<step>."""
  p = path(checkpoint)
  if not p.is_dir():
    raise FileNotFoundError(f'{p} does not exist: pass a pre-training workdir or one of its '
                            'checkpoints/<step> folders')
  if p.name.isdigit() and p.parent.name == 'checkpoints':
    return p, p.parent.parent
  ckdir = p / 'checkpoints'
  steps = [int(d.name) for d in ckdir.iterdir() if d.name.isdigit()] if ckdir.is_dir() else []
  if not steps:
    raise FileNotFoundError(f'no checkpoint in {ckdir}: has pre-training saved one yet?')
  return ckdir / str(max(steps)), p


def _item(step_dir) -> epath.Path:
  return epath.Path(step_dir) / 'default'   # CheckpointManager's name for a single item


def saved_tree(step_dir):
  """The saved train state's tree as shape-only metadata (reads no arrays)."""
  handler = ocp.PyTreeCheckpointHandler()
  try:
    return handler.metadata(_item(step_dir)).tree
  except Exception as e:  # pylint: disable=broad-except  (a damaged _METADATA: JSON, OS errors)
    raise errors.BadInput(f'{step_dir} is not a readable checkpoint ({_first_line(e)}): pass '
                          'an earlier step (WORKDIR/checkpoints/<step>).') from e
  finally:
    handler.close()


def restore_raw(step_dir) -> dict:
  """The saved train state as nested dicts of NumPy arrays: no model, no target tree and no
  devices (the saving run's device layout need not exist here)."""
  tree = saved_tree(step_dir)
  handler = ocp.PyTreeCheckpointHandler()
  try:
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return handler.restore(_item(step_dir), args=ocp.args.PyTreeRestore(restore_args=args))
  except Exception as e:  # pylint: disable=broad-except  (TensorStore: damaged or missing data)
    raise errors.BadInput(f'{step_dir} is not a readable checkpoint ({_first_line(e)}): pass '
                          'an earlier step (WORKDIR/checkpoints/<step>).') from e
  finally:
    handler.close()


def config_changes(workdir, config) -> dict:
  """{dotted field: (saved, new)} between the workdir's config.json and `config` ({} if none)."""
  p = path(workdir) / 'config.json'
  if not p.exists():
    return {}
  old = traverse_util.flatten_dict(json.loads(p.read_text()), sep='.')
  new = traverse_util.flatten_dict(json.loads(config.to_json_best_effort()), sep='.')
  return {k: (old.get(k), new.get(k)) for k in sorted(old.keys() | new.keys())
          if old.get(k) != new.get(k)}


def check_resume(workdir, config, fixed):
  """Before a run resumes `workdir`: refuses a change of a field that shapes the state or the
  method (`fixed`: dotted names or prefixes such as 'model.'), returns the other changes."""
  ckdir = path(workdir) / 'checkpoints'
  if not (ckdir.is_dir() and any(d.name.isdigit() for d in ckdir.iterdir())):
    return {}
  changes = config_changes(workdir, config)
  refused = {k: v for k, v in changes.items()
             if any(k == f or (f.endswith('.') and k.startswith(f)) for f in fixed)}
  if refused:
    raise ValueError(f'{workdir} holds a run with another ' + ', '.join(
        f'{k} (saved {old!r}, now {new!r})' for k, (old, new) in refused.items())
        + ': its checkpoints cannot continue with this config: use a new --workdir, or the '
        'saved values.')
  return changes


def check_workdir(workdir):
  """A clear error, before anything is written, for a workdir that is a file or not writable."""
  p = path(workdir)
  if '://' in str(workdir):
    return   # remote: the first write tells
  if p.exists() and not p.is_dir():
    raise ValueError(f'--workdir={workdir} is a file, not a folder: pass a folder.')
  existing = p
  while not existing.exists():
    existing = existing.parent
  if not os.access(existing, os.W_OK):
    raise ValueError(f'--workdir={workdir}: {existing} is not writable: pass a folder you can '
                     'write to.')


class WorkdirLock:
  """One run per workdir: WORKDIR/lock names the run that holds it (host, pid, start time).

  Local folders use flock, which the kernel releases when the holder dies, however it dies: a
  lock file still naming a holder then is taken over with a warning. Remote workdirs (gs://)
  have no flock: the file alone tells, and a holder on this host that is gone is taken over.
  """

  def __init__(self, workdir):
    self.workdir, self.file = path(workdir), path(workdir) / 'lock'
    self._fd, self._remote = None, False

  def _me(self):
    return dict(host=socket.gethostname(), pid=os.getpid(),
                started=time.strftime('%Y-%m-%d %H:%M:%S %Z'))

  @staticmethod
  def _describe(holder):
    try:
      h = json.loads(holder)
      return f'host {h["host"]}, pid {h["pid"]}, started {h["started"]}'
    except (ValueError, KeyError, TypeError):
      return 'unknown holder'

  def _busy(self, holder):
    return errors.BadInput(
        f'{self.workdir} is in use by another run ({self._describe(holder)}): wait for it to '
        f'end or stop it, or pass another --workdir. (A run that is gone leaves {self.file}; '
        'delete it only if no run uses this workdir.)')

  def acquire(self):
    self.workdir.mkdir(parents=True, exist_ok=True)
    if '://' in str(self.workdir):
      return self._acquire_remote()
    fd = os.open(self.file, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      holder = os.pread(fd, 4096, 0).decode(errors='replace')
      os.close(fd)
      raise self._busy(holder) from None
    previous = os.pread(fd, 4096, 0).decode(errors='replace').strip()
    if previous:
      logging.warning('Took over %s from a run that is no longer running (%s).', self.file,
                      self._describe(previous))
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(self._me()).encode(), 0)
    self._fd = fd

  def _acquire_remote(self):
    if self.file.exists():
      holder = self.file.read_text()
      try:
        h = json.loads(holder)
        gone = h['host'] == socket.gethostname() and not _alive(int(h['pid']))
      except (ValueError, KeyError, TypeError):
        gone = False
      if not gone:
        raise self._busy(holder)
      logging.warning('Took over %s from a run that is no longer running (%s).', self.file,
                      self._describe(holder))
    self.file.write_text(json.dumps(self._me()))
    self._remote = True

  def release(self):
    if self._fd is not None:
      os.ftruncate(self._fd, 0)   # kept, empty: unlinking it would race with a new run
      os.close(self._fd)          # closing releases the flock
      self._fd = None
    elif self._remote:
      self.file.unlink(missing_ok=True)
      self._remote = False


def _alive(pid):
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True
