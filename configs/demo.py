"""The offline demo: MoCo v2 on synthetic shapes, a small ResNet-18, a few minutes on 2 CPU cores.

The data is generated (10 classes of shapes with random colours, no download), so a newcomer sees
the whole loop run: augmented pairs in TensorBoard, loss falling, checkpoints, and a kNN check of
the learned encoder against the same encoder at random init.
"""
from mocov2_jax import defaults
from mocov2_jax.data import recipes


def get_config():
  c = defaults.base_config()
  c.batch_size = 128
  c.num_epochs = 10
  c.model.update(arch='resnet18', width=16, cifar_stem=True, head='mlp')
  c.moco.update(queue_size=1024, momentum=0.99, temperature=0.2, bn_groups=8)
  c.optim.update(base_lr=0.06, weight_decay=5e-4)
  c.data.update(source='synthetic', name='shapes', train_split='train', eval_split='test',
                num_train=4096, num_eval=1024, image_size=32, eval_crop_frac=1.0,
                shuffle_buffer=4096, augment=recipes.recipe('cifar'))
  c.data.augment.crop_scale = (0.2, 1.0)   # keep the shape in view: it is the only class cue
  c.knn.update(every_epochs=5, at_init=True)
  c.log_every_steps = 8
  c.checkpoint_every_steps = 64
  return c
