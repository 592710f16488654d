"""The full set of config fields with MoCo v2 / ImageNet defaults; `configs/*.py` start from it.

Every field a program reads is here, so `--config.field=value` can override any of them and a
misspelt override fails loudly.
"""
import importlib.util

import ml_collections
from etils import epath
from ml_collections import config_dict

from mocov2_jax.data import recipes

IMAGENET_EXAMPLES = 1_281_167


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.method = 'moco'                 # or 'simclr' (the end-to-end mechanism, Table 2)
  c.seed = 0
  c.batch_size = 256                # global, over all devices and hosts
  c.num_epochs = 200
  c.num_train_steps = -1            # > 0 stops early (tests, smoke runs); the schedule keeps epochs

  c.model = ml_collections.ConfigDict(dict(
      arch='resnet50', width=64, cifar_stem=False, head='mlp', dim=128, dtype='float32'))
  c.moco = ml_collections.ConfigDict(dict(
      queue_size=65536, momentum=0.999, temperature=0.2, bn_groups=8, symmetric=False,
      momentum_schedule='constant'))   # or 'cosine': BYOL's, from `momentum` up to 1
  # SimCLR's own settings; its BN is global (one group over the 2N views of the global batch).
  c.simclr = ml_collections.ConfigDict(dict(temperature=0.1))
  c.optim = ml_collections.ConfigDict(dict(
      optimizer='sgd', base_lr=0.03, lr_batch_base=256, lr_scaling='linear', momentum=0.9,
      weight_decay=1e-4, schedule='cosine', lr_drop_epochs=(120, 160), warmup_epochs=0.0,
      trust_coefficient=0.001))   # LARS only

  c.data = ml_collections.ConfigDict(dict(
      source='tfds', name='imagenet2012', data_dir='', manual_dir='', folder='',  # '' = unset
      train_split='train', eval_split='validation', image_size=224, eval_crop_frac=0.875,
      shuffle_buffer=16384, num_train=0, num_eval=0, synthetic_seed=0,
      augment=recipes.recipe('mocov2'),
      # 'host': the whole recipe in tf.data. 'device': tf.data decodes and crops (uint8 to the
      # devices), the jitted step does the rest (flip, jitter, grayscale, blur, normalisation);
      # it learned about a point less over 5 seeds (docs/results.md), so it is not the default.
      augment_on='host',
      # An unreadable image (corrupt, truncated, not an image): 'skip' it (counted in the log,
      # TensorBoard and results.json, the first few named) or stop with 'error', naming it.
      on_bad_image='skip'))

  # kNN monitor: off for ImageNet (a 1.28M x 2048 bank does not fit beside training); the CIFAR
  # and demo configs switch it on. Each pass measures both features (pooled backbone, head
  # output); `feature` is the one reported as knn_top1.
  c.knn = ml_collections.ConfigDict(dict(
      every_epochs=0, k=200, temperature=0.1, at_init=False, train_split='', max_train=0,
      feature='backbone'))

  # The paper's row this config reproduces (configs/table*.py), for `python -m mocov2_jax.report`.
  c.paper = ml_collections.ConfigDict(dict(
      table='', row='', top1=config_dict.placeholder(float), note=''))

  c.log_every_steps = 100
  c.checkpoint_every_steps = 2000
  c.keep_checkpoints = 3
  c.num_summary_pairs = 4
  # > 0: one jax.profiler trace of this many steps from the run's 5th step (after compiling),
  # in WORKDIR/plugins/profile for TensorBoard's profile tab (clu's Profile action).
  c.profile_steps = 0
  return c


def use_simclr(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """SimCLR's ImageNet settings (Chen et al. 2020a), as the MoCo v2 paper's Table 2 compares:
  end-to-end, tau 0.1, projection head 2048-2048-128 with BN, global BN, LARS (trust 0.001),
  lr 0.3 x batch / 256, weight decay 1e-6, 10 warm-up epochs then a per-step cosine, SimCLR's
  augmentation (strength-1 colour distortion, crops (0.08, 1), blur, images in [0, 1])."""
  c.method = 'simclr'
  c.model.head = 'simclr'
  c.simclr.temperature = 0.1
  c.optim.update(optimizer='lars', base_lr=0.3, lr_batch_base=256, lr_scaling='linear',
                 momentum=0.9, weight_decay=1e-6, schedule='warmup_cosine', warmup_epochs=10.0,
                 trust_coefficient=0.001)
  c.data.augment = recipes.recipe('simclr')
  return c


def sibling_config(config_file: str, name: str):
  """The module of `configs/<name>.py` next to `config_file`: configs are files, not a package,
  so a config that builds on another loads it by path."""
  path = str(epath.Path(config_file).resolve().parent / f'{name}.py')
  spec = importlib.util.spec_from_file_location(f'mocov2_jax_configs_{name}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module
