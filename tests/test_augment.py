"""The TF view augmentation against torchvision's formulas, re-written here in NumPy."""
import itertools
import math

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageFilter

from mocov2_jax.data import augment, recipes

N = 2000   # draws for the statistics: binomial std at p = 0.2 is 0.009


def sample_many(recipe, height, width, n=N):
  ds = tf.data.Dataset.range(n).map(lambda i: augment.sample_params(
      tf.stack([tf.constant(7, tf.int64), i]), recipe, height, width))
  return {k: v.numpy() for k, v in next(iter(ds.batch(n))).items()}


def torchvision_crops(rng, scale, ratio, height, width, n):
  """`RandomResizedCrop.get_params`, transcribed (sequential attempts)."""
  out = []
  for _ in range(n):
    for _ in range(10):
      area = height * width * rng.uniform(*scale)
      aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
      w, h = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
      if 0 < w <= width and 0 < h <= height:
        out.append((h, w))
        break
    else:
      out.append((height, width))   # not reached for the shapes used here
  return np.array(out)


@pytest.mark.parametrize('name,height,width', [('mocov2', 48, 64), ('cifar', 32, 32)])
def test_crop_distribution(name, height, width):
  r = recipes.recipe(name)
  y, x, h, w = sample_many(r, height, width)['crop'].T
  assert (h > 0).all() and (w > 0).all() and (y >= 0).all() and (x >= 0).all()
  assert (y + h <= height).all() and (x + w <= width).all()
  frac, aspect = h * w / (height * width), w / h
  lo, hi = r.crop_scale
  assert frac.min() >= lo * 0.9 and frac.max() <= 1.0 and frac.min() < lo * 1.3
  assert (aspect >= 3 / 4 * (1 - 2 / h)).all() and (aspect <= 4 / 3 * (1 + 2 / h)).all()
  # Offsets cover their whole range: the crop can touch either border.
  assert (y == 0).mean() > 0.02 and (x + w == width).mean() > 0.02
  # Same distribution as torchvision's sequential attempts.
  ref_h, ref_w = torchvision_crops(np.random.default_rng(0), r.crop_scale, r.crop_ratio,
                                   height, width, N).T
  ref_frac = ref_h * ref_w / (height * width)
  for q in (0.1, 0.5, 0.9):
    assert abs(np.quantile(frac, q) - np.quantile(ref_frac, q)) < 0.04
  assert abs(np.mean(np.log(aspect)) - np.mean(np.log(ref_w / ref_h))) < 0.03


def test_crop_fallback_is_centred_with_clamped_ratio():
  # No attempt can fit: scale >= 0.9 of a 8x200 image needs h > 8 at ratio <= 4/3.
  box = augment.crop_box(tf.constant([0, 1]), (0.9, 1.0), (3 / 4, 4 / 3), 8, 200).numpy()
  np.testing.assert_array_equal(box, [0, (200 - 11) // 2, 8, 11])   # w = round(8 * 4/3)


@pytest.mark.parametrize('name', ['mocov1', 'mocov2', 'simclr'])
def test_random_decisions(name):
  r = recipes.recipe(name)
  p = sample_many(r, 40, 40)
  tol = 0.04
  assert abs(p['flip'].mean() - r.flip_p) < tol
  assert abs(p['gray'].mean() - r.gray_p) < tol
  assert abs(p['jitter'].mean() - r.jitter_p) < tol
  assert abs(p['blur'].mean() - r.blur_p) < tol
  sigma = p['blur_sigma']
  assert sigma.min() >= 0.1 and sigma.max() <= 2.0 and sigma.min() < 0.15 and sigma.max() > 1.95
  f = p['jitter_factors']
  b, c, s, h = r.jitter
  for i, strength in enumerate((b, c, s)):
    assert f[:, i].min() >= 1 - strength and f[:, i].max() <= 1 + strength
    assert f[:, i].min() < 1 - 0.95 * strength and f[:, i].max() > 1 + 0.95 * strength
  assert f[:, 3].min() >= -h and f[:, 3].max() <= h and f[:, 3].min() < -0.95 * h
  orders = {tuple(o) for o in p['jitter_order']}
  assert orders == set(itertools.permutations(range(4)))
  # The decisions are independent of each other (e.g. gray does not follow flip).
  assert abs(p['gray'][p['flip']].mean() - p['gray'][~p['flip']].mean()) < 0.06


# ---- colour ops: NumPy, written from torchvision.transforms.functional_tensor ----
def np_gray(x):
  return (x @ np.array(augment.GRAY_WEIGHTS))[..., None]


def np_rgb_to_hsv(x):
  r, g, b = x[..., 0], x[..., 1], x[..., 2]
  maxc, minc = x.max(-1), x.min(-1)
  eqc = maxc == minc
  cr = maxc - minc
  s = cr / np.where(eqc, 1.0, maxc)
  crd = np.where(eqc, 1.0, cr)
  rc, gc, bc = (maxc - r) / crd, (maxc - g) / crd, (maxc - b) / crd
  hr = (maxc == r) * (bc - gc)
  hg = ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
  hb = ((maxc != g) & (maxc != r)) * (4.0 + gc - rc)
  h = np.fmod((hr + hg + hb) / 6.0 + 1.0, 1.0)
  return np.stack([h, s, maxc], -1)


def np_hsv_to_rgb(x):
  h, s, v = x[..., 0], x[..., 1], x[..., 2]
  i = np.floor(h * 6.0)
  f = h * 6.0 - i
  i = i.astype(np.int32) % 6
  p, q, t = np.clip(v * (1 - s), 0, 1), np.clip(v * (1 - s * f), 0, 1), np.clip(
      v * (1 - s * (1 - f)), 0, 1)
  table = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
  out = np.zeros_like(x)
  for k, (r, g, b) in enumerate(table):
    out[i == k] = np.stack([r, g, b], -1)[i == k]
  return out


def np_hue(x, delta):
  hsv = np_rgb_to_hsv(x)
  hsv[..., 0] = (hsv[..., 0] + delta) % 1.0
  return np_hsv_to_rgb(hsv)


NP_OPS = dict(
    brightness=lambda x, f: np.clip(x * f, 0, 1),
    contrast=lambda x, f: np.clip(f * x + (1 - f) * np_gray(x).mean(), 0, 1),
    saturation=lambda x, f: np.clip(f * x + (1 - f) * np_gray(x), 0, 1),
    hue=np_hue)
TF_OPS = dict(brightness=augment.adjust_brightness, contrast=augment.adjust_contrast,
              saturation=augment.adjust_saturation, hue=augment.adjust_hue)
IMAGE = np.random.default_rng(0).uniform(0, 1, (16, 20, 3)).astype(np.float32)
IMAGE[0, :4] = IMAGE[0, :4, :1]   # a few gray pixels (hue undefined)


@pytest.mark.parametrize('op,factor', [
    ('brightness', 1.3), ('brightness', 0.6), ('contrast', 1.4), ('contrast', 0.7),
    ('saturation', 1.8), ('saturation', 0.2), ('hue', 0.1), ('hue', -0.37), ('hue', 0.45)])
def test_color_op_matches_torchvision_formula(op, factor):
  want = NP_OPS[op](IMAGE.astype(np.float64), factor)
  got = TF_OPS[op](tf.constant(IMAGE), factor).numpy()
  np.testing.assert_allclose(got, want, atol=2e-5)
  assert np.abs(want - IMAGE).max() > 0.05   # the op did something


@pytest.mark.parametrize('name', ['mocov1', 'mocov2'])
def test_apply_composes_ops_in_order(name):
  """apply() = crop, flip, [gray], jitter in the drawn order, [gray], normalize (no blur here)."""
  r = recipes.recipe(name)
  img = (IMAGE * 255).round().astype(np.uint8)
  factors, order = np.array([1.2, 0.7, 1.5, 0.08], np.float32), [2, 0, 3, 1]
  params = dict(crop=tf.constant([0, 0, 16, 20]), flip=tf.constant(True),
                jitter=tf.constant(True), jitter_factors=tf.constant(factors),
                jitter_order=tf.constant(order), gray=tf.constant(True), blur=tf.constant(False),
                blur_sigma=tf.constant(1.0))
  got = augment.apply(tf.constant(img), params, r, 16).numpy()
  # The crop is 16x20 resized to 16x16: compare after the same resize, done by TF.
  x = tf.image.resize(img.astype(np.float32), [16, 16], antialias=True).numpy() / 255
  x = x[:, ::-1].astype(np.float64)
  ops = list(NP_OPS.values())
  if r.gray_before_jitter:
    x = np.repeat(np_gray(x), 3, -1)
  for i in order:
    x = ops[i](x, factors[i])
  if not r.gray_before_jitter:
    x = np.repeat(np_gray(x), 3, -1)
  x = (x - r.mean) / r.std
  np.testing.assert_allclose(got, x, atol=1e-4)


def np_gaussian_blur(x, sigma, radius):
  k = np.exp(-np.arange(-radius, radius + 1)**2 / (2 * sigma**2))
  k /= k.sum()
  x = np.apply_along_axis(lambda v: np.convolve(v, k, 'same'), 0, x)
  return np.apply_along_axis(lambda v: np.convolve(v, k, 'same'), 1, x)


@pytest.mark.parametrize('sigma', [0.1, 0.7, 1.5, 2.0])
def test_blur(sigma):
  radius = recipes.blur_radius(recipes.recipe('mocov2'), 64)
  assert radius == 6
  const = np.full((24, 30, 3), 0.3, np.float32)
  np.testing.assert_allclose(augment.gaussian_blur(tf.constant(const), sigma, radius), const,
                             atol=1e-6)
  img = np.random.default_rng(1).uniform(0, 255, (40, 40, 3))
  got = augment.gaussian_blur(tf.constant(img, tf.float32), sigma, radius).numpy()
  want = np_gaussian_blur(img, sigma, 12)   # untruncated reference
  m = 12
  # Truncation at radius 6 = 3 sigma of sigma 2 loses 0.3% of the mass per axis.
  tol = 0.05 if sigma <= 1.5 else 2.0
  np.testing.assert_allclose(got[m:-m, m:-m], want[m:-m, m:-m], atol=tol)
  # Close to PIL's GaussianBlur(radius=sigma) (box approximation, edge pixels repeated).
  # On white noise the kernels' shapes differ by a few levels; on a photo-like image they agree.
  smooth = Image.fromarray(img[:10, :10].astype(np.uint8)).resize((40, 40), Image.BICUBIC)
  pil = np.asarray(smooth.filter(ImageFilter.GaussianBlur(sigma)))
  ours = augment.gaussian_blur(tf.constant(np.asarray(smooth), tf.float32), sigma, radius)
  err = np.abs(ours.numpy() - pil)
  assert err[6:-6, 6:-6].mean() < 1.0 and err.mean() < 1.5, (err[6:-6, 6:-6].mean(), err.mean())


def test_simclr_blur_kernel_is_a_tenth_of_the_side():
  assert recipes.blur_radius(recipes.recipe('simclr'), 224) == 11   # kernel 22 -> 2 * 11 + 1
  assert recipes.blur_radius(recipes.recipe('simclr'), 32) == 1


@pytest.mark.parametrize('name', ['mocov1', 'mocov2', 'cifar', 'simclr'])
def test_view_is_reproducible(name):
  r = recipes.recipe(name)
  img = tf.constant(np.random.default_rng(2).integers(0, 256, (37, 45, 3), np.uint8))
  a = augment.view(img, tf.constant([3, 4]), r, 24).numpy()
  b = augment.view(img, tf.constant([3, 4]), r, 24).numpy()
  c = augment.view(img, tf.constant([3, 5]), r, 24).numpy()
  assert a.shape == (24, 24, 3) and a.dtype == np.float32
  np.testing.assert_array_equal(a, b)
  assert np.abs(a - c).mean() > 0.05
  if r.mean is None:
    assert a.min() >= 0 and a.max() <= 1


def test_eval_view_resize_and_centre_crop():
  r = recipes.recipe('mocov2')
  img = np.random.default_rng(3).integers(0, 256, (40, 64, 3), np.uint8)
  # crop_frac 1 on an image whose shorter side is the size: a pure centre crop, no resampling.
  got = augment.eval_view(tf.constant(img), r, 40, 1.0).numpy()
  want = (img[:, 12:52] / 255 - r.mean) / r.std
  np.testing.assert_allclose(got, want, atol=1e-4)
  assert augment.eval_view(tf.constant(img), r, 28, 0.875).shape == (28, 28, 3)


# ---- the host half of device augmentation: uint8 crops (a faster resize, the same pixels) ----
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
