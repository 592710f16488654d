"""The end-to-end mechanism of SimCLR (Chen et al. 2020) as pure functions: the NT-Xent loss.

Both views of every example go through one encoder; the batch of 2N projections is laid out with
the two views of example i at rows 2i and 2i + 1 (interleaved, so a device's shard of the batch
holds whole pairs). Under `jit` with the batch sharded over devices, `z @ z.T` gathers the
projections of the whole global batch and the gradient flows back through that gather.
"""
import jax.numpy as jnp
import optax

from mocov2_jax import moco


def interleave(view1, view2):
  """[N, ...] x 2 -> [2N, ...] with the views of example i at rows 2i, 2i + 1."""
  return jnp.stack([view1, view2], axis=1).reshape((-1,) + view1.shape[1:])


def positives(n2: int):
  """Row index of each row's other view: 2i <-> 2i + 1."""
  return jnp.arange(n2) ^ 1


def similarities(z, tau: float):
  """Cosine similarities / tau, [2N, 2N], with each row's own entry masked to -inf."""
  z = moco.normalize(z)
  s = (z @ z.T) / tau
  return jnp.where(jnp.eye(s.shape[0], dtype=bool), -jnp.inf, s)


def nt_xent(z, tau: float):
  """NT-Xent: for each of the 2N views, cross-entropy of its other view against the 2N - 2 other
  views of the global batch; the mean over all 2N. Returns (loss, similarities / tau)."""
  s = similarities(z, tau)
  loss = optax.softmax_cross_entropy_with_integer_labels(s, positives(s.shape[0])).mean()
  return loss, s


def loss(z, tau: float):
  """The loss SimCLR's code optimises: each view's mean NT-Xent over its N anchors, summed over
  the two views (`reduce_mean(loss_a + loss_b)`), i.e. twice `nt_xent`, the paper's Eq. 1 mean
  over 2N. The factor is not cosmetic: LARS steps the parameters it does not adapt (BN, biases)
  by lr x gradient. Returns (loss, similarities / tau)."""
  mean, s = nt_xent(z, tau)
  return 2.0 * mean, s


def summaries(s, tau: float, ks=(1, 5)):
  """Mean positive and negative cosine, and how often the positive ranks in the top k."""
  n2 = s.shape[0]
  pos = jnp.take_along_axis(s, positives(n2)[:, None], axis=1)
  rank = jnp.sum(s > pos, axis=-1)   # other views scoring above the positive (self is -inf)
  neg_mask = ~jnp.eye(n2, dtype=bool) & (jnp.arange(n2)[None, :] != positives(n2)[:, None])
  logit_neg = jnp.sum(jnp.where(neg_mask, s, 0.0)) / neg_mask.sum()
  out = dict(logit_pos=pos.mean() * tau, logit_neg=logit_neg * tau)
  out.update({f'top{k}': jnp.mean(rank < k) for k in ks})
  return out
