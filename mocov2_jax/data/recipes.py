"""Augmentation recipes as ConfigDicts, so configs can embed them and override single fields.

No TensorFlow here: configs import this module. `augment.py` (tf.data, on the host) and
`device_augment.py` (JAX, inside the step) implement the same fields.
"""
import math

import ml_collections

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)

_MOCOV2 = dict(
    crop_scale=(0.2, 1.0), crop_ratio=(3 / 4, 4 / 3), interpolation='bilinear',
    jitter=(0.4, 0.4, 0.4, 0.1), jitter_p=0.8,      # (brightness, contrast, saturation, hue)
    gray_p=0.2, gray_before_jitter=False,
    blur_p=0.5, blur_sigma=(0.1, 2.0),
    blur_kernel_frac=None,   # None: PIL GaussianBlur(radius=sigma); float: kernel = frac * side
    flip_p=0.5, mean=IMAGENET_MEAN, std=IMAGENET_STD)  # mean/std None: images stay in [0, 1]

_RECIPES = dict(
    mocov2=_MOCOV2,
    # v1 applies grayscale before an always-on, stronger jitter and has no blur.
    mocov1=dict(_MOCOV2, jitter=(0.4, 0.4, 0.4, 0.4), jitter_p=1.0, gray_before_jitter=True,
                blur_p=0.0),
    # The reference's CIFAR-10 demo: v2 without blur, torchvision's default crop scale.
    cifar=dict(_MOCOV2, crop_scale=(0.08, 1.0), blur_p=0.0, mean=CIFAR_MEAN, std=CIFAR_STD),
    # SimCLR (ImageNet) for the Table 2 comparison.
    simclr=dict(_MOCOV2, crop_scale=(0.08, 1.0), interpolation='bicubic',
                jitter=(0.8, 0.8, 0.8, 0.2), blur_kernel_frac=0.1, mean=None, std=None),
    # SimCLR's CIFAR-10 choice: colour strength 0.5, no blur, 32 px.
    simclr_cifar=dict(_MOCOV2, crop_scale=(0.08, 1.0), interpolation='bicubic',
                      jitter=(0.4, 0.4, 0.4, 0.1), blur_p=0.0, mean=None, std=None),
)


def recipe(name: str) -> ml_collections.ConfigDict:
  """A fresh copy of the named recipe ('mocov1', 'mocov2', 'cifar', 'simclr', 'simclr_cifar')."""
  if name not in _RECIPES:
    raise ValueError(f'Unknown augmentation recipe {name!r}; pick one of {sorted(_RECIPES)}.')
  return ml_collections.ConfigDict(dict(_RECIPES[name]))


def blur_radius(recipe, size: int) -> int:
  """Static kernel radius: 3 sigma of the largest sigma (PIL), or SimCLR's kernel of frac * side."""
  if recipe.blur_kernel_frac is None:
    return max(1, math.ceil(3 * recipe.blur_sigma[1]))
  return max(1, int(size * recipe.blur_kernel_frac) // 2)
