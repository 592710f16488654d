"""Linear evaluation of a pre-trained backbone as an experiment of the one loop.

Protocol: the backbone is frozen in inference mode (BN running statistics) and a linear layer on
its pooled features is trained with SGD on random-resized-crop + flip views; top-1/top-5 on the
centre crops of the eval split. Fast mode: the centre-crop features of both splits are extracted
once and linear layers are trained on them, one per learning rate of `sweep_lrs` (the protocol's
among them) in the same pass; the lr is chosen on a held-out part of train, never test.
"""
import functools
import json
import time

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from clu import metrics
from flax import traverse_util
from flax.training import train_state

from mocov2_jax import checkpoints, config_check, knn, loop, methods, optim
from mocov2_jax import torch_names as names
from mocov2_jax.models import resnet

FAST_NOTE = "fast mode (cached center-crop features), not the paper's protocol"
MODEL_FIELDS = ('arch', 'width', 'cifar_stem')
FIXED_FIELDS = ('pretrained_checkpoint', 'fast', 'model.', 'batch_size', 'sweep_lrs',
                'holdout_fraction')


@flax.struct.dataclass
class LinearMetrics(metrics.Collection):
  loss: metrics.Average.from_output('loss')
  top1: metrics.Average.from_output('top1')
  lr: metrics.LastValue.from_output('lr')


class Classifier(nn.Module):
  """`num_heads` independent linear layers as the reference's (weights N(0, 0.01), bias 0):
  logits [heads, N, classes]. 'classifier' exports as torchvision's fc.*."""
  num_classes: int
  num_heads: int = 1

  @nn.compact
  def __call__(self, h):
    dense = nn.vmap(nn.Dense, variable_axes={'params': 0}, split_rngs={'params': True},
                    in_axes=None, out_axes=0, axis_size=self.num_heads)
    return dense(self.num_classes, kernel_init=nn.initializers.normal(0.01),
                 bias_init=nn.initializers.zeros, name='classifier')(h)


def per_head_sgd(optim_cfg, lr_schedule, lr_scales):
  """SGD whose head i steps at lr_scales[i] x the schedule: torch's SGD is linear in the lr
  (its momentum buffer holds gradients only), so this is one SGD per head."""
  scales = jnp.asarray(lr_scales, jnp.float32)
  scale = lambda u: u * scales.reshape((-1,) + (1,) * (u.ndim - 1))
  return optax.chain(optim.sgd(optim_cfg, lr_schedule),
                     optax.stateless(lambda updates, _: jax.tree.map(scale, updates)))


def head_lrs(cfg):
  """The learning rates (before batch scaling) of the heads: the sweep in fast mode, the
  protocol's lr among them; the protocol's alone otherwise."""
  if not cfg.fast or not cfg.sweep_lrs:
    return (float(cfg.optim.base_lr),)
  return tuple(sorted({float(x) for x in cfg.sweep_lrs} | {float(cfg.optim.base_lr)}))


# ---- the pre-trained checkpoint, the resolved config, the checks ----
def resolve(config, overridden=()):
  """The config this run uses: model fields from the checkpoint, data as `data_from_pretrained`
  says. `overridden`: the dotted fields given on the command line (they are kept as given)."""
  if not config.pretrained:
    raise ValueError('--config.pretrained is required: a pre-training workdir (its latest '
                     'checkpoint) or one of its checkpoints/<step> folders.')
  try:
    step_dir, pre_workdir = checkpoints.find(config.pretrained)
  except FileNotFoundError as e:
    raise ValueError(f'--config.pretrained: {e}') from e
  pre = checkpoints.read_config(pre_workdir)
  cfg = config.copy_and_resolve_references()
  with cfg.unlocked():
    saved = checkpoints.saved_tree(step_dir)
    if pre is not None:
      found = {k: pre.model[k] for k in MODEL_FIELDS}
    else:  # no config.json (weights copied alone): read the model off the weights
      empty = lambda m: np.broadcast_to(np.float32(0), m.shape)  # shapes only, no memory
      sd = names.state_dict(*(jax.tree.map(empty, saved[k]) for k in ('params', 'batch_stats')))
      found = {k: v for k, v in names.infer_model(sd).items() if k in MODEL_FIELDS}
    names.check_model(found, {k: cfg.model[k] for k in MODEL_FIELDS}, f'checkpoint {step_dir}',
                      'the linear config')
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
    cfg.pretrained_checkpoint = str(step_dir)
  return cfg


def backbone_module(cfg) -> resnet.ResNet:
  if cfg.model.arch not in resnet.ARCHS:
    raise ValueError(f'unknown model.arch {cfg.model.arch!r}: choose one of {sorted(resnet.ARCHS)}')
  if cfg.model.dtype not in resnet.DTYPES:
    raise ValueError(f'unknown model.dtype {cfg.model.dtype!r}: choose one of '
                     f'{sorted(resnet.DTYPES)}')
  return resnet.ResNet(cfg.model.arch, cfg.model.width, cfg.model.cifar_stem, 1,
                       resnet.DTYPES[cfg.model.dtype])


def check_shapes(cfg, step_dir):
  """The saved backbone must have exactly the model's variables and shapes."""
  saved = checkpoints.saved_tree(step_dir)
  x = jnp.zeros((1, cfg.data.image_size, cfg.data.image_size, 3))
  like = jax.eval_shape(lambda: backbone_module(cfg).init(jax.random.PRNGKey(0), x, train=False))
  shapes = lambda tree: {p: x.shape for p, x in traverse_util.flatten_dict(tree).items()}
  for col in ('params', 'batch_stats'):
    want, have = shapes(like[col]), shapes(saved[col].get('backbone', {}))
    bad = [f'{"/".join(p)} {have.get(p, "missing")} (model: {s})'
           for p, s in want.items() if have.get(p) != s]
    bad += [f'{"/".join(p)} (not in the model)' for p in have if p not in want]
    if bad:
      m = cfg.model
      raise ValueError(f'checkpoint {step_dir} does not fit a {m.arch} of width {m.width} '
                       f'(cifar_stem={m.cifar_stem}): {len(bad)} backbone {col} differ, e.g. '
                       + '; '.join(bad[:3]))


def check(cfg, data, workdir=None):
  """All start-up checks of a `resolve`d config and its data; returns (steps per epoch, number
  of classes)."""
  config_check.check(cfg)
  check_shapes(cfg, cfg.pretrained_checkpoint)
  load_backbone(cfg.pretrained_checkpoint)   # its arrays read, before any long work
  b = cfg.batch_size
  if b <= 0 or b % jax.device_count() or b % jax.process_count():
    raise ValueError(f'batch_size={b} is not a positive multiple of the {jax.device_count()} '
                     f'devices and {jax.process_count()} processes: set --config.batch_size.')
  optim.schedule(cfg.optim, b, 1, cfg.num_epochs)  # unknown schedule
  if workdir is not None:
    checkpoints.check_resume(workdir, cfg, FIXED_FIELDS)
  data.check()
  num_train = data.num_examples(cfg.data.train_split)
  if num_train < b:
    raise ValueError(f'{num_train} training examples make no full batch of {b}: lower '
                     '--config.batch_size.')
  num_classes = cfg.num_classes or data.num_classes()
  if num_classes < 2:
    raise ValueError(f'{cfg.data.train_split!r} of data {cfg.data.name or cfg.data.folder!r} has '
                     f'no labels ({num_classes} classes): linear evaluation needs labelled data.')
  return num_train // b, num_classes


# ---- the frozen backbone ----
def load_backbone(step_dir):
  """The checkpoint's backbone {'params', 'batch_stats'} as NumPy (any saving device count)."""
  raw = checkpoints.restore_raw(step_dir)
  return {k: raw[k]['backbone'] for k in ('params', 'batch_stats')}


def check_unchanged(frozen, step_dir):
  """The reference's sanity check: the backbone used is bit-identical to the checkpoint's."""
  saved = traverse_util.flatten_dict(load_backbone(step_dir))
  used = traverse_util.flatten_dict(jax.tree.map(lambda a: np.asarray(a.addressable_data(0)),
                                                  frozen))
  moved = [p for p in saved if p not in used or not np.array_equal(saved[p], used[p])]
  if moved or len(used) != len(saved):
    raise RuntimeError(f'the frozen backbone differs from {step_dir}: '
                       + ', '.join('/'.join(p) for p in moved[:5]) + ' (a bug: please report)')


def make_features(backbone):
  """Pooled features of the backbone in inference mode (BN running statistics), no gradient."""
  return lambda frozen, x: jax.lax.stop_gradient(backbone.apply(frozen, x, train=False))


def accuracy(top5_fn, variables, batches, to_device):
  """(top-1, top-5) in percent of each head, [heads] arrays, over the real (mask 1) examples;
  `top5_fn(variables, image)`: the heads' 5 best classes, [B, heads, 5]."""
  top, label = knn.extract(top5_fn, variables, batches, to_device)
  hits = top == label[:, None, None]
  return 100.0 * hits[..., 0].mean(0), 100.0 * hits.any(-1).mean(0)


def train_step(state, frozen, batch, *, features, lrs, protocol_lr, lr_schedule):
  """One SGD step of every linear head on the frozen `features(frozen, batch['image'])`; the
  metrics are the protocol lr's head's."""
  h = features(frozen, batch['image'])

  def loss_fn(params):
    logits = state.apply_fn({'params': params}, h)
    losses = jax.vmap(lambda z: optax.softmax_cross_entropy_with_integer_labels(
        z, batch['label']).mean())(logits)
    return losses.sum(), (losses, logits)   # a sum: each head gets its own gradient

  (_, (losses, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  top1 = jnp.mean(jnp.argmax(logits, -1) == batch['label'], axis=-1)
  i = lrs.index(protocol_lr)
  return state.apply_gradients(grads=grads), LinearMetrics.single_from_model_output(
      loss=losses[i], top1=top1[i], lr=lr_schedule(state.step) * lrs[i] / protocol_lr)


class LinearExperiment(loop.Experiment):
  """Linear heads on frozen `features(frozen, image)`; `make_batches(start)`: process-local
  dict(image, label) batches; `eval_batches()`: padded dict(image, label, mask) batches of the
  eval split (in fast mode `image` holds cached features and `features` passes them through);
  `held_out_batches()`, in a sweep: the same of the train examples held out to choose the lr.
  `backbone`: the frozen backbone on the devices, checked against the checkpoint at the end
  (None: features given as they are, no checkpoint)."""

  def __init__(self, cfg, *, num_classes, feature_dim, steps_per_epoch, features, frozen,
               make_batches, eval_batches, backbone, held_out_batches=None, held_out=0,
               bad=None):
    super().__init__(cfg, steps_per_epoch)
    self.frozen, self.backbone, self.bad = frozen, backbone, bad
    self.num_classes, self.held_out_batches, self.held_out = num_classes, held_out_batches, held_out
    _, self.repl, self.batch_sharding = methods.mesh_and_shardings()
    self.lrs = head_lrs(cfg)
    self.classifier = Classifier(num_classes, len(self.lrs))
    self.feature_dim, self.make_batches, self.eval_batches = feature_dim, make_batches, eval_batches
    self.lr = optim.schedule(cfg.optim, cfg.batch_size, steps_per_epoch, cfg.num_epochs)
    self.tx = per_head_sgd(cfg.optim, self.lr, [x / cfg.optim.base_lr for x in self.lrs])

    step = functools.partial(train_step, features=features, lrs=self.lrs,
                             protocol_lr=float(cfg.optim.base_lr), lr_schedule=self.lr)
    self._step = jax.jit(step, in_shardings=(self.repl, self.repl, self.batch_sharding),
                         out_shardings=(self.repl, self.repl), donate_argnums=0)

    def top5(variables, image):
      params, frozen = variables
      logits = self.classifier.apply({'params': params}, features(frozen, image))
      return jnp.swapaxes(jax.lax.top_k(logits, min(5, num_classes))[1], 0, 1)
    self.top5 = jax.jit(top5, in_shardings=(self.repl, self.batch_sharding),
                        out_shardings=self.batch_sharding)

  def init_state(self):
    params = jax.jit(self.classifier.init)(jax.random.PRNGKey(self.config.seed),
                                           jnp.zeros((1, self.feature_dim)))['params']
    state = train_state.TrainState.create(apply_fn=self.classifier.apply, params=params,
                                          tx=self.tx)
    return jax.device_put(state, self.repl)

  def train_step(self, state, batch):
    return self._step(state, self.frozen, batch)

  def batches(self, start_step):
    return loop.prefetch(self.make_batches(start_step), self.batch_sharding)

  def accuracy(self, params, batches):
    put = lambda a: jax.make_array_from_process_local_data(self.batch_sharding, a)
    return accuracy(self.top5, (params, self.frozen), batches, put)

  def should_evaluate(self, step):
    every = self.config.eval_every_epochs
    epoch, rest = divmod(step, self.steps_per_epoch)
    return step > 0 and every > 0 and rest == 0 and epoch % every == 0

  def evaluate(self, state, step, results):
    top1, top5 = self.accuracy(state.params, self.eval_batches())
    results['eval'] = [dict(lr=lr, top1=float(a), top5=float(b))
                       for lr, a, b in zip(self.lrs, top1, top5)]
    return {f'val_top1_lr{lr:g}': float(a) for lr, a in zip(self.lrs, top1)}

  def final_results(self, state, results):
    """The chosen head's accuracy (the protocol's lr, or the sweep's best on held-out train),
    every head's in a sweep, and what was evaluated how."""
    cfg = self.config
    if self.backbone is not None:
      check_unchanged(self.backbone, cfg.pretrained_checkpoint)
      results.update(backbone_unchanged=True, checkpoint=dict(
          path=cfg.pretrained_checkpoint,
          step=int(checkpoints.path(cfg.pretrained_checkpoint).name)))
    if 'eval' not in results:   # the loop evaluates at the last step; a run that ended earlier
      self.evaluate(state, int(state.step), results)
    heads, sweep = results.pop('eval'), self.held_out_batches is not None
    if sweep:
      held_top1, _ = self.accuracy(state.params, self.held_out_batches())
      for h, a in zip(heads, held_top1):
        h['holdout_top1'] = float(a)
    protocol = next(h for h in heads if h['lr'] == float(cfg.optim.base_lr))
    best = max(heads, key=lambda h: h['holdout_top1']) if sweep else protocol
    results.update(
        top1=best['top1'], top5=best['top5'], lr=best['lr'], protocol_lr=protocol,
        sweep=heads if sweep else [],
        selection=(f'lr chosen on {self.held_out} held-out train examples (fraction '
                   f'{cfg.holdout_fraction}), never on test' if sweep else 'one lr, no sweep'),
        mode='fast' if cfg.fast else 'protocol',
        note=FAST_NOTE if cfg.fast else 'linear protocol (frozen backbone, crop + flip views)',
        num_classes=self.num_classes, feature_dim=self.feature_dim,
        config=json.loads(cfg.to_json_best_effort()))
    return results


# ---- the input: images through the frozen backbone, or cached features (fast mode) ----
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
    yield dict(image=feats[idx], label=labels[idx])
    step += 1


def cached_eval_batches(feats, labels, batch_size):
  """Features in padded global batches (mask 0 on the padding)."""
  for i in range(0, len(labels), batch_size):
    x, y = feats[i:i + batch_size], labels[i:i + batch_size]
    pad = batch_size - len(y)
    yield {k: _local(v, batch_size) for k, v in dict(
        image=np.pad(x, ((0, pad), (0, 0))), label=np.pad(y, (0, pad)),
        mask=np.pad(np.ones(len(y), np.int32), (0, pad))).items()}


def holdout_split(num, fraction, seed):
  """(fit, held-out) indices of train: the held-out part chooses the lr, test never does."""
  perm = np.random.default_rng([seed, 1]).permutation(num)
  n = max(1, int(round(num * fraction)))
  return np.sort(perm[n:]), np.sort(perm[:n])


def extract_features(data, features, frozen, split, batch_sharding):
  """Centre-crop (eval view) features and labels of every example of `split`, on every host."""
  put = lambda x: jax.make_array_from_process_local_data(batch_sharding, x)
  fn = jax.jit(features, in_shardings=(None, batch_sharding), out_shardings=batch_sharding)
  return knn.extract(fn, frozen, data.eval(split), put)


def fast_experiment(cfg, train_set, eval_set, num_classes, backbone=None, bad=None):
  """Heads on cached (features, labels): with a sweep, on train minus a held-out part that
  chooses the lr."""
  (x, y), (ex, ey) = train_set, eval_set
  sweep = len(head_lrs(cfg)) > 1
  fit, held = holdout_split(len(y), cfg.holdout_fraction, cfg.seed) if sweep else (
      np.arange(len(y)), np.arange(0))
  return LinearExperiment(
      cfg, num_classes=num_classes, feature_dim=x.shape[1],
      steps_per_epoch=len(fit) // cfg.batch_size, features=lambda frozen, h: h, frozen={},
      make_batches=lambda start: cached_batches(x[fit], y[fit], cfg.batch_size, cfg.seed, start),
      eval_batches=lambda: cached_eval_batches(ex, ey, cfg.batch_size),
      held_out_batches=(lambda: cached_eval_batches(x[held], y[held], cfg.batch_size)) if sweep
      else None, held_out=len(held), backbone=backbone, bad=bad)


def experiment(cfg, data, workdir=None):
  """The linear evaluation of a `resolve`d config on `data` (its program's input) after every
  start-up check; in fast mode its features are extracted here."""
  steps_per_epoch, num_classes = check(cfg, data, workdir)
  _, repl, batch_sharding = methods.mesh_and_shardings()
  features = make_features(backbone_module(cfg))
  frozen = jax.device_put(load_backbone(cfg.pretrained_checkpoint), repl)
  logging.info('Backbone %s (width %d, cifar_stem %s) from %s; %s.', cfg.model.arch,
               cfg.model.width, cfg.model.cifar_stem, cfg.pretrained_checkpoint,
               FAST_NOTE if cfg.fast else 'protocol')
  if cfg.fast:
    tick = time.time()
    train_set = extract_features(data, features, frozen, cfg.data.train_split, batch_sharding)
    eval_set = extract_features(data, features, frozen, cfg.data.eval_split, batch_sharding)
    logging.info('Extracted %d + %d centre-crop features in %.1f s.', len(train_set[1]),
                 len(eval_set[1]), time.time() - tick)
    return fast_experiment(cfg, train_set, eval_set, num_classes, frozen, data.bad)
  return LinearExperiment(
      cfg, num_classes=num_classes, feature_dim=resnet.feature_dim(cfg.model.arch, cfg.model.width),
      steps_per_epoch=steps_per_epoch, features=features, frozen=frozen,
      make_batches=lambda start: data.train(steps_per_epoch, start, num_views=1),
      eval_batches=lambda: data.eval(cfg.data.eval_split), backbone=frozen, bad=data.bad)
