"""An independent PyTorch ResNet in torchvision's published layout, for the tests.

torchvision itself does not import beside the CPU torch used here; this follows its module names
and shapes (`width`: torchvision's 64 planes of the first stage), not this project's code.
"""
import torch
import torch.nn as tnn
import torch.nn.functional as F


class GroupBatchNorm2d(tnn.BatchNorm2d):
  """Train mode: BN statistics over each contiguous group of N/groups examples (one group per
  GPU in the reference), each group's running statistics updated PyTorch's way (momentum 0.1,
  unbiased variance) from the shared running statistics, then averaged over groups (as the
  reference demo's SplitBatchNorm does). Eval mode: plain BN with the running statistics."""

  def __init__(self, c, groups):
    super().__init__(c)
    self.groups = groups

  def forward(self, x):
    if not self.training:
      return super().forward(x)
    outs, means, vars_ = [], [], []
    for xg in x.chunk(self.groups, dim=0):
      rm, rv = self.running_mean.clone(), self.running_var.clone()
      outs.append(F.batch_norm(xg, rm, rv, self.weight, self.bias, True, self.momentum, self.eps))
      means.append(rm)
      vars_.append(rv)
    with torch.no_grad():
      self.running_mean.copy_(torch.stack(means).mean(0))
      self.running_var.copy_(torch.stack(vars_).mean(0))
    return torch.cat(outs, 0)


class Basic(tnn.Module):
  expansion = 1

  def __init__(self, inplanes, planes, stride, downsample, norm=tnn.BatchNorm2d):
    super().__init__()
    self.conv1 = tnn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
    self.bn1 = norm(planes)
    self.conv2 = tnn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = norm(planes)
    self.downsample = downsample

  def forward(self, x):
    out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
    return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class Bottle(tnn.Module):
  expansion = 4

  def __init__(self, inplanes, planes, stride, downsample, norm=tnn.BatchNorm2d):
    super().__init__()
    self.conv1 = tnn.Conv2d(inplanes, planes, 1, bias=False)
    self.bn1 = norm(planes)
    self.conv2 = tnn.Conv2d(planes, planes, 3, stride, 1, bias=False)
    self.bn2 = norm(planes)
    self.conv3 = tnn.Conv2d(planes, planes * 4, 1, bias=False)
    self.bn3 = norm(planes * 4)
    self.downsample = downsample

  def forward(self, x):
    out = F.relu(self.bn1(self.conv1(x)))
    out = self.bn3(self.conv3(F.relu(self.bn2(self.conv2(out)))))
    return F.relu(out + (x if self.downsample is None else self.downsample(x)))


LAYOUT = {'resnet18': (Basic, [2, 2, 2, 2]), 'resnet50': (Bottle, [3, 4, 6, 3])}


class TorchResNet(tnn.Module):
  """fc: 'imagenet' (Linear(feat, 1000), torchvision's), 'linear' or 'mlp' (the MoCo heads);
  `norm(channels)`: the BatchNorm (GroupBatchNorm2d for the reference's shuffle BN)."""

  def __init__(self, arch, width=64, cifar_stem=False, fc='imagenet', dim=128,
               norm=tnn.BatchNorm2d):
    super().__init__()
    self.norm = norm
    block, layers = LAYOUT[arch]
    if cifar_stem:  # the README's recipe: 3x3 stride-1 conv1, no max-pool
      self.conv1, self.maxpool = tnn.Conv2d(3, width, 3, 1, 1, bias=False), tnn.Identity()
    else:
      self.conv1 = tnn.Conv2d(3, width, 7, 2, 3, bias=False)
      self.maxpool = tnn.MaxPool2d(3, 2, 1)
    self.bn1 = norm(width)
    self.inplanes = width
    for i, n in enumerate(layers):
      setattr(self, f'layer{i + 1}', self._make_layer(block, width * 2**i, n, 1 if i == 0 else 2))
    feat = self.inplanes
    self.fc = {'imagenet': lambda: tnn.Linear(feat, 1000), 'linear': lambda: tnn.Linear(feat, dim),
               'mlp': lambda: tnn.Sequential(tnn.Linear(feat, feat), tnn.ReLU(),
                                             tnn.Linear(feat, dim))}[fc]()

  def _make_layer(self, block, planes, n, stride):
    down = None
    if stride != 1 or self.inplanes != planes * block.expansion:
      down = tnn.Sequential(tnn.Conv2d(self.inplanes, planes * block.expansion, 1, stride,
                                       bias=False), self.norm(planes * block.expansion))
    blocks = [block(self.inplanes, planes, stride, down, self.norm)]
    self.inplanes = planes * block.expansion
    blocks += [block(self.inplanes, planes, 1, None, self.norm) for _ in range(1, n)]
    return tnn.Sequential(*blocks)

  def forward(self, x):
    x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
    x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
    h = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
    return h, self.fc(h)


def torch_forward(model, x):
  with torch.no_grad():
    return [t.numpy() for t in model.eval()(torch.from_numpy(x).permute(0, 3, 1, 2))]


def torch_name(path):
  """('backbone', 'layer2_0', 'downsample_bn', 'scale') -> 'layer2.0.downsample.1.weight',
  written here from torchvision's names (not the package's mapping, which it checks)."""
  mods, leaf = path[:-1], path[-1]
  parts = []
  for m in mods[1:]:
    if m.startswith('layer'):
      parts += m.split('_')
    elif m in ('downsample_conv', 'downsample_bn'):
      parts += ['downsample', '0' if m.endswith('conv') else '1']
    elif m in ('fc0', 'fc2'):
      parts += ['fc', m[2]]
    else:
      parts.append(m)
  return '.'.join(parts + [{'kernel': 'weight', 'scale': 'weight', 'bias': 'bias',
                            'mean': 'running_mean', 'var': 'running_var'}[leaf]])
