r"""The MoCo v2 paper's Table 1 (ablation) and its temperature sweep, one config per row.

ResNet-50, ImageNet, 200 epochs, batch 256, lr 0.03, linear top-1 from the paper:

| row            | MLP | aug+ | cos | tau  | paper |
|----------------|-----|------|-----|------|-------|
| v1             |     |      |     | 0.07 | 60.6  |
| mlp            | x   |      |     | 0.2  | 66.2  |
| aug            |     | x    |     | 0.07 | 63.4  |
| mlp_aug        | x   | x    |     | 0.2  | 67.3  |
| mlp_aug_cos    | x   | x    | x   | 0.2  | 67.5  |  (= MoCo v2, configs/mocov2.py)
| mlp_tau{T}     | x   |      |     | T    | 0.07: 62.9, 0.1: 64.9, 0.2: 66.2, 0.3: 65.7, 0.4: 65.0, 0.5: 64.3 |
| linear_tau{T}  |     |      |     | T    | 0.07: 60.6; the paper reports no other tau without the MLP |

T is one of 0.07, 0.1, 0.2, 0.3, 0.4, 0.5. Without "cos" the lr drops x0.1 at epochs 120 and 160;
without "aug+" the augmentation is MoCo v1's.

python -m mocov2_jax.main --config=configs/table1.py:mlp_aug --workdir=DIR \
    --config.data.manual_dir=/path/to/imagenet/tars
"""
from mocov2_jax import defaults, paper
from mocov2_jax.data import recipes

# row: (head, aug+, cosine, tau); the paper's numbers are in mocov2_jax/paper.py
ROWS = {
    'v1': ('linear', False, False, 0.07),
    'mlp': ('mlp', False, False, 0.2),
    'aug': ('linear', True, False, 0.07),
    'mlp_aug': ('mlp', True, False, 0.2),
    'mlp_aug_cos': ('mlp', True, True, 0.2),
    **{f'mlp_tau{t}': ('mlp', False, False, float(t)) for t in paper.TEMPERATURES},
    **{f'linear_tau{t}': ('linear', False, False, float(t)) for t in paper.TEMPERATURES},
}


def get_config(row=None):
  if row not in ROWS:
    raise ValueError(f'configs/table1.py needs a row, as configs/table1.py:ROW; got {row!r}. '
                     f'Rows: {", ".join(ROWS)}')
  head, aug_plus, cosine, tau = ROWS[row]
  top1 = paper.top1('1', row)
  c = defaults.base_config()
  c.model.head = head
  c.moco.temperature = tau
  c.data.augment = recipes.recipe('mocov2' if aug_plus else 'mocov1')
  c.optim.update(schedule='cosine' if cosine else 'step', lr_drop_epochs=(120, 160))
  c.paper.update(table='1', row=row, top1=top1,
                 note='' if top1 is not None else 'not reported in the paper')
  return c
