"""The reference's single-GPU CIFAR-10 demo: ResNet-18 (CIFAR stem), batch 512, lr 0.06, wd 5e-4,
cosine, 200 epochs, K 4096, m 0.99, tau 0.1, 8 BN groups, linear head, v2 augmentation without
blur at 32 px. Published kNN top-1 (asymmetric loss): 82.6 / 86.3 / 88.7 at 200 / 400 / 800 epochs.

Reads `cifar10` from tfds (prepared in `data.data_dir`), or an image folder with
`--config.data.source=folder --config.data.folder=DIR` (DIR/train/<class>/*.jpg, DIR/test/...).
"""
from mocov2_jax import defaults
from mocov2_jax.data import recipes


def get_config():
  c = defaults.base_config()
  c.batch_size = 512
  c.num_epochs = 200
  c.model.update(arch='resnet18', cifar_stem=True, head='linear')
  c.moco.update(queue_size=4096, momentum=0.99, temperature=0.1, bn_groups=8)
  c.optim.update(base_lr=0.03, weight_decay=5e-4)   # 0.03 x 512 / 256 = 0.06
  c.data.update(name='cifar10', train_split='train', eval_split='test', image_size=32,
                eval_crop_frac=1.0, shuffle_buffer=50000, augment=recipes.recipe('cifar'))
  c.knn.update(every_epochs=10, at_init=True)
  c.log_every_steps = 20
  c.checkpoint_every_steps = 500
  return c
