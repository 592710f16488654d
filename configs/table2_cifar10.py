r"""Table 2 at small scale: MoCo v2 against SimCLR on CIFAR-10, same encoder, batch and epochs.

ResNet-18 (CIFAR stem), batch 256, 200 epochs, 32 px. The paper has no CIFAR numbers: these rows
are for comparing the two mechanisms on data anyone can run.

| row    | settings |
|--------|----------|
| mocov2 | the reference's CIFAR-10 demo recipe (configs/cifar10.py): K 4096, m 0.99, tau 0.1, 8 BN groups, SGD lr 0.03 x batch / 256, wd 5e-4, cosine |
| simclr | SimCLR's CIFAR-10 settings: tau 0.5, LARS lr 1.0 x batch / 256, wd 1e-4, 10 warm-up epochs, colour strength 0.5, no blur, images in [0, 1] |

python -m mocov2_jax.main --config=configs/table2_cifar10.py:simclr --workdir=DIR \
    --config.data.source=folder --config.data.folder=/path/to/cifar10_jpg
"""
from mocov2_jax import defaults
from mocov2_jax.data import recipes

ROWS = ('mocov2', 'simclr')


def get_config(row=None):
  if row not in ROWS:
    raise ValueError(f'configs/table2_cifar10.py needs a row, as configs/table2_cifar10.py:ROW; '
                     f'got {row!r}. Rows: {", ".join(ROWS)}')
  c = defaults.sibling_config(__file__, 'cifar10').get_config()
  c.batch_size = 256
  if row == 'simclr':
    defaults.use_simclr(c)
    c.simclr.temperature = 0.5
    c.optim.update(base_lr=1.0, weight_decay=1e-4)
    c.data.augment = recipes.recipe('simclr_cifar')
  c.paper.update(table='2-cifar10', row=row, note='small scale: no paper number')
  return c
