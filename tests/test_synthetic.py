"""The offline shapes dataset: deterministic, balanced, labelled by shape; neither colour nor
position tells images apart (the cues MoCo learned instead of shape in earlier versions)."""
import numpy as np

from mocov2_jax.data import synthetic


def foreground(images):
  """[n, size * size] bool: pixels nearer the foreground colour than the background colour."""
  a = images.astype(np.float32)
  dist = lambda colour: ((a - np.float32(colour))**2).sum(-1)
  return (dist(synthetic.FOREGROUND) < dist(synthetic.BACKGROUND)).reshape(len(a), -1)


def test_deterministic_and_balanced():
  x, y = synthetic.make_shapes(1000, size=24, seed=3)
  assert x.shape == (1000, 24, 24, 3) and x.dtype == np.uint8
  assert y.shape == (1000,) and y.dtype == np.int32
  np.testing.assert_array_equal(np.bincount(y), [100] * 10)
  x2, y2 = synthetic.make_shapes(1000, size=24, seed=3)
  np.testing.assert_array_equal(x, x2)
  np.testing.assert_array_equal(y, y2)
  x3, y3 = synthetic.make_shapes(1000, size=24, seed=4)
  assert (y != y3).any() and (foreground(x) != foreground(x3)).mean() > 0.1
  assert np.ptp(np.bincount(synthetic.make_shapes(25)[1], minlength=10)) <= 1


def test_one_colour_pair():
  """Every pixel is the foreground or the background colour plus noise: colour tells neither
  classes nor instances apart."""
  x, _ = synthetic.make_shapes(500, seed=0)
  pixels = x.reshape(len(x), -1, 3).astype(np.float32)
  expected = np.where(foreground(x)[..., None], np.float32(synthetic.FOREGROUND),
                      np.float32(synthetic.BACKGROUND))
  noise = np.abs(pixels - expected)   # half-normal: mean 0.8 std; the colours are >= 105 apart
  assert noise.mean() < synthetic.NOISE_STD and noise.max() < 8 * synthetic.NOISE_STD


def nearest_neighbour_accuracy(train, train_labels, test, test_labels):
  train, test = train.astype(np.float32), test.astype(np.float32)
  d = (test**2).sum(1)[:, None] - 2 * test @ train.T + (train**2).sum(1)[None]
  return (train_labels[np.argmin(d, 1)] == test_labels).mean()


def test_label_is_in_the_shape_not_the_position():
  x, y = synthetic.make_shapes(3000, seed=0)
  xt, yt = synthetic.make_shapes(500, seed=1)
  fg, fgt = foreground(x), foreground(xt)
  # Shape: 1-NN on the foreground masks recovers the class.
  assert nearest_neighbour_accuracy(fg, y, fgt, yt) > 0.8
  # Every image shows a shape of sensible size.
  area = fg.mean(1)
  assert area.min() > 0.02 and area.max() < 0.6
  # Position: the shape's centre of mass stays near the middle, and the nearest class centroid of
  # it is at chance.
  size = x.shape[1]
  grid = np.stack(np.meshgrid(np.arange(size), np.arange(size), indexing='ij'), -1).reshape(-1, 2)
  centre = lambda m: (m @ (grid + 0.5)) / m.sum(1, keepdims=True) / size - 0.5
  c, ct = centre(fg), centre(fgt)
  assert np.percentile(np.abs(c), 90) < synthetic.MAX_SHIFT   # anywhere in the image: 0.2
  centroids = np.stack([c[y == k].mean(0) for k in range(10)])
  assert (np.argmin(((ct[:, None] - centroids)**2).sum(-1), 1) == yt).mean() < 0.2
