"""One augmented view in TensorFlow, with torchvision's semantics (the reference's PIL transforms).

Two halves, which `device_augment.py` mirrors in JAX: `sample_params` draws every random decision
of a view from a stateless seed (reproducible, no hidden state), and `apply` is a pure function of
the image and those decisions.
"""
import math

import tensorflow as tf

from mocov2_jax.data import recipes

GRAY_WEIGHTS = (0.299, 0.587, 0.114)   # ITU-R 601-2, as PIL's convert('L')
CROP_ATTEMPTS = 10


def crop_box(seed, scale, ratio, height, width):
  """torchvision `RandomResizedCrop.get_params` with its 10 attempts vectorised: [y, x, h, w]."""
  s_area, s_ratio, s_offset = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
  fh, fw = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
  area = fh * fw * tf.random.stateless_uniform([CROP_ATTEMPTS], s_area, scale[0], scale[1])
  aspect = tf.exp(tf.random.stateless_uniform(
      [CROP_ATTEMPTS], s_ratio, math.log(ratio[0]), math.log(ratio[1])))
  w = tf.cast(tf.round(tf.sqrt(area * aspect)), tf.int32)   # round half to even, like Python
  h = tf.cast(tf.round(tf.sqrt(area / aspect)), tf.int32)
  ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
  first = tf.argmax(tf.cast(ok, tf.int32))                  # the first accepted attempt
  # Fallback after 10 failures: the largest centred crop with the ratio clamped into range.
  in_ratio = fw / fh
  fb_w = tf.where(in_ratio > ratio[1], tf.cast(tf.round(fh * ratio[1]), tf.int32), width)
  fb_h = tf.where(in_ratio < ratio[0], tf.cast(tf.round(fw / ratio[0]), tf.int32), height)
  any_ok = tf.reduce_any(ok)
  h, w = tf.where(any_ok, h[first], fb_h), tf.where(any_ok, w[first], fb_w)
  u = tf.random.stateless_uniform([2], s_offset)
  y = tf.where(any_ok, tf.cast(u[0] * tf.cast(height - h + 1, tf.float32), tf.int32),
               (height - h) // 2)
  x = tf.where(any_ok, tf.cast(u[1] * tf.cast(width - w + 1, tf.float32), tf.int32),
               (width - w) // 2)
  return tf.stack([y, x, h, w])


def sample_params(seed, recipe, height, width):
  """Every random decision of one view, drawn from `seed` (int [2]), as a dict of tensors."""
  seeds = tf.unstack(tf.random.experimental.stateless_split(seed, 8))
  u = lambda i, shape=(), lo=0.0, hi=1.0: tf.random.stateless_uniform(shape, seeds[i], lo, hi)
  b, c, s, h = recipe.jitter
  lo = tf.constant([max(0.0, 1 - b), max(0.0, 1 - c), max(0.0, 1 - s), -h])
  hi = tf.constant([1 + b, 1 + c, 1 + s, h])
  return dict(
      crop=crop_box(seeds[0], recipe.crop_scale, recipe.crop_ratio, height, width),
      flip=u(1) < recipe.flip_p,
      jitter=u(2) < recipe.jitter_p,
      jitter_factors=lo + (hi - lo) * u(3, [4]),   # brightness, contrast, saturation, hue
      jitter_order=tf.argsort(u(4, [4])),
      gray=u(5) < recipe.gray_p,
      blur=u(6) < recipe.blur_p,
      blur_sigma=u(7, (), *recipe.blur_sigma))


# Colour ops on float images in [0, 1], torchvision's formulas (`_blend` clamps after each op).
def grayscale(image):
  gray = tf.tensordot(image, tf.constant(GRAY_WEIGHTS), axes=1)[..., None]
  return tf.broadcast_to(gray, tf.shape(image))


def adjust_brightness(image, factor):
  return tf.clip_by_value(image * factor, 0.0, 1.0)


def adjust_contrast(image, factor):
  mean = tf.reduce_mean(grayscale(image)[..., 0])
  return tf.clip_by_value(factor * image + (1 - factor) * mean, 0.0, 1.0)


def adjust_saturation(image, factor):
  return tf.clip_by_value(factor * image + (1 - factor) * grayscale(image), 0.0, 1.0)


def adjust_hue(image, delta):
  """Shift H of HSV by `delta` (mod 1): TF's kernel is torchvision's `adjust_hue` formula."""
  return tf.image.adjust_hue(image, delta)


def color_jitter(image, factors, order, strengths):
  """torchvision ColorJitter: the four ops in the given order; ops with strength 0 are skipped."""
  ops = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)
  branch = lambda i, im: (lambda: ops[i](im, factors[i])) if strengths[i] else (lambda: im)
  for k in range(4):
    image = tf.switch_case(order[k], [branch(i, image) for i in range(4)])
  return image


def gaussian_blur(image, sigma, radius):
  """Separable Gaussian on [H, W, C]; edge pixels are repeated outside the image, as PIL does."""
  x = tf.range(-radius, radius + 1, dtype=tf.float32)
  kernel = tf.exp(-x**2 / (2 * sigma**2))
  kernel /= tf.reduce_sum(kernel)
  channels = image.shape[-1]
  for axis in (0, 1):
    n = tf.shape(image)[axis]
    image = tf.gather(image, tf.clip_by_value(tf.range(-radius, n + radius), 0, n - 1), axis=axis)
    shape = [2 * radius + 1, 1] if axis == 0 else [1, 2 * radius + 1]
    k = tf.tile(tf.reshape(kernel, shape + [1, 1]), [1, 1, channels, 1])
    image = tf.nn.depthwise_conv2d(image[None], k, [1, 1, 1, 1], 'VALID')[0]
  return image


def normalize(image, recipe):
  if recipe.mean is None:
    return image
  return (image - tf.constant(recipe.mean)) / tf.constant(recipe.std)


def apply(image, params, recipe, size):
  """The view of a uint8 [H, W, 3] image given `sample_params`: float32 [size, size, 3]."""
  y, x, h, w = tf.unstack(params['crop'])
  image = tf.cast(image[y:y + h, x:x + w], tf.float32)
  # antialias=True: PIL filters with a widened kernel when it shrinks, like this.
  image = tf.image.resize(image, [size, size], recipe.interpolation, antialias=True)
  image = tf.clip_by_value(image / 255.0, 0.0, 1.0)   # bicubic overshoots; PIL clips to uint8
  image = tf.where(params['flip'], image[:, ::-1], image)
  jitter = lambda im: tf.cond(params['jitter'], lambda: color_jitter(
      im, params['jitter_factors'], params['jitter_order'], recipe.jitter), lambda: im)
  gray = lambda im: tf.cond(params['gray'], lambda: grayscale(im), lambda: im)
  image = jitter(gray(image)) if recipe.gray_before_jitter else gray(jitter(image))
  if recipe.blur_p > 0:
    radius = recipes.blur_radius(recipe, size)
    image = tf.cond(params['blur'],
                    lambda: gaussian_blur(image, params['blur_sigma'], radius), lambda: image)
  image = normalize(image, recipe)
  image.set_shape([size, size, 3])
  return image


def view(image, seed, recipe, size):
  """One random view of a uint8 [H, W, 3] image; the same seed gives the same view."""
  shape = tf.shape(image)
  return apply(image, sample_params(seed, recipe, shape[0], shape[1]), recipe, size)


# tf.image.resize's kernels for antialiased resizing (ScaleAndTranslate's names).
RESIZE_KERNELS = {'bilinear': 'triangle', 'bicubic': 'keyscubic'}


def _resize_rows(x, size, kernel):
  """Antialiased resize of axis 0 of a 2-D [n, m] array to `size` rows: float32 [size, m].

  ScaleAndTranslate's row pass is a vectorised sum of whole rows; its column pass runs pixel by
  pixel. With the other axes flattened into one column the second pass is a copy, so the work is
  the fast half only. Same spans and weights as `tf.image.resize(..., antialias=True)`."""
  scale = tf.stack([tf.cast(size, tf.float32) / tf.cast(tf.shape(x)[0], tf.float32), 1.0])
  y = tf.raw_ops.ScaleAndTranslate(images=x[None, :, None, :], size=tf.stack([size, 1]),
                                   scale=scale, translation=tf.zeros([2]), kernel_type=kernel,
                                   antialias=True)
  return y[0, :, 0, :]


def resize_uint8(image, size, interpolation):
  """`tf.image.resize(image, [size, size], interpolation, antialias=True)` rounded to uint8, as
  two row passes with a transpose between them: the op's column pass is scalar code (a crop of
  ~300 px to 224: 1.45 -> 1.1 core-ms with the rounding). The passes are the op's own, in its
  order (rows, then columns), so the result is the op's to the bit."""
  kernel = RESIZE_KERNELS[interpolation]
  h, w, c = tf.shape(image)[0], tf.shape(image)[1], image.shape[-1] or tf.shape(image)[2]
  x = _resize_rows(tf.reshape(image, [h, w * c]), size, kernel)               # [size, w * c]
  x = tf.reshape(tf.transpose(tf.reshape(x, [size, w, c]), [1, 0, 2]), [w, size * c])
  x = _resize_rows(x, size, kernel)                                            # [size(x), size * c]
  x = tf.cast(tf.round(tf.clip_by_value(x, 0.0, 255.0)), tf.uint8)
  return tf.transpose(tf.reshape(x, [size, size, c]), [1, 0, 2])


def crop_uint8(image, seed, recipe, size):
  """The host half of on-device augmentation (`device_augment.finish` does the rest): `view`'s
  crop and resize for the same seed, rounded to uint8 [size, size, 3] (4x fewer bytes to send)."""
  shape = tf.shape(image)
  y, x, h, w = tf.unstack(sample_params(seed, recipe, shape[0], shape[1])['crop'])
  image = resize_uint8(image[y:y + h, x:x + w], size, recipe.interpolation)
  image.set_shape([size, size, 3])
  return image


def eval_view(image, recipe, size, crop_frac):
  """Resize the shorter side to round(size / crop_frac), then centre-crop `size` (torchvision)."""
  shape = tf.shape(image)
  h, w = shape[0], shape[1]
  short = round(size / crop_frac)
  # torchvision: the longer side becomes int(short * long / shorter side).
  new_h = tf.where(h <= w, short, short * h // w)
  new_w = tf.where(h <= w, short * w // h, short)
  image = tf.image.resize(tf.cast(image, tf.float32), tf.stack([new_h, new_w]),
                          recipe.interpolation, antialias=True)
  top = tf.cast(tf.round(tf.cast(new_h - size, tf.float32) / 2), tf.int32)
  left = tf.cast(tf.round(tf.cast(new_w - size, tf.float32) / 2), tf.int32)
  image = tf.clip_by_value(image[top:top + size, left:left + size] / 255.0, 0.0, 1.0)
  image = normalize(image, recipe)
  image.set_shape([size, size, 3])
  return image
