"""The offline shapes dataset: deterministic, balanced, labelled by shape and not by colour."""
import numpy as np

from mocov2_jax.data import synthetic


def test_deterministic_and_balanced():
  x, y = synthetic.make_shapes(1000, size=24, seed=3)
  assert x.shape == (1000, 24, 24, 3) and x.dtype == np.uint8
  assert y.shape == (1000,) and y.dtype == np.int32
  np.testing.assert_array_equal(np.bincount(y), [100] * 10)
  x2, y2 = synthetic.make_shapes(1000, size=24, seed=3)
  np.testing.assert_array_equal(x, x2)
  np.testing.assert_array_equal(y, y2)
  x3, y3 = synthetic.make_shapes(1000, size=24, seed=4)
  assert (y != y3).any() and np.abs(x.astype(int) - x3).mean() > 20
  assert np.ptp(np.bincount(synthetic.make_shapes(25)[1], minlength=10)) <= 1


def foreground(images):
  """Pixels far from the image's background colour (the median border colour)."""
  a = images.astype(np.float32)
  border = np.concatenate([a[:, 0], a[:, -1], a[:, :, 0], a[:, :, -1]], 1)
  bg = np.median(border, 1)[:, None, None]
  return (np.abs(a - bg).sum(-1) > 60).reshape(len(a), -1).astype(np.float32)


def nearest_neighbour_accuracy(train, train_labels, test, test_labels):
  d = (test**2).sum(1)[:, None] - 2 * test @ train.T + (train**2).sum(1)[None]
  return (train_labels[np.argmin(d, 1)] == test_labels).mean()


def test_label_is_in_the_shape_not_the_colour():
  x, y = synthetic.make_shapes(3000, seed=0)
  xt, yt = synthetic.make_shapes(500, seed=1)
  # Colour: nearest class centroid of the mean RGB is at chance.
  mean = lambda a: a.reshape(len(a), -1, 3).mean(1)
  centroids = np.stack([mean(x)[y == k].mean(0) for k in range(10)])
  pred = np.argmin(((mean(xt)[:, None] - centroids)**2).sum(-1), 1)
  assert (pred == yt).mean() < 0.2
  # Shape: 1-NN on the colour-free foreground masks recovers the class.
  assert nearest_neighbour_accuracy(foreground(x), y, foreground(xt), yt) > 0.8
  # Every image shows a shape of sensible size.
  fg = foreground(x).mean(1)
  assert fg.min() > 0.02 and fg.max() < 0.6
