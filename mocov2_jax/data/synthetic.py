"""An offline, labelled toy dataset for the default demo: 10 classes told apart by shape only.

Every image is one shape, in the same two colours: its size, its position near the middle and its
own parameters (aspect, thickness, stripe frequency and phase) are random and independent of the
class. Nothing but the shape tells classes apart, and neither colour nor position tells instances
apart, so instance discrimination has to look at the shapes. NumPy only.
"""
import numpy as np

CLASSES = ('disk', 'square', 'triangle', 'ring', 'cross', 'h_stripes', 'v_stripes', 'd_stripes',
           'checkerboard', 'two_dots')

# One colour pair for every image. With colours drawn per image (even from a palette of three),
# the colour pair is what tells instances apart, and MoCo learns colour instead of shape
# (docs/results.md: with a palette of 8 the kNN fell, with one of 3 it gained about 4 points).
FOREGROUND, BACKGROUND = (230, 25, 75), (0, 130, 200)
MAX_SHIFT = 0.15   # of the image size: how far a shape's centre may be from the middle
NOISE_STD = 6.0    # per pixel and channel, so that no two images are alike


def _masks(label, u, v, freq, phase, a):
  """Foreground masks [n, size, size] of one class in shape coordinates (u, v) in about [-1, 1].

  `a` in [0, 1] is a per-image shape parameter (aspect, thickness, spacing): it tells instances
  of a class apart by their shape, which is what instance discrimination should learn here.
  """
  inside = np.maximum(np.abs(u), np.abs(v)) <= 1
  wave = lambda t: np.sin(np.pi * freq * t + phase) > 0
  aspect = 0.55 + 0.45 * a
  r2 = u**2 + v**2
  return [
      lambda: u**2 + (v / aspect)**2 <= 1,
      lambda: (np.abs(u) <= 0.85) & (np.abs(v) <= 0.85 * aspect),
      lambda: (v >= -0.8) & (v <= 0.8) & (np.abs(u) <= (v + 0.8) * (0.3 + 0.5 * a)),
      lambda: (r2 <= 1) & (r2 >= (0.3 + 0.4 * a)**2),
      lambda: ((np.abs(u) <= 0.15 + 0.25 * a) | (np.abs(v) <= 0.15 + 0.25 * a)) & inside,
      lambda: inside & wave(v),
      lambda: inside & wave(u),
      lambda: inside & wave((u + v) / np.sqrt(2)),
      lambda: inside & (wave(u) == wave(v)),
      lambda: ((np.abs(u) - (0.35 + 0.3 * a))**2 + v**2 <= 0.09),
  ][label]()


def make_shapes(num, size=32, seed=0):
  """(images uint8 [num, size, size, 3], labels int32 [num]); deterministic given `seed`."""
  rng = np.random.default_rng(seed)
  labels = rng.permutation(np.arange(num) % len(CLASSES)).astype(np.int32)   # balanced
  radius = rng.uniform(0.22, 0.36, num) * size
  # Near the middle: crops of one image keep the shape near the same place in the view, so a
  # shape that may sit anywhere makes its position an instance cue MoCo learns instead of shape.
  cy, cx = size / 2 + rng.uniform(-MAX_SHIFT, MAX_SHIFT, (2, num)) * size
  freq, phase = rng.uniform(1.5, 2.5, num), rng.uniform(0, 2 * np.pi, num)
  shape = rng.uniform(0, 1, num)
  grid = np.arange(size, dtype=np.float32) + 0.5
  mask = np.zeros((num, size, size), bool)
  for c in range(len(CLASSES)):
    i = np.flatnonzero(labels == c)
    u = (grid[None, None, :] - cx[i, None, None]) / radius[i, None, None]
    v = (grid[None, :, None] - cy[i, None, None]) / radius[i, None, None]
    mask[i] = _masks(c, u, v, freq[i, None, None], phase[i, None, None], shape[i, None, None])
  images = np.where(mask[..., None], np.float32(FOREGROUND), np.float32(BACKGROUND))
  images += rng.standard_normal(images.shape, np.float32) * NOISE_STD
  return np.clip(images, 0, 255).astype(np.uint8), labels
