"""An offline, labelled toy dataset for the default demo: 10 classes told apart by shape only.

Foreground and background colours (two of a three-colour palette), position, size and stripe
phase are random and independent of the class. Colour carries no class information, and,
with a small palette, little instance information either, so instance discrimination has to look
at the shapes: a random-init encoder's kNN is mediocre and MoCo improves on it. NumPy only.
"""
import numpy as np

CLASSES = ('disk', 'square', 'triangle', 'ring', 'cross', 'h_stripes', 'v_stripes', 'd_stripes',
           'checkerboard', 'two_dots')

# Three colours give six (foreground, background) pairs: with many more, the colour pair alone
# tells instances apart and MoCo learns colour instead of shape (seen with 8: no kNN gain).
PALETTE = np.array([(230, 25, 75), (60, 180, 75), (0, 130, 200)], np.float32)


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
  bg_index = rng.integers(0, len(PALETTE), num)
  fg_index = (bg_index + rng.integers(1, len(PALETTE), num)) % len(PALETTE)   # never the bg
  bg, fg = PALETTE[bg_index], PALETTE[fg_index]
  radius = rng.uniform(0.22, 0.36, num) * size
  cy, cx = (rng.uniform(0, 1, (2, num)) * (size - 2 * radius) + radius)
  freq, phase = rng.uniform(1.5, 2.5, num), rng.uniform(0, 2 * np.pi, num)
  shape = rng.uniform(0, 1, num)
  grid = np.arange(size, dtype=np.float32) + 0.5
  mask = np.zeros((num, size, size), bool)
  for c in range(len(CLASSES)):
    i = np.flatnonzero(labels == c)
    u = (grid[None, None, :] - cx[i, None, None]) / radius[i, None, None]
    v = (grid[None, :, None] - cy[i, None, None]) / radius[i, None, None]
    mask[i] = _masks(c, u, v, freq[i, None, None], phase[i, None, None], shape[i, None, None])
  images = np.where(mask[..., None], fg[:, None, None], bg[:, None, None]).astype(np.float32)
  images += rng.standard_normal(images.shape, np.float32) * 6
  return np.clip(images, 0, 255).astype(np.uint8), labels
