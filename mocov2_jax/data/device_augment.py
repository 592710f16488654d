"""The device half of a view: everything `augment.apply` does after the crop and resize, in JAX.

The host then only decodes and crops (`augment.crop_uint8`: uint8, a quarter of float32's bytes),
and the accelerator finishes each view inside the jitted step. Same recipe fields and
torchvision semantics as `augment.py`, which tests/test_device_augment.py checks op by op. No
TensorFlow here: this runs on accelerator hosts that may not have it. On TPUs the step runs the
same ops as one Pallas kernel per view (`augment_kernel`).
"""
import dm_pix
import jax
import jax.numpy as jnp

from mocov2_jax.data import recipes

GRAY_WEIGHTS = (0.299, 0.587, 0.114)   # PIL's convert('L'), as augment.GRAY_WEIGHTS


def example_keys(seed: int, step, num: int, view: int = 0):
  """One key per example of the global batch, from (seed, step, view, global index) only.

  Nothing depends on the device count or the process: example i of step t gets the same view on
  1 device, 8 devices or several hosts. Call with `view` 0 and 1 for the two views of an image.
  """
  base = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), step), view)
  return jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.arange(num))


def sample_params(key, recipe):
  """Every random decision of one view but the crop: `augment.sample_params`'s distributions."""
  k = jax.random.split(key, 7)
  u = lambda i, shape=(), lo=0.0, hi=1.0: jax.random.uniform(k[i], shape, jnp.float32, lo, hi)
  b, c, s, h = recipe.jitter
  lo = jnp.array([max(0.0, 1 - b), max(0.0, 1 - c), max(0.0, 1 - s), -h], jnp.float32)
  hi = jnp.array([1 + b, 1 + c, 1 + s, h], jnp.float32)
  return dict(
      flip=u(0) < recipe.flip_p,
      jitter=u(1) < recipe.jitter_p,
      jitter_factors=lo + (hi - lo) * u(2, (4,)),   # brightness, contrast, saturation, hue
      jitter_order=jnp.argsort(u(3, (4,))).astype(jnp.int32),   # a uniform random permutation
      gray=u(4) < recipe.gray_p,
      blur=u(5) < recipe.blur_p,
      blur_sigma=u(6, (), *recipe.blur_sigma))


# Colour ops on float images in [0, 1], torchvision's formulas (`_blend` clamps after each op).
def grayscale(image):
  # dm_pix.rgb_to_grayscale weighs 0.2989 (torchvision's tensor op); PIL and the host use 0.299.
  r, g, b = image[..., 0], image[..., 1], image[..., 2]   # a weighted sum, not a (TF32) matmul
  gray = GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b
  return jnp.broadcast_to(gray[..., None], image.shape)


def _blend(image, other, factor):
  """torchvision's `_blend`, which its brightness, contrast and saturation ops share."""
  return jnp.clip(factor * image + (1 - factor) * other, 0.0, 1.0)


# dm-pix's brightness adds a delta, its contrast blends to per-channel means and its saturation
# scales HSV's S; torchvision's (the reference's) blend with black, the gray mean, the gray image.
adjust_brightness = lambda image, factor: jnp.clip(image * factor, 0.0, 1.0)
adjust_contrast = lambda image, factor: _blend(image, jnp.mean(grayscale(image)[..., 0]), factor)
adjust_saturation = lambda image, factor: _blend(image, grayscale(image), factor)


def adjust_hue(image, delta, channel_axis=-1):
  """dm-pix's HSV round trip is torchvision's (red > green > blue priority for H, H mod 1)."""
  return dm_pix.adjust_hue(image, delta, channel_axis=channel_axis)


def _blend_op(image, op, factors, strengths):
  """Brightness, contrast or saturation (`op` 0, 1, 2, traced) as the one blend they share, with
  black, the gray mean or the gray image; the hue (3) and ops of strength 0 leave the image."""
  gray = grayscale(image)
  other = jnp.where(op == 0, 0.0, jnp.where(op == 1, jnp.mean(gray[..., 0]), gray))
  on = jnp.asarray([s > 0 for s in strengths[:3]] + [False])[op]
  return jnp.where(on, _blend(image, other, factors[op]), image)


def color_jitter(image, factors, order, strengths):
  """torchvision ColorJitter: the four ops in the traced `order`; ops of strength 0 are skipped.

  Under vmap a switch on a traced index computes every branch: one switch per position of the
  order computed all four ops at each position, the costly hue (an HSV round trip) four times.
  Here the hue runs once, between the blends drawn before it and those drawn after it.
  """
  if not strengths[3]:
    for k in range(4):
      image = _blend_op(image, order[k], factors, strengths)
    return image
  hue_at = jnp.argmax(order == 3)
  for k in range(3):    # the positions that can come before the hue
    image = jnp.where(k < hue_at, _blend_op(image, order[k], factors, strengths), image)
  image = adjust_hue(image, factors[3])
  for k in range(1, 4):  # and after it
    image = jnp.where(k > hue_at, _blend_op(image, order[k], factors, strengths), image)
  return image


def blur_taps(sigma, radius: int):
  """[2 radius + 1]: the normalised Gaussian's weights at -radius..radius."""
  t = jnp.arange(-radius, radius + 1).astype(jnp.float32)
  kernel = jnp.exp(-t**2 / (2 * sigma**2))
  return kernel / jnp.sum(kernel)


def blur_matrix(taps, n: int, flip=False):
  """[n, n]: row i weighs the 2 radius + 1 pixels around i by `taps` (`blur_taps`), the edge
  pixels repeated outside the image (PIL's). With `flip` (traced) the columns are reversed: the
  blur of the mirrored row. Built from iotas, so the Pallas kernel builds it too."""
  radius = (len(taps) - 1) // 2
  rows = jax.lax.broadcasted_iota(jnp.int32, (n, n), 0)
  cols = jax.lax.broadcasted_iota(jnp.int32, (n, n), 1)
  source = jnp.where(flip, n - 1 - cols, cols)
  matrix = jnp.zeros((n, n), jnp.float32)
  for t, w in zip(range(-radius, radius + 1), taps):
    matrix = matrix + jnp.where(jnp.clip(rows + t, 0, n - 1) == source, w, 0.0)
  return matrix


def gaussian_blur(image, sigma, radius: int):
  """Separable Gaussian on [H, W, C] as two matrix products, K_h @ image @ K_w^T per channel.

  A matrix unit's work on TPUs: XLA materialised the padded copies and shifted sums of the
  separable passes (the TPU compiler's estimate: 11.2 MB an image at 224 px, now 6.2), and a
  convolution with one kernel per image (sigma is drawn per image) vmaps into a grouped
  convolution, slow on every backend. HIGHEST precision: float32 sums, as the host's."""
  h, w = image.shape[:2]
  taps = blur_taps(sigma, radius)
  return jnp.einsum('ij,jkc,lk->ilc', blur_matrix(taps, h), image, blur_matrix(taps, w),
                    precision=jax.lax.Precision.HIGHEST)


def normalize(image, recipe):
  if recipe.mean is None:
    return image
  return (image - jnp.array(recipe.mean, jnp.float32)) / jnp.array(recipe.std, jnp.float32)


def finish(image, params, recipe):
  """The view of a uint8 [S, S, 3] crop given `sample_params`: float32 [S, S, 3].

  Flip, gray and jitter in the recipe's order, blur, normalise. Decisions select with `jnp.where`
  (under vmap a `cond` computes both branches anyway), so this vmaps and jits as is.
  """
  # Flipped as uint8: a quarter of the bytes (a reversal is a pass of its own on TPUs).
  x = jnp.where(params['flip'], dm_pix.flip_left_right(image), image).astype(jnp.float32) / 255.0
  jitter = lambda im: jnp.where(params['jitter'], color_jitter(
      im, params['jitter_factors'], params['jitter_order'], recipe.jitter), im)
  gray = lambda im: jnp.where(params['gray'], grayscale(im), im)
  x = jitter(gray(x)) if recipe.gray_before_jitter else gray(jitter(x))
  if recipe.blur_p > 0:
    blurred = gaussian_blur(x, params['blur_sigma'], recipes.blur_radius(recipe, image.shape[0]))
    x = jnp.where(params['blur'], blurred, x)
  return normalize(x, recipe)


def finish_batch(images, params, recipe):
  """uint8 [N, S, S, 3] crops and their `sample_params` (vmapped) -> float32 [N, S, S, 3]."""
  return jax.vmap(lambda im, p: finish(im, p, recipe))(images, params)


def augment_batch(images, keys, recipe):
  """uint8 [N, S, S, 3] crops and their `example_keys` [N] -> float32 [N, S, S, 3] views."""
  return finish_batch(images, jax.vmap(lambda k: sample_params(k, recipe))(keys), recipe)
