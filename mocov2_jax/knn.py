"""Weighted kNN monitor (Wu et al. 2018, as in the reference CIFAR demo): k = 200, tau = 0.1.

Each test feature votes with its k most similar train features, weighted by exp(cos / tau).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from mocov2_jax import moco


@functools.partial(jax.jit, static_argnames=('k', 'num_classes'))
def _predict(query, bank, bank_labels, *, k, tau, num_classes):
  sim, idx = jax.lax.top_k(query @ bank.T, k)
  votes = jax.nn.one_hot(bank_labels[idx], num_classes) * jnp.exp(sim / tau)[..., None]
  return jnp.argmax(votes.sum(axis=1), axis=-1)


def predict(query, bank, bank_labels, *, k=200, tau=0.1, num_classes=None, chunk=1024):
  """Predicted labels of L2-normalised `query` features from a normalised `bank` (NumPy in/out)."""
  num_classes = num_classes or int(bank_labels.max()) + 1
  k = min(k, len(bank))
  bank, bank_labels = jnp.asarray(bank), jnp.asarray(bank_labels)
  preds = []
  for i in range(0, len(query), chunk):
    q = query[i:i + chunk]
    pad = chunk - len(q) if len(query) > chunk else 0   # one compiled shape for every chunk
    q = np.pad(q, ((0, pad), (0, 0)))
    preds.append(np.asarray(_predict(q, bank, bank_labels, k=k, tau=tau,
                                     num_classes=num_classes))[:len(q) - pad])
  return np.concatenate(preds)


def accuracy(train_feats, train_labels, test_feats, test_labels, *, k=200, tau=0.1):
  """kNN top-1 accuracy in percent."""
  num_classes = int(max(train_labels.max(), test_labels.max())) + 1
  pred = predict(test_feats, train_feats, train_labels, k=k, tau=tau, num_classes=num_classes)
  return 100.0 * float(np.mean(pred == test_labels))


FEATURES = ('backbone', 'head')


def make_feature_fn(model, batch_sharding):
  """Both monitor features of one inference-mode pass (BN running statistics), L2-normalised:
  'backbone', the pooled features, and 'head', the head's output (the reference CIFAR demo's
  monitor: its encoder keeps the fc layer)."""
  @functools.partial(jax.jit, in_shardings=(None, batch_sharding), out_shardings=batch_sharding)
  def features(variables, images):
    h, z = model.apply(variables, images, train=False)
    return {'backbone': moco.normalize(h), 'head': moco.normalize(z)}
  return features


def extract(feature_fn, variables, batches, to_device):
  """Features (an array, or a dict of arrays as `feature_fn` returns) and labels of every real
  (mask = 1) example of `batches`, gathered on every host."""
  gather = lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True))
  feats, labels = [], []
  for batch in batches:
    f = jax.tree.map(gather, feature_fn(variables, to_device(batch['image'])))
    lab, mask = (gather(to_device(batch[k])) for k in ('label', 'mask'))
    keep = mask.astype(bool)
    feats.append(jax.tree.map(lambda a: a[keep], f))
    labels.append(lab[keep])
  feats = jax.tree.map(lambda *a: np.concatenate(a), *feats)
  return feats, np.concatenate(labels).astype(np.int32)
