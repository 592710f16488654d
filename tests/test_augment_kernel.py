"""The device recipe's Pallas kernel (TPUs) against the jnp recipe, in Pallas' interpret mode."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mocov2_jax import methods
from mocov2_jax.data import augment_kernel as kernel
from mocov2_jax.data import device_augment as dev
from mocov2_jax.data import recipes

S, N = 16, 8
IMAGES = np.random.default_rng(0).integers(0, 256, (N, S, S, 3), np.uint8)
IMAGES[:, 0, :4] = IMAGES[:, 0, :4, :1]   # a few gray pixels (hue undefined)


def fixed_params(n, on, order=(2, 0, 3, 1)):
  """Every decision on (or off) for n views, with fixed factors and order."""
  full = lambda v, dtype: jnp.full((n,), v, dtype)
  return dict(flip=full(on, bool), jitter=full(on, bool), gray=full(on, bool),
              blur=full(on, bool), blur_sigma=full(1.2, jnp.float32),
              jitter_factors=jnp.tile(jnp.array([1.3, 0.6, 1.7, 0.2], jnp.float32), (n, 1)),
              jitter_order=jnp.tile(jnp.array(order, jnp.int32), (n, 1)))


def drawn_params(recipe, n, step=0):
  return jax.vmap(lambda k: dev.sample_params(k, recipe))(dev.example_keys(1, step, n))


def interpret(images, params, recipe):
  return np.asarray(kernel.finish_batch(jnp.asarray(images), params, recipe, interpret=True))


@pytest.mark.parametrize('name', ['mocov1', 'mocov2', 'cifar', 'simclr', 'simclr_cifar'])
def test_kernel_equals_jnp_recipe(name):
  """Drawn decisions, and all on / all off: the same views as `device_augment.finish_batch` up to
  the order of the blur's float32 sums."""
  r = recipes.recipe(name)
  for params in (drawn_params(r, N), fixed_params(N, True), fixed_params(N, False)):
    got = interpret(IMAGES, params, r)
    want = np.asarray(dev.finish_batch(jnp.asarray(IMAGES), params, r))
    assert got.shape == (N, S, S, 3) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize('order', list(itertools.permutations(range(4)))[::5])
def test_kernel_follows_the_drawn_order(order):
  r = recipes.recipe('mocov2')
  params = fixed_params(2, True, order)
  params['gray'] = jnp.zeros(2, bool)   # a gray image has no hue or saturation to order
  got = interpret(IMAGES[:2], params, r)
  np.testing.assert_allclose(got, dev.finish_batch(jnp.asarray(IMAGES[:2]), params, r), atol=1e-5)
  params['jitter_order'] = params['jitter_order'][:, ::-1]
  assert np.abs(got - interpret(IMAGES[:2], params, r)).max() > 0.05   # a wrong order fails


def test_flip_and_blur_matrices():
  """The kernel's matrices from its table row: K x (K J)^T is blur(flip(x)), the flip folded into
  the right matrix, and the identity's taps leave x (flipped or not) as it is."""
  r = recipes.recipe('mocov2')
  params = drawn_params(r, 64)
  table = np.asarray(kernel.scalar_table(params, r, S))
  x = jnp.asarray(IMAGES[0, ..., 0], jnp.float32)
  for i in range(64):
    taps, flip = table[i, len(kernel.SCALARS):], table[i, kernel.SCALARS.index('flip')] > 0
    got = dev.blur_matrix(taps, S) @ x @ dev.blur_matrix(taps, S, flip).T
    flipped = x[:, ::-1] if params['flip'][i] else x
    want = (dev.gaussian_blur(flipped[..., None], params['blur_sigma'][i],
                              recipes.blur_radius(r, S))[..., 0] if params['blur'][i] else flipped)
    np.testing.assert_allclose(got, want, atol=1e-3)
  assert {bool(f) for f in params['flip']} == {True, False}
  assert {bool(b) for b in params['blur']} == {True, False}


def test_other_backends_run_the_jnp_recipe():
  """On the CPU the dispatcher is `device_augment.augment_batch`, to the bit; lowered for TPUs
  it is the kernel (a Mosaic custom call), split by device under a batch sharding."""
  r = recipes.recipe('mocov2')
  keys = dev.example_keys(0, 3, N)
  got = jax.jit(lambda x: kernel.augment_batch(x, keys, r))(IMAGES)
  np.testing.assert_array_equal(got, jax.jit(lambda x: dev.augment_batch(x, keys, r))(IMAGES))
  _, _, sharding = methods.mesh_and_shardings(jax.devices())
  spec = jax.ShapeDtypeStruct(IMAGES.shape, jnp.uint8, sharding=sharding)
  traced = jax.jit(lambda x: kernel.augment_batch(x, keys, r, sharding)).trace(spec)
  assert 'tpu_custom_call' not in traced.lower().as_text()
  tpu = traced.lower(lowering_platforms=('tpu',)).as_text()
  assert tpu.count('tpu_custom_call') == 1
  assert 'manual' in tpu   # inside the shard_map: each device's rows
