"""The end-to-end mechanism against references written from the equations: NT-Xent (NumPy), its
gradient over 8 devices, LARS with its exclusions, global BN, the warm-up + cosine schedule, and
the whole step on 1 vs 8 devices."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mocov2_jax import methods, optim, simclr
from mocov2_jax.models import resnet


def _np_nt_xent(z, tau):
  """SimCLR Eq. 1 with the pairs (2i, 2i+1): l(i, j) = -log exp(s_ij / tau) / sum_{k != i}
  exp(s_ik / tau), averaged over all 2N anchors."""
  z = z / np.linalg.norm(z, axis=1, keepdims=True)
  s = z @ z.T / tau
  total = 0.0
  for i in range(len(z)):
    j = i + 1 if i % 2 == 0 else i - 1
    others = np.delete(s[i], i)
    total += -(s[i, j] - np.log(np.sum(np.exp(others))))
  return total / len(z)


def test_interleave_pairs_views():
  a, b = np.arange(3)[:, None] * 10, np.arange(3)[:, None] * 10 + 1
  np.testing.assert_array_equal(simclr.interleave(a, b)[:, 0], [0, 1, 10, 11, 20, 21])
  np.testing.assert_array_equal(simclr.positives(6), [1, 0, 3, 2, 5, 4])


@pytest.mark.parametrize('tau', [0.1, 0.5])
def test_nt_xent_matches_numpy_and_its_gradient(tau):
  z = np.random.default_rng(0).normal(size=(12, 5))
  loss, _ = simclr.nt_xent(jnp.asarray(z, jnp.float32), tau)
  np.testing.assert_allclose(float(loss), _np_nt_xent(z, tau), rtol=1e-5)
  grad = np.asarray(jax.grad(lambda x: simclr.nt_xent(x, tau)[0])(jnp.asarray(z, jnp.float32)))
  eps, num = 1e-5, np.zeros_like(z)
  for idx in np.ndindex(*z.shape):
    d = np.zeros_like(z)
    d[idx] = eps
    num[idx] = (_np_nt_xent(z + d, tau) - _np_nt_xent(z - d, tau)) / (2 * eps)
  np.testing.assert_allclose(grad, num, rtol=2e-3, atol=2e-4 * np.abs(num).max())


def test_summaries_match_numpy():
  tau = 0.2
  z = np.random.default_rng(1).normal(size=(8, 4)).astype(np.float32)
  _, s = simclr.nt_xent(jnp.asarray(z), tau)
  out = {k: float(v) for k, v in simclr.summaries(s, tau).items()}
  zn = z / np.linalg.norm(z, axis=1, keepdims=True)
  cos = zn @ zn.T
  pos = np.array([cos[i, i ^ 1] for i in range(8)])
  negs = [cos[i, k] for i in range(8) for k in range(8) if k not in (i, i ^ 1)]
  ranks = np.array([sum(cos[i, k] > pos[i] for k in range(8) if k != i) for i in range(8)])
  np.testing.assert_allclose(out['logit_pos'], pos.mean(), rtol=1e-5)
  np.testing.assert_allclose(out['logit_neg'], np.mean(negs), rtol=1e-5, atol=1e-6)
  assert out['top1'] == np.mean(ranks < 1) and out['top5'] == np.mean(ranks < 5)


def test_nt_xent_gradient_on_8_devices_uses_the_global_batch():
  """Sharded over 8 devices, the loss and gradient equal the single-device ones: each view's
  negatives are the 2N - 2 other views of the global batch, gathered with gradients. A loss over
  each device's shard alone (local negatives) gives a different gradient."""
  assert jax.device_count() == 8
  tau = 0.1
  z = jnp.asarray(np.random.default_rng(2).normal(size=(32, 6)), jnp.float32)
  loss_fn = lambda x: simclr.nt_xent(x, tau)[0]
  one = jax.jit(jax.value_and_grad(loss_fn))(jax.device_put(z, jax.devices()[0]))
  _, _, data = methods.mesh_and_shardings(jax.devices())
  zs = jax.device_put(z, data)
  eight = jax.jit(jax.value_and_grad(loss_fn), in_shardings=data)(zs)
  assert eight[1].sharding.device_set == set(jax.devices())
  np.testing.assert_allclose(float(eight[0]), float(one[0]), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(eight[1]), np.asarray(one[1]), rtol=1e-5, atol=1e-7)
  local = jax.grad(lambda x: jnp.mean(jax.vmap(loss_fn)(x.reshape(8, 4, 6))))(z)
  assert np.abs(np.asarray(local) - np.asarray(one[1])).max() > 1e-2


def test_lars_matches_its_equations():
  """d = g + wd w; d *= eta |w| / |d|; buf = mu buf + lr d; w -= buf; BN parameters and biases
  (1-D leaves) get plain momentum SGD: no weight decay, no trust ratio. A zero gradient keeps a
  trust ratio of 1."""
  cfg = ml_collections.ConfigDict(dict(optimizer='lars', weight_decay=1e-2,
                                       trust_coefficient=0.001, momentum=0.9))
  rng = np.random.default_rng(3)
  params = {'conv': {'kernel': rng.normal(size=(3, 3, 2, 4))},
            'dense': {'kernel': rng.normal(size=(4, 5)), 'bias': rng.normal(size=5)},
            'bn': {'scale': 1 + rng.normal(size=4) * .1, 'bias': rng.normal(size=4)},
            'still': {'kernel': rng.normal(size=(2, 2))}}
  params = jax.tree.map(lambda x: x.astype(np.float32), params)
  lrs = [0.5, 0.25, 0.125]
  tx = optim.create(cfg, lambda i: jnp.asarray(lrs)[i])
  opt_state = tx.init(params)
  w, ref, buf = params, jax.tree.map(np.float64, params), jax.tree.map(np.zeros_like, params)
  for i, lr in enumerate(lrs):
    grads = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), params)
    grads['still']['kernel'] = np.zeros((2, 2), np.float32)
    updates, opt_state = tx.update(grads, opt_state, w)
    w = jax.tree.map(lambda p, u: p + u, w, updates)

    def ref_update(path, p, g, b):
      if p.ndim > 1:
        d = g + cfg.weight_decay * p
        wn, dn = np.linalg.norm(p), np.linalg.norm(d)
        d = d * (cfg.trust_coefficient * wn / dn if wn > 0 and dn > 0 else 1.0)
      else:
        d = g
      return cfg.momentum * b + lr * d

    buf = jax.tree_util.tree_map_with_path(ref_update, ref, grads, buf)
    ref = jax.tree.map(lambda p, b: p - b, ref, buf)
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(w)[0], jax.tree.leaves(ref)):
      np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6,
                                 err_msg=f'step {i}: {jax.tree_util.keystr(path)}')
  # The adapted step of a kernel is tiny (eta |w|); a BN parameter moves by ~ lr |g|.
  assert np.abs(w['bn']['bias'] - params['bn']['bias']).max() > 0.1
  assert np.abs(w['dense']['kernel'] - params['dense']['kernel']).max() < 0.05


def test_warmup_cosine_per_step_and_sqrt_scaling():
  cfg = ml_collections.ConfigDict(dict(base_lr=0.3, lr_batch_base=256, lr_scaling='linear',
                                       schedule='warmup_cosine', warmup_epochs=2))
  sched = optim.schedule(cfg, 512, steps_per_epoch=10, num_epochs=10)
  lr, total, warm = 0.6, 100, 20
  for s in [0, 5, 19, 20, 21, 50, 99, 100]:
    want = lr * s / warm if s < warm else 0.5 * lr * (1 + np.cos(np.pi * (s - warm) /
                                                                 (total - warm)))
    np.testing.assert_allclose(float(sched(s)), want, rtol=1e-5, atol=1e-7, err_msg=str(s))
  cfg.update(lr_scaling='sqrt', base_lr=0.075)
  np.testing.assert_allclose(optim.learning_rate(cfg, 4096), 0.075 * 64, rtol=1e-12)
  cfg.lr_scaling = 'cube'
  with pytest.raises(ValueError, match='lr_scaling'):
    optim.learning_rate(cfg, 256)


def _np_batchnorm(x, eps=1e-5):
  flat = x.reshape(-1, x.shape[-1]).astype(np.float64)
  mean, var = flat.mean(0), flat.var(0)
  return (x - mean) / np.sqrt(var + eps), mean, flat.var(0, ddof=1)


def test_global_bn_over_8_devices_equals_bn_over_the_whole_batch():
  """groups=1 under jit with the batch split over 8 devices: statistics of the whole batch
  (cross-device), not of each device's shard; running statistics as PyTorch's."""
  x = np.random.default_rng(4).normal(size=(32, 3, 3, 5)).astype(np.float32)
  x += np.arange(32, dtype=np.float32)[:, None, None, None] / 8  # shards differ in mean
  bn = resnet.GroupBatchNorm(groups=1)
  variables = bn.init(jax.random.PRNGKey(0), x, train=False)
  _, _, data = methods.mesh_and_shardings(jax.devices())
  apply = jax.jit(lambda v, x: bn.apply(v, x, train=True, mutable=['batch_stats']),
                  in_shardings=(None, data))
  y, new = apply(variables, jax.device_put(x, data))
  want, mean, unbiased = _np_batchnorm(x)
  np.testing.assert_allclose(np.asarray(y), want, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(new['batch_stats']['mean'], 0.1 * mean, rtol=1e-5)
  np.testing.assert_allclose(new['batch_stats']['var'], 0.9 + 0.1 * unbiased, rtol=1e-5)
  per_shard = _np_batchnorm(x[:4])[0]
  assert np.abs(np.asarray(y)[:4] - per_shard).max() > 0.1


def test_simclr_head_layout():
  """SimCLR v1's head: Linear (no bias) -> BN -> ReLU -> Linear (no bias) -> BN (no shift)."""
  head = resnet.Head('simclr', dim=3)
  v = head.init(jax.random.PRNGKey(0), jnp.ones((4, 6)), train=False)
  shapes = jax.tree.map(lambda x: x.shape, v)
  assert shapes['params'] == {'proj0': {'kernel': (6, 6)}, 'proj_bn0': {'scale': (6,),
                              'bias': (6,)}, 'proj1': {'kernel': (6, 3)},
                              'proj_bn1': {'scale': (3,)}}
  z, _ = head.apply(v, np.random.default_rng(0).normal(size=(8, 6)), train=True,
                    mutable=['batch_stats'])
  np.testing.assert_allclose(np.asarray(z).mean(0), 0, atol=1e-5)  # BN output, no shift

  # SimCLR initialises both kernels N(0, 0.01), not as PyTorch's Linear (U(+-1/sqrt(fan_in))).
  wide = resnet.Head('simclr', dim=128).init(jax.random.PRNGKey(1), jnp.ones((2, 512)),
                                             train=False)['params']
  for name in ('proj0', 'proj1'):
    kernel = np.asarray(wide[name]['kernel'])
    assert abs(kernel.mean()) < 1e-3 and 0.0097 < kernel.std() < 0.0103, (name, kernel.std())


BATCH, IMAGE = 16, 16


def _simclr_config(tiny_config):
  return tiny_config(**{'method': 'simclr', 'model.head': 'simclr', 'optim.optimizer': 'lars',
                        'optim.schedule': 'warmup_cosine', 'optim.warmup_epochs': 1,
                        'optim.base_lr': 0.3, 'optim.weight_decay': 1e-6})


def _run(config, devices, state0, batches):
  sched = optim.schedule(config.optim, BATCH, 2, 3)
  _, repl, data = methods.mesh_and_shardings(devices)
  train_step = methods.jit_train_step(config, sched, repl, data)
  state = jax.device_put(state0, repl)
  losses = []
  for b in batches:
    state, m = train_step(state, jax.device_put(b, data))
    losses.append(m.compute())
  return losses, jax.tree.map(np.asarray, state)


def test_simclr_step_one_device_equals_eight(tiny_config):
  """The whole end-to-end step (global BN, NT-Xent over the global batch, LARS) on 8 devices
  equals the step on one; the loss falls on a repeated batch."""
  config = _simclr_config(tiny_config)
  model = methods.create_model(config)
  sched = optim.schedule(config.optim, BATCH, 2, 3)
  state0 = methods.create_train_state(jax.random.PRNGKey(0), config, model, sched, IMAGE)
  assert type(state0) is methods.TrainState and not hasattr(state0, 'queue')
  state0 = jax.tree.map(np.asarray, state0)
  rng = np.random.default_rng(0)
  batch = {k: rng.normal(size=(BATCH, IMAGE, IMAGE, 3)).astype(np.float32)
           for k in ('view1', 'view2')}
  m1, s1 = _run(config, jax.devices()[:1], state0, [batch] * 3)
  m8, s8 = _run(config, jax.devices(), state0, [batch] * 3)
  for a, b in zip(m1, m8):
    for k in a:
      np.testing.assert_allclose(float(b[k]), float(a[k]), rtol=1e-5, atol=1e-6, err_msg=k)
  for name in ('params', 'batch_stats', 'opt_state'):
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(getattr(s8, name))[0],
                            jax.tree.leaves(getattr(s1, name))):
      np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5 * (np.abs(y).max() + 1e-3),
                                 err_msg=f'{name}{jax.tree_util.keystr(path)}')
  losses = [float(m['loss']) for m in m1]
  assert losses[2] < losses[0], losses
  assert float(m1[0]['lr']) == 0.0 and float(m1[1]['lr']) > 0  # warm-up starts at 0
  # Global BN: the head's last BN saw all 2N projections (its running mean moved).
  assert np.abs(s1.batch_stats['head']['proj_bn1']['mean']).max() > 0


def _np_simclr_code_loss(z, tau):
  """SimCLR's objective.py in NumPy: views a, b; logits [a.b^T, a.a^T - self] / tau against the
  one-hot label of the pair, and the same for b; the mean over examples of loss_a + loss_b."""
  z = z / np.linalg.norm(z, axis=1, keepdims=True)
  a, b = z[0::2], z[1::2]  # the step interleaves the views: example i at rows 2i, 2i + 1
  n = len(a)
  def xent(x, y):
    logits = np.concatenate([x @ y.T, x @ x.T - 1e9 * np.eye(n)], axis=1) / tau
    logits -= logits.max(axis=1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return -logp[np.arange(n), np.arange(n)]
  return np.mean(xent(a, b) + xent(b, a))


def test_step_loss_is_the_one_simclr_code_optimises(tiny_config):
  """SimCLR's code sums the two views' mean losses: twice Eq. 1's mean over 2N. The step's loss
  (the function it differentiates) equals that, on the projections of the step's own forward."""
  config = _simclr_config(tiny_config)
  tau = config.simclr.temperature
  model = methods.create_model(config)
  sched = optim.schedule(config.optim, BATCH, 2, 3)
  state = methods.create_train_state(jax.random.PRNGKey(0), config, model, sched, IMAGE)
  rng = np.random.default_rng(3)
  batch = {k: rng.normal(size=(BATCH, IMAGE, IMAGE, 3)).astype(np.float32)
           for k in ('view1', 'view2')}
  (_, z), _ = model.apply({'params': state.params, 'batch_stats': state.batch_stats},
                          simclr.interleave(batch['view1'], batch['view2']), train=True,
                          mutable=['batch_stats'])
  z = np.asarray(z, np.float64)
  want = _np_simclr_code_loss(z, tau)
  np.testing.assert_allclose(want, 2 * _np_nt_xent(z, tau), rtol=1e-9)  # the two definitions
  _, metrics = methods.train_step(state, batch, config=config, lr_schedule=sched)
  np.testing.assert_allclose(float(metrics.compute()['loss']), want, rtol=1e-5)


def test_encoder_runs_on_the_local_shard_only(tiny_config):
  """The 2N views stay split over the devices: every convolution of the compiled 8-device step
  sees 2N / 8 images; only the 128-d projections are gathered for NT-Xent."""
  import re  # pylint: disable=g-import-not-at-top
  config = _simclr_config(tiny_config)
  config.model.width = 2
  n = 64
  sched = optim.schedule(config.optim, n, 10, 1)
  _, repl, data = methods.mesh_and_shardings(jax.devices())
  state = jax.eval_shape(lambda: methods.create_train_state(
      jax.random.PRNGKey(0), config, methods.create_model(config), sched, IMAGE))
  batch = {k: jax.ShapeDtypeStruct((n, IMAGE, IMAGE, 3), jnp.float32) for k in ('view1', 'view2')}
  hlo = methods.jit_train_step(config, sched, repl, data).lower(state, batch).compile().as_text()
  convs = [line for line in hlo.splitlines() if ' convolution(' in line]
  assert convs
  assert not [c for c in convs if re.search(rf'= f32\[{2 * n},', c)]
  assert any(re.search(rf'= f32\[{2 * n // 8},', c) for c in convs)
