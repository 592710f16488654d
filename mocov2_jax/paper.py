"""The MoCo v2 paper's Tables 1 and 2 (Chen et al. 2020, arXiv:2003.04297): rows and numbers.

One source for the configs that reproduce the rows (configs/table*.py) and for the report that
sets our results beside the paper's (`python -m mocov2_jax.report`). ResNet-50, ImageNet, linear
top-1 (1 crop, 224).
"""
TEMPERATURES = ('0.07', '0.1', '0.2', '0.3', '0.4', '0.5')
_MLP_SWEEP = (62.9, 64.9, 66.2, 65.7, 65.0, 64.3)

# Table 2's rows: (mechanism, batch, epochs, top-1).
_TABLE2 = (('simclr', 256, 200, 61.9), ('simclr', 8192, 200, 66.6), ('mocov2', 256, 200, 67.5),
           ('simclr', 4096, 1000, 69.3), ('mocov2', 256, 800, 71.1))
_NAMES = {'simclr': 'SimCLR', 'mocov2': 'MoCo v2'}

# table id: (title, {row: (setting, paper top-1 or None)})
TABLES = {
    '1': ('Table 1: MoCo ablation (ResNet-50, ImageNet, 200 epochs, batch 256)', {
        'v1': ('MoCo v1 (tau 0.07)', 60.6),
        'mlp': ('+MLP (tau 0.2)', 66.2),
        'aug': ('+aug+', 63.4),
        'mlp_aug': ('+MLP +aug+', 67.3),
        'mlp_aug_cos': ('+MLP +aug+ +cos (MoCo v2)', 67.5),
        **{f'mlp_tau{t}': (f'w/ MLP, tau {t}', v) for t, v in zip(TEMPERATURES, _MLP_SWEEP)},
        **{f'linear_tau{t}': (f'w/o MLP, tau {t}', 60.6 if t == '0.07' else None)
           for t in TEMPERATURES},
    }),
    '2': ('Table 2: MoCo v2 vs SimCLR (ResNet-50, ImageNet)', {
        (f'simclr_b{b}_e{e}' if m == 'simclr' else f'mocov2_e{e}'):
        (f'{_NAMES[m]}, batch {b}, {e} ep', top1) for m, b, e, top1 in _TABLE2}),
    '2-cifar10': ('Table 2 at small scale: MoCo v2 vs SimCLR (ResNet-18, CIFAR-10, batch 256)', {
        'mocov2': ('MoCo v2 (the reference CIFAR recipe)', None),
        'simclr': ('SimCLR (its CIFAR settings)', None),
    }),
}


def top1(table: str, row: str):
  return TABLES[table][1][row][1]
