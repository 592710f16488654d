r"""Linear evaluation of a pre-trained backbone (the MoCo protocol), or a fast variant for CPUs.

  python -m mocov2_jax.linear_eval --config=configs/linear_eval.py \
      --config.pretrained=PRETRAIN_WORKDIR --workdir=DIR [--config.fast=True]

Protocol: the backbone is frozen in inference mode (BN running statistics) and one linear layer on
its pooled features is trained with SGD on random-resized-crop + flip views; top-1/top-5 on the
centre crops of the eval split. Fast mode: the centre-crop features of both splits are extracted
once and the same layer, optimizer and schedule are trained on them (not the paper's protocol).
Starting again with the same --workdir resumes from its latest checkpoint.
"""
import json
import logging as pylogging
import os
import time

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import app, flags, logging
from clu import metric_writers, metrics
from flax.training import train_state
from ml_collections import config_flags

from mocov2_jax import convert, knn, optim, step as step_lib, train
from mocov2_jax.models import resnet

FAST_NOTE = "fast mode (cached center-crop features), not the paper's protocol"
MODEL_FIELDS = ('arch', 'width', 'cifar_stem')


class Classifier(nn.Module):
  """The reference's linear layer: weights N(0, 0.01), bias 0 ('classifier' exports as fc.*)."""
  num_classes: int

  @nn.compact
  def __call__(self, h):
    return nn.Dense(self.num_classes, kernel_init=nn.initializers.normal(0.01),
                    bias_init=nn.initializers.zeros, name='classifier')(h)


@flax.struct.dataclass
class LinearMetrics(metrics.Collection):
  loss: metrics.Average.from_output('loss')
  top1: metrics.Average.from_output('top1')
  lr: metrics.LastValue.from_output('lr')


# ---- start-up: the pre-trained checkpoint, the resolved config, the checks ----
def find_pretrained(config):
  """(step dir, its step, the pre-training config or None) of `config.pretrained`."""
  if not config.pretrained:
    raise ValueError('--config.pretrained is required: a pre-training workdir (its latest '
                     'checkpoint) or one of its checkpoints/<step> folders.')
  try:
    step_dir, pre_workdir = convert.find_checkpoint(config.pretrained)
  except FileNotFoundError as e:
    raise ValueError(f'--config.pretrained: {e}') from e
  return step_dir, int(os.path.basename(step_dir)), convert.load_config(pre_workdir)


def _saved_tree(step_dir):
  """{'params': ..., 'batch_stats': ...} of the checkpoint as shape-only metadata (no reads)."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  handler = ocp.PyTreeCheckpointHandler()
  try:
    tree = handler.metadata(epath.Path(step_dir) / 'default').tree
  finally:
    handler.close()
  return {k: tree[k] for k in ('params', 'batch_stats')}


def _shapes(tree):
  flat = convert._flatten(tree)  # pylint: disable=protected-access
  return {p: tuple(x.shape) for p, x in flat.items()}


def resolve(config, overridden=()):
  """The config this run uses: model fields from the checkpoint, data as `data_from_pretrained`
  says. `overridden`: the dotted fields given on the command line (they are kept as given)."""
  step_dir, _, pre = find_pretrained(config)
  cfg = config.copy_and_resolve_references()
  with cfg.unlocked():
    saved = _saved_tree(step_dir)
    if pre is not None:
      found = {k: pre.model[k] for k in MODEL_FIELDS}
    else:  # no config.json (weights copied alone): read the model off the weights
      empty = lambda m: np.broadcast_to(np.float32(0), m.shape)  # shapes only, no memory
      sd = convert.state_dict(*(jax.tree.map(empty, saved[k]) for k in ('params', 'batch_stats')))
      found = {k: v for k, v in convert.infer_model(sd).items() if k in MODEL_FIELDS}
    wanted = {k: cfg.model[k] for k in MODEL_FIELDS}
    convert.check_model(found, wanted, f'checkpoint {step_dir}', 'the linear config')
    cfg.model.update(found)
    if cfg.data_from_pretrained:
      if pre is None:
        raise ValueError(f'data_from_pretrained=True but {step_dir} has no config.json '
                         'two levels up: set --config.data_from_pretrained=False and the data.')
      tuples = lambda v: tuple(v) if isinstance(v, list) else v
      for k, v in pre.data.items():
        if k != 'augment' and f'data.{k}' not in overridden:
          cfg.data[k] = tuples(v)
      for k in ('mean', 'std', 'interpolation'):  # the pre-training's normalisation
        if f'data.augment.{k}' not in overridden:
          cfg.data.augment[k] = tuples(pre.data.augment[k])
    cfg.pretrained_checkpoint = step_dir
  return cfg


def backbone_module(cfg) -> resnet.ResNet:
  if cfg.model.arch not in resnet.ARCHS:
    raise ValueError(f'unknown model.arch {cfg.model.arch!r}: choose one of {sorted(resnet.ARCHS)}')
  if cfg.model.dtype not in resnet.DTYPES:
    raise ValueError(f'unknown model.dtype {cfg.model.dtype!r}: choose one of '
                     f'{sorted(resnet.DTYPES)}')
  return resnet.ResNet(cfg.model.arch, cfg.model.width, cfg.model.cifar_stem, 1,
                       resnet.DTYPES[cfg.model.dtype])


def check_shapes(cfg, saved, source):
  """The saved backbone must have exactly the model's variables and shapes."""
  x = jnp.zeros((1, cfg.data.image_size, cfg.data.image_size, 3))
  like = jax.eval_shape(lambda: backbone_module(cfg).init(jax.random.PRNGKey(0), x, train=False))
  for col in ('params', 'batch_stats'):
    want, have = _shapes(like[col]), _shapes(saved[col].get('backbone', {}))
    bad = [f'{"/".join(p)} {have.get(p, "missing")} (model: {s})'
           for p, s in want.items() if have.get(p) != s]
    bad += [f'{"/".join(p)} (not in the model)' for p in have if p not in want]
    if bad:
      m = cfg.model
      raise ValueError(f'{source} does not fit a {m.arch} of width {m.width} '
                       f'(cifar_stem={m.cifar_stem}): {len(bad)} backbone {col} differ, e.g. '
                       + '; '.join(bad[:3]))


def check(config, overridden=()):
  """All start-up checks; returns (resolved config, steps per epoch, number of classes)."""
  from mocov2_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  cfg = resolve(config, overridden)
  step_dir = cfg.pretrained_checkpoint
  check_shapes(cfg, _saved_tree(step_dir), f'checkpoint {step_dir}')
  b = cfg.batch_size
  if b <= 0 or b % jax.device_count() or b % jax.process_count():
    raise ValueError(f'batch_size={b} is not divisible by the {jax.device_count()} devices and '
                     f'{jax.process_count()} processes: set --config.batch_size to a multiple.')
  optim.schedule(cfg.optim, b, 1, cfg.num_epochs)  # unknown schedule
  pipeline.check_data(cfg.data)
  num_train = pipeline.num_examples(cfg.data, cfg.data.train_split)
  if num_train < b:
    raise ValueError(f'{num_train} training examples make no full batch of {b}: lower '
                     '--config.batch_size.')
  num_classes = cfg.num_classes or pipeline.num_classes(cfg.data)
  if num_classes < 2:
    raise ValueError(f'{cfg.data.train_split!r} of data {cfg.data.name or cfg.data.folder!r} has '
                     f'no labels ({num_classes} classes): linear evaluation needs labelled data.')
  return cfg, num_train // b, num_classes


# ---- the frozen backbone and the linear layer ----
def load_backbone(step_dir):
  """The checkpoint's backbone {'params', 'batch_stats'} as NumPy (any saving device count)."""
  raw = convert.restore_raw(step_dir)
  return {k: raw[k]['backbone'] for k in ('params', 'batch_stats')}


def check_unchanged(frozen, step_dir):
  """The reference's sanity check: the backbone used is bit-identical to the checkpoint's."""
  saved = convert._flatten(load_backbone(step_dir))  # pylint: disable=protected-access
  used = convert._flatten(jax.tree.map(  # pylint: disable=protected-access
      lambda a: np.asarray(a.addressable_data(0)), frozen))
  moved = [p for p in saved if p not in used or not np.array_equal(saved[p], used[p])]
  if moved or len(used) != len(saved):
    raise RuntimeError(f'the frozen backbone differs from {step_dir}: '
                       + ', '.join('/'.join(p) for p in moved[:5]) + ' (a bug: please report)')


def make_features(backbone):
  """Pooled features of the backbone in inference mode (BN running statistics), no gradient."""
  return lambda frozen, x: jax.lax.stop_gradient(backbone.apply(frozen, x, train=False))


def jit_train_step(features, lr_schedule, repl, batch_sharding):
  """SGD on the linear layer only; `frozen` (the backbone, or {} for cached features) is read."""
  def step(state, frozen, batch):
    h = features(frozen, batch['x'])
    def loss_fn(params):
      logits = state.apply_fn({'params': params}, h)
      return optax.softmax_cross_entropy_with_integer_labels(logits, batch['label']).mean(), logits
    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    top1 = jnp.mean(jnp.argmax(logits, -1) == batch['label'])
    lr = lr_schedule(state.step)
    return state.apply_gradients(grads=grads), LinearMetrics.single_from_model_output(
        loss=loss, top1=top1, lr=lr)
  return jax.jit(step, in_shardings=(repl, repl, batch_sharding), out_shardings=(repl, repl),
                 donate_argnums=0)


def jit_logits(classifier, features, batch_sharding):
  def logits(params, frozen, x):
    return classifier.apply({'params': params}, features(frozen, x))
  return jax.jit(logits, out_shardings=batch_sharding)


def accuracy(logits_fn, params, frozen, batches, to_device):
  """(top-1, top-5) in percent over the real (mask = 1) examples of `batches`."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  gather = lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True))
  hits1 = hits5 = count = 0
  for batch in batches:
    logits = gather(logits_fn(params, frozen, to_device(batch['x'])))
    label, mask = (gather(to_device(batch[k])) for k in ('label', 'mask'))
    keep = mask.astype(bool)
    k = min(5, logits.shape[-1])
    top = np.argsort(-logits[keep], axis=-1)[:, :k]
    hits1 += int(np.sum(top[:, 0] == label[keep]))
    hits5 += int(np.sum(np.any(top == label[keep][:, None], axis=-1)))
    count += int(keep.sum())
  return 100.0 * hits1 / count, 100.0 * hits5 / count


# ---- input of both modes (process-local NumPy batches) ----
def _local(x, batch_size):
  """This process's share of a global batch that every process holds."""
  n = batch_size // jax.process_count()
  return x[jax.process_index() * n:(jax.process_index() + 1) * n]


def cached_batches(feats, labels, batch_size, seed, start):
  """Global batches of cached features from step `start` on: a fresh permutation each epoch."""
  steps_per_epoch = len(labels) // batch_size
  step, perm_epoch, perm = start, None, None
  while True:
    epoch, i = divmod(step, steps_per_epoch)
    if epoch != perm_epoch:
      perm_epoch, perm = epoch, np.random.default_rng([seed, epoch]).permutation(len(labels))
    idx = _local(perm[i * batch_size:(i + 1) * batch_size], batch_size)
    yield dict(x=feats[idx], label=labels[idx])
    step += 1


def cached_eval_batches(feats, labels, batch_size):
  """The eval features in padded global batches (mask 0 on the padding)."""
  for i in range(0, len(labels), batch_size):
    x, y = feats[i:i + batch_size], labels[i:i + batch_size]
    pad = batch_size - len(y)
    yield {k: _local(v, batch_size) for k, v in dict(
        x=np.pad(x, ((0, pad), (0, 0))), label=np.pad(y, (0, pad)),
        mask=np.pad(np.ones(len(y), np.int32), (0, pad))).items()}


def eval_batches(cfg, split):
  from mocov2_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  ds = pipeline.eval_dataset(
      cfg.data, split, local_batch_size=cfg.batch_size // jax.process_count(),
      process_index=jax.process_index(), process_count=jax.process_count())
  return (dict(x=b['image'], label=b['label'], mask=b['mask']) for b in ds.as_numpy_iterator())


def extract_features(cfg, features, frozen, split, batch_sharding):
  """Centre-crop (eval view) features and labels of every example of `split`, on every host."""
  put = lambda x: jax.make_array_from_process_local_data(batch_sharding, x)
  fn = jax.jit(features, in_shardings=(None, batch_sharding), out_shardings=batch_sharding)
  batches = (dict(image=b['x'], label=b['label'], mask=b['mask']) for b in eval_batches(cfg, split))
  return knn.extract(fn, frozen, batches, put)


# ---- the loop ----
def fit(cfg, workdir, *, num_classes, feature_dim, steps_per_epoch, make_batches, features,
        frozen, evaluate_fn, writer):
  """Trains the linear layer (resuming from `workdir`); returns (state, top-1, top-5).

  `make_batches(start)`: process-local dict(x, label) batches from step `start` on;
  `evaluate_fn(params)`: (top-1, top-5) on the eval split.
  """
  _, repl, batch_sharding = step_lib.mesh_and_shardings()
  classifier = Classifier(num_classes)
  lr_schedule = optim.schedule(cfg.optim, cfg.batch_size, steps_per_epoch, cfg.num_epochs)
  params = jax.jit(classifier.init)(jax.random.PRNGKey(cfg.seed),
                                    jnp.zeros((1, feature_dim)))['params']
  state = train_state.TrainState.create(apply_fn=classifier.apply, params=params,
                                        tx=optim.sgd(cfg.optim, lr_schedule))
  state = jax.device_put(state, repl)
  total = steps_per_epoch * cfg.num_epochs
  if cfg.num_train_steps > 0:
    total = min(total, cfg.num_train_steps)
  ckpt = ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, 'checkpoints')),
                               options=ocp.CheckpointManagerOptions(
                                   max_to_keep=cfg.keep_checkpoints))
  if ckpt.latest_step() is not None:
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    state = ckpt.restore(ckpt.latest_step(), args=ocp.args.StandardRestore(abstract))
    logging.info('Resumed from %s at step %d (epoch %.2f).', workdir, int(state.step),
                 int(state.step) / steps_per_epoch)
  start = int(state.step)
  logging.info('%s: %d classes on %d features, %d steps per epoch, %d steps (%d epochs), '
               '%d devices, lr %.4g.', FAST_NOTE if cfg.fast else 'protocol', num_classes,
               feature_dim, steps_per_epoch, total, cfg.num_epochs, jax.device_count(),
               optim.learning_rate(cfg.optim, cfg.batch_size))
  train_step = jit_train_step(features, lr_schedule, repl, batch_sharding)
  batches = train.prefetch_to_device(make_batches(start), batch_sharding)
  top1 = top5 = None
  metrics_, tick, tick_step = None, time.time(), start
  try:
    for step in range(start + 1, total + 1):
      state, m = train_step(state, frozen, next(batches))
      metrics_ = m if metrics_ is None else metrics_.merge(m)
      if step % cfg.log_every_steps == 0 or step == total:
        scalars = {k: float(v) for k, v in metrics_.compute().items()}
        rate = (step - tick_step) / (time.time() - tick)
        scalars.update(steps_per_sec=rate, epoch=step / steps_per_epoch)
        writer.write_scalars(step, {f'train_{k}' if k in ('loss', 'top1') else k: v
                                    for k, v in scalars.items()})
        logging.info('step %d/%d  epoch %.2f  loss %.4f  top1 %.1f%%  lr %.4g  %.2f steps/s  '
                     'ETA %s', step, total, scalars['epoch'], scalars['loss'],
                     100 * scalars['top1'], scalars['lr'], rate,
                     train.format_eta((total - step) / max(rate, 1e-9)))
        metrics_, tick, tick_step = None, time.time(), step
      if step % cfg.checkpoint_every_steps == 0:
        ckpt.save(step, args=ocp.args.StandardSave(state))
      epoch_end = step % steps_per_epoch == 0
      if step == total or (epoch_end and cfg.eval_every_epochs > 0
                           and (step // steps_per_epoch) % cfg.eval_every_epochs == 0):
        top1, top5 = evaluate_fn(state.params)
        writer.write_scalars(step, {'val_top1': top1, 'val_top5': top5})
        logging.info('step %d (epoch %.2f): val top-1 %.2f%%  top-5 %.2f%%', step,
                     step / steps_per_epoch, top1, top5)
        tick, tick_step = time.time(), step
  except KeyboardInterrupt:
    logging.warning('Interrupted: saving step %d before exiting.', int(state.step))
    train.save_final(ckpt, state)
    raise
  train.save_final(ckpt, state)
  if top1 is None:  # resumed a finished run
    top1, top5 = evaluate_fn(state.params)
  writer.flush()
  return state, top1, top5


def fit_cached(cfg, workdir, train_set, eval_set, num_classes, writer=None):
  """Fast mode on cached (features, labels) pairs: the same layer, optimizer and schedule."""
  batch_sharding = step_lib.mesh_and_shardings()[2]
  writer = writer or metric_writers.create_default_writer(
      workdir, just_logging=jax.process_index() != 0)
  (x, y), (ex, ey) = train_set, eval_set
  identity = lambda frozen, x: x
  logits_fn = jit_logits(Classifier(num_classes), identity, batch_sharding)
  put = lambda a: jax.make_array_from_process_local_data(batch_sharding, a)
  evaluate_fn = lambda params: accuracy(logits_fn, params, {},
                                        cached_eval_batches(ex, ey, cfg.batch_size), put)
  return fit(cfg, workdir, num_classes=num_classes, feature_dim=x.shape[1],
             steps_per_epoch=len(y) // cfg.batch_size,
             make_batches=lambda start: cached_batches(x, y, cfg.batch_size, cfg.seed, start),
             features=identity, frozen={}, evaluate_fn=evaluate_fn, writer=writer)


def _check_workdir(cfg, workdir):
  """A workdir holds one evaluation: refuse to resume it with another checkpoint or mode."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path) or not os.path.isdir(os.path.join(workdir, 'checkpoints')):
    return
  with open(path) as f:
    old = json.load(f)
  for k in ('pretrained_checkpoint', 'fast'):
    if k in old and old[k] != cfg[k]:
      raise ValueError(f'{workdir} holds an evaluation with {k}={old[k]!r}, not {cfg[k]!r}: '
                       'use a new --workdir (or point --config.pretrained at that checkpoint).')


def evaluate(config: ml_collections.ConfigDict, workdir: str, overridden=(), checked=None):
  """Linear evaluation of `config.pretrained`; writes `workdir`/results.json and returns it.

  `checked`: what `check(config, overridden)` returned, when the caller has run it already.
  """
  from mocov2_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  cfg, steps_per_epoch, num_classes = checked or check(config, overridden)
  _check_workdir(cfg, workdir)
  os.makedirs(workdir, exist_ok=True)
  lead = jax.process_index() == 0
  if lead:
    train.write_config(cfg, workdir)
  writer = metric_writers.create_default_writer(workdir, just_logging=not lead)
  _, repl, batch_sharding = step_lib.mesh_and_shardings()
  step_dir = cfg.pretrained_checkpoint
  backbone = backbone_module(cfg)
  features = make_features(backbone)
  frozen = jax.device_put(load_backbone(step_dir), repl)
  feature_dim = resnet.feature_dim(cfg.model.arch, cfg.model.width)
  logging.info('Backbone %s (width %d, cifar_stem %s) from %s.', cfg.model.arch, cfg.model.width,
               cfg.model.cifar_stem, step_dir)

  if cfg.fast:
    tick = time.time()
    train_set = extract_features(cfg, features, frozen, cfg.data.train_split, batch_sharding)
    eval_set = extract_features(cfg, features, frozen, cfg.data.eval_split, batch_sharding)
    logging.info('Extracted %d + %d centre-crop features in %.1f s.', len(train_set[1]),
                 len(eval_set[1]), time.time() - tick)
    state, top1, top5 = fit_cached(cfg, workdir, train_set, eval_set, num_classes, writer)
  else:
    logits_fn = jit_logits(Classifier(num_classes), features, batch_sharding)
    put = lambda a: jax.make_array_from_process_local_data(batch_sharding, a)

    def make_batches(start):
      ds = pipeline.pretrain_dataset(
          cfg.data, local_batch_size=cfg.batch_size // jax.process_count(),
          seed=cfg.seed * 1_000_003 + start, process_index=jax.process_index(),
          process_count=jax.process_count(), num_views=1)
      return (dict(x=b['image'], label=b['label']) for b in ds.as_numpy_iterator())

    state, top1, top5 = fit(
        cfg, workdir, num_classes=num_classes, feature_dim=feature_dim,
        steps_per_epoch=steps_per_epoch, make_batches=make_batches, features=features,
        frozen=frozen,
        evaluate_fn=lambda params: accuracy(logits_fn, params, frozen,
                                            eval_batches(cfg, cfg.data.eval_split), put),
        writer=writer)
  check_unchanged(frozen, step_dir)
  results = dict(
      top1=top1, top5=top5, epochs=int(state.step) / steps_per_epoch, step=int(state.step),
      checkpoint=dict(path=step_dir, step=int(os.path.basename(step_dir))),
      mode='fast' if cfg.fast else 'protocol',
      note=FAST_NOTE if cfg.fast else 'linear protocol (frozen backbone, crop + flip views)',
      backbone_unchanged=True, num_classes=num_classes, feature_dim=feature_dim,
      config=json.loads(cfg.to_json_best_effort()))
  if lead:
    with open(os.path.join(workdir, 'results.json'), 'w') as f:
      json.dump(results, f, indent=2)
  return results


# ---- command line ----
_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               'configs', 'linear_eval.py')


def main(argv):
  del argv
  logging.get_absl_handler().addFilter(  # orbax logs every save at INFO
      lambda r: r.levelno >= pylogging.WARNING or '/orbax/' not in r.pathname)
  if os.environ.get('MOCO_DISTRIBUTED'):
    jax.distributed.initialize()
  fv = flags.FLAGS
  overridden = tuple(config_flags.get_override_values(fv['config']))
  logging.info('JAX %s: %d processes, %d devices (%s).', jax.__version__, jax.process_count(),
               jax.device_count(), jax.devices()[0].platform)
  try:
    checked = check(fv.config, overridden)
  except ValueError as e:  # bad input: say what to change, before any long work
    raise app.UsageError(str(e)) from e
  r = evaluate(fv.config, fv.workdir, overridden, checked)
  print(f'Linear top-1 {r["top1"]:.2f}%  top-5 {r["top5"]:.2f}%  after {r["epochs"]:g} epochs '
        f'on {r["checkpoint"]["path"]} -- {r["note"]}')


if __name__ == '__main__':
  config_flags.DEFINE_config_file('config', _DEFAULT_CONFIG, 'Config file.', lock_config=True)
  flags.DEFINE_string('workdir', None, 'Linear checkpoints, TensorBoard events, results.json.')
  flags.mark_flag_as_required('workdir')
  app.run(main)
