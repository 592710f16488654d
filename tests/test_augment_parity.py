"""Device augmentation (`device_augment`, JAX) against the host recipe (`augment`, tf.data) as
distributions: the same decision rates, factor, order and sigma distributions (both also against
torchvision's definitions: uniform factors, a uniform random order), the same views draw by draw
given the same decisions, and the same statistics of finished views over many draws.

Sampling error, not luck, sets every bound: two-sample tests at p > 1e-4, z-scores below 4.5.
Each check has a negative control (a recipe with one field off) that the same check rejects.
"""
import itertools

import jax
import numpy as np
import pytest
import tensorflow as tf
from scipy import stats

from mocov2_jax.data import augment, recipes
from mocov2_jax.data import device_augment as dev

N = 4000          # draws of the decisions
P_MIN = 1e-4      # two-sample tests: a real difference gives p far below this at N draws
FIELDS = ('flip', 'jitter', 'gray', 'blur')


def host_params(recipe, n=N, seed=11):
  ds = tf.data.Dataset.range(n).map(lambda i: augment.sample_params(
      tf.stack([tf.constant(seed, tf.int64), i]), recipe, 40, 40))
  return {k: v.numpy() for k, v in next(iter(ds.batch(n))).items()}


def device_params(recipe, n=N, seed=11):
  keys = dev.example_keys(seed, 0, n)
  return jax.tree.map(np.array, jax.jit(jax.vmap(lambda k: dev.sample_params(k, recipe)))(keys))


def rate_z(a, b):
  """z-score of the difference between two Bernoulli rates."""
  p = (a.sum() + b.sum()) / (a.size + b.size)
  se = np.sqrt(p * (1 - p) * (1 / a.size + 1 / b.size)) + 1e-12
  return abs(a.mean() - b.mean()) / se


def one_rate_z(a, p):
  """z-score of a Bernoulli sample's rate against the recipe's probability p."""
  if p in (0.0, 1.0):
    return 0.0 if (a == p).all() else np.inf
  return abs(a.mean() - p) / np.sqrt(p * (1 - p) / a.size)


def factor_ranges(recipe):
  b, c, s, h = recipe.jitter
  return [(max(0, 1 - b), 1 + b), (max(0, 1 - c), 1 + c), (max(0, 1 - s), 1 + s), (-h, h)]


def distribution_failures(host, device, recipe):
  """Names of the decisions whose host and device distributions differ, or that are not
  torchvision's (factors and sigma uniform on their ranges, the order a uniform permutation)."""
  bad = [f for f in FIELDS if rate_z(host[f], device[f]) > 4.5]
  bad += [f for f in FIELDS if one_rate_z(device[f], recipe[f'{f}_p']) > 4.5]
  uniform = lambda lo, hi: stats.uniform(lo, hi - lo).cdf
  for i, (lo, hi) in enumerate(factor_ranges(recipe)):
    if hi == lo:
      continue
    h, d = host['jitter_factors'][:, i], device['jitter_factors'][:, i]
    if (stats.ks_2samp(h, d).pvalue < P_MIN or stats.kstest(d, uniform(lo, hi)).pvalue < P_MIN
        or stats.kstest(h, uniform(lo, hi)).pvalue < P_MIN):
      bad.append(f'factor {i}')
  if recipe.blur_p > 0:
    lo, hi = recipe.blur_sigma
    if (stats.ks_2samp(host['blur_sigma'], device['blur_sigma']).pvalue < P_MIN
        or stats.kstest(device['blur_sigma'], uniform(lo, hi)).pvalue < P_MIN):
      bad.append('blur_sigma')
  perms = {o: i for i, o in enumerate(itertools.permutations(range(4)))}
  for name, p in (('host', host), ('device', device)):
    counts = np.bincount([perms[tuple(o)] for o in p['jitter_order']], minlength=24)
    if stats.chisquare(counts).pvalue < P_MIN:
      bad.append(f'{name} order')
  # Where each op comes in the order: the same on both paths (the hue not kept last, say).
  position = lambda p: np.argsort(p['jitter_order'], axis=1)
  table = np.stack([np.bincount(position(p)[:, 3], minlength=4) for p in (host, device)])
  if stats.chi2_contingency(table).pvalue < P_MIN:
    bad.append('hue position')
  return bad


@pytest.mark.parametrize('name', ['mocov1', 'mocov2', 'simclr'])
def test_decisions_are_distributed_as_the_host_and_torchvision(name):
  r = recipes.recipe(name)
  host = host_params(r)
  assert distribution_failures(host, device_params(r), r) == []


def test_a_recipe_off_by_one_field_is_caught():
  """The same checks reject device draws from a recipe with one field wrong."""
  r = recipes.recipe('mocov2')
  host = host_params(r)
  for field, value, caught in [('jitter_p', 0.7, 'jitter'),
                               ('blur_sigma', (0.1, 1.6), 'blur_sigma'),
                               ('jitter', (0.4, 0.4, 0.4, 0.05), 'factor 3'),
                               ('gray_p', 0.25, 'gray')]:
    wrong = recipes.recipe('mocov2')
    wrong[field] = value
    assert caught in distribution_failures(host, device_params(wrong), r), field
  # Half of the orders fixed: the order is no longer a uniform permutation.
  biased = device_params(r)
  biased['jitter_order'][::2] = [0, 1, 2, 3]
  assert 'device order' in distribution_failures(host, biased, r)


@pytest.mark.parametrize('name', ['mocov1', 'mocov2', 'simclr'])
def test_device_view_is_the_host_view_for_every_drawn_decision(name):
  """64 draws of the device's decisions (every jitter order among them for 'mocov2'): the device
  finish equals the host's apply with the identity crop, draw by draw."""
  r, s = recipes.recipe(name), 16
  image = np.random.default_rng(5).integers(0, 256, (s, s, 3), np.uint8)
  draws = device_params(r, n=64, seed=3)
  views = jax.jit(jax.vmap(lambda p: dev.finish(image, p, r)))(draws)
  apply = tf.function(lambda p: augment.apply(tf.constant(image), p, r, s))
  for i in range(64):
    p = {k: tf.constant(v[i]) for k, v in draws.items()}
    want = apply(dict(p, crop=tf.constant([0, 0, s, s]))).numpy()
    np.testing.assert_allclose(views[i], want, atol=1e-4, err_msg=f'draw {i}')


def view_stats(views, recipe):
  """Per view: per-channel mean and std, the share of pixels in 4 bins per channel (in [0, 1]
  units), and the sharpness (mean absolute horizontal difference): [n, 19]."""
  x = np.asarray(views, np.float64)
  if recipe.mean is not None:
    x = x * np.array(recipe.std) + np.array(recipe.mean)
  bins = [((x >= lo) & (x < lo + 0.25 + 1e-6 * (lo == 0.75))).mean(axis=(1, 2))
          for lo in (0.0, 0.25, 0.5, 0.75)]
  sharp = np.abs(np.diff(x, axis=2)).mean(axis=(1, 2, 3))
  return np.concatenate([x.mean(axis=(1, 2)), x.std(axis=(1, 2)), *bins, sharp[:, None]], 1)


def host_and_device_views(recipe, device_recipe=None, n=768, s=16):
  """n views of 4 photo-like images (smooth colour fields and grain), host recipe and device
  recipe: the same host crops (same seeds), then each path's own random decisions."""
  rng = np.random.default_rng(2)
  low = rng.uniform(0, 255, (4, 4, 5, 3)).astype(np.float32)
  images = tf.image.resize(low, [30, 36], 'bicubic') + rng.normal(0, 16, (4, 30, 36, 3))
  images = tf.cast(tf.clip_by_value(images, 0, 255), tf.uint8)
  seeds = tf.stack([tf.fill([n], tf.constant(9, tf.int64)), tf.range(n, dtype=tf.int64)], 1)
  ds = tf.data.Dataset.from_tensor_slices((tf.range(n) % 4, seeds))
  host = ds.map(lambda i, seed: augment.view(tf.gather(images, i), seed, recipe, s))
  crops = ds.map(lambda i, seed: augment.crop_uint8(tf.gather(images, i), seed, recipe, s))
  host, crops = (next(iter(d.batch(n))).numpy() for d in (host, crops))
  device_recipe = device_recipe or recipe
  device = jax.jit(lambda c: dev.augment_batch(c, dev.example_keys(4, 0, n), device_recipe))(crops)
  return view_stats(host, recipe), view_stats(device, recipe)


def worst_z(a, b):
  """The largest Welch z-score over the statistics' means."""
  se = np.sqrt(a.var(0, ddof=1) / len(a) + b.var(0, ddof=1) / len(b)) + 1e-9
  return float(np.max(np.abs(a.mean(0) - b.mean(0)) / se))


def test_finished_views_have_the_host_statistics():
  """Mean, std, per-channel histograms and sharpness of 768 views: device == host within
  sampling error; the same check tells a device recipe without blur, or with twice the jitter,
  apart."""
  r = recipes.recipe('mocov2')
  host, device = host_and_device_views(r)
  assert worst_z(host, device) < 4.5
  no_blur = recipes.recipe('mocov2')
  no_blur.blur_p = 0.0
  assert worst_z(*host_and_device_views(r, no_blur)) > 4.5
  strong = recipes.recipe('mocov2')
  strong.jitter = (0.8, 0.8, 0.8, 0.2)
  assert worst_z(*host_and_device_views(r, strong)) > 4.5
