r"""Linear evaluation on ImageNet, the MoCo protocol: frozen ResNet-50 (BN running statistics),
one linear layer on the 2048 pooled features, SGD lr 30 x batch / 256, momentum 0.9, no weight
decay, 100 epochs, lr x0.1 at epochs 60 and 80; random-resized-crop (0.08, 1) + flip to train,
resize 256 + centre crop 224 to evaluate.

python -m mocov2_jax.linear_eval --config=configs/linear_eval.py \
    --config.pretrained=PRETRAIN_WORKDIR --workdir=DIR [--config.data.data_dir=...]

`pretrained` is a pre-training workdir (its latest checkpoint) or one WORKDIR/checkpoints/<step>.
The architecture comes from the pre-training's config.json; `model.arch/width/cifar_stem` are
unset and, if set, only check it.
"""
import ml_collections
from ml_collections import config_dict

from mocov2_jax import defaults
from mocov2_jax.data import recipes


def linear_recipe(base: str = 'mocov2') -> ml_collections.ConfigDict:
  """Random-resized-crop (0.08, 1) + flip only: never colour jitter, grayscale or blur."""
  r = recipes.recipe(base)
  r.update(crop_scale=(0.08, 1.0), jitter_p=0.0, gray_p=0.0, blur_p=0.0)
  return r


def get_config():
  c = ml_collections.ConfigDict()
  c.pretrained = ''                 # required: pre-training workdir or checkpoints/<step> dir
  c.fast = False                    # True: cached centre-crop features (small data, CPUs)
  c.seed = 0
  c.batch_size = 256                # global
  c.num_epochs = 100
  c.num_train_steps = -1            # > 0 stops early (smoke runs); the schedule keeps epochs
  c.num_classes = 0                 # 0: from the data (tfds info, class folders)
  # Unset: taken from the pre-training's config.json. Set: must match it (a check).
  c.model = ml_collections.ConfigDict(dict(
      arch=config_dict.placeholder(str), width=config_dict.placeholder(int),
      cifar_stem=config_dict.placeholder(bool), dtype='float32'))
  c.optim = ml_collections.ConfigDict(dict(
      base_lr=30.0, lr_batch_base=256, lr_scaling='linear', momentum=0.9, weight_decay=0.0,
      schedule='step',
      lr_drop_epochs=(60, 80)))
  # True: the data fields (where the data is, sizes, mean/std) come from the pre-training's
  # config.json, except those given on the command line; the crop + flip recipe stays this one's.
  c.data_from_pretrained = False
  c.data = defaults.base_config().data
  c.data.augment = linear_recipe()
  # Fast mode trains one head per lr of this grid (x batch / 256; optim.base_lr is added) in the
  # same pass and reports the one that does best on `holdout_fraction` of train (never test),
  # beside the protocol lr's. () trains the protocol lr alone, on all of train.
  c.sweep_lrs = (0.1, 0.3, 1.0, 3.0, 10.0, 30.0)
  c.holdout_fraction = 0.1
  c.eval_every_epochs = 10          # top-1/top-5 on data.eval_split; 0: only at the end
  c.log_every_steps = 100
  c.checkpoint_every_steps = 1000   # and at the end; the last `keep_checkpoints` are kept
  c.keep_checkpoints = 2
  c.profile_steps = 0               # > 0: one profiler trace of this many steps (as pre-training)
  return c
