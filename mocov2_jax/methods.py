"""Train states and jitted train steps of the two mechanisms (no TensorFlow here: they run on
NumPy-fed batches).

`config.method` picks one: 'moco' (a query encoder trained against a momentum key encoder and a
queue) or 'simclr' (the end-to-end mechanism: both views through one encoder, negatives from the
global batch). Both share the encoder, the metrics and the jitted, donated step over the mesh.
"""
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from clu import metrics
from flax.training import train_state
from jax.sharding import NamedSharding, PartitionSpec as P

from mocov2_jax import moco, optim, simclr
from mocov2_jax.data import augment_kernel, device_augment
from mocov2_jax.models import resnet

METHODS = ('moco', 'simclr')


class TrainState(train_state.TrainState):
  """Params + optimizer state (the base class), BN statistics and the step rng: all SimCLR needs."""
  batch_stats: Any
  rng: jax.Array


class MoCoState(TrainState):
  """The query encoder is the base state; MoCo adds the key encoder and the queue."""
  key_params: Any
  key_batch_stats: Any
  queue: jax.Array
  queue_ptr: jax.Array


@flax.struct.dataclass
class TrainMetrics(metrics.Collection):
  loss: metrics.Average.from_output('loss')
  top1: metrics.Average.from_output('top1')
  top5: metrics.Average.from_output('top5')
  logit_pos: metrics.Average.from_output('logit_pos')
  logit_neg: metrics.Average.from_output('logit_neg')
  lr: metrics.LastValue.from_output('lr')


def bn_groups(config) -> int:
  """MoCo: BN statistics per group of examples (shuffle BN). SimCLR: one group, global BN."""
  return config.moco.bn_groups if config.method == 'moco' else 1


def create_model(config) -> nn.Module:
  if config.method not in METHODS:
    raise ValueError(f'unknown method {config.method!r}: choose one of {METHODS}')
  return resnet.create_encoder(config.model, bn_groups(config))


def create_train_state(rng, config, model, lr_schedule, image_size: int) -> TrainState:
  """MoCo: query and key encoders start equal (the reference copies f_q into f_k)."""
  init_rng, queue_rng, step_rng = jax.random.split(rng, 3)
  x = jnp.zeros((2 * bn_groups(config), image_size, image_size, 3), jnp.float32)
  variables = jax.jit(lambda r: model.init(r, x, train=False))(init_rng)
  params, batch_stats = variables['params'], variables['batch_stats']
  tx = optim.create(config.optim, lr_schedule)
  if config.method == 'simclr':
    return TrainState.create(apply_fn=model.apply, params=params, tx=tx, batch_stats=batch_stats,
                             rng=step_rng)
  return MoCoState.create(
      apply_fn=model.apply, params=params, tx=tx, batch_stats=batch_stats,
      key_params=jax.tree.map(jnp.copy, params),
      key_batch_stats=jax.tree.map(jnp.copy, batch_stats),
      queue=moco.init_queue(queue_rng, config.moco.queue_size, config.model.dim),
      queue_ptr=jnp.zeros((), jnp.int32), rng=step_rng)


def view_finisher(config, step, batch_sharding=None):
  """finish(x, view, rows): the views the encoders see. Host augmentation: `x` as it came.
  Device augmentation (`data.augment_on='device'`): `x` are uint8 crops and the rest of the
  recipe runs here (a Pallas kernel on TPUs), keyed by (seed, step, view, global example index);
  `rows` are the global indices of x's rows (a shuffled batch keeps its examples' draws);
  `batch_sharding`, x's, splits the kernel's work by device."""
  if not is_device_augmented(config):
    return lambda x, view, rows=None: x
  recipe = config.data.augment

  def finish(x, view, rows=None):
    keys = device_augment.example_keys(config.seed, step, x.shape[0], view)
    return augment_kernel.augment_batch(x, keys if rows is None else keys[rows], recipe,
                                        batch_sharding)
  return finish


def is_device_augmented(config) -> bool:
  return config.data.augment_on == 'device'


def moco_step(state: MoCoState, batch, *, moco_cfg, lr_schedule, batch_sharding=None,
              finish=lambda x, view, rows=None: x, momentum=None):
  """One MoCo step: momentum update, shuffled keys, InfoNCE, SGD, enqueue.

  `batch['view1']`, `batch['view2']`: the two views of the global batch, [N, H, W, 3], finished
  by `finish` (`view_finisher`); a key batch is shuffled before it is finished (uint8 moves).
  With `moco_cfg.symmetric`, both views serve as queries (the reference CIFAR demo's option):
  loss = L(q1, k2) + L(q2, k1), and 2N keys are enqueued. `batch_sharding` keeps the shuffled key
  batch split over the devices (a gather alone would leave it replicated: every device would run
  the key encoder on the whole global batch). `momentum`: step -> m (`moco.momentum_schedule`);
  by default the constant `moco_cfg.momentum`.
  """
  tau = moco_cfg.temperature
  m = moco_cfg.momentum if momentum is None else momentum(state.step)
  key_params = moco.momentum_update(state.key_params, state.params, m)
  rngs = jax.random.split(jax.random.fold_in(state.rng, state.step), 2)

  def keys(x, view, rng, key_stats):
    perm, unperm = moco.shuffle(rng, x.shape[0])
    x = x[perm]
    if batch_sharding is not None:
      x = jax.lax.with_sharding_constraint(x, batch_sharding)
    x = finish(x, view, perm)
    (_, k), new = state.apply_fn({'params': key_params, 'batch_stats': key_stats}, x,
                                 train=True, mutable=['batch_stats'])
    return moco.normalize(k)[unperm], new['batch_stats']

  def queries(params, x, stats):
    (_, q), new = state.apply_fn({'params': params, 'batch_stats': stats}, x, train=True,
                                 mutable=['batch_stats'])
    return moco.normalize(q), new['batch_stats']

  k2, key_stats = keys(batch['view2'], 1, rngs[0], state.key_batch_stats)
  if moco_cfg.symmetric:
    k1, key_stats = keys(batch['view1'], 0, rngs[1], key_stats)
  x1 = finish(batch['view1'], 0)
  x2 = finish(batch['view2'], 1) if moco_cfg.symmetric else None

  def loss_fn(params):
    q1, stats = queries(params, x1, state.batch_stats)
    loss, z = moco.info_nce(q1, k2, state.queue, tau)
    if moco_cfg.symmetric:
      q2, stats = queries(params, x2, stats)
      loss21, z21 = moco.info_nce(q2, k1, state.queue, tau)
      loss, z = loss + loss21, jnp.concatenate([z, z21])
    return loss, (z, stats)

  (loss, (z, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  new_keys = jnp.concatenate([k1, k2]) if moco_cfg.symmetric else k2
  queue, ptr = moco.enqueue(state.queue, state.queue_ptr, new_keys)
  lr = lr_schedule(state.step)
  state = state.apply_gradients(grads=grads, batch_stats=stats, key_params=key_params,
                                key_batch_stats=key_stats, queue=queue, queue_ptr=ptr)
  out = dict(loss=loss, lr=lr, logit_pos=z[:, 0].mean() * tau, logit_neg=z[:, 1:].mean() * tau,
             **moco.topk_accuracy(z))
  return state, TrainMetrics.single_from_model_output(**out)


def simclr_step(state: TrainState, batch, *, simclr_cfg, lr_schedule, batch_sharding=None,
                finish=lambda x, view, rows=None: x):
  """One end-to-end step: both views through the encoder (global BN over all 2N), NT-Xent over
  the global batch, gradients through both views. LARS (or SGD) from the state's optimizer.
  `batch_sharding` keeps the 2N views split over the devices as the N examples were."""
  tau = simclr_cfg.temperature
  x = simclr.interleave(finish(batch['view1'], 0), finish(batch['view2'], 1))
  if batch_sharding is not None:
    x = jax.lax.with_sharding_constraint(x, batch_sharding)

  def loss_fn(params):
    (_, z), new = state.apply_fn({'params': params, 'batch_stats': state.batch_stats}, x,
                                 train=True, mutable=['batch_stats'])
    loss, s = simclr.loss(z, tau)
    return loss, (s, new['batch_stats'])

  (loss, (s, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  lr = lr_schedule(state.step)
  state = state.apply_gradients(grads=grads, batch_stats=stats)
  return state, TrainMetrics.single_from_model_output(loss=loss, lr=lr,
                                                      **simclr.summaries(s, tau))


def train_step(state, batch, *, config, lr_schedule, batch_sharding=None, total_steps=None):
  """The step of `config.method`. `total_steps`: where a schedule other than the lr's ends (the
  key encoder's momentum); None for a constant momentum."""
  finish = view_finisher(config, state.step, batch_sharding)
  if config.method == 'simclr':
    return simclr_step(state, batch, simclr_cfg=config.simclr, lr_schedule=lr_schedule,
                       batch_sharding=batch_sharding, finish=finish)
  momentum = None
  if config.moco.momentum_schedule != 'constant':
    momentum = moco.momentum_schedule(config.moco.momentum, total_steps,
                                      config.moco.momentum_schedule)
  return moco_step(state, batch, moco_cfg=config.moco, lr_schedule=lr_schedule,
                   batch_sharding=batch_sharding, finish=finish, momentum=momentum)


def mesh_and_shardings(devices=None):
  """A 1-D `data` mesh over `devices` (all by default): the batch is split on it, the state is
  replicated. (mesh, replicated sharding, batch sharding)."""
  mesh = jax.sharding.Mesh(np.array(jax.devices() if devices is None else devices), ('data',))
  return mesh, NamedSharding(mesh, P()), NamedSharding(mesh, P('data'))


def jit_train_step(config, lr_schedule, state_sharding, batch_sharding, total_steps=None):
  """The step compiled over the mesh, with the state donated (no copies, no host sync)."""
  def step(state, batch):
    return train_step(state, batch, config=config, lr_schedule=lr_schedule,
                      batch_sharding=batch_sharding, total_steps=total_steps)
  return jax.jit(step, in_shardings=(state_sharding, batch_sharding),
                 out_shardings=(state_sharding, state_sharding), donate_argnums=0)
