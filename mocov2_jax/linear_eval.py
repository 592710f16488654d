r"""Linear evaluation of a pre-trained backbone (the MoCo protocol, `linear`), or its fast variant
for CPUs (`--config.fast=True`).

  python -m mocov2_jax.linear_eval --config=configs/linear_eval.py \
      --config.pretrained=PRETRAIN_WORKDIR --workdir=DIR [--config.fast=True]

Starting again with the same --workdir resumes from its latest checkpoint.
"""
import ml_collections
from absl import flags
from etils import epath
from ml_collections import config_flags

from mocov2_jax import checkpoints, cli, linear, loop
from mocov2_jax.data import pipeline

_DEFAULT_CONFIG = str(epath.Path(__file__).resolve().parent.parent / 'configs' / 'linear_eval.py')


def inputs(config: ml_collections.ConfigDict, overridden=()):
  """(the config resolved against the pre-training, its data): what `linear.experiment` takes.
  `overridden`: the dotted fields given on the command line (kept as given)."""
  cfg = linear.resolve(config, overridden)
  return cfg, pipeline.Input(cfg.data, cfg.batch_size, cfg.seed)


def experiment(config: ml_collections.ConfigDict, overridden=(), workdir=None):
  """The linear evaluation of `config.pretrained` after every start-up check."""
  return linear.experiment(*inputs(config, overridden), workdir)


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
