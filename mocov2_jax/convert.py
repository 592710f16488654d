r"""Checkpoint conversion between this project and PyTorch.

Export a pre-training checkpoint (a workdir: its latest step; or one WORKDIR/checkpoints/<step>):

  python -m mocov2_jax.convert --checkpoint=WORKDIR --format=torchvision --out=resnet50.pth

  torchvision  backbone state_dict for torchvision.models.resnetNN() (only fc.* missing)
  moco         the reference's {'epoch', 'arch', 'state_dict'}: module.encoder_q.* (backbone and
               head), module.encoder_k.*, module.queue [dim, K], module.queue_ptr
  detectron2   pickle {'model': {name: numpy array}, ...}, names as the reference's
               convert-pretrain-to-detectron2.py (backbone only)
  safetensors  the torchvision state_dict as .safetensors (no PyTorch needed)

Import PyTorch weights into a workdir that pre-training starts from (step 0):

  python -m mocov2_jax.convert --from=torchvision resnet50.pth --out=WORKDIR [--config=...]
  python -m mocov2_jax.convert --from=moco moco_v2_800ep_pretrain.pth.tar --out=WORKDIR

The architecture (arch, width, CIFAR stem; head and dim for 'moco') is read from the weights'
names and shapes; --arch/--width/--cifar_stem only check it. Everything else comes from --config
(default: defaults.base_config()); pre-train with the same --config and the printed overrides.
PyTorch is optional (pip install -e '.[torch]'); safetensors files are read and written without it.
"""
from absl import flags
from flax import traverse_util
from ml_collections import config_flags

from mocov2_jax import cli, config_check, defaults, torch_io
from mocov2_jax.models import resnet

FLAGS = flags.FLAGS


def overrides(base, config, prefix='--config.'):
  """The --config.x=y flags that turn `base` into `config` (what to pass to the trainer)."""
  flat = lambda c: traverse_util.flatten_dict(c.to_dict(), sep='.')
  b = flat(base)
  return [f'{prefix}{k}={v}' for k, v in flat(config).items() if b.get(k) != v]


def convert(files):
  if not FLAGS.out:
    raise ValueError('--out is required')
  if FLAGS['from'].value:
    if len(files) != 1:
      raise ValueError('--from needs one FILE argument: --from=moco FILE --out=WORKDIR')
    base = FLAGS.config or defaults.base_config()
    config_check.check(base)
    config = torch_io.import_weights(FLAGS['from'].value, files[0], FLAGS.out, base, FLAGS.arch,
                                     FLAGS.width, FLAGS.cifar_stem)
    name = (config_flags.get_config_filename(FLAGS['config']) if FLAGS.config
            else 'configs/mocov2.py')
    return (f'wrote {FLAGS.out}/checkpoints/0; pre-train from it with your --config.* flags and:\n'
            f'  python -m mocov2_jax.main --config={name} --workdir={FLAGS.out} '
            + ' '.join(overrides(base, config)))
  if FLAGS.checkpoint:
    return torch_io.export(FLAGS.checkpoint, FLAGS.format, FLAGS.out)
  raise ValueError('pass --checkpoint=WORKDIR --format=FORMAT --out=FILE (export) or '
                   '--from=torchvision|moco FILE --out=WORKDIR (import); see --help')


def define_flags():
  flags.DEFINE_string('checkpoint', None, 'Export: a workdir (latest step) or a step dir.')
  flags.DEFINE_enum('format', 'torchvision', torch_io.FORMATS, 'Export format.')
  flags.DEFINE_string('out', None, 'Export: the file to write. Import: the workdir.')
  flags.DEFINE_enum('from', None, ['torchvision', 'moco'], 'Import FILE (positional) of this kind '
                    'into --out.')
  flags.DEFINE_enum('arch', None, sorted(resnet.ARCHS), 'Import: check the file is this arch.')
  flags.DEFINE_integer('width', None, 'Import: check the first stage has this width.')
  flags.DEFINE_bool('cifar_stem', None, 'Import: check the stem (3x3, no max-pool).')
  cli.define_config(None, lock=False, help_text='Import: the pre-training config the workdir is '
                    'for (default: defaults.base_config()).')


def main(argv):
  print(cli.checked(convert, argv[1:]))


if __name__ == '__main__':
  define_flags()
  cli.run(main)
