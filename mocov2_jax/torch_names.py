"""Flax parameter trees <-> PyTorch names and layouts: torchvision, the reference MoCo
checkpoint (`module.encoder_q.*`) and detectron2. The one mapping every format uses.
"""
import numpy as np
from flax import traverse_util

from mocov2_jax.models import resnet

_MODULES = {'downsample_conv': 'downsample.0', 'downsample_bn': 'downsample.1',
            'fc0': 'fc.0', 'fc2': 'fc.2', 'classifier': 'fc'}
_LEAVES = {'kernel': 'weight', 'scale': 'weight', 'mean': 'running_mean', 'var': 'running_var'}


def torch_name(path) -> str:
  """('backbone', 'layer2_0', 'downsample_bn', 'scale') -> 'layer2.0.downsample.1.weight'.

  'backbone' and 'head' disappear (torchvision's model is flat; the MoCo head is its `fc`), and a
  linear-eval 'classifier' is torchvision's `fc`.
  """
  *mods, leaf = path
  parts = [_MODULES.get(m, m.replace('_', '.')) for m in mods if m not in ('backbone', 'head')]
  return '.'.join(parts + [_LEAVES.get(leaf, leaf)])


def to_torch(path, x) -> np.ndarray:
  """Conv HWIO -> OIHW, Dense [in, out] -> [out, in]; everything else as is."""
  x = np.asarray(x)
  if path[-1] != 'kernel':
    return x
  return x.transpose(3, 2, 0, 1) if x.ndim == 4 else x.T


def from_torch(path, x) -> np.ndarray:
  x = np.asarray(x)
  if path[-1] != 'kernel':
    return x
  return x.transpose(2, 3, 1, 0) if x.ndim == 4 else x.T


def state_dict(params, batch_stats, num_batches_tracked=0) -> dict:
  """Flax variables -> {torchvision name: numpy array}, with BN's int64 num_batches_tracked."""
  sd = {torch_name(p): to_torch(p, x) for p, x in traverse_util.flatten_dict(params).items()}
  for p, x in traverse_util.flatten_dict(batch_stats).items():
    sd[torch_name(p)] = np.asarray(x)
    if p[-1] == 'var':
      sd[torch_name(p[:-1] + ('num_batches_tracked',))] = np.array(num_batches_tracked, np.int64)
  return sd


def variables(sd, params_like, stats_like):
  """The inverse: picks the arrays `params_like`/`stats_like` (shape templates) need from `sd`.

  Every name must be there with the right shape, and every array of `sd` must be used
  (num_batches_tracked aside), so nothing is silently dropped.
  """
  missing, wrong, used = [], [], set()
  def take(tree):
    flat = {}
    for p, like in traverse_util.flatten_dict(tree).items():
      name = torch_name(p)
      if name not in sd:
        missing.append(name)
        continue
      x = from_torch(p, sd[name])
      if x.shape != tuple(like.shape):
        wrong.append(f'{name} {x.shape} (expected {tuple(like.shape)})')
      flat[p] = x.astype(like.dtype)
      used.add(name)
    return traverse_util.unflatten_dict(flat)
  params, stats = take(params_like), take(stats_like)
  unused = sorted(k for k in sd if k not in used and not k.endswith('num_batches_tracked'))
  if missing or wrong or unused:
    raise ValueError('the weights do not fit the model: ' + '; '.join(
        f'{what}: {", ".join(v[:5])}{" ..." if len(v) > 5 else ""}'
        for what, v in (('missing', missing), ('wrong shape', wrong), ('unused', unused)) if v))
  return params, stats


def detectron2_name(name: str) -> str:
  """The reference's convert-pretrain-to-detectron2.py renaming of a torchvision name."""
  if 'layer' not in name:
    name = 'stem.' + name
  for t in (1, 2, 3, 4):
    name = name.replace(f'layer{t}', f'res{t + 1}')
  for t in (1, 2, 3):
    name = name.replace(f'bn{t}', f'conv{t}.norm')
  return name.replace('downsample.0', 'shortcut').replace('downsample.1', 'shortcut.norm')


def infer_model(sd) -> dict:
  """arch, width, cifar_stem (and head, dim when fc.* is a MoCo head) from names and shapes."""
  if 'conv1.weight' not in sd:
    raise ValueError('no conv1.weight: not a torchvision-layout ResNet state_dict')
  blocks = tuple(len({k.split('.')[1] for k in sd if k.startswith(f'layer{i}.')})
                 for i in (1, 2, 3, 4))
  expansion = 4 if 'layer1.0.conv3.weight' in sd else 1
  arch = next((a for a, (cls, n) in resnet.ARCHS.items()
               if tuple(n) == blocks and cls.expansion == expansion), f'unknown{blocks}')
  stem = sd['conv1.weight'].shape  # [width, 3, k, k]
  found = dict(arch=arch, width=int(stem[0]), cifar_stem=int(stem[-1]) == 3)
  if 'fc.2.weight' in sd:
    found.update(head='mlp', dim=int(sd['fc.2.weight'].shape[0]))
  elif 'fc.weight' in sd:
    found.update(head='linear', dim=int(sd['fc.weight'].shape[0]))
  return found


def check_model(found, wanted, source, by):
  """A clear error when the weights are not the model `by` asks for (arch, width, stem, head)."""
  diff = [k for k, v in wanted.items() if v is not None and k in found and found[k] != v]
  if diff:
    have = ', '.join(f'{k}={v}' for k, v in found.items())
    raise ValueError(f'{source} holds a model with {have}, but {by} says '
                     + ', '.join(f'{k}={wanted[k]}' for k in diff))


_ORDER = {'conv1': 0, 'bn1': 1, 'conv2': 2, 'bn2': 3, 'conv3': 4, 'bn3': 5, 'downsample': 6,
          'fc': 0, 'weight': 0, 'bias': 1}


def parameter_order(name: str):
  """Sort key of a torchvision parameter name in registration order: the order of
  `model.parameters()`, which a PyTorch optimizer's state is indexed by."""
  parts = name.split('.')
  group = 1 if parts[0].startswith('layer') else 2 if parts[0] == 'fc' else 0
  key = [int(p[len('layer'):]) if p.startswith('layer') else int(p) if p.isdigit() else _ORDER[p]
         for p in parts]
  return (group, *key)


def parameter_names(params) -> list:
  """The torchvision names of a Flax params tree (no BN buffers), in `parameter_order`."""
  return sorted((torch_name(p) for p in traverse_util.flatten_dict(params)), key=parameter_order)
