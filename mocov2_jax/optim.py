"""Optimisers and learning-rate schedules.

MoCo (the reference): SGD, momentum 0.9, PyTorch-style weight decay on every parameter, the lr
constant within an epoch. SimCLR: LARS with BN parameters and biases excluded from trust-ratio
adaptation and weight decay, linear warm-up then a per-step cosine.
"""
import math

import jax
import optax


def learning_rate(optim_cfg, global_batch: int) -> float:
  """'linear': base_lr x batch / lr_batch_base (MoCo; SimCLR 0.3 x B / 256).
  'sqrt': base_lr x sqrt(batch) (SimCLR's square-root scaling, base_lr 0.075)."""
  if optim_cfg.lr_scaling == 'linear':
    return optim_cfg.base_lr * global_batch / optim_cfg.lr_batch_base
  if optim_cfg.lr_scaling == 'sqrt':
    return optim_cfg.base_lr * math.sqrt(global_batch)
  raise ValueError(f"unknown optim.lr_scaling {optim_cfg.lr_scaling!r}: use 'linear' or 'sqrt'")


def schedule(optim_cfg, global_batch: int, steps_per_epoch: int, num_epochs: int):
  """Learning rate as a function of the step.

  Per epoch, as the reference MoCo: 'cosine': lr x 0.5 (1 + cos(pi epoch / epochs)) (MoCo v2);
  'step': lr x 0.1 at each epoch of `lr_drop_epochs` (MoCo v1: 120, 160); 'constant'.
  Per step, as SimCLR: 'warmup_cosine': linear from 0 over `warmup_epochs`, then a half cosine to
  0 at the last step.
  """
  lr = learning_rate(optim_cfg, global_batch)
  if optim_cfg.schedule == 'warmup_cosine':
    total, warmup = steps_per_epoch * num_epochs, int(steps_per_epoch * optim_cfg.warmup_epochs)
    if warmup == 0:
      return optax.cosine_decay_schedule(lr, total)
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(total, warmup + 1))
  if optim_cfg.schedule == 'cosine':
    per_epoch = optax.cosine_decay_schedule(lr, num_epochs)
  elif optim_cfg.schedule == 'step':
    per_epoch = optax.piecewise_constant_schedule(
        lr, {int(e): 0.1 for e in optim_cfg.lr_drop_epochs})
  elif optim_cfg.schedule == 'constant':
    per_epoch = optax.constant_schedule(lr)
  else:
    raise ValueError(f"unknown optim.schedule {optim_cfg.schedule!r}: use 'cosine', 'step', "
                     "'constant' or 'warmup_cosine'")
  return lambda step: per_epoch(step // steps_per_epoch)


def sgd(optim_cfg, lr_schedule) -> optax.GradientTransformation:
  """torch.optim.SGD(momentum, weight_decay): d = g + wd * p; buf = mu * buf + d; p -= lr * buf."""
  return optax.chain(
      optax.add_decayed_weights(optim_cfg.weight_decay),
      optax.sgd(lr_schedule, momentum=optim_cfg.momentum, nesterov=False))


def kernels_only(params):
  """True for weight matrices and conv kernels; False for BN scales and shifts and biases (1-D)."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def lars(optim_cfg, lr_schedule) -> optax.GradientTransformation:
  """SimCLR's LARS: d = g + wd * w; d *= eta * |w| / |d| (per tensor); buf = mu * buf + lr * d.

  BN parameters and biases get neither weight decay nor the trust ratio (plain momentum SGD).
  """
  return optax.lars(lr_schedule, weight_decay=optim_cfg.weight_decay,
                    weight_decay_mask=kernels_only,
                    trust_coefficient=optim_cfg.trust_coefficient, eps=0.0,
                    trust_ratio_mask=kernels_only, momentum=optim_cfg.momentum, nesterov=False)


OPTIMIZERS = {'sgd': sgd, 'lars': lars}


def create(optim_cfg, lr_schedule) -> optax.GradientTransformation:
  if optim_cfg.optimizer not in OPTIMIZERS:
    raise ValueError(f'unknown optim.optimizer {optim_cfg.optimizer!r}: use one of '
                     f'{sorted(OPTIMIZERS)}')
  return OPTIMIZERS[optim_cfg.optimizer](optim_cfg, lr_schedule)
