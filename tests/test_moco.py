"""The MoCo math of `mocov2_jax.moco` against NumPy written from the equations."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mocov2_jax import moco


def _unit(rng, shape):
  x = rng.normal(size=shape)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _np_info_nce(q, k, queue, tau):
  """Eq. 1 of the v2 paper: -log softmax([q.k+, q.queue] / tau)[0], averaged over the batch."""
  z = np.concatenate([np.sum(q * k, -1, keepdims=True), q @ queue.T], axis=1) / tau
  zmax = z.max(1, keepdims=True)
  lse = zmax[:, 0] + np.log(np.exp(z - zmax).sum(1))
  return np.mean(lse - z[:, 0]), z


def _np_info_nce_grad_q(q, k, queue, tau):
  """dL/dq_i = (sum_j p_ij c_j - k_i) / (tau N), c_0 = k_i, c_j = queue_{j-1}."""
  _, z = _np_info_nce(q, k, queue, tau)
  p = np.exp(z - z.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  expected = p[:, :1] * k + p[:, 1:] @ queue
  return (expected - k) / (tau * q.shape[0])


@pytest.mark.parametrize('tau', [0.07, 0.2])
def test_info_nce_matches_numpy(tau):
  rng = np.random.default_rng(0)
  n, kk, d = 8, 32, 16
  q, k, queue = _unit(rng, (n, d)), _unit(rng, (n, d)), _unit(rng, (kk, d))
  loss, z = moco.info_nce(jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32),
                          jnp.asarray(queue, jnp.float32), tau)
  ref_loss, ref_z = _np_info_nce(q, k, queue, tau)
  assert z.shape == (n, 1 + kk)
  np.testing.assert_allclose(np.asarray(z), ref_z, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5)
  # A sanity check on the scale: uniform logits give log(K + 1).
  uniform, _ = moco.info_nce(jnp.zeros((n, d)), jnp.zeros((n, d)), jnp.zeros((kk, d)), tau)
  np.testing.assert_allclose(float(uniform), np.log(kk + 1), rtol=1e-6)


def test_info_nce_gradient():
  """Gradient w.r.t. q equals the analytic one (itself checked by finite differences); keys and
  queue get no gradient (stop_gradient, as the reference's no_grad keys and detached queue)."""
  rng = np.random.default_rng(1)
  n, kk, d, tau = 6, 20, 8, 0.2
  q, k, queue = _unit(rng, (n, d)), _unit(rng, (n, d)), _unit(rng, (kk, d))
  analytic = _np_info_nce_grad_q(q, k, queue, tau)

  # The NumPy analytic gradient vs central finite differences in float64.
  eps, fd = 1e-6, np.zeros_like(q)
  for idx in np.ndindex(*q.shape):
    dq = np.zeros_like(q)
    dq[idx] = eps
    fd[idx] = (_np_info_nce(q + dq, k, queue, tau)[0] -
               _np_info_nce(q - dq, k, queue, tau)[0]) / (2 * eps)
  np.testing.assert_allclose(analytic, fd, rtol=1e-6, atol=1e-9)

  f = lambda q_, k_, queue_: moco.info_nce(q_, k_, queue_, tau)[0]
  gq, gk, gqueue = jax.grad(f, argnums=(0, 1, 2))(
      *(jnp.asarray(a, jnp.float32) for a in (q, k, queue)))
  np.testing.assert_allclose(np.asarray(gq), analytic, rtol=1e-4, atol=1e-6)
  assert np.abs(np.asarray(gq)).max() > 1e-3
  np.testing.assert_array_equal(np.asarray(gk), 0.0)
  np.testing.assert_array_equal(np.asarray(gqueue), 0.0)


def test_normalize_unit_rows_like_torch():
  torch = pytest.importorskip('torch')
  x = np.random.default_rng(2).normal(size=(5, 7)).astype(np.float32)
  x[3] = 0.0  # a zero row stays zero (eps), as torch.nn.functional.normalize
  out = np.asarray(moco.normalize(jnp.asarray(x)))
  ref = torch.nn.functional.normalize(torch.from_numpy(x), dim=1).numpy()
  np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(np.linalg.norm(out[[0, 1, 2, 4]], axis=1), 1.0, rtol=1e-6)
  assert out.dtype == np.float32
  assert moco.normalize(jnp.asarray(x, jnp.bfloat16)).dtype == jnp.float32


def test_momentum_update_matches_numpy():
  rng = np.random.default_rng(3)
  q = {'a': rng.normal(size=(3, 4)), 'b': {'c': rng.normal(size=(5,))}}
  k = {'a': rng.normal(size=(3, 4)), 'b': {'c': rng.normal(size=(5,))}}
  to_j = lambda t: jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), t)
  for m in (0.0, 0.99, 0.999, 1.0):
    out = moco.momentum_update(to_j(k), to_j(q), m)
    assert jax.tree.structure(out) == jax.tree.structure(to_j(k))
    np.testing.assert_allclose(np.asarray(out['a']), m * k['a'] + (1 - m) * q['a'],
                               rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(out['b']['c']), m * k['b']['c'] + (1 - m) * q['b']['c'],
                               rtol=1e-6, atol=1e-7)
  # m = 0 copies the query, m = 1 keeps the key: the argument order matters.
  np.testing.assert_allclose(np.asarray(moco.momentum_update(to_j(k), to_j(q), 0.0)['a']),
                             q['a'], rtol=1e-6)


def test_enqueue_ring_buffer_wraps():
  """Several steps of a (K=12, d) queue with batches of 4: overwrites the oldest keys in order,
  wraps to the start after 3 steps, and the pointer stays in [0, K). Also under jit."""
  rng = np.random.default_rng(4)
  kk, n, d = 12, 4, 3
  queue0 = rng.normal(size=(kk, d)).astype(np.float32)
  ref_queue, ref_ptr = queue0.copy(), 0
  queue, ptr = jnp.asarray(queue0), jnp.zeros((), jnp.int32)
  jit_enqueue = jax.jit(moco.enqueue)
  for step in range(7):  # more than two full turns of the ring
    keys = rng.normal(size=(n, d)).astype(np.float32)
    ref_queue[ref_ptr:ref_ptr + n] = keys
    ref_ptr = (ref_ptr + n) % kk
    queue, ptr = jit_enqueue(queue, ptr, jnp.asarray(keys))
    np.testing.assert_array_equal(np.asarray(queue), ref_queue, err_msg=f'step {step}')
    assert int(ptr) == ref_ptr, f'step {step}'
  assert ref_ptr == 7 * n % kk
  # Eager call with a Python int pointer gives the same.
  q2, p2 = moco.enqueue(jnp.asarray(queue0), 8, jnp.ones((n, d)))
  np.testing.assert_array_equal(np.asarray(q2)[8:], 1.0)
  np.testing.assert_array_equal(np.asarray(q2)[:8], queue0[:8])
  assert int(p2) == 0


def test_init_queue_unit_vectors():
  queue = moco.init_queue(jax.random.PRNGKey(0), 64, 16)
  assert queue.shape == (64, 16) and queue.dtype == jnp.float32
  np.testing.assert_allclose(np.linalg.norm(np.asarray(queue), axis=1), 1.0, rtol=1e-6)
  assert np.linalg.matrix_rank(np.asarray(queue)) == 16  # random, not repeated rows
  other = moco.init_queue(jax.random.PRNGKey(1), 64, 16)
  assert not np.allclose(np.asarray(queue), np.asarray(other))


def test_shuffle_is_exact_and_fresh():
  n = 32
  x = np.random.default_rng(5).normal(size=(n, 4, 2)).astype(np.float32)
  perms = []
  for seed in range(5):
    perm, unperm = moco.shuffle(jax.random.PRNGKey(seed), n)
    perm, unperm = np.asarray(perm), np.asarray(unperm)
    assert sorted(perm.tolist()) == list(range(n))
    np.testing.assert_array_equal(x[perm][unperm], x)
    np.testing.assert_array_equal(perm[unperm], np.arange(n))
    # Through JAX gathers too (what the step does with keys).
    xj = jnp.asarray(x)
    np.testing.assert_array_equal(np.asarray(xj[perm][unperm]), x)
    perms.append(tuple(perm))
  assert len(set(perms)) == len(perms), 'permutations repeat across rngs'
  assert any(p != tuple(range(n)) for p in perms)


def test_topk_accuracy_hand_made():
  z = jnp.asarray([
      [5.0, 1.0, 2.0, 3.0, 0.0, -1.0, 0.5],   # positive ranks first -> top1, top5
      [2.0, 3.0, 1.0, 0.0, -1.0, -2.0, 0.5],  # one negative above -> rank 1: top5 only
      [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, -1.0],   # five above -> rank 5: neither
      [1.0, 2.0, 3.0, 4.0, 5.0, 0.0, -1.0],   # four above -> rank 4: top5 only
  ])
  acc = moco.topk_accuracy(z, ks=(1, 2, 5))
  np.testing.assert_allclose(float(acc['top1']), 1 / 4)
  np.testing.assert_allclose(float(acc['top2']), 2 / 4)
  np.testing.assert_allclose(float(acc['top5']), 3 / 4)
  default = moco.topk_accuracy(z)
  assert set(default) == {'top1', 'top5'}


def test_momentum_schedules():
  """'cosine' is BYOL's: 1 - (1 - m) (cos(pi t / T) + 1) / 2, from m at 0 up to 1 at T."""
  t = np.arange(0, 101)
  cosine = moco.momentum_schedule(0.9, 100, 'cosine')
  np.testing.assert_allclose([float(cosine(i)) for i in t],
                             1 - 0.1 * (np.cos(np.pi * t / 100) + 1) / 2, rtol=0, atol=1e-6)
  assert float(cosine(0)) == pytest.approx(0.9) and float(cosine(100)) == pytest.approx(1.0)
  assert float(moco.momentum_schedule(0.99, 100)(37)) == pytest.approx(0.99)
  with pytest.raises(ValueError, match='momentum_schedule'):
    moco.momentum_schedule(0.9, 100, 'linear')
