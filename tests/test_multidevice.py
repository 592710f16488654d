"""The jitted step (methods.py): on 8 (fake CPU) devices it equals the step on one (results depend
on the BN group count, never on the device count; conftest.py asks XLA for 8 host devices), each
encoder pass stays on its shard, the momentum schedule reaches the key encoder, and bf16 or a
uint8 key shuffle change nothing they must not. One cache of compiled steps serves them all."""
import re

import jax
import jax.numpy as jnp
import numpy as np

from mocov2_jax import methods, optim
from mocov2_jax.data import device_augment

BATCH, IMAGE = 16, 16


_INITIAL = {}


def _initial_state(config, sched=None):
  """One initial state (as host arrays) for every run here: the parameter shapes depend on
  neither the BN group count nor the dtype, so those runs start from the same weights."""
  if 'state' not in _INITIAL:
    sched = sched or optim.schedule(config.optim, BATCH, 1, 5)
    state = methods.create_train_state(jax.random.PRNGKey(0), config, methods.create_model(config),
                                    sched, IMAGE)
    _INITIAL['state'] = jax.tree.map(np.asarray, state)
  key = config.to_json()   # one model per config: the same apply_fn, so compiled steps are reused
  if key not in _INITIAL:
    _INITIAL[key] = methods.create_model(config)
  return _INITIAL['state'].replace(apply_fn=_INITIAL[key].apply)


def _batches(n):
  rng = np.random.default_rng(0)
  return [{k: rng.normal(size=(BATCH, IMAGE, IMAGE, 3)).astype(np.float32)
           for k in ('view1', 'view2')} for _ in range(n)]


_STEPS = {}   # the compiled steps of every test here, by (config, device count)


def _run(config, devices, batches, state=None):
  """The losses of the jitted steps from `state` (the shared initial one by default) over
  `batches`, and the final state (host arrays)."""
  sched = optim.schedule(config.optim, BATCH, 1, 5)
  _, repl, data = methods.mesh_and_shardings(devices)
  key = (config.to_json(), len(devices))
  if key not in _STEPS:
    _STEPS[key] = methods.jit_train_step(config, sched, repl, data)
  train_step = _STEPS[key]
  state = jax.device_put(_initial_state(config, sched) if state is None else state, repl)
  losses = []
  for b in batches:
    b = jax.device_put(b, data)
    assert len(b['view1'].sharding.device_set) == len(devices)
    state, metrics = train_step(state, b)
    losses.append(float(metrics.compute()['loss']))
  # The state stays replicated over the mesh.
  for leaf in jax.tree.leaves(state):
    if isinstance(leaf, jax.Array):
      assert leaf.sharding.is_fully_replicated
      assert leaf.sharding.device_set == set(devices)
  return np.array(losses), jax.tree.map(np.asarray, state)


def _assert_states_close(a, b, where):
  for name in ('params', 'key_params', 'batch_stats', 'key_batch_stats', 'queue', 'opt_state'):
    ta, tb = getattr(a, name), getattr(b, name)
    assert jax.tree.structure(ta) == jax.tree.structure(tb)
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(ta)[0], jax.tree.leaves(tb)):
      # The momentum buffer holds (sums of) raw gradients: sums over the batch that 8 devices
      # reduce in another order (partial sums, then an all-reduce). Its elements near zero then
      # differ by float32 rounding relative to the leaf's scale, not their own.
      atol = 1e-5 * np.abs(y).max() if name == 'opt_state' else 1e-6
      np.testing.assert_allclose(x, y, rtol=1e-5, atol=atol,
                                 err_msg=f'{where}: {name}{jax.tree_util.keystr(path)}')
  assert int(a.queue_ptr) == int(b.queue_ptr)
  assert int(a.step) == int(b.step)


def test_eight_fake_devices():
  assert jax.device_count() == 8, 'tests/conftest.py must set XLA_FLAGS before jax starts'
  assert jax.devices()[0].platform == 'cpu'


def test_one_device_equals_eight_devices(tiny_config):
  """8 BN groups: 3 steps on one device and on 8 devices (2 examples each) agree."""
  assert jax.device_count() == 8
  config = tiny_config(**{'moco.bn_groups': 8})
  batches = _batches(3)
  loss1, s1 = _run(config, jax.devices()[:1], batches)
  loss8, s8 = _run(config, jax.devices(), batches)
  np.testing.assert_allclose(loss8, loss1, rtol=1e-5)
  _assert_states_close(s8, s1, '8 devices vs 1')
  assert int(s1.queue_ptr) == 3 * BATCH % config.moco.queue_size
  assert len(set(loss1.tolist())) == 3


def test_result_depends_on_bn_groups_not_devices(tiny_config):
  """2 BN groups (each spanning 4 of the 8 devices) also give the same step on 1 and 8 devices,
  and a different one from 8 groups: the group count, not the device count, defines BN."""
  assert jax.device_count() == 8
  batches = _batches(1)
  loss2_1, s2_1 = _run(tiny_config(**{'moco.bn_groups': 2}), jax.devices()[:1], batches)
  loss2_8, s2_8 = _run(tiny_config(**{'moco.bn_groups': 2}), jax.devices(), batches)
  loss8_8, s8_8 = _run(tiny_config(**{'moco.bn_groups': 8}), jax.devices(), batches)
  np.testing.assert_allclose(loss2_8, loss2_1, rtol=1e-5)
  _assert_states_close(s2_8, s2_1, 'bn_groups=2, 8 devices vs 1')
  assert abs(loss2_8[0] - loss8_8[0]) > 1e-3, (loss2_8, loss8_8)
  diff = np.abs(s2_8.batch_stats['backbone']['bn1']['var'] -
                s8_8.batch_stats['backbone']['bn1']['var']).max()
  assert diff > 1e-5, 'BN running statistics should depend on the group count'


def test_every_encoder_pass_runs_on_the_local_shard_only(tiny_config):
  """The key shuffle gathers across devices; the key encoder must still see N / devices examples
  per device, not the whole global batch (that would cost devices x the key compute)."""
  config = tiny_config(**{'moco.bn_groups': 8, 'model.width': 2})
  global_batch = 64
  sched = optim.schedule(config.optim, global_batch, 10, 1)
  _, repl, data = methods.mesh_and_shardings(jax.devices())
  state = jax.eval_shape(lambda: methods.create_train_state(
      jax.random.PRNGKey(0), config, methods.create_model(config), sched, IMAGE))
  batch = {k: jax.ShapeDtypeStruct((global_batch, IMAGE, IMAGE, 3), jnp.float32)
           for k in ('view1', 'view2')}
  hlo = methods.jit_train_step(config, sched, repl, data).lower(state, batch).compile().as_text()
  convs = [line for line in hlo.splitlines() if ' convolution(' in line]
  assert convs, 'no convolutions found in the compiled step'
  local = global_batch // jax.device_count()
  whole = [c for c in convs if re.search(rf'= f32\[{global_batch},', c)]
  assert not whole, f'{len(whole)} convolutions run on the global batch, e.g. {whole[0][:200]}'
  assert any(re.search(rf'= f32\[{local},', c) for c in convs)


def test_a_momentum_schedule_moves_the_key_encoder_by_its_step(tiny_config):
  """'cosine' from m = 0 over 2 steps: m(0) = 0 (the keys take the query's weights as they were
  before its update), m(1) = 0.5 (halfway between the keys and the query)."""
  config = tiny_config(**{'moco.momentum': 0.0, 'moco.momentum_schedule': 'cosine'})
  sched = optim.schedule(config.optim, BATCH, 1, 5)
  _, repl, data = methods.mesh_and_shardings(jax.devices()[:1])
  step = methods.jit_train_step(config, sched, repl, data, total_steps=2)
  state = jax.device_put(_initial_state(config, sched), repl)
  params, keys = [jax.tree.map(np.asarray, state.params)], []
  for batch in _batches(2):
    state, _ = step(state, jax.device_put(batch, data))
    params.append(jax.tree.map(np.asarray, state.params))
    keys.append(jax.tree.map(np.asarray, state.key_params))
  for p0, p1, k1, k2 in zip(*(jax.tree.leaves(t) for t in (params[0], params[1], *keys))):
    np.testing.assert_array_equal(k1, p0)
    np.testing.assert_allclose(k2, 0.5 * k1 + 0.5 * p1, rtol=1e-6, atol=1e-7)
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params[0]),
                                                       jax.tree.leaves(params[1])))


# ---- what feeding the accelerators faster must not change: bf16, the uint8 key shuffle ----
def test_bf16_step_matches_float32(tiny_config):
  """Same state and batch: the bf16 loss is the float32 one within bf16 noise, the update points
  the same way (the backward pass through the bf16 BN is right; seen: cosine 0.948, as the
  autodiff BN gave) and the BN statistics stay float32."""
  f32 = tiny_config()
  bf16 = tiny_config(**{'model.dtype': 'bfloat16'})
  state = _initial_state(f32)
  rng = np.random.default_rng(3)
  batches = [{k: rng.normal(size=(BATCH, IMAGE, IMAGE, 3)).astype(np.float32)
              for k in ('view1', 'view2')}]
  device = jax.devices()[:1]
  loss32, s32 = _run(f32, device, batches)
  loss16, s16 = _run(bf16, device, batches)
  np.testing.assert_allclose(loss16, loss32, rtol=2e-2)   # seen: 0.7%
  delta = lambda s: np.concatenate([(a - b).ravel() for a, b in zip(
      jax.tree.leaves(s.params), jax.tree.leaves(state.params))])
  d32, d16 = delta(s32), delta(s16)
  assert d16 @ d32 / np.linalg.norm(d16) / np.linalg.norm(d32) > 0.9
  for leaf in jax.tree.leaves((s16.batch_stats, s16.key_batch_stats, s16.params)):
    assert leaf.dtype == np.float32


def test_uint8_shuffle_gives_the_float32_shuffle_loss(tiny_config):
  """Device augmentation shuffles the uint8 key crops and finishes them with each example's own
  key; host augmentation shuffles the finished float32 views. On the same views (finished here
  with the step's keys) the two steps give the same loss and state."""
  device_cfg = tiny_config()
  device_cfg.data.augment_on = 'device'
  host_cfg = tiny_config()
  state = _initial_state(host_cfg)
  rng = np.random.default_rng(4)
  crops = {k: rng.integers(0, 256, (BATCH, IMAGE, IMAGE, 3), np.uint8) for k in ('view1', 'view2')}
  finished = {k: np.asarray(device_augment.augment_batch(
      crops[k], device_augment.example_keys(host_cfg.seed, 0, BATCH, view),
      host_cfg.data.augment)) for view, k in enumerate(('view1', 'view2'))}
  devices = jax.devices()[:1]   # the shuffle's sharding: test_every_encoder_pass_runs_on_...
  loss_u8, s_u8 = _run(device_cfg, devices, [crops], state)
  loss_f32, s_f32 = _run(host_cfg, devices, [finished], state)
  np.testing.assert_allclose(loss_u8, loss_f32, rtol=1e-5)
  for a, b in zip(jax.tree.leaves((s_u8.params, s_u8.queue)),
                  jax.tree.leaves((s_f32.params, s_f32.queue))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * max(np.abs(b).max(), 1e-6))
