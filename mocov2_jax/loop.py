"""The one training loop of every program (pre-training, linear evaluation in both modes).

A program supplies an `Experiment`: its state, its jitted step, its input and its evaluators.
The loop owns the rest: the workdir (config, checkpoints, results), resume, clu periodic actions
(progress with rate and ETA, profiling), evaluation on a schedule, metric writing, divergence
checks, preemption (SIGTERM / SIGINT) and the final save.

Faults (README, "Long runs"; exit codes in `cli`): a workdir in use or with no readable
checkpoint is refused before anything is written; a checkpoint that fails to restore is set aside
and the one before it is used; a save the storage refuses is errors.CannotWrite; divergence stops
without saving the diverged state; SIGTERM / SIGINT save the current step first.
"""
import collections
import contextlib
import signal
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from clu import metric_writers, periodic_actions
from jax.experimental import multihost_utils

from mocov2_jax import checkpoints, errors
from mocov2_jax.data import bad_images
from mocov2_jax.cli import EXIT_DIVERGED, EXIT_INTERRUPTED, EXIT_PREEMPTED, Stop

_EXIT_CODES = {signal.SIGTERM: EXIT_PREEMPTED, signal.SIGINT: EXIT_INTERRUPTED}
SIGNAL_SYNC_EVERY = 10   # steps between the hosts' agreement on a stop (several processes)


class Experiment:
  """What a program gives the loop: `config` (num_epochs, num_train_steps, log_every_steps,
  checkpoint_every_steps, keep_checkpoints, profile_steps), the steps per epoch, and `bad` (a
  BadImages its input counts into, if it reads image files)."""
  bad = None

  def __init__(self, config, steps_per_epoch: int):
    self.config, self.steps_per_epoch = config, steps_per_epoch
    self.total_steps = steps_per_epoch * config.num_epochs
    if config.num_train_steps > 0:   # stops early; the schedule keeps its epochs
      self.total_steps = min(self.total_steps, config.num_train_steps)

  def init_state(self):
    """The initial train state, placed on the devices."""
    raise NotImplementedError

  def train_step(self, state, batch):
    """(state, clu metrics with at least 'loss'); jitted, may donate `state`."""
    raise NotImplementedError

  def batches(self, start_step):
    """Global device batches from step `start_step` on (the same whether resumed or not)."""
    raise NotImplementedError

  def should_evaluate(self, step) -> bool:
    return False

  def evaluate(self, state, step, results) -> dict:
    """{name: number} scalars to write ({} for none); may record more in `results` (what the
    loop keeps in results.json)."""
    return {}

  def summary(self) -> dict:
    """What the run met beside its metrics: numbers are written at each log step, everything is
    kept in results.json. By default the unreadable images met by every process (a collective:
    the loop calls this on all of them)."""
    if self.bad is None:
      return {}
    count, names, digests = bad_images.over_processes(self.bad)
    return dict(bad_images=count, bad_image_names=names,
                bad_image_digests=[list(d) for d in digests])

  def resume(self, results):
    """Called on a resumed run with the results.json it wrote (e.g. tallies to continue)."""
    if self.bad is not None:
      self.bad.restore(results.get('bad_image_names', []), results.get('bad_image_digests', []))

  def final_results(self, state, results) -> dict:
    """What results.json holds at the end (the loop writes it): by default what the run
    recorded, its summary, step and epochs; a program adds its own numbers here."""
    return results

  def first_batch_images(self, batch) -> dict:
    """{name: [1, H, W, C]} images summarised once (e.g. augmented pairs); {} for none."""
    return {}


def prefetch(iterator, sharding, size=2):
  """Keeps `size` global batches in flight to the devices, built from process-local data."""
  queue = collections.deque()
  for batch in iterator:
    queue.append(jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, x), batch))
    if len(queue) >= size:
      yield queue.popleft()
  while queue:
    yield queue.popleft()


@jax.jit
def _all_finite(tree):
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
                            if jnp.issubdtype(x.dtype, jnp.floating)]))


@contextlib.contextmanager
def _signals_caught():
  """SIGTERM / SIGINT only set a flag (read between steps); a second one changes nothing, so a
  save in progress finishes. The previous handlers come back afterwards."""
  caught = []
  handler = lambda signum, frame: caught.append(signum)
  previous = {s: signal.signal(s, handler) for s in _EXIT_CODES}
  try:
    yield caught
  finally:
    for s, h in previous.items():
      signal.signal(s, h)


def _stop_signal(caught, step):
  """The signal to stop on, agreed by every process (all save the same step), or None."""
  mine = caught[0] if caught else 0
  if jax.process_count() == 1:
    return mine or None
  if step % SIGNAL_SYNC_EVERY:
    return None
  agreed = int(np.max(multihost_utils.process_allgather(np.int32(mine))))
  return agreed or None


def _check_finite(metrics, step):
  """Stops on a non-finite loss or metric, naming the step and the metric."""
  for name, value in metrics.items():
    if not np.all(np.isfinite(value)):
      raise Stop(f'diverged at step {step}: {name} is {value}. No checkpoint of it was written; '
                 'the latest checkpoint is the last good one. Lower the learning rate '
                 '(--config.optim.base_lr) or check the data, then start again.', EXIT_DIVERGED)


def _lock(workdir):
  """Process 0 locks the workdir; every process stops if it could not (errors.BadInput)."""
  lock, error = checkpoints.WorkdirLock(workdir), None
  if jax.process_index() == 0:
    try:
      lock.acquire()
    except errors.BadInput as e:
      error = e
  if jax.process_count() > 1:
    busy = np.max(multihost_utils.process_allgather(np.int32(error is not None)))
    if busy and error is None:
      lock.release()
      error = errors.BadInput(f'{workdir} is in use by another run (process 0 says which).')
  if error is not None:
    raise error
  return lock


def run(exp: Experiment, workdir):
  """Trains `exp` to `exp.total_steps`, resuming from `workdir`; returns (state, results)."""
  lock = _lock(checkpoints.path(workdir))
  try:
    return _run(exp, checkpoints.path(workdir))
  except OSError as e:   # results.json, config.json, TensorBoard events on a full disk
    cause = errors.storage_cause(e)
    if cause is None or isinstance(e, errors.CannotWrite):
      raise
    raise errors.CannotWrite(f'cannot write to {workdir}: {cause.strerror} ({e}). The '
                             'checkpoints saved so far are intact; free space or fix the '
                             'permissions, then run the same command to resume.') from e
  finally:
    lock.release()


def _run(exp, workdir):
  cfg, lead = exp.config, jax.process_index() == 0
  state = exp.init_state()
  mgr = checkpoints.manager(workdir, cfg.keep_checkpoints)
  restored = checkpoints.restore_newest(mgr, state)   # before anything in the workdir changes
  if restored is not None:
    state = restored
    logging.info('Resumed from %s at step %d.', workdir, int(state.step))
  if lead:
    if checkpoints.config_changes(workdir, cfg):
      checkpoints.keep_previous_config(workdir)
    checkpoints.write_config(cfg, workdir)
  writer = metric_writers.create_default_writer(str(workdir), just_logging=not lead)
  start = int(state.step)
  results = checkpoints.read_results(workdir) if start > 0 else {}
  if start > 0:
    exp.resume(results)

  def evaluate(step):
    scores = exp.evaluate(state, step, results)
    if scores:
      writer.write_scalars(step, scores)
    if lead:   # what was measured so far survives a crash
      checkpoints.write_results(workdir, results)

  def save(step, force=False):
    if not bool(_all_finite(state)):   # params, BN statistics, key encoder, queue, optimizer
      raise Stop(f'diverged at step {step}: the train state holds a non-finite value. No '
                 'checkpoint of it was written; the latest checkpoint is the last good one. '
                 'Lower the learning rate and start again.', EXIT_DIVERGED)
    checkpoints.save(mgr, state, force=force)
    summary = exp.summary()   # every process: it may be a collective
    if lead:   # the tallies of the saved step, for a run that resumes from it
      results.update(summary)
      checkpoints.write_results(workdir, results)

  progress = periodic_actions.ReportProgress(
      num_train_steps=exp.total_steps, writer=writer if lead else None,
      every_steps=cfg.log_every_steps, every_secs=None)
  hooks = [progress]
  if lead and cfg.profile_steps > 0:
    hooks.append(periodic_actions.Profile(
        logdir=str(workdir), num_profile_steps=cfg.profile_steps, profile_duration_ms=None,
        first_profile=start + 5, every_steps=None, every_secs=None))
  if start == 0 and exp.should_evaluate(0):
    with progress.timed('eval'):
      evaluate(0)

  batches = exp.batches(start)
  metrics = pending = None
  try:
    with _signals_caught() as caught:
      for step in range(start + 1, exp.total_steps + 1):
        batch = next(batches)
        images = exp.first_batch_images(batch) if step == start + 1 and lead else None
        if images:
          writer.write_images(step, images)
        state, m = exp.train_step(state, batch)
        if pending is not None:   # the previous step's loss: the host never waits on this one
          _check_finite(pending[1].compute(), pending[0])
        pending = (step, m)
        metrics = m if metrics is None else metrics.merge(m)
        for hook in hooks:
          hook(step)
        if step % cfg.log_every_steps == 0 or step == exp.total_steps:
          scalars = metrics.compute()
          _check_finite(scalars, step)
          scalars = {k: float(v) for k, v in scalars.items()}
          scalars['epoch'] = step / exp.steps_per_epoch
          scalars.update({k: v for k, v in exp.summary().items() if isinstance(v, (int, float))})
          writer.write_scalars(step, scalars)
          logging.info('step %d/%d  epoch %.2f  %s', step, exp.total_steps, scalars['epoch'],
                       '  '.join(f'{k} {v:.4g}' for k, v in scalars.items() if k != 'epoch'))
          metrics = None
        if step % cfg.checkpoint_every_steps == 0:
          _check_finite(m.compute(), step)
          save(step)
        if exp.should_evaluate(step) or step == exp.total_steps:
          with progress.timed('eval'):
            evaluate(step)
        signum = _stop_signal(caught, step)
        if signum:
          save(step, force=True)
          raise Stop(f'preempted at step {step}: saved {workdir / "checkpoints" / str(step)}; '
                     f'run the same command to resume ({signal.Signals(signum).name}, exit '
                     f'{_EXIT_CODES[signum]})', _EXIT_CODES[signum])
      if pending is not None:
        _check_finite(pending[1].compute(), pending[0])
      save(int(state.step))
      if start >= exp.total_steps and not results:   # a finished run without results
        evaluate(start)
  finally:
    failing = sys.exc_info()[1]   # the run's own error, not one of closing after it
    if len(hooks) > 1:
      try:
        jax.profiler.stop_trace()   # a trace still open when the run ended
      except RuntimeError:
        pass   # none was
    try:
      mgr.close()   # waits for a save in flight; re-raises a failed save's error
    except Exception:  # pylint: disable=broad-except
      if failing is None:
        raise
  writer.flush()
  results.update(exp.summary(), step=int(state.step), epochs=int(state.step) / exp.steps_per_epoch)
  results = exp.final_results(state, results)
  if lead:
    checkpoints.write_results(workdir, results)
  return state, results
