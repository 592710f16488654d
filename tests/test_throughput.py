"""What feeding the accelerators faster must not change: the host's uint8 crops (a faster resize),
the loss with a uint8 key shuffle, and the bf16 step (BN without float32 copies)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

from mocov2_jax import methods, optim, xla_stats
from mocov2_jax.data import augment, device_augment, recipes
from mocov2_jax.models import resnet

BATCH, IMAGE = 16, 16


def _exact_resize(image, size, interpolation):
  """The path `augment.resize_uint8` replaces: the float resize op, then rounding."""
  x = tf.image.resize(tf.cast(image, tf.float32), [size, size], interpolation, antialias=True)
  return tf.cast(tf.round(tf.clip_by_value(x, 0.0, 255.0)), tf.uint8).numpy()


@pytest.mark.parametrize('interpolation', ['bilinear', 'bicubic'])
def test_resize_uint8_is_the_resize_op(interpolation):
  """Shrinking (also by more than 2x), enlarging and mixed crops, odd sizes: the same pixels."""
  rng = np.random.default_rng(0)
  for h, w in [(300, 300), (375, 433), (194, 250), (120, 90), (50, 400), (224, 224), (7, 5)]:
    image = tf.constant(rng.integers(0, 256, (h, w, 3), np.uint8))
    got, want = augment.resize_uint8(image, 224, interpolation).numpy(), _exact_resize(
        image, 224, interpolation)
    assert got.dtype == np.uint8 and got.shape == (224, 224, 3)
    # Bitwise equal here (the op's own passes, in its order); a rounding tie may flip elsewhere.
    diff = np.abs(got.astype(int) - want)
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, ((h, w), diff.max(), (diff > 0).mean())
  image = rng.integers(0, 256, (24, 24, 3), np.uint8)   # no resize: the pixels themselves
  np.testing.assert_array_equal(augment.resize_uint8(tf.constant(image), 24, interpolation), image)


def test_crop_uint8_is_the_exact_crop_and_resize():
  """`view`'s crop box for the same seed, resized as before, on an ImageNet-sized image."""
  r = recipes.recipe('mocov2')
  image = tf.constant(np.random.default_rng(1).integers(0, 256, (375, 500, 3), np.uint8))
  for i in range(4):
    seed = tf.constant([3, i])
    y, x, h, w = augment.sample_params(seed, r, 375, 500)['crop'].numpy()
    want = _exact_resize(image[y:y + h, x:x + w], 224, r.interpolation)
    got = augment.crop_uint8(image, seed, r, 224).numpy()
    assert np.abs(got.astype(int) - want).max() <= 1 and (got != want).mean() < 1e-3


def test_benchmark_counts_collective_bytes_by_kind():
  """xla_stats' HLO reading (the benchmarks'): the image batch (the key shuffle) apart from the
  gradient all-reduce, an async start counted once (its result holds the operand too)."""
  hlo = """
  %all-gather = u8[16,64,64,3]{3,2,1,0} all-gather(%param.75), channel_id=4, dimensions={0}
  %all-gather.1 = s32[16]{0} all-gather(%perm), channel_id=5, dimensions={0}
  %all-reduce.2 = (f32[8]{0}, f32[3,3,64,64]{3,2,1,0}) all-reduce(%g0, %g1), channel_id=6
  %ag-start = (f32[2,64,64,3]{3,2,1,0}, f32[16,64,64,3]{3,2,1,0}) all-gather-start(%x)
  %ag-done = f32[16,64,64,3]{3,2,1,0} all-gather-done(%ag-start)"""
  image = 64 * 64 * 3
  assert xla_stats.collectives(hlo, 64) == {
      'views': 16 * image + 18 * image * 4, 'all-reduce': (8 + 9 * 64 * 64) * 4, 'other': 64}


def _reference_norm(x, scale, bias, eps=1e-5):
  mean = x.mean(axis=1, keepdims=True)
  var = jnp.square(x - mean).mean(axis=1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps) * scale + bias, mean, var


def test_low_precision_group_norm_gradients_are_autodiff():
  """The bf16 BN's hand-written backward pass (it saves no float32 copy of x) is the gradient of
  the float32 formula: checked in float32, with cotangents on the statistics as well."""
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(2.0, 3.0, (4, 30, 6)), jnp.float32)
  scale, bias = (jnp.asarray(rng.uniform(0.5, 1.5, 6), jnp.float32),
                 jnp.asarray(rng.normal(size=6), jnp.float32))
  cot = tuple(jnp.asarray(rng.normal(size=s), jnp.float32) for s in (x.shape, (4, 1, 6), (4, 1, 6)))
  outs, grads = [], []
  for f in (lambda *a: resnet._group_norm_low(*a, 1e-5), _reference_norm):
    out, vjp = jax.vjp(f, x, scale, bias)
    outs.append(out)
    grads.append(vjp(cot))
  for a, b in zip(jax.tree.leaves(outs[0]) + jax.tree.leaves(grads[0]),
                  jax.tree.leaves(outs[1]) + jax.tree.leaves(grads[1])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(b).max())


_STEPS = {}


def _steps(config, state, batches, devices):
  """The losses of the jitted steps from `state` and the final state (host arrays). Compiled
  steps are shared between the tests (compiling takes most of their time)."""
  _, repl, data = methods.mesh_and_shardings(devices)
  key = (config.to_json(), len(devices))
  if key not in _STEPS:
    sched = optim.schedule(config.optim, BATCH, 1, 5)
    _STEPS[key] = methods.jit_train_step(config, sched, repl, data)
  step = _STEPS[key]
  state, losses = jax.device_put(state, repl), []
  for b in batches:
    state, metrics = step(state, jax.device_put(b, data))
    losses.append(float(metrics.compute()['loss']))
  return np.array(losses), jax.tree.map(np.asarray, state)


def _initial_state(config):
  if 'state' not in _STEPS:
    sched = optim.schedule(config.optim, BATCH, 1, 5)
    _STEPS['state'] = jax.tree.map(np.asarray, methods.create_train_state(
        jax.random.PRNGKey(0), config, methods.create_model(config), sched, IMAGE))
  return _STEPS['state'].replace(apply_fn=methods.create_model(config).apply)


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
  loss32, s32 = _steps(f32, state, batches, device)
  loss16, s16 = _steps(bf16, _initial_state(bf16), batches, device)
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
  devices = jax.devices()[:1]   # the shuffle's sharding: tests/test_multidevice.py
  loss_u8, s_u8 = _steps(device_cfg, state, [crops], devices)
  loss_f32, s_f32 = _steps(host_cfg, state, [finished], devices)
  np.testing.assert_allclose(loss_u8, loss_f32, rtol=1e-5)
  for a, b in zip(jax.tree.leaves((s_u8.params, s_u8.queue)),
                  jax.tree.leaves((s_f32.params, s_f32.queue))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * max(np.abs(b).max(), 1e-6))
