"""The on-device (JAX / dm-pix) view augmentation against the host's TF ops of augment.py."""
import itertools
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

from mocov2_jax import methods
from mocov2_jax.data import augment, recipes
from mocov2_jax.data import device_augment as dev

S = 16
IMAGE = np.random.default_rng(0).integers(0, 256, (S, S, 3), np.uint8)
IMAGE[0, :4] = IMAGE[0, :4, :1]   # a few gray pixels (hue undefined)
X = IMAGE / np.float32(255)
OPS = ('brightness', 'contrast', 'saturation', 'hue')


def host_params(p):
  """Device params as the host's `augment.apply` takes them, with the identity crop."""
  return dict({k: tf.constant(np.asarray(v)) for k, v in p.items()},
              crop=tf.constant([0, 0, S, S]))


def device_params(p):
  return {k: jnp.asarray(np.asarray(v)) for k, v in p.items() if k != 'crop'}


def fixed_params(on, factors=(1.3, 0.6, 1.7, 0.2), order=(2, 0, 3, 1), sigma=1.2):
  return dict(flip=on, jitter=on, jitter_factors=np.array(factors, np.float32),
              jitter_order=np.array(order, np.int32), gray=on, blur=on,
              blur_sigma=np.float32(sigma))


@pytest.mark.parametrize('op,factor', [
    ('brightness', 1.3), ('brightness', 0.6), ('contrast', 1.4), ('contrast', 0.2),
    ('saturation', 1.8), ('saturation', 0.2), ('hue', 0.1), ('hue', -0.37), ('hue', 0.45)])
def test_color_op_matches_host(op, factor):
  got = getattr(dev, f'adjust_{op}')(jnp.asarray(X), factor)
  want = getattr(augment, f'adjust_{op}')(tf.constant(X), factor).numpy()
  np.testing.assert_allclose(got, want, atol=1e-5)
  assert np.abs(want - X).max() > 0.05   # the op did something


def test_grayscale_flip_normalize_match_host():
  np.testing.assert_allclose(dev.grayscale(jnp.asarray(X)), augment.grayscale(tf.constant(X)),
                             atol=1e-6)
  r = recipes.recipe('mocov2')
  np.testing.assert_allclose(dev.normalize(jnp.asarray(X), r),
                             augment.normalize(tf.constant(X), r), atol=1e-6)
  assert dev.normalize(X, recipes.recipe('simclr')) is X
  only_flip = dict(fixed_params(False), flip=True)
  got = dev.finish(IMAGE, device_params(only_flip), recipes.recipe('simclr'))
  unflipped = dev.finish(IMAGE[:, ::-1], device_params(fixed_params(False)),
                         recipes.recipe('simclr'))
  np.testing.assert_array_equal(got, unflipped)   # a mirror image, nothing else
  np.testing.assert_allclose(got, X[:, ::-1], rtol=0, atol=1e-7)   # x / 255 to the last bit or so


@pytest.mark.parametrize('order', [(0, 1, 2, 3), (3, 2, 1, 0), (2, 0, 3, 1), (1, 3, 0, 2)])
def test_jitter_follows_the_drawn_order(order):
  factors, strengths = np.array([1.6, 0.5, 1.8, 0.3], np.float32), (0.8, 0.8, 0.8, 0.4)
  got = dev.color_jitter(jnp.asarray(X), factors, jnp.array(order), strengths)
  host = lambda o: augment.color_jitter(tf.constant(X), factors, tf.constant(o), strengths).numpy()
  np.testing.assert_allclose(got, host(order), atol=2e-5)
  assert np.abs(got - host(order[::-1])).max() > 0.05   # a wrong order fails


def test_jitter_skips_ops_of_strength_zero():
  factors, order = np.array([1.6, 0.5, 1.8, 0.3], np.float32), jnp.array([1, 3, 0, 2])
  got = dev.color_jitter(jnp.asarray(X), factors, order, (0.8, 0.0, 0.8, 0.0))
  want = dev.adjust_saturation(dev.adjust_brightness(jnp.asarray(X), 1.6), 1.8)
  np.testing.assert_allclose(got, want, atol=1e-6)


@pytest.mark.parametrize('sigma,radius', [(0.1, 6), (0.8, 6), (2.0, 6), (1.5, 1)])
def test_blur_matches_host(sigma, radius):
  got = dev.gaussian_blur(jnp.asarray(X), sigma, radius)
  want = augment.gaussian_blur(tf.constant(X), sigma, radius).numpy()
  np.testing.assert_allclose(got, want, atol=1e-5)
  if sigma > 0.5:
    assert np.abs(want - X).max() > 0.1
  # Edge pixels repeated (PIL), not zeros: a constant image stays constant up to its borders.
  const = jnp.full((S, S, 3), 0.7)
  np.testing.assert_allclose(dev.gaussian_blur(const, sigma, radius), const, atol=1e-6)


@pytest.mark.parametrize('name', ['mocov1', 'mocov2', 'cifar', 'simclr', 'simclr_cifar'])
def test_finish_matches_host_apply(name):
  """All decisions on, all off, and 6 random draws: device finish == host apply (identity crop)."""
  r = recipes.recipe(name)
  keys = dev.example_keys(1, 0, 6)
  drawn = jax.vmap(lambda k: dev.sample_params(k, r))(keys)
  cases = [fixed_params(True), fixed_params(False)]
  cases += [jax.tree.map(lambda v, i=i: v[i], drawn) for i in range(6)]
  finish = jax.jit(lambda im, p: dev.finish(im, p, r))
  for p in cases:
    got = finish(IMAGE, device_params(p))
    want = augment.apply(tf.constant(IMAGE), host_params(p), r, S).numpy()
    assert got.shape == (S, S, 3) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, atol=1e-4)


@pytest.mark.parametrize('name', ['mocov2', 'simclr'])
def test_crop_uint8_then_finish_is_the_host_view(name):
  r = recipes.recipe(name)
  image = tf.constant(np.random.default_rng(4).integers(0, 256, (40, 48, 3), np.uint8))
  scale = 1.0 if r.std is None else 1 / min(r.std)
  err = []
  for i in range(4):
    seed = tf.constant([5, i])
    params = augment.sample_params(seed, r, 40, 48)
    crop = augment.crop_uint8(image, seed, r, 24)
    assert crop.dtype == tf.uint8 and crop.shape == (24, 24, 3)
    got = dev.finish(jnp.asarray(crop.numpy()), device_params(params), r)
    want = augment.view(image, seed, r, 24).numpy()
    err.append(np.abs(got - want))
  err = np.stack(err)
  # The only difference is the uint8 rounding of the resized crop (<= 0.5 / 255), which the
  # jitter can amplify a few times (seen: mean 0.16 / 255, max 1.4 / 255).
  assert err.mean() < 0.5 / 255 * scale and err.max() < 3 / 255 * scale, (err.mean(), err.max())
  # An identity crop (scale 1, ratio 1 on a square image) is passed through unchanged.
  square = recipes.recipe(name)
  square.crop_scale, square.crop_ratio = (1.0, 1.0), (1.0, 1.0)
  crop = augment.crop_uint8(tf.constant(IMAGE), tf.constant([0, 1]), square, S)
  np.testing.assert_array_equal(crop.numpy(), IMAGE)


@pytest.mark.parametrize('name', ['mocov1', 'mocov2', 'simclr'])
def test_param_distributions(name):
  r, n = recipes.recipe(name), 4000   # binomial std at p = 0.5: 0.008
  p = jax.tree.map(np.asarray, jax.vmap(lambda k: dev.sample_params(k, r))(
      dev.example_keys(7, 0, n)))
  for field in ('flip', 'jitter', 'gray', 'blur'):
    assert abs(p[field].mean() - r[f'{field}_p']) < 0.03, field
  assert abs(p['gray'][p['flip']].mean() - p['gray'][~p['flip']].mean()) < 0.05   # independent
  lo, hi = r.blur_sigma
  sigma = p['blur_sigma']
  assert sigma.min() >= lo and sigma.max() <= hi
  assert sigma.min() < lo + 0.01 * (hi - lo) and sigma.max() > hi - 0.01 * (hi - lo)
  b, c, s, h = r.jitter
  f = p['jitter_factors']
  for i, (lo, hi) in enumerate([(1 - b, 1 + b), (1 - c, 1 + c), (1 - s, 1 + s), (-h, h)]):
    assert f[:, i].min() >= lo and f[:, i].max() <= hi, OPS[i]
    assert f[:, i].min() < lo + 0.01 * (hi - lo) and f[:, i].max() > hi - 0.01 * (hi - lo)
    assert abs(f[:, i].mean() - (lo + hi) / 2) < 0.02 * (hi - lo), OPS[i]   # uniform: sd 0.005
  counts = {o: 0 for o in itertools.permutations(range(4))}
  for o in map(tuple, p['jitter_order']):
    counts[o] += 1                                    # KeyError if not a permutation
  assert all(abs(k - n / 24) < 0.3 * n / 24 for k in counts.values()), counts   # sd 0.08 n/24


def test_sharded_batch_equals_single_device():
  """The same decisions (bitwise) and views on 8 devices as on 1; the views only up to float
  rounding, since XLA compiles the per-example reductions differently for other shapes."""
  r = recipes.recipe('mocov2')
  n = 16
  images = np.random.default_rng(3).integers(0, 256, (n, S, S, 3), np.uint8)
  draw = lambda t: jax.vmap(lambda k: dev.sample_params(k, r))(dev.example_keys(0, t, n))
  step = lambda im, t: (dev.augment_batch(im, dev.example_keys(0, t, n), r), draw(t))
  single = jax.jit(step)(jax.device_put(images, jax.devices()[0]), 3)
  assert len(jax.devices()) == 8
  _, _, sharding = methods.mesh_and_shardings(jax.devices())
  sharded = jax.jit(step, out_shardings=sharding)(jax.device_put(images, sharding), 3)
  assert sharded[0].sharding.device_set == set(jax.devices())
  jax.tree.map(np.testing.assert_array_equal, sharded[1], single[1])
  np.testing.assert_allclose(sharded[0], single[0], atol=1e-5)
  assert np.abs(np.asarray(single[0][1:]) - np.asarray(single[0][:-1])).mean() > 0.1


def test_example_keys():
  data = lambda k: np.asarray(jax.random.key_data(k))
  a = dev.example_keys(0, 5, 8)
  np.testing.assert_array_equal(data(a), data(dev.example_keys(0, 5, 8)))
  np.testing.assert_array_equal(data(a[:4]), data(dev.example_keys(0, 5, 4)))   # global index
  others = [dev.example_keys(0, 6, 8), dev.example_keys(1, 5, 8), dev.example_keys(0, 5, 8, 1)]
  rows = {tuple(row) for k in [a] + others for row in data(k).reshape(-1, 2)}
  assert len(rows) == 32   # every (seed, step, view, index) its own key
  r = recipes.recipe('mocov2')
  images = np.broadcast_to(IMAGE, (8, S, S, 3))
  augment_batch = jax.jit(lambda im, k: dev.augment_batch(im, k, r))
  views = augment_batch(images, a)
  np.testing.assert_array_equal(views, augment_batch(images, a))
  diff = lambda u, v: np.abs(u - v).mean(axis=(1, 2, 3))
  # The same image at other indices or steps: other views (unless all decisions happen to agree).
  assert (diff(views[1:], views[:1]) > 0.05).mean() > 0.8
  assert (diff(views, augment_batch(images, others[0])) > 0.05).mean() > 0.8


def test_no_tensorflow_on_the_device_path():
  code = ('import sys; import mocov2_jax.data.device_augment; '
          'sys.exit(any(m.startswith("tensorflow") for m in sys.modules))')
  assert subprocess.run([sys.executable, '-c', code]).returncode == 0
