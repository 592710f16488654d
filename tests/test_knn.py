"""The weighted kNN monitor against a NumPy implementation of its definition."""
import numpy as np

from mocov2_jax import knn


def numpy_knn(query, bank, labels, k, tau, num_classes):
  preds = []
  for q in query:
    sim = bank @ q
    idx = np.argsort(-sim)[:k]
    scores = np.zeros(num_classes)
    np.add.at(scores, labels[idx], np.exp(sim[idx] / tau))
    preds.append(scores.argmax())
  return np.array(preds)


def _unit(x):
  return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def test_predictions_match_numpy():
  rng = np.random.default_rng(0)
  centers = rng.normal(size=(5, 16))
  labels = rng.integers(0, 5, 600)
  bank = _unit(centers[labels] + 1.5 * rng.normal(size=(600, 16)))
  query = _unit(rng.normal(size=(250, 16)))
  for k, tau in [(1, 0.1), (20, 0.1), (200, 0.5)]:
    got = knn.predict(query, bank, labels, k=k, tau=tau, num_classes=5, chunk=64)
    np.testing.assert_array_equal(got, numpy_knn(query, bank, labels, k, tau, 5))


def test_accuracy_on_separable_and_random_features():
  rng = np.random.default_rng(1)
  centers = _unit(rng.normal(size=(4, 32)))
  train_y, test_y = rng.integers(0, 4, 400), rng.integers(0, 4, 100)
  noise = lambda n: 0.05 * rng.normal(size=(n, 32))
  train = _unit(centers[train_y] + noise(400))
  test = _unit(centers[test_y] + noise(100))
  assert knn.accuracy(train, train_y, test, test_y, k=200, tau=0.1) == 100.0
  shuffled = knn.accuracy(train, rng.permutation(train_y), test, test_y, k=200, tau=0.1)
  assert shuffled < 60.0
