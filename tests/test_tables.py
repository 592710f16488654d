"""Every Table 1/2 row resolves to the settings it names; the report prints the tables from
result files and refuses malformed ones."""
import importlib.util
import json
import os

import pytest
from ml_collections import config_flags
from absl import flags

from mocov2_jax import paper, report

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs')


def _load(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(CONFIGS, f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_rows_are_selected_on_the_command_line():
  """--config=configs/table2.py:ROW is how users pick a row (ml_collections passes ROW)."""
  values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', flag_values=values)
  values(['prog', f'--config={CONFIGS}/table2.py:simclr_b8192_e200'])
  assert values.config.paper.row == 'simclr_b8192_e200' and values.config.batch_size == 8192
  with pytest.raises(ValueError, match='Rows: v1, mlp'):
    _load('table1').get_config()


TABLE1 = {  # row: (head, tau, augmentation has blur (aug+), schedule)
    'v1': ('linear', 0.07, False, 'step'), 'mlp': ('mlp', 0.2, False, 'step'),
    'aug': ('linear', 0.07, True, 'step'), 'mlp_aug': ('mlp', 0.2, True, 'step'),
    'mlp_aug_cos': ('mlp', 0.2, True, 'cosine'),
    'mlp_tau0.07': ('mlp', 0.07, False, 'step'), 'mlp_tau0.5': ('mlp', 0.5, False, 'step'),
    'linear_tau0.3': ('linear', 0.3, False, 'step'),
}


def test_table1_rows():
  module = _load('table1')
  assert set(module.ROWS) == set(paper.TABLES['1'][1])
  assert len(module.ROWS) == 5 + 2 * 6
  for row in module.ROWS:
    c = module.get_config(row)
    assert (c.method, c.batch_size, c.num_epochs, c.model.arch) == ('moco', 256, 200,
                                                                     'resnet50')
    assert (c.optim.optimizer, c.optim.base_lr, c.moco.momentum) == ('sgd', 0.03, 0.999)
    assert c.paper.table == '1' and c.paper.row == row
    assert c.paper.top1 == paper.top1('1', row)
  for row, (head, tau, aug_plus, sched) in TABLE1.items():
    c = module.get_config(row)
    aug = c.data.augment
    assert (c.model.head, c.moco.temperature, c.optim.schedule) == (head, tau, sched), row
    assert (aug.blur_p, aug.jitter_p, aug.gray_before_jitter) == (
        (0.5, 0.8, False) if aug_plus else (0.0, 1.0, True)), row
  expected = {'v1': 60.6, 'mlp': 66.2, 'aug': 63.4, 'mlp_aug': 67.3, 'mlp_aug_cos': 67.5,
              'mlp_tau0.1': 64.9, 'mlp_tau0.3': 65.7, 'linear_tau0.07': 60.6,
              'linear_tau0.2': None}
  for row, top1 in expected.items():
    assert module.get_config(row).paper.top1 == top1, row
  # The full row equals configs/mocov2.py (MoCo v2), apart from its label.
  v2, full = _load('mocov2').get_config(), module.get_config('mlp_aug_cos')
  full.paper = v2.paper
  assert full.to_dict() == v2.to_dict()


def test_table2_rows():
  module = _load('table2')
  expected = {'simclr_b256_e200': ('simclr', 256, 200, 61.9),
              'simclr_b8192_e200': ('simclr', 8192, 200, 66.6),
              'mocov2_e200': ('moco', 256, 200, 67.5),
              'simclr_b4096_e1000': ('simclr', 4096, 1000, 69.3),
              'mocov2_e800': ('moco', 256, 800, 71.1)}
  assert set(module.ROWS) == set(expected)
  for row, (method, batch, epochs, top1) in expected.items():
    c = module.get_config(row)
    assert (c.method, c.batch_size, c.num_epochs, c.paper.top1) == (method, batch, epochs, top1)
    if method == 'simclr':
      assert (c.model.head, c.simclr.temperature) == ('simclr', 0.1)
      assert (c.optim.optimizer, c.optim.base_lr, c.optim.lr_batch_base, c.optim.lr_scaling,
              c.optim.weight_decay, c.optim.schedule, c.optim.warmup_epochs,
              c.optim.trust_coefficient) == ('lars', 0.3, 256, 'linear', 1e-6, 'warmup_cosine',
                                             10.0, 0.001)
      aug = c.data.augment
      assert (aug.crop_scale, aug.jitter, aug.blur_p, aug.blur_kernel_frac, aug.mean,
              aug.interpolation) == ((0.08, 1.0), (0.8, 0.8, 0.8, 0.2), 0.5, 0.1, None,
                                     'bicubic')
    else:
      assert (c.model.head, c.moco.temperature, c.optim.schedule) == ('mlp', 0.2, 'cosine')


def test_table2_cifar10_rows_share_encoder_batch_and_epochs():
  module = _load('table2_cifar10')
  moco, sim = module.get_config('mocov2'), module.get_config('simclr')
  for c in (moco, sim):
    assert (c.batch_size, c.num_epochs, c.data.image_size) == (256, 200, 32)
    assert (c.model.arch, c.model.cifar_stem) == ('resnet18', True)
  assert (moco.method, sim.method) == ('moco', 'simclr')
  assert (sim.simclr.temperature, sim.optim.base_lr, sim.data.augment.blur_p,
          sim.data.augment.mean) == (0.5, 1.0, 0.0, None)


# ---- the report ----

def _fake_run(tmp_path, name, table, row, top1, *, epochs=2.0, knn=30.0, batch=64):
  pre, lin = tmp_path / f'{name}_pre', tmp_path / f'{name}_lin'
  (pre / 'checkpoints' / '10').mkdir(parents=True)
  lin.mkdir()
  (pre / 'config.json').write_text(json.dumps(dict(
      method='simclr' if 'simclr' in row else 'moco', batch_size=batch, num_epochs=200,
      model=dict(arch='resnet18', width=8), data=dict(name='shapes', folder=''),
      paper=dict(table=table, row=row))))
  (pre / 'results.json').write_text(json.dumps(dict(epochs=epochs, knn_top1=knn, step=10)))
  (lin / 'results.json').write_text(json.dumps(dict(
      top1=top1, top5=90.0, mode='fast', checkpoint=dict(path=str(pre / 'checkpoints' / '10'),
                                                         step=10))))
  return str(lin)


def test_report_prints_both_tables(tmp_path):
  runs = [_fake_run(tmp_path, 'a', '2', 'simclr_b256_e200', 12.5),
          _fake_run(tmp_path, 'b', '2', 'mocov2_e200', 20.25, knn=None),
          _fake_run(tmp_path, 'c', '1', 'mlp_tau0.3', 70.0, epochs=3.0),
          _fake_run(tmp_path, 'd', '', '', 5.0)]
  text = report.report(runs)
  lines = text.splitlines()
  row = lambda name: [l for l in lines if l.startswith(f'| {name} |')]
  assert '### Table 1: MoCo ablation' in text and '### Table 2: MoCo v2 vs SimCLR' in text
  sim = row('simclr_b256_e200')
  assert len(sim) == 1
  cells = [c.strip() for c in sim[0].split('|')[1:-1]]
  assert cells[:9] == ['simclr_b256_e200', 'SimCLR, batch 256, 200 ep', '61.9', '12.50',
                       '-49.4', '30.00', '2 (of 200)', '64', 'resnet18/8']
  assert row('mocov2_e200')[0].split('|')[4:7] == [' 20.25 ', ' -47.2 ', ' - ']
  assert row('mlp_tau0.3')[0].split('|')[3:6] == [' 65.7 ', ' 70.00 ', ' +4.3 ']
  # Rows not run say so, with the paper's number and nothing of ours.
  for name, ref in [('simclr_b8192_e200', '66.6'), ('v1', '60.6'), ('linear_tau0.5', '-')]:
    assert row(name)[0].split('|')[3:5] == [f' {ref} ', ' not run '], name
  assert sum('not run' in l for l in lines) == 17 + 5 - 3
  assert '### Runs of no paper row' in text and 'Table 2 at small scale' not in text


def test_report_refuses_malformed_results(tmp_path, capsys):
  good = _fake_run(tmp_path, 'g', '2', 'mocov2_e200', 60.0)
  missing = tmp_path / 'empty'
  missing.mkdir()
  bad_json = tmp_path / 'bad'
  bad_json.mkdir()
  (bad_json / 'results.json').write_text('{"top1": 3')
  no_top1 = tmp_path / 'nonum'
  no_top1.mkdir()
  (no_top1 / 'results.json').write_text(json.dumps(dict(top1='high', top5=1)))
  pretrain = tmp_path / 'g_pre'  # a pre-training workdir, not a linear evaluation
  cases = [(missing, 'not a finished linear-evaluation workdir'), (bad_json, 'not valid JSON'),
           (no_top1, '"top1" is \'high\', not a number'),
           (pretrain, '"top1" is None, not a number')]
  for workdir, message in cases:
    with pytest.raises(report.ReportError, match=message.replace('(', r'\(')):
      report.report([good, str(workdir)])
    assert report.main([good, str(workdir)]) == 2
    assert message in capsys.readouterr().err
  os.remove(tmp_path / 'g_pre' / 'config.json')
  with pytest.raises(report.ReportError, match='which row it reproduces'):
    report.report([good])
