r"""Linear evaluation of a pre-trained backbone (the MoCo protocol), or a fast variant for CPUs.

  python -m mocov2_jax.linear_eval --config=configs/linear_eval.py \
      --config.pretrained=PRETRAIN_WORKDIR --workdir=DIR [--config.fast=True]

Protocol: the backbone is frozen in inference mode (BN running statistics) and one linear layer on
its pooled features is trained with SGD on random-resized-crop + flip views; top-1/top-5 on the
centre crops of the eval split. Fast mode: the centre-crop features of both splits are extracted
once and one linear layer per learning rate of `sweep_lrs` (the protocol's among them) is trained
on them with the same optimizer and schedule; the lr is chosen on a held-out part of train.
Starting again with the same --workdir resumes from its latest checkpoint.
"""
import time

import jax
import ml_collections
import numpy as np
from absl import flags, logging
from etils import epath
from ml_collections import config_flags

from mocov2_jax import checkpoints, cli, knn, linear, loop, methods
from mocov2_jax.data.bad_images import BadImages
from mocov2_jax.models import resnet

_DEFAULT_CONFIG = str(epath.Path(__file__).resolve().parent.parent / 'configs' / 'linear_eval.py')


def _local(x, batch_size):
  """This process's share of a global batch that every process holds."""
  n = batch_size // jax.process_count()
  return x[jax.process_index() * n:(jax.process_index() + 1) * n]


def cached_batches(feats, labels, batch_size, seed, start):
  """Global batches of cached features from step `start` on: a fresh permutation each epoch."""
  steps_per_epoch = len(labels) // batch_size
  step, perm_epoch, perm = start, None, None
  while True:
    epoch, i = divmod(step, steps_per_epoch)
    if epoch != perm_epoch:
      perm_epoch, perm = epoch, np.random.default_rng([seed, epoch]).permutation(len(labels))
    idx = _local(perm[i * batch_size:(i + 1) * batch_size], batch_size)
    yield dict(x=feats[idx], label=labels[idx])
    step += 1


def cached_eval_batches(feats, labels, batch_size):
  """Features in padded global batches (mask 0 on the padding)."""
  for i in range(0, len(labels), batch_size):
    x, y = feats[i:i + batch_size], labels[i:i + batch_size]
    pad = batch_size - len(y)
    yield {k: _local(v, batch_size) for k, v in dict(
        x=np.pad(x, ((0, pad), (0, 0))), label=np.pad(y, (0, pad)),
        mask=np.pad(np.ones(len(y), np.int32), (0, pad))).items()}


def holdout_split(num, fraction, seed):
  """(fit, held-out) indices of train: the held-out part chooses the lr, test never does."""
  perm = np.random.default_rng([seed, 1]).permutation(num)
  n = max(1, int(round(num * fraction)))
  return np.sort(perm[n:]), np.sort(perm[:n])


def eval_batches(cfg, split, bad=None):
  from mocov2_jax.data import pipeline  # pylint: disable=g-import-not-at-top  (TensorFlow)
  batches = pipeline.eval_batches(
      cfg.data, split, local_batch_size=cfg.batch_size // jax.process_count(),
      process_index=jax.process_index(), process_count=jax.process_count(), bad=bad)
  return (dict(x=b['image'], label=b['label'], mask=b['mask']) for b in batches)


def extract_features(cfg, features, frozen, split, batch_sharding, bad=None):
  """Centre-crop (eval view) features and labels of every example of `split`, on every host."""
  put = lambda x: jax.make_array_from_process_local_data(batch_sharding, x)
  fn = jax.jit(features, in_shardings=(None, batch_sharding), out_shardings=batch_sharding)
  batches = (dict(image=b['x'], label=b['label'], mask=b['mask'])
             for b in eval_batches(cfg, split, bad))
  return knn.extract(fn, frozen, batches, put)


def fast_experiment(cfg, train_set, eval_set, num_classes, backbone=None, bad=None):
  """Heads on cached (features, labels): with a sweep, on train minus a held-out part that
  chooses the lr."""
  (x, y), (ex, ey) = train_set, eval_set
  sweep = len(linear.head_lrs(cfg)) > 1
  fit, held = holdout_split(len(y), cfg.holdout_fraction, cfg.seed) if sweep else (
      np.arange(len(y)), np.arange(0))
  return linear.LinearExperiment(
      cfg, num_classes=num_classes, feature_dim=x.shape[1],
      steps_per_epoch=len(fit) // cfg.batch_size, features=lambda frozen, h: h, frozen={},
      make_batches=lambda start: cached_batches(x[fit], y[fit], cfg.batch_size, cfg.seed, start),
      eval_batches=lambda: cached_eval_batches(ex, ey, cfg.batch_size),
      held_out_batches=(lambda: cached_eval_batches(x[held], y[held], cfg.batch_size)) if sweep
      else None, held_out=len(held), backbone=backbone, bad=bad)


def experiment(config: ml_collections.ConfigDict, overridden=(), workdir=None):
  """The linear evaluation of `config.pretrained` after every start-up check; in fast mode its
  features are extracted here. `overridden`: the dotted fields given on the command line."""
  from mocov2_jax.data import pipeline  # pylint: disable=g-import-not-at-top  (TensorFlow)
  cfg, steps_per_epoch, num_classes = linear.check(config, overridden, workdir)
  _, repl, batch_sharding = methods.mesh_and_shardings()
  features = linear.make_features(linear.backbone_module(cfg))
  frozen = jax.device_put(linear.load_backbone(cfg.pretrained_checkpoint), repl)
  logging.info('Backbone %s (width %d, cifar_stem %s) from %s; %s.', cfg.model.arch,
               cfg.model.width, cfg.model.cifar_stem, cfg.pretrained_checkpoint,
               linear.FAST_NOTE if cfg.fast else 'protocol')
  bad = BadImages()
  if cfg.fast:
    tick = time.time()
    train_set = extract_features(cfg, features, frozen, cfg.data.train_split, batch_sharding, bad)
    eval_set = extract_features(cfg, features, frozen, cfg.data.eval_split, batch_sharding, bad)
    logging.info('Extracted %d + %d centre-crop features in %.1f s.', len(train_set[1]),
                 len(eval_set[1]), time.time() - tick)
    return fast_experiment(cfg, train_set, eval_set, num_classes, frozen, bad)

  def make_batches(start):
    stream = pipeline.train_batches(
        cfg.data, local_batch_size=cfg.batch_size // jax.process_count(),
        steps_per_epoch=steps_per_epoch, seed=cfg.seed, start_step=start,
        process_index=jax.process_index(), process_count=jax.process_count(), num_views=1,
        bad=bad)
    return (dict(x=b['image'], label=b['label']) for b in stream)
  return linear.LinearExperiment(
      cfg, num_classes=num_classes, feature_dim=resnet.feature_dim(cfg.model.arch, cfg.model.width),
      steps_per_epoch=steps_per_epoch, features=features, frozen=frozen,
      make_batches=make_batches, eval_batches=lambda: eval_batches(cfg, cfg.data.eval_split, bad),
      backbone=frozen, bad=bad)


def evaluate(config: ml_collections.ConfigDict, workdir, overridden=()):
  """Linear evaluation of `config.pretrained`; the loop writes `workdir`/results.json, returned."""
  _, results = loop.run(experiment(config, overridden, workdir), workdir)
  return results


def main(argv):
  del argv
  cli.start()
  fv = flags.FLAGS
  config = fv.config
  overridden = tuple(config_flags.get_override_values(fv['config']))
  cli.checked(checkpoints.check_workdir, fv.workdir)
  exp = cli.checked(experiment, config, overridden, fv.workdir)   # every check, then features
  _, r = loop.run(exp, fv.workdir)
  print(f'Linear top-1 {r["top1"]:.2f}%  top-5 {r["top5"]:.2f}% (lr {r["lr"]:g}; the '
        f'protocol\'s lr {r["protocol_lr"]["lr"]:g}: {r["protocol_lr"]["top1"]:.2f}%) after '
        f'{r["step"]} steps on {r["checkpoint"]["path"]} -- {r["note"]}')


if __name__ == '__main__':
  cli.define_config(_DEFAULT_CONFIG)
  flags.DEFINE_string('workdir', None, 'Linear checkpoints, TensorBoard events, results.json.')
  flags.mark_flag_as_required('workdir')
  cli.define_distributed_flags()
  cli.run(main)
