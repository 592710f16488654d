"""The range of every numeric config field, checked by every program before anything is written:
a value outside it (a negative lr, momentum 1.5, temperature 0) would otherwise train silently
wrong or fail an hour later. Choices (arch, optimizer, ...) are checked where they are used."""
import math

from mocov2_jax import errors


def _number(v):
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _ints(v):
  return isinstance(v, int) and not isinstance(v, bool)


def positive(v):
  return _number(v) and v > 0


def non_negative(v):
  return _number(v) and v >= 0


def probability(v):
  return _number(v) and 0 <= v <= 1


def below_one(v):
  return _number(v) and 0 <= v < 1


def fraction(v):
  return _number(v) and 0 < v <= 1


def positive_int(v):
  return _ints(v) and v > 0


def count(v):
  return _ints(v) and v >= 0


def steps_or_unset(v):
  return _ints(v) and (v > 0 or v == -1)


def interval(inside):
  """A (low, high) pair with low <= high, both satisfying `inside`."""
  def check(v):
    return (isinstance(v, (tuple, list)) and len(v) == 2 and all(inside(x) for x in v)
            and v[0] <= v[1])
  return check


def each(inside):
  return lambda v: isinstance(v, (tuple, list)) and all(inside(x) for x in v)


def jitter(v):
  """(brightness, contrast, saturation, hue) strengths: >= 0, hue <= 0.5 (torchvision's)."""
  return (isinstance(v, (tuple, list)) and len(v) == 4 and all(non_negative(x) for x in v)
          and v[3] <= 0.5)


def per_channel(v):
  return v is None or (isinstance(v, (tuple, list)) and len(v) == 3 and all(_number(x) for x in v))


def positive_per_channel(v):
  return v is None or (per_channel(v) and all(x > 0 for x in v))


# field: (test, what it must be). Fields a config lacks are not checked; None (unset) passes.
RULES = {
    'seed': (count, 'an integer >= 0'),
    'batch_size': (positive_int, 'a positive integer'),
    'num_epochs': (positive_int, 'a positive integer'),
    'num_train_steps': (steps_or_unset, '-1 (the whole schedule) or a positive integer'),
    'num_classes': (count, '0 (from the data) or the number of classes'),
    'model.width': (positive_int, 'a positive integer'),
    'model.dim': (positive_int, 'a positive integer'),
    'moco.queue_size': (positive_int, 'a positive integer'),
    'moco.momentum': (below_one, 'in [0, 1) (0.999 in the paper)'),
    'moco.temperature': (positive, '> 0 (0.2 for MoCo v2, 0.07 for v1)'),
    'moco.bn_groups': (positive_int, 'a positive integer'),
    'simclr.temperature': (positive, '> 0'),
    'optim.base_lr': (positive, '> 0'),
    'optim.lr_batch_base': (positive, '> 0'),
    'optim.momentum': (below_one, 'in [0, 1)'),
    'optim.weight_decay': (non_negative, '>= 0'),
    'optim.warmup_epochs': (non_negative, '>= 0'),
    'optim.trust_coefficient': (positive, '> 0'),
    'optim.lr_drop_epochs': (each(non_negative), 'epochs >= 0'),
    'data.image_size': (positive_int, 'a positive integer'),
    'data.eval_crop_frac': (fraction, 'in (0, 1]'),
    'data.shuffle_buffer': (positive_int, 'a positive integer'),
    'data.num_train': (count, '0 (all) or a number of examples'),
    'data.num_eval': (count, '0 (all) or a number of examples'),
    'data.synthetic_seed': (count, 'an integer >= 0'),
    'data.augment.crop_scale': (interval(fraction), '(low, high) with 0 < low <= high <= 1'),
    'data.augment.crop_ratio': (interval(positive), '(low, high) with 0 < low <= high'),
    'data.augment.jitter': (jitter, '(brightness, contrast, saturation, hue), each >= 0, hue '
                            '<= 0.5'),
    'data.augment.jitter_p': (probability, 'a probability in [0, 1]'),
    'data.augment.gray_p': (probability, 'a probability in [0, 1]'),
    'data.augment.blur_p': (probability, 'a probability in [0, 1]'),
    'data.augment.flip_p': (probability, 'a probability in [0, 1]'),
    'data.augment.blur_sigma': (interval(positive), '(low, high) with 0 < low <= high'),
    'data.augment.blur_kernel_frac': (lambda v: v is None or fraction(v), 'None or in (0, 1]'),
    'data.augment.mean': (per_channel, 'None or 3 numbers'),
    'data.augment.std': (positive_per_channel, 'None or 3 numbers > 0'),
    'knn.every_epochs': (count, '0 (off) or a number of epochs'),
    'knn.k': (positive_int, 'a positive integer'),
    'knn.temperature': (positive, '> 0'),
    'knn.max_train': (count, '0 (all) or a number of examples'),
    'sweep_lrs': (each(positive), 'learning rates > 0'),
    'holdout_fraction': (lambda v: _number(v) and 0 < v < 1, 'in (0, 1)'),
    'eval_every_epochs': (count, '0 (only at the end) or a number of epochs'),
    'log_every_steps': (positive_int, 'a positive integer'),
    'checkpoint_every_steps': (positive_int, 'a positive integer'),
    'keep_checkpoints': (positive_int, 'a positive integer'),
    'num_summary_pairs': (count, 'an integer >= 0'),
    'profile_steps': (count, '0 (no trace) or a number of steps'),
}


def _get(config, dotted):
  node = config
  for part in dotted.split('.'):
    if not hasattr(node, 'keys') or part not in node.keys():
      return _MISSING
    node = node[part]
  return node


_MISSING = object()


def check(config):
  """Raises errors.BadInput naming the first field out of its range, and what it must be."""
  for field, (test, what) in RULES.items():
    value = _get(config, field)
    if value is _MISSING or value is None:
      continue
    if isinstance(value, list):
      value = tuple(value)
    if not test(value):
      raise errors.BadInput(f'--config.{field}={value!r}: must be {what}.')
