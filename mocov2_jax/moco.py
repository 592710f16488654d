"""Momentum Contrast as pure functions (He et al. 2019; Chen et al. 2020).

Everything the method adds on top of an encoder and SGD: the momentum (EMA) key encoder, the
InfoNCE loss against a queue of keys, the queue's ring buffer and the key shuffle of shuffle BN.
"""
import jax
import jax.numpy as jnp
import optax


def normalize(x, eps=1e-12):
  """L2-normalise rows in float32 (as torch.nn.functional.normalize)."""
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def momentum_update(key_params, query_params, m: float):
  """k <- m * k + (1 - m) * q, applied before the keys are computed (the reference's order)."""
  return jax.tree.map(lambda k, q: m * k + (1.0 - m) * q, key_params, query_params)


def momentum_schedule(m: float, total_steps: int, kind: str = 'constant'):
  """step -> the key encoder's momentum. 'constant': m (the papers'). 'cosine': BYOL's (Grill et
  al. 2020), from m at step 0 up to 1 at `total_steps`, 1 - (1 - m) (cos(pi t / T) + 1) / 2:
  short runs whose keys must follow the query early and settle late."""
  if kind == 'constant':
    return lambda step: jnp.float32(m)
  if kind == 'cosine':
    return lambda step: 1.0 - (1.0 - m) * (jnp.cos(jnp.pi * step / total_steps) + 1.0) / 2.0
  raise ValueError(f"unknown moco.momentum_schedule {kind!r}: use 'constant' or 'cosine'.")


def logits(q, k, queue, tau: float):
  """[l_pos, l_neg] / tau: column 0 is the positive key, the rest are the queue's negatives."""
  l_pos = jnp.sum(q * k, axis=-1, keepdims=True)
  l_neg = q @ queue.T
  return jnp.concatenate([l_pos, l_neg], axis=-1).astype(jnp.float32) / tau


def info_nce(q, k, queue, tau: float):
  """InfoNCE (Eq. 1 of the v2 paper): mean cross-entropy with label 0. Returns (loss, logits)."""
  z = logits(q, jax.lax.stop_gradient(k), jax.lax.stop_gradient(queue), tau)
  labels = jnp.zeros(z.shape[0], jnp.int32)
  return optax.softmax_cross_entropy_with_integer_labels(z, labels).mean(), z


def enqueue(queue, ptr, keys):
  """Writes the global batch of keys at `ptr` of the (K, dim) ring buffer (K % batch == 0)."""
  queue = jax.lax.dynamic_update_slice_in_dim(queue, keys.astype(queue.dtype), ptr, axis=0)
  return queue, (ptr + keys.shape[0]) % queue.shape[0]


def init_queue(rng, size: int, dim: int):
  """K random unit vectors, as the reference (randn then normalised)."""
  return normalize(jax.random.normal(rng, (size, dim), jnp.float32))


def shuffle(rng, n: int):
  """A fresh permutation of the global batch and its inverse (shuffle BN)."""
  perm = jax.random.permutation(rng, n)
  return perm, jnp.argsort(perm)


def topk_accuracy(z, ks=(1, 5)):
  """Instance-discrimination accuracy: how often the positive (column 0) ranks in the top k."""
  rank = jnp.sum(z[:, 1:] > z[:, :1], axis=-1)  # negatives scoring above the positive
  return {f'top{k}': jnp.mean(rank < k) for k in ks}
