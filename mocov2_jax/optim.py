"""The reference's SGD: momentum 0.9, PyTorch-style weight decay on every parameter, lr per epoch."""
import optax


def learning_rate(optim_cfg, global_batch: int) -> float:
  """lr = base_lr x global_batch / 256 (linear scaling, as the reference)."""
  return optim_cfg.base_lr * global_batch / optim_cfg.lr_batch_base


def schedule(optim_cfg, global_batch: int, steps_per_epoch: int, num_epochs: int):
  """Learning rate as a function of the step, constant within an epoch as in the reference.

  'cosine': lr x 0.5 (1 + cos(pi epoch / epochs)) (MoCo v2); 'step': lr x 0.1 at each epoch of
  `lr_drop_epochs` (MoCo v1: 120, 160).
  """
  lr = learning_rate(optim_cfg, global_batch)
  if optim_cfg.schedule == 'cosine':
    per_epoch = optax.cosine_decay_schedule(lr, num_epochs)
  elif optim_cfg.schedule == 'step':
    per_epoch = optax.piecewise_constant_schedule(
        lr, {int(e): 0.1 for e in optim_cfg.lr_drop_epochs})
  elif optim_cfg.schedule == 'constant':
    per_epoch = optax.constant_schedule(lr)
  else:
    raise ValueError(f"unknown optim.schedule {optim_cfg.schedule!r}: use 'cosine', 'step' "
                     "or 'constant'")
  return lambda step: per_epoch(step // steps_per_epoch)


def sgd(optim_cfg, lr_schedule) -> optax.GradientTransformation:
  """torch.optim.SGD(momentum, weight_decay): d = g + wd * p; buf = mu * buf + d; p -= lr * buf."""
  return optax.chain(
      optax.add_decayed_weights(optim_cfg.weight_decay),
      optax.sgd(lr_schedule, momentum=optim_cfg.momentum, nesterov=False))
