"""The torchvision-layout ResNet, GroupBatchNorm and heads against NumPy and PyTorch."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mocov2_jax.models import resnet
from tests.torch_resnet import TorchResNet, torch_name


# ---------------------------------------------------------------------------------------------
# GroupBatchNorm

def _bn_variables(rng, c):
  return {
      'params': {'scale': rng.uniform(0.5, 1.5, c).astype(np.float32),
                 'bias': rng.normal(size=c).astype(np.float32)},
      'batch_stats': {'mean': rng.normal(size=c).astype(np.float32),
                      'var': rng.uniform(0.5, 2.0, c).astype(np.float32)},
  }


@pytest.mark.parametrize('groups', [1, 4])
def test_group_batchnorm_train_matches_per_group_bn(groups):
  """Train mode: plain BN on each contiguous group of N/groups examples; running stats as
  torch.nn.functional.batch_norm on each group (momentum 0.1, unbiased var), averaged."""
  rng = np.random.default_rng(0)
  n, h, w, c = 8, 5, 3, 6
  x = (rng.normal(size=(n, h, w, c)) * rng.uniform(0.5, 3, c) + rng.normal(size=c)).astype(
      np.float32)
  variables = _bn_variables(rng, c)
  bn = resnet.GroupBatchNorm(groups=groups)
  y, new = bn.apply(variables, jnp.asarray(x), train=True, mutable=['batch_stats'])
  y = np.asarray(y)

  scale, bias = variables['params']['scale'], variables['params']['bias']
  g = n // groups
  means, vars_ = [], []
  for i in range(groups):
    xg = x[i * g:(i + 1) * g].astype(np.float64)
    mu, var = xg.mean((0, 1, 2)), xg.var((0, 1, 2))  # biased variance normalises
    np.testing.assert_allclose(y[i * g:(i + 1) * g], (xg - mu) / np.sqrt(var + 1e-5) * scale + bias,
                               rtol=1e-4, atol=1e-5, err_msg=f'group {i}')
    rm = torch.from_numpy(variables['batch_stats']['mean'].copy())
    rv = torch.from_numpy(variables['batch_stats']['var'].copy())
    F.batch_norm(torch.from_numpy(x[i * g:(i + 1) * g]).permute(0, 3, 1, 2), rm, rv,
                 torch.from_numpy(scale), torch.from_numpy(bias), training=True, momentum=0.1,
                 eps=1e-5)
    means.append(rm.numpy())
    vars_.append(rv.numpy())
  np.testing.assert_allclose(np.asarray(new['batch_stats']['mean']), np.mean(means, 0),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(new['batch_stats']['var']), np.mean(vars_, 0),
                             rtol=1e-5, atol=1e-6)
  if groups > 1:  # grouping really changes the output
    y1 = resnet.GroupBatchNorm(groups=1).apply(variables, jnp.asarray(x), train=True,
                                               mutable=['batch_stats'])[0]
    assert np.abs(np.asarray(y1) - y).max() > 1e-2


def test_group_batchnorm_eval_uses_running_stats():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(4, 3, 3, 5)).astype(np.float32) * 2 + 1
  variables = _bn_variables(rng, 5)
  bn = resnet.GroupBatchNorm(groups=2)
  y, new = bn.apply(variables, jnp.asarray(x), train=False, mutable=['batch_stats'])
  s = variables['batch_stats']
  ref = ((x - s['mean']) / np.sqrt(s['var'] + 1e-5) * variables['params']['scale'] +
         variables['params']['bias'])
  np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(new['batch_stats']['mean']), s['mean'])
  np.testing.assert_array_equal(np.asarray(new['batch_stats']['var']), s['var'])
  # Eval output of one example does not depend on the rest of the batch.
  y0 = bn.apply(variables, jnp.asarray(x[:2]), train=False)
  np.testing.assert_allclose(np.asarray(y0), np.asarray(y)[:2], rtol=1e-6)


def test_group_batchnorm_rejects_uneven_groups():
  bn = resnet.GroupBatchNorm(groups=4)
  variables = _bn_variables(np.random.default_rng(0), 3)
  with pytest.raises(ValueError, match='BN groups'):
    bn.apply(variables, jnp.ones((6, 2, 2, 3)), train=True, mutable=['batch_stats'])


def test_group_batchnorm_init_does_not_touch_stats():
  bn = resnet.GroupBatchNorm(groups=2)
  v = bn.init(jax.random.PRNGKey(0), jnp.full((4, 2, 2, 3), 7.0), train=True)
  np.testing.assert_array_equal(np.asarray(v['batch_stats']['mean']), 0.0)
  np.testing.assert_array_equal(np.asarray(v['batch_stats']['var']), 1.0)
  np.testing.assert_array_equal(np.asarray(v['params']['scale']), 1.0)
  np.testing.assert_array_equal(np.asarray(v['params']['bias']), 0.0)


# ---------------------------------------------------------------------------------------------
# Parameter counts (torchvision's published numbers)

def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _shapes(arch, width=64, head='mlp', dim=128, cifar_stem=False):
  model = resnet.Encoder(arch, width, cifar_stem, 1, head, dim)
  return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((2, 32, 32, 3)),
                                           train=False))


@pytest.mark.parametrize('arch,backbone,torchvision_total', [
    ('resnet18', 11_176_512, 11_689_512),
    ('resnet50', 23_508_032, 25_557_032),
])
def test_parameter_counts_match_torchvision(arch, backbone, torchvision_total):
  v = _shapes(arch)
  feat = resnet.feature_dim(arch)
  assert _count(v['params']['backbone']) == backbone
  assert backbone + feat * 1000 + 1000 == torchvision_total  # + torchvision's fc
  # v2 head: feat -> feat (ReLU) -> 128; v1 head: feat -> 128.
  assert _count(v['params']['head']) == feat * feat + feat + feat * 128 + 128
  assert _count(_shapes(arch, head='linear')['params']['head']) == feat * 128 + 128
  # BN buffers: running mean and var per BN channel (= half the BN params).
  bn_params = sum(int(np.prod(x.shape)) for p, x in
                  jax.tree_util.tree_flatten_with_path(v['params']['backbone'])[0]
                  if jax.tree_util.keystr(p).endswith("['scale']"))
  assert _count(v['batch_stats']) == 2 * bn_params
  for leaf in jax.tree.leaves(v['params']):
    assert leaf.dtype == jnp.float32


def test_feature_dims():
  assert resnet.feature_dim('resnet18') == 512
  assert resnet.feature_dim('resnet50') == 2048
  assert resnet.feature_dim('resnet50', 8) == 256


# ---------------------------------------------------------------------------------------------
# Equivalence with a torchvision-layout PyTorch ResNet (written here, torchvision not needed)

def _to_torch_array(path, x):
  x = np.asarray(x, np.float32)
  if path[-1] == 'kernel' and x.ndim == 4:
    return x.transpose(3, 2, 0, 1)  # HWIO -> OIHW
  if path[-1] == 'kernel':
    return x.T  # [in, out] -> [out, in]
  return x


def _load_into_torch(tmodel, variables):
  sd = {}
  for col in ('params', 'batch_stats'):
    for p, x in jax.tree_util.tree_flatten_with_path(variables[col])[0]:
      path = tuple(k.key for k in p)
      sd[torch_name(path)] = torch.from_numpy(_to_torch_array(path, x).copy())
  missing, unexpected = tmodel.load_state_dict(sd, strict=False)
  assert not unexpected, unexpected
  assert all(k.endswith('num_batches_tracked') for k in missing), missing


def _randomise_batch_stats(variables, seed):
  """Non-trivial BN parameters and running statistics, so eval mode is really exercised."""
  rng = np.random.default_rng(seed)
  def f(p, x):
    name = p[-1].key
    if name == 'mean':
      return jnp.asarray(rng.normal(size=x.shape) * 0.1, jnp.float32)
    if name == 'var':
      return jnp.asarray(rng.uniform(0.5, 2.0, x.shape), jnp.float32)
    if name == 'scale':
      return jnp.asarray(rng.uniform(0.5, 1.5, x.shape), jnp.float32)
    if name == 'bias' and x.ndim == 1 and len(p) > 2 and 'fc' not in p[-2].key:
      return jnp.asarray(rng.normal(size=x.shape) * 0.1, jnp.float32)
    return x
  return {c: jax.tree_util.tree_map_with_path(f, variables[c]) for c in variables}


def _assert_close(flax_out, torch_out):
  """Float32 agreement: 1e-4 relative, or 1e-5 of the output's scale near zero."""
  t = torch_out.numpy()
  assert np.abs(t).max() > 1e-2  # the comparison is not between zeros
  np.testing.assert_allclose(np.asarray(flax_out), t, rtol=1e-4, atol=1e-5 * np.abs(t).max())


@pytest.mark.parametrize('arch,cifar_stem,size,head', [
    ('resnet18', False, 64, 'mlp'),
    ('resnet18', True, 16, 'linear'),
    ('resnet50', False, 32, 'mlp'),
])
def test_matches_torchvision_layout_in_eval_mode(arch, cifar_stem, size, head):
  """Same weights, same input -> same features and projection (to float32 rounding). Checks the
  layout (names, shapes, stride on the bottleneck's 3x3) and PyTorch's padding of stride-2
  convs and max-pool (an odd feature map after the stem makes asymmetric padding show)."""
  width, dim = 8, 16
  model = resnet.Encoder(arch, width, cifar_stem, 1, head, dim)
  x = np.random.default_rng(2).normal(size=(3, size, size, 3)).astype(np.float32)
  variables = model.init(jax.random.PRNGKey(3), jnp.asarray(x), train=False)
  variables = _randomise_batch_stats(variables, 4)
  h, z = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, jnp.asarray(x))

  tmodel = TorchResNet(arch, width, cifar_stem, fc=head, dim=dim).eval()
  n_torch = sum(p.numel() for p in tmodel.parameters())
  assert n_torch == _count(variables['params'])
  _load_into_torch(tmodel, variables)
  with torch.no_grad():
    th, tz = tmodel(torch.from_numpy(x).permute(0, 3, 1, 2))
  assert h.shape == (3, resnet.feature_dim(arch, width)) and z.shape == (3, dim)
  _assert_close(h, th)
  _assert_close(z, tz)


def test_matches_torch_in_train_mode_global_bn():
  """Train mode with one BN group is PyTorch's train-mode BN: outputs and running statistics."""
  model = resnet.Encoder('resnet18', 8, True, 1, 'mlp', 16)
  x = np.random.default_rng(5).normal(size=(4, 16, 16, 3)).astype(np.float32)
  variables = _randomise_batch_stats(model.init(jax.random.PRNGKey(6), jnp.asarray(x),
                                                train=False), 7)
  (h, z), new = model.apply(variables, jnp.asarray(x), train=True, mutable=['batch_stats'])
  tmodel = TorchResNet('resnet18', 8, True, fc='mlp', dim=16).train()
  _load_into_torch(tmodel, variables)
  with torch.no_grad():
    th, tz = tmodel(torch.from_numpy(x).permute(0, 3, 1, 2))
  _assert_close(h, th)
  _assert_close(z, tz)
  tsd = tmodel.state_dict()
  for p, v in jax.tree_util.tree_flatten_with_path(new['batch_stats'])[0]:
    name = torch_name(tuple(k.key for k in p))
    np.testing.assert_allclose(np.asarray(v), tsd[name].numpy(), rtol=1e-5, atol=1e-6,
                               err_msg=name)


def test_bfloat16_compute_float32_params():
  cfg = ml_collections.ConfigDict(dict(arch='resnet18', width=8, cifar_stem=True, head='mlp',
                                       dim=16, dtype='float32'))
  x = jnp.asarray(np.random.default_rng(8).normal(size=(4, 16, 16, 3)), jnp.float32)
  m32 = resnet.create_encoder(cfg)
  variables = m32.init(jax.random.PRNGKey(0), x, train=False)
  cfg.dtype = 'bfloat16'
  m16 = resnet.create_encoder(cfg)
  v16 = m16.init(jax.random.PRNGKey(0), x, train=False)
  for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(v16)):
    assert b.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # same init
  for train in (False, True):
    (h32, z32), _ = m32.apply(variables, x, train=train, mutable=['batch_stats'])
    (h16, z16), s16 = m16.apply(variables, x, train=train, mutable=['batch_stats'])
    assert h16.dtype == jnp.float32 and z16.dtype == jnp.float32
    for a, b in ((h32, h16), (z32, z16)):
      rel = np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(a))
      assert rel < 5e-2, rel
      assert np.abs(np.asarray(a) - np.asarray(b)).max() > 0  # it did compute in bf16
    for leaf in jax.tree.leaves(s16):
      assert leaf.dtype == jnp.float32


def test_create_encoder_rejects_unknown_fields():
  base = dict(arch='resnet18', width=8, cifar_stem=True, head='mlp', dim=16, dtype='float32')
  for field, bad in (('arch', 'resnet7'), ('head', 'conv'), ('dtype', 'float16')):
    cfg = ml_collections.ConfigDict(dict(base, **{field: bad}))
    with pytest.raises(ValueError, match=field):
      resnet.create_encoder(cfg)


def _reference_norm(x, scale, bias, eps=1e-5):
  mean = x.mean(axis=1, keepdims=True)
  var = jnp.square(x - mean).mean(axis=1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps) * scale + bias, mean, var


def test_low_precision_group_norm_gradients_are_autodiff():
  """The bf16 BN's hand-written backward pass (it saves no float32 copy of x) is the gradient of
  the float32 formula: checked in float32, with cotangents on the statistics as well."""
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(2.0, 3.0, (4, 30, 6)), jnp.float32)
  scale, bias = (jnp.asarray(rng.uniform(0.5, 1.5, 6), jnp.float32),
                 jnp.asarray(rng.normal(size=6), jnp.float32))
  cot = tuple(jnp.asarray(rng.normal(size=s), jnp.float32) for s in (x.shape, (4, 1, 6), (4, 1, 6)))
  outs, grads = [], []
  for f in (lambda *a: resnet._group_norm_low(*a, 1e-5), _reference_norm):
    out, vjp = jax.vjp(f, x, scale, bias)
    outs.append(out)
    grads.append(vjp(cot))
  for a, b in zip(jax.tree.leaves(outs[0]) + jax.tree.leaves(grads[0]),
                  jax.tree.leaves(outs[1]) + jax.tree.leaves(grads[1])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(b).max())
