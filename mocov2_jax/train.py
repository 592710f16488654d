"""The pre-training loop: checks, state, input, steps, logging, kNN monitor, checkpoints, resume."""
import collections
import json
import os
import time

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from clu import metric_writers, periodic_actions
from etils import epath

from mocov2_jax import knn, optim, step as step_lib


def validate(config, num_devices: int, num_processes: int = 1):
  """Fails before any long work with a message that says what to change."""
  b = config.batch_size
  if config.method not in step_lib.METHODS:
    raise ValueError(f'unknown method {config.method!r}: set --config.method to one of '
                     f'{step_lib.METHODS}.')
  if b <= 0 or b % num_devices:
    raise ValueError(f'batch_size={b} is not divisible by the {num_devices} devices: set '
                     f'--config.batch_size to a multiple of {num_devices}.')
  if b % num_processes:
    raise ValueError(f'batch_size={b} is not divisible by the {num_processes} processes.')
  if config.method == 'moco':
    groups, k = config.moco.bn_groups, config.moco.queue_size
    if groups <= 0 or b % groups or b // groups < 2:
      raise ValueError(f'batch_size={b} does not split into moco.bn_groups={groups} BN groups '
                       f'of 2 or more examples: change --config.moco.bn_groups or the batch size.')
    keys_per_step = b * (2 if config.moco.symmetric else 1)
    if k % keys_per_step:
      raise ValueError(f'moco.queue_size={k} is not a multiple of the {keys_per_step} keys '
                       f'enqueued per step: set --config.moco.queue_size to a multiple of it.')
  elif b < 2:
    raise ValueError(f'batch_size={b}: SimCLR needs 2 or more examples (the negatives).')
  for field in ('log_every_steps', 'checkpoint_every_steps', 'keep_checkpoints'):
    if config[field] <= 0:
      raise ValueError(f'{field}={config[field]} must be positive.')
  if config.knn.feature not in knn.FEATURES:
    raise ValueError(f'knn.feature={config.knn.feature!r}: choose one of {knn.FEATURES}.')
  if config.profile_steps < 0:
    raise ValueError(f'profile_steps={config.profile_steps}: 0 (no trace) or a number of steps.')
  step_lib.create_model(config)  # unknown arch / head / dtype
  lr = optim.schedule(config.optim, b, 1, config.num_epochs)  # unknown schedule / scaling
  optim.create(config.optim, lr)  # unknown optimizer


def check(config) -> int:
  """All start-up checks (config, devices, data); returns the number of steps per epoch."""
  from mocov2_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  validate(config, jax.device_count(), jax.process_count())
  pipeline.check_data(config.data)
  num_train = pipeline.num_examples(config.data, config.data.train_split)
  if num_train < config.batch_size:
    raise ValueError(f'{num_train} training examples make no full batch of {config.batch_size}: '
                     'lower --config.batch_size.')
  return num_train // config.batch_size


def workdir_path(workdir) -> epath.Path:
  """Local folders (made absolute, as orbax wants) or cloud URLs such as gs://bucket/run."""
  return epath.Path(workdir if '://' in str(workdir) else os.path.abspath(workdir))


def write_config(config, workdir):
  (workdir_path(workdir) / 'config.json').write_text(
      config.to_json_best_effort(indent=2, sort_keys=True))


def prefetch_to_device(iterator, sharding, size=2):
  """Keeps `size` global batches in flight to the devices, built from process-local data."""
  queue = collections.deque()
  put = lambda x: jax.make_array_from_process_local_data(sharding, x)
  for batch in iterator:
    queue.append(jax.tree.map(put, batch))
    if len(queue) >= size:
      yield queue.popleft()
  while queue:
    yield queue.popleft()


def pair_grid(batch, augment_cfg, n):
  """[1, n*H, 2*W, 3] image of n (view1 | view2) pairs, un-normalised to [0, 1]."""
  def show(x):
    x = np.asarray(x[:n], np.float32)
    if augment_cfg.get('std') is not None:
      x = x * np.asarray(augment_cfg.std) + np.asarray(augment_cfg.mean)
    return np.clip(x, 0, 1)
  pairs = np.concatenate([show(batch['view1']), show(batch['view2'])], axis=2)
  return pairs.reshape(1, -1, *pairs.shape[2:])


def format_eta(seconds):
  m, s = divmod(int(seconds), 60)
  h, m = divmod(m, 60)
  return f'{h}h{m:02d}m' if h else f'{m}m{s:02d}s'


class KnnMonitor:
  """kNN top-1 on the labelled eval split against the train split, for each feature of
  `knn.FEATURES` ({feature: top-1}; None for unlabelled data)."""

  def __init__(self, config, model, batch_sharding):
    from mocov2_jax.data import pipeline  # pylint: disable=g-import-not-at-top
    self.config, self.pipeline, self.sharding = config, pipeline, batch_sharding
    self.features = knn.make_feature_fn(model, batch_sharding)
    self.put = lambda x: jax.make_array_from_process_local_data(batch_sharding, x)

  def _split(self, variables, split, limit=0):
    ds = self.pipeline.eval_dataset(
        self.config.data, split, local_batch_size=self.config.batch_size // jax.process_count(),
        process_index=jax.process_index(), process_count=jax.process_count())
    if limit:
      ds = ds.take(-(-limit // self.config.batch_size))
    return knn.extract(self.features, variables, ds.as_numpy_iterator(), self.put)

  def __call__(self, state):
    cfg = self.config
    variables = {'params': state.params, 'batch_stats': state.batch_stats}
    bank, bank_labels = self._split(variables, cfg.knn.train_split or cfg.data.train_split,
                                    cfg.knn.max_train)
    if bank_labels.min() < 0:
      return None  # unlabelled data: nothing to monitor
    test, test_labels = self._split(variables, cfg.data.eval_split)
    return {f: knn.accuracy(bank[f], bank_labels, test[f], test_labels, k=cfg.knn.k,
                            tau=cfg.knn.temperature) for f in knn.FEATURES}


def save_final(ckpt, state):
  if ckpt.latest_step() != int(state.step):
    ckpt.save(int(state.step), args=ocp.args.StandardSave(state), force=True)
  ckpt.wait_until_finished()


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, steps_per_epoch=None):
  """Pre-trains MoCo; resumes from the latest checkpoint in `workdir`. Returns the final metrics.

  `steps_per_epoch`: what `check(config)` returned, when the caller has run the checks already.
  """
  from mocov2_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  steps_per_epoch = steps_per_epoch or check(config)
  num_train = pipeline.num_examples(config.data, config.data.train_split)
  total_steps = steps_per_epoch * config.num_epochs
  if config.num_train_steps > 0:
    total_steps = min(total_steps, config.num_train_steps)

  workdir_path(workdir).mkdir(parents=True, exist_ok=True)
  lead = jax.process_index() == 0
  writer = metric_writers.create_default_writer(workdir, just_logging=not lead)
  if lead:
    write_config(config, workdir)

  _, repl, batch_sharding = step_lib.mesh_and_shardings()
  model = step_lib.create_model(config)
  lr_schedule = optim.schedule(config.optim, config.batch_size, steps_per_epoch, config.num_epochs)
  state = step_lib.create_train_state(jax.random.PRNGKey(config.seed), config, model, lr_schedule,
                                      config.data.image_size)
  state = jax.device_put(state, repl)
  ckpt = ocp.CheckpointManager(
      workdir_path(workdir) / 'checkpoints',
      options=ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints))
  if ckpt.latest_step() is not None:
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    state = ckpt.restore(ckpt.latest_step(), args=ocp.args.StandardRestore(abstract))
    logging.info('Resumed from %s at step %d.', workdir, int(state.step))
  start = int(state.step)
  logging.info('%s: %d examples, %d steps per epoch, %d steps (%d epochs), %d devices, '
               '%s lr %.4g.', config.method, num_train, steps_per_epoch, total_steps,
               config.num_epochs, jax.device_count(), config.optim.optimizer,
               optim.learning_rate(config.optim, config.batch_size))

  ds = pipeline.pretrain_dataset(
      config.data, local_batch_size=config.batch_size // jax.process_count(),
      seed=config.seed * 1_000_003 + start, process_index=jax.process_index(),
      process_count=jax.process_count())
  views = ({'view1': b['view1'], 'view2': b['view2']} for b in ds.as_numpy_iterator())
  batches = prefetch_to_device(views, batch_sharding)
  train_step = step_lib.jit_train_step(config, lr_schedule, repl, batch_sharding)
  monitor = KnnMonitor(config, model, batch_sharding) if config.knn.every_epochs > 0 else None

  results_path = workdir_path(workdir) / 'results.json'
  results = {}
  if start > 0 and results_path.exists():  # keep what earlier runs measured (init kNN)
    results = json.loads(results_path.read_text())
  history = results.setdefault('knn_history', [])

  def monitor_and_log(step, seconds):
    """Runs the monitor; its `knn.feature` is `knn_top1`, every feature goes to the history."""
    accs = monitor(state)
    if accs is None:
      return None
    epoch = step / steps_per_epoch
    history.append(dict(step=step, epoch=epoch, train_seconds=seconds, **accs))
    writer.write_scalars(step, {'knn_top1': accs[config.knn.feature],
                                **{f'knn_top1_{f}': a for f, a in accs.items()}})
    logging.info('kNN top-1 at step %d (epoch %.2f): %.2f%% (%s; %s)', step, epoch,
                 accs[config.knn.feature], config.knn.feature,
                 ', '.join(f'{f} {a:.2f}%' for f, a in accs.items()))
    if lead:  # the curve so far survives a crash
      results_path.write_text(json.dumps(results, indent=2))
    return accs[config.knn.feature]

  if monitor and config.knn.at_init and start == 0:
    results['knn_top1_init'] = monitor_and_log(0, 0.0)

  profile = None
  if lead and config.profile_steps > 0:
    profile = periodic_actions.Profile(
        logdir=str(workdir_path(workdir)), num_profile_steps=config.profile_steps,
        profile_duration_ms=None, first_profile=start + 5, every_steps=None, every_secs=None)

  metrics, tick, tick_step = None, time.time(), start
  since = time.time()   # wall time since the last kNN pass ended (the epoch's time)
  try:
    for step in range(start + 1, total_steps + 1):
      batch = next(batches)
      if step == start + 1 and lead and config.num_summary_pairs:
        from_device = {k: np.asarray(v.addressable_data(0)) for k, v in batch.items()}
        writer.write_images(step, {'augmented_pairs': pair_grid(
            from_device, config.data.augment, config.num_summary_pairs)})
      state, m = train_step(state, batch)
      metrics = m if metrics is None else metrics.merge(m)
      if profile:
        profile(step)
      if step % config.log_every_steps == 0 or step == total_steps:
        scalars = {k: float(v) for k, v in metrics.compute().items()}
        rate = (step - tick_step) / (time.time() - tick)
        scalars.update(steps_per_sec=rate, images_per_sec=rate * config.batch_size,
                       epoch=step / steps_per_epoch)
        writer.write_scalars(step, scalars)
        logging.info('step %d/%d  epoch %.2f  loss %.4f  top1 %.1f%%  %.2f steps/s  %.0f img/s  '
                     'ETA %s', step, total_steps, scalars['epoch'], scalars['loss'],
                     100 * scalars['top1'], rate, rate * config.batch_size,
                     format_eta((total_steps - step) / max(rate, 1e-9)))
        metrics, tick, tick_step = None, time.time(), step
      if step % config.checkpoint_every_steps == 0:
        ckpt.save(step, args=ocp.args.StandardSave(state))
      epoch_end = step % steps_per_epoch == 0
      if monitor and ((epoch_end and (step // steps_per_epoch) % config.knn.every_epochs == 0)
                      or step == total_steps):
        jax.block_until_ready(state)
        results['knn_top1'] = monitor_and_log(step, time.time() - since)
        since = time.time()
        tick, tick_step = since, step  # the monitor's time is not training time
  except KeyboardInterrupt:
    try:
      logging.warning('Interrupted: saving step %d before exiting.', int(state.step))
      save_final(ckpt, state)
    except RuntimeError:  # interrupted inside the step: its donated input is gone
      logging.warning('Interrupted mid-step: the last periodic checkpoint stands.')
    raise
  finally:
    if profile:
      try:
        jax.profiler.stop_trace()  # a trace still open when the run ended
      except RuntimeError:
        pass  # none was
  save_final(ckpt, state)
  writer.flush()
  if lead:
    results_path.write_text(json.dumps(
        dict(results, step=int(state.step), epochs=int(state.step) / steps_per_epoch), indent=2))
  return results
