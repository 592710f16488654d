r"""The MoCo v2 paper's Table 2: MoCo v2 against SimCLR (end-to-end), one config per row.

ResNet-50, ImageNet, linear top-1 from the paper:

| row                | mechanism | batch | epochs | paper |
|--------------------|-----------|-------|--------|-------|
| simclr_b256_e200   | SimCLR    | 256   | 200    | 61.9  |
| simclr_b8192_e200  | SimCLR    | 8192  | 200    | 66.6  |
| mocov2_e200        | MoCo v2   | 256   | 200    | 67.5  |
| simclr_b4096_e1000 | SimCLR    | 4096  | 1000   | 69.3  |
| mocov2_e800        | MoCo v2   | 256   | 800    | 71.1  |

SimCLR rows: `defaults.use_simclr` (tau 0.1, LARS, lr 0.3 x batch / 256, 10 warm-up epochs, SimCLR
augmentation, global BN). MoCo v2 rows: configs/mocov2.py with the epochs of the row.

python -m mocov2_jax.main --config=configs/table2.py:simclr_b256_e200 --workdir=DIR \
    --config.data.manual_dir=/path/to/imagenet/tars
"""
from mocov2_jax import defaults, paper

# row: (method, batch, epochs); the paper's numbers are in mocov2_jax/paper.py
ROWS = {
    'simclr_b256_e200': ('simclr', 256, 200),
    'simclr_b8192_e200': ('simclr', 8192, 200),
    'mocov2_e200': ('moco', 256, 200),
    'simclr_b4096_e1000': ('simclr', 4096, 1000),
    'mocov2_e800': ('moco', 256, 800),
}


def get_config(row=None):
  if row not in ROWS:
    raise ValueError(f'configs/table2.py needs a row, as configs/table2.py:ROW; got {row!r}. '
                     f'Rows: {", ".join(ROWS)}')
  method, batch, epochs = ROWS[row]
  c = defaults.base_config()
  if method == 'simclr':
    defaults.use_simclr(c)
  c.batch_size, c.num_epochs = batch, epochs
  c.paper.update(table='2', row=row, top1=paper.top1('2', row))
  return c
