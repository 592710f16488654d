"""Pre-training (MoCo or SimCLR) as an experiment of the one loop: checks, state, step, the kNN
monitor, on the input its program hands it (`pipeline.Input`: any object with its methods)."""
import itertools
import time

import jax
import ml_collections
import numpy as np
from absl import logging

from mocov2_jax import checkpoints, config_check, knn, loop, methods, moco, optim

# What shapes the train state or the method: a resumed run may not change these.
FIXED_FIELDS = ('method', 'model.', 'moco.queue_size', 'moco.bn_groups', 'moco.symmetric',
                'batch_size', 'optim.optimizer')


def validate(config, num_devices: int, num_processes: int = 1):
  """Fails before any long work with a message that says what to change."""
  config_check.check(config)
  b = config.batch_size
  if config.method not in methods.METHODS:
    raise ValueError(f'unknown method {config.method!r}: set --config.method to one of '
                     f'{methods.METHODS}.')
  if b % num_devices:
    raise ValueError(f'batch_size={b} is not a multiple of the {num_devices} devices: '
                     f'set --config.batch_size to a multiple of {num_devices}.')
  if b % num_processes:
    raise ValueError(f'batch_size={b} is not divisible by the {num_processes} processes.')
  if config.method == 'moco':
    groups, k = config.moco.bn_groups, config.moco.queue_size
    if b % groups or b // groups < 2:
      raise ValueError(f'batch_size={b} does not split into moco.bn_groups={groups} BN groups '
                       f'of 2 or more examples: change --config.moco.bn_groups or the batch size.')
    moco.momentum_schedule(config.moco.momentum, 1, config.moco.momentum_schedule)  # unknown kind
    keys_per_step = b * (2 if config.moco.symmetric else 1)
    if k % keys_per_step:
      raise ValueError(f'moco.queue_size={k} is not a multiple of the {keys_per_step} keys '
                       f'enqueued per step: set --config.moco.queue_size to a multiple of it.')
  elif b < 2:
    raise ValueError(f'batch_size={b}: SimCLR needs 2 or more examples (the negatives).')
  if config.knn.feature not in knn.FEATURES:
    raise ValueError(f'knn.feature={config.knn.feature!r}: choose one of {knn.FEATURES}.')
  if config.data.augment_on not in ('host', 'device'):
    raise ValueError(f"data.augment_on={config.data.augment_on!r}: 'host' (the default: the "
                     "whole recipe in tf.data) or 'device' (the host only crops).")
  methods.create_model(config)  # unknown arch / head / dtype
  lr = optim.schedule(config.optim, b, 1, config.num_epochs)  # unknown schedule / scaling
  optim.create(config.optim, lr)  # unknown optimizer


def check(config, data, workdir=None) -> int:
  """All start-up checks (config, resume, devices, data); returns the steps per epoch."""
  validate(config, jax.device_count(), jax.process_count())
  if workdir is not None:
    for k, (old, new) in checkpoints.check_resume(workdir, config, FIXED_FIELDS).items():
      logging.warning('Resuming %s with %s changed: %r -> %r (the previous config.json is kept '
                      'as config.N.json).', workdir, k, old, new)
  data.check()
  num_train = data.num_examples(config.data.train_split)
  if num_train < config.batch_size:
    raise ValueError(f'{num_train} training examples make no full batch of {config.batch_size}: '
                     'lower --config.batch_size.')
  return num_train // config.batch_size


def pair_grid(batch, augment_cfg, n):
  """[1, n*H, 2*W, 3] image of n (view1 | view2) pairs, un-normalised to [0, 1] (uint8: the
  crops that device augmentation finishes)."""
  def show(x):
    if x.dtype == np.uint8:
      return np.asarray(x[:n], np.float32) / 255
    x = np.asarray(x[:n], np.float32)
    if augment_cfg.get('std') is not None:
      x = x * np.asarray(augment_cfg.std) + np.asarray(augment_cfg.mean)
    return np.clip(x, 0, 1)
  pairs = np.concatenate([show(batch['view1']), show(batch['view2'])], axis=2)
  return pairs.reshape(1, -1, *pairs.shape[2:])


class KnnMonitor:
  """kNN top-1 on the labelled eval split against the train split, for each feature of
  `knn.FEATURES` ({feature: top-1}; None for unlabelled data)."""

  def __init__(self, config, model, batch_sharding, data):
    self.config, self.sharding, self.data = config, batch_sharding, data
    self.features = knn.make_feature_fn(model, batch_sharding)

  def _split(self, variables, split, limit=0):
    batches = self.data.eval(split)
    if limit:
      batches = itertools.islice(batches, -(-limit // self.config.batch_size))
    put = lambda x: jax.make_array_from_process_local_data(self.sharding, x)
    return knn.extract(self.features, variables, batches, put)

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


class Pretraining(loop.Experiment):
  """MoCo or SimCLR pre-training (`config.method`) with the kNN monitor as its evaluator."""

  def __init__(self, config, data, steps_per_epoch):
    super().__init__(config, steps_per_epoch)
    self.data, self.bad = data, data.bad
    _, self.repl, self.batch_sharding = methods.mesh_and_shardings()
    self.model = methods.create_model(config)
    self.lr = optim.schedule(config.optim, config.batch_size, steps_per_epoch, config.num_epochs)
    self.train_step = methods.jit_train_step(config, self.lr, self.repl, self.batch_sharding,
                                             steps_per_epoch * config.num_epochs)
    every = config.knn.every_epochs
    self.monitor = (KnnMonitor(config, self.model, self.batch_sharding, data) if every > 0
                    else None)
    self.since = time.time()   # wall time since the last kNN pass ended (the epoch's time)

  def init_state(self):
    state = methods.create_train_state(jax.random.PRNGKey(self.config.seed), self.config,
                                       self.model, self.lr, self.config.data.image_size)
    return jax.device_put(state, self.repl)

  def batches(self, start_step):
    cfg = self.config
    logging.info('%s: %d steps per epoch, %d steps (%d epochs), %d devices, %s lr %.4g.',
                 cfg.method, self.steps_per_epoch, self.total_steps, cfg.num_epochs,
                 jax.device_count(), cfg.optim.optimizer,
                 optim.learning_rate(cfg.optim, cfg.batch_size))
    # The pipeline builds rows [k L, (k + 1) L) of each global batch: k is the block of rows
    # this process's devices hold (process_index on a mesh that lists devices process by process).
    local = cfg.batch_size // jax.process_count()
    rows = [i[0] for i in self.batch_sharding.addressable_devices_indices_map(
        (cfg.batch_size,)).values()]
    first, last = min(r.start or 0 for r in rows), max(r.stop or cfg.batch_size for r in rows)
    block = first // local
    if last - first != local:
      block = jax.process_index()
      logging.warning('The devices of process %d hold rows %s of the global batch, not one block: '
                      'the batch then depends on the number of processes.', block, rows)
    stream = self.data.train(self.steps_per_epoch, start_step, block=block,
                             crops_only=methods.is_device_augmented(cfg))
    views = ({'view1': b['view1'], 'view2': b['view2']} for b in stream)
    return loop.prefetch(views, self.batch_sharding)

  def should_evaluate(self, step):
    if self.monitor is None:
      return False
    if step == 0:
      return self.config.knn.at_init
    epoch, rest = divmod(step, self.steps_per_epoch)
    return rest == 0 and epoch % self.config.knn.every_epochs == 0

  def evaluate(self, state, step, results):
    if self.monitor is None:
      return {}
    jax.block_until_ready(state)
    seconds = time.time() - self.since if step else 0.0
    accs = self.monitor(state)
    self.since = time.time()
    if accs is None:
      return {}
    feature, epoch = self.config.knn.feature, step / self.steps_per_epoch
    results['knn_top1_init' if step == 0 else 'knn_top1'] = accs[feature]
    results.setdefault('knn_history', []).append(
        dict(step=step, epoch=epoch, train_seconds=seconds, **accs))
    logging.info('kNN top-1 at step %d (epoch %.2f): %.2f%% (%s; %s)', step, epoch, accs[feature],
                 feature, ', '.join(f'{f} {a:.2f}%' for f, a in accs.items()))
    return {'knn_top1': accs[feature], **{f'knn_top1_{f}': a for f, a in accs.items()}}

  def first_batch_images(self, batch):
    n = self.config.num_summary_pairs
    if not n:
      return {}
    local = {k: np.asarray(v.addressable_data(0)) for k, v in batch.items()}
    return {'augmented_pairs': pair_grid(local, self.config.data.augment, n)}


def experiment(config: ml_collections.ConfigDict, data, workdir=None) -> Pretraining:
  """The pre-training of `config` on `data` after every start-up check (config, resume, devices,
  data)."""
  return Pretraining(config, data, check(config, data, workdir))
