"""torchvision-layout ResNets in Flax linen, with BatchNorm over groups of examples.

The layout (module names, stride on the bottleneck's 3x3, explicit PyTorch padding, default
initialisers, no zero-initialised BN scales) mirrors `torchvision.models.resnet` so that weights
map one-to-one onto it and exported models give the same features.
"""
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# torchvision: kaiming_normal_(mode='fan_out', nonlinearity='relu'), not truncated.
conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def torch_linear_init(fan_in: int):
  """PyTorch's nn.Linear default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias."""
  bound = 1.0 / np.sqrt(fan_in)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _group_norm_low(x, scale, bias, epsilon):
  """Train-mode BN of x [G, M, C] in a low-precision dtype, per group (axis 0), with float32
  statistics: (y in x's dtype, mean, biased var). The backward pass keeps only x itself (plus
  the per-group statistics), not float32 copies of it: autodiff of the float32 formula would save
  those, and in bfloat16 they cost more than the activations."""
  return _group_norm_low_fwd(x, scale, bias, epsilon)[0]


def _group_norm_low_fwd(x, scale, bias, epsilon):
  xf = x.astype(jnp.float32)
  mean = xf.mean(axis=1, keepdims=True)
  var = jnp.square(xf - mean).mean(axis=1, keepdims=True)
  inv = jax.lax.rsqrt(var + epsilon)
  y = ((xf - mean) * inv * scale + bias).astype(x.dtype)
  return (y, mean, var), (x, mean, inv, scale)


def _group_norm_low_bwd(epsilon, res, cotangents):
  del epsilon
  x, mean, inv, scale = res
  dy, dmean, dvar = cotangents
  centred = x.astype(jnp.float32) - mean
  x_hat = centred * inv
  dy = dy.astype(jnp.float32)
  g = dy * scale                                     # d loss / d x_hat
  dx = inv * (g - g.mean(axis=1, keepdims=True) - x_hat * (g * x_hat).mean(axis=1, keepdims=True))
  dx += (dmean + 2 * dvar * centred) / x.shape[1]    # the statistics' own uses (running stats)
  return (dx.astype(x.dtype), (dy * x_hat).sum(axis=(0, 1)), dy.sum(axis=(0, 1)))


_group_norm_low.defvjp(_group_norm_low_fwd, _group_norm_low_bwd)


class GroupBatchNorm(nn.Module):
  """BatchNorm whose training statistics are computed per group of `groups` contiguous examples.

  This is how the reference gets per-GPU statistics (shuffle BN) and how its CIFAR demo emulates
  it on one GPU (SplitBatchNorm). The result depends on the group count, never on the device
  count. Running statistics follow PyTorch: momentum 0.1, unbiased variance, averaged over groups.
  `groups=1` is plain BatchNorm over the whole (global) batch: under `jit` with the batch sharded
  over devices, XLA computes its statistics across devices (SimCLR's global BN).
  `use_bias=False`: no shift (SimCLR's last projection layer).
  Statistics are float32 whatever `dtype`; in a lower precision (bfloat16) the train-mode
  backward pass saves the input in that dtype only (`_group_norm_low`).
  """
  groups: int = 1
  momentum: float = 0.9
  epsilon: float = 1e-5
  use_bias: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    c = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (c,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (c,), jnp.float32) if self.use_bias else 0.0
    ra_mean = self.variable('batch_stats', 'mean', jnp.zeros, (c,), jnp.float32)
    ra_var = self.variable('batch_stats', 'var', jnp.ones, (c,), jnp.float32)
    if train:
      n = x.shape[0]
      if n % self.groups:
        raise ValueError(f'batch of {n} does not split into {self.groups} BN groups')
      if jnp.dtype(self.dtype) == jnp.float32:
        xg = x.astype(jnp.float32).reshape(self.groups, n // self.groups, -1, c)
        mean = xg.mean(axis=(1, 2), keepdims=True)
        var = jnp.square(xg - mean).mean(axis=(1, 2), keepdims=True)
        y = (xg - mean) * jax.lax.rsqrt(var + self.epsilon)
        y = (y * scale + bias).reshape(x.shape)
      else:
        shift = bias if self.use_bias else jnp.zeros((c,), jnp.float32)
        y, mean, var = _group_norm_low(x.reshape(self.groups, -1, c), scale, shift, self.epsilon)
        y = y.reshape(x.shape)
      if not self.is_initializing():
        count = x.size // (self.groups * c)
        unbiased = var * (count / max(count - 1, 1))
        m = self.momentum
        ra_mean.value = m * ra_mean.value + (1 - m) * mean.reshape(self.groups, c).mean(0)
        ra_var.value = m * ra_var.value + (1 - m) * unbiased.reshape(self.groups, c).mean(0)
    else:
      y = (x.astype(jnp.float32) - ra_mean.value) * jax.lax.rsqrt(ra_var.value + self.epsilon)
      y = y * scale + bias
    return y.astype(self.dtype)


def _conv(features, kernel, stride, name, dtype):
  pad = kernel // 2
  return nn.Conv(features, (kernel, kernel), (stride, stride), padding=((pad, pad), (pad, pad)),
                 use_bias=False, kernel_init=conv_init, dtype=dtype, param_dtype=jnp.float32,
                 name=name)


class _Block(nn.Module):
  """What both residual blocks take: planes, stride, the norm layer and the compute dtype."""
  features: int
  stride: int
  norm: Any
  dtype: Any = jnp.float32


class BasicBlock(_Block):
  expansion = 1

  @nn.compact
  def __call__(self, x, train):
    y = _conv(self.features, 3, self.stride, 'conv1', self.dtype)(x)
    y = nn.relu(self.norm(name='bn1')(y, train))
    y = _conv(self.features, 3, 1, 'conv2', self.dtype)(y)
    y = self.norm(name='bn2')(y, train)
    return nn.relu(y + _shortcut(self, x, train))


class Bottleneck(_Block):
  expansion = 4

  @nn.compact
  def __call__(self, x, train):
    y = _conv(self.features, 1, 1, 'conv1', self.dtype)(x)
    y = nn.relu(self.norm(name='bn1')(y, train))
    y = _conv(self.features, 3, self.stride, 'conv2', self.dtype)(y)  # torchvision "v1.5"
    y = nn.relu(self.norm(name='bn2')(y, train))
    y = _conv(self.features * 4, 1, 1, 'conv3', self.dtype)(y)
    y = self.norm(name='bn3')(y, train)
    return nn.relu(y + _shortcut(self, x, train))


def _shortcut(block, x, train):
  out = block.features * block.expansion
  if block.stride == 1 and x.shape[-1] == out:
    return x
  x = _conv(out, 1, block.stride, 'downsample_conv', block.dtype)(x)
  return block.norm(name='downsample_bn')(x, train)


ARCHS = {
    'resnet18': (BasicBlock, (2, 2, 2, 2)),
    'resnet34': (BasicBlock, (3, 4, 6, 3)),
    'resnet50': (Bottleneck, (3, 4, 6, 3)),
    'resnet101': (Bottleneck, (3, 4, 23, 3)),
    'resnet152': (Bottleneck, (3, 8, 36, 3)),
}


class ResNet(nn.Module):
  """Backbone up to global average pooling: returns [N, 512 * expansion * width / 64] features.

  `cifar_stem`: 3x3 stride-1 stem conv and no max-pool, as the reference CIFAR-10 demo.
  `width`: channels of the first stage (64 in torchvision); smaller for tiny test models.
  """
  arch: str = 'resnet50'
  width: int = 64
  cifar_stem: bool = False
  bn_groups: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    block_cls, stage_sizes = ARCHS[self.arch]
    norm = functools.partial(GroupBatchNorm, groups=self.bn_groups, dtype=self.dtype)
    x = x.astype(self.dtype)
    if self.cifar_stem:
      x = _conv(self.width, 3, 1, 'conv1', self.dtype)(x)
      x = nn.relu(norm(name='bn1')(x, train))
    else:
      x = _conv(self.width, 7, 2, 'conv1', self.dtype)(x)
      x = nn.relu(norm(name='bn1')(x, train))
      x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
    for i, num_blocks in enumerate(stage_sizes):
      for j in range(num_blocks):
        stride = 2 if i > 0 and j == 0 else 1
        x = block_cls(self.width * 2**i, stride, norm, self.dtype,
                      name=f'layer{i + 1}_{j}')(x, train)
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


def feature_dim(arch: str, width: int = 64) -> int:
  block_cls, _ = ARCHS[arch]
  return width * 8 * block_cls.expansion


HEADS = ('linear', 'mlp', 'simclr')


class Head(nn.Module):
  """Projection head. 'linear': fc (MoCo v1); 'mlp': fc0 -> ReLU -> fc2 (MoCo v2);
  'simclr': proj0 -> BN -> ReLU -> proj1 -> BN without shift (SimCLR v1: BN replaces the biases).
  """
  kind: str = 'mlp'
  dim: int = 128
  bn_groups: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h, train: bool):
    c = h.shape[-1]
    dense = functools.partial(nn.Dense, kernel_init=torch_linear_init(c),
                              bias_init=torch_linear_init(c), dtype=self.dtype,
                              param_dtype=jnp.float32)
    if self.kind == 'linear':
      return dense(self.dim, name='fc')(h)
    if self.kind == 'mlp':
      return dense(self.dim, name='fc2')(nn.relu(dense(c, name='fc0')(h)))
    if self.kind == 'simclr':  # SimCLR's linear_layer: kernels N(0, 0.01), no bias before a BN
      proj = functools.partial(nn.Dense, use_bias=False, kernel_init=nn.initializers.normal(0.01),
                               dtype=self.dtype, param_dtype=jnp.float32)
      norm = functools.partial(GroupBatchNorm, groups=self.bn_groups, dtype=self.dtype)
      h = nn.relu(norm(name='proj_bn0')(proj(c, name='proj0')(h), train))
      return norm(use_bias=False, name='proj_bn1')(proj(self.dim, name='proj1')(h), train)
    raise ValueError(f'unknown head {self.kind!r}: use one of {HEADS}')


class Encoder(nn.Module):
  """Backbone + head. Returns (backbone features, projection), both float32, un-normalised."""
  arch: str = 'resnet50'
  width: int = 64
  cifar_stem: bool = False
  bn_groups: int = 1
  head: str = 'mlp'
  dim: int = 128
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    h = ResNet(self.arch, self.width, self.cifar_stem, self.bn_groups, self.dtype,
               name='backbone')(x, train)
    z = Head(self.head, self.dim, self.bn_groups, self.dtype, name='head')(h, train)
    return h, z.astype(jnp.float32)


DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def create_encoder(model_cfg, bn_groups: int = 1) -> Encoder:
  """Builds the encoder from `config.model` (arch, width, cifar_stem, head, dim, dtype)."""
  if model_cfg.arch not in ARCHS:
    raise ValueError(f'unknown model.arch {model_cfg.arch!r}: choose one of {sorted(ARCHS)}')
  if model_cfg.head not in HEADS:
    raise ValueError(f'unknown model.head {model_cfg.head!r}: choose one of {HEADS}')
  if model_cfg.dtype not in DTYPES:
    raise ValueError(f'unknown model.dtype {model_cfg.dtype!r}: choose one of {sorted(DTYPES)}')
  return Encoder(model_cfg.arch, model_cfg.width, model_cfg.cifar_stem, bn_groups,
                 model_cfg.head, model_cfg.dim, DTYPES[model_cfg.dtype])
