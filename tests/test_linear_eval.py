"""Linear evaluation: the layer learns, the backbone stays put, resume, deterministic crops,
clear errors. One tiny pre-training (2 steps of the demo at width 4, 16 px) serves the module."""
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from mocov2_jax import linear, linear_eval, loop, main, methods
from tests.helpers import REPO, demo_config


@pytest.fixture(scope='module')
def pretrained(tmp_path_factory):
  c = demo_config(num_train_steps=2)
  workdir = str(tmp_path_factory.mktemp('pretrained'))
  main.train_and_evaluate(c, workdir)
  return workdir


def linear_config(pretrained, **changes):
  """configs/linear_eval_cifar10.py: data, image size and model from the tiny pre-training."""
  from configs import linear_eval_cifar10  # pylint: disable=g-import-not-at-top
  c = linear_eval_cifar10.get_config()
  c.update_from_flattened_dict({'pretrained': pretrained, 'batch_size': 32, 'num_epochs': 1,
                                'log_every_steps': 2, 'eval_every_epochs': 1, **changes})
  return c


def _clusters(seed, spread, dim):
  """split(n): (features [n, dim], labels) of 4 Gaussian clusters with centres `spread` apart."""
  rng = np.random.default_rng(seed)
  centres = spread * rng.normal(size=(4, dim))
  def split(n):
    y = rng.integers(0, 4, n).astype(np.int32)
    return (centres[y] + rng.normal(size=(n, dim))).astype(np.float32), y
  return rng, split


def test_linear_layer_separates_cached_features(tmp_path):
  _, split = _clusters(0, 4.0, 16)
  cfg = linear_config('unused', num_epochs=5, fast=True)
  exp = linear.fast_experiment(cfg, split(256), split(64), 4)
  state, r = loop.run(exp, str(tmp_path))
  heads = r['sweep']
  assert exp.held_out == 26 and int(state.step) == 5 * (256 - 26) // 32   # 10% of train held out
  assert r['selection'].startswith('lr chosen on 26 held-out train examples')
  assert json.load(open(tmp_path / 'results.json'))['sweep'] == heads
  assert [h['lr'] for h in heads] == [0.1, 0.3, 1.0, 3.0, 10.0, 30.0]
  best = max(heads, key=lambda h: h['holdout_top1'])
  assert best['top1'] >= 95.0 and best['top5'] == 100.0
  assert state.params['classifier']['kernel'].shape == (6, 16, 4)   # one layer per lr


def test_protocol_trains_head_and_backbone_stays_bit_identical(pretrained, tmp_path):
  r = linear_eval.evaluate(linear_config(pretrained), str(tmp_path))
  assert r['mode'] == 'protocol' and r['backbone_unchanged']
  assert r['step'] == 128 // 32 and r['epochs'] == 1.0
  assert r['checkpoint'] == {'path': os.path.join(pretrained, 'checkpoints', '2'), 'step': 2}
  assert r['feature_dim'] == 32 and r['num_classes'] == 10
  saved = json.load(open(tmp_path / 'results.json'))
  assert saved['top1'] == r['top1'] and saved['config']['model']['width'] == 4
  assert saved['config']['data']['augment']['jitter_p'] == 0.0
  assert any(f.startswith('events.out.tfevents') for f in os.listdir(tmp_path))

  # The sanity check itself fails loudly on a backbone that moved by one ulp.
  step_dir = r['checkpoint']['path']
  frozen = linear.load_backbone(step_dir)
  linear.check_unchanged(jax.device_put(frozen), step_dir)
  kernel = frozen['params']['conv1']['kernel']
  kernel.flat[0] = np.nextafter(kernel.flat[0], np.inf)
  with pytest.raises(RuntimeError, match='conv1/kernel'):
    linear.check_unchanged(jax.device_put(frozen), step_dir)


def test_fast_mode_resumes_and_continues_the_epoch_count(pretrained, tmp_path, caplog):
  first = linear_eval.evaluate(linear_config(pretrained, fast=True), str(tmp_path))
  assert first['mode'] == 'fast' and 'not the paper' in first['note']
  assert (first['step'], first['epochs']) == (3, 1.0)   # 128 - 13 held out: 3 steps of 32
  caplog.set_level('INFO')
  second = linear_eval.evaluate(linear_config(pretrained, fast=True, num_epochs=2),
                                str(tmp_path))
  assert (second['step'], second['epochs']) == (6, 2.0)
  assert 'Resumed from' in caplog.text and 'at step 3.' in caplog.text
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['3', '6']
  with pytest.raises(ValueError, match='use a new --workdir'):  # another mode, same workdir
    linear_eval.evaluate(linear_config(pretrained, fast=False, num_epochs=2), str(tmp_path))


def test_eval_crops_are_deterministic(pretrained):
  cfg, data = linear_eval.inputs(linear_config(pretrained))
  linear.check(cfg, data)
  sharding = methods.mesh_and_shardings()[2]
  features = linear.make_features(linear.backbone_module(cfg))
  frozen = jax.device_put(linear.load_backbone(cfg.pretrained_checkpoint))
  (a, la), (b, lb) = (linear.extract_features(data, features, frozen, 'test', sharding)
                      for _ in range(2))
  assert a.shape == (64, 32) and np.array_equal(a, b) and np.array_equal(la, lb)


def test_data_and_model_come_from_the_pretraining_unless_overridden(pretrained, tmp_path):
  cfg = linear.resolve(linear_config(pretrained, **{'data.num_eval': 32}))
  assert (cfg.model.arch, cfg.model.width, cfg.model.cifar_stem) == ('resnet18', 4, True)
  assert (cfg.data.source, cfg.data.image_size, cfg.data.num_eval) == ('synthetic', 16, 64)
  assert cfg.data.augment.crop_scale == (0.08, 1.0) and cfg.data.augment.jitter_p == 0.0
  kept = linear.resolve(linear_config(pretrained, **{'data.num_eval': 32}),
                             overridden=('data.num_eval',))
  assert (kept.data.num_eval, kept.data.image_size) == (32, 16)
  # A step dir copied without its workdir's config.json: the model is read off the weights.
  alone = tmp_path / 'copied' / 'checkpoints' / '2'
  shutil.copytree(os.path.join(pretrained, 'checkpoints', '2'), alone)
  cfg = linear.resolve(linear_config(str(alone), data_from_pretrained=False))
  assert (cfg.model.arch, cfg.model.width, cfg.model.cifar_stem) == ('resnet18', 4, True)


def test_bad_input_gives_clear_errors(pretrained, tmp_path):
  check = lambda **changes: linear.check(*linear_eval.inputs(linear_config(
      **{'pretrained': pretrained, **changes})))
  with pytest.raises(ValueError, match='pretrained is required'):
    check(pretrained='')
  with pytest.raises(ValueError, match='does not exist'):
    check(pretrained=str(tmp_path / 'missing'))
  with pytest.raises(ValueError, match='holds a model with .*width=4.* says width=8'):
    check(**{'model.width': 8})
  # A config.json that lies about the weights: the shapes give it away.
  liar = tmp_path / 'liar'
  shutil.copytree(pretrained, liar)
  config = json.load(open(liar / 'config.json'))
  config['model']['width'] = 8
  json.dump(config, open(liar / 'config.json', 'w'))
  with pytest.raises(ValueError, match='does not fit a resnet18 of width 8'):
    check(pretrained=str(liar))


def test_command_line(pretrained, tmp_path):
  cmd = [sys.executable, '-m', 'mocov2_jax.linear_eval', '--config=configs/linear_eval_cifar10.py',
         '--config.fast=True', '--config.batch_size=32', '--config.num_epochs=2',
         f'--workdir={tmp_path}']
  bad = subprocess.run(cmd + ['--config.pretrained=/nonexistent/workdir'], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
  assert bad.returncode != 0 and 'does not exist' in bad.stderr
  assert 'Traceback' not in bad.stderr and not os.listdir(tmp_path)
  ok = subprocess.run(cmd + [f'--config.pretrained={pretrained}/checkpoints/2'], cwd=REPO,
                      capture_output=True, text=True, timeout=300)
  assert ok.returncode == 0, ok.stderr[-3000:]
  assert "fast mode (cached center-crop features), not the paper's protocol" in ok.stdout
  assert json.load(open(tmp_path / 'results.json'))['step'] == 6   # 2 epochs of 3 steps


def test_each_head_steps_at_its_own_lr():
  """per_head_sgd on [heads, ...] leaves == torch.optim.SGD's equations with lr_i per head."""
  import optax  # pylint: disable=g-import-not-at-top
  cfg = linear_config('unused').optim
  cfg.weight_decay = 0.01   # the equations with decay too (the protocol has none)
  scales, base = np.array([0.1, 1.0, 30.0]), 0.5
  tx = linear.per_head_sgd(cfg, lambda step: base, scales)
  rng = np.random.default_rng(0)
  p = {'kernel': rng.normal(size=(3, 4, 2)).astype(np.float32)}
  state, ref_p, buf = tx.init(p), p['kernel'].astype(np.float64), 0.0
  for _ in range(3):
    g = rng.normal(size=(3, 4, 2)).astype(np.float32)
    updates, state = tx.update({'kernel': g}, state, p)
    p = optax.apply_updates(p, updates)
    d = g + cfg.weight_decay * ref_p                       # torch: d = g + wd * p
    buf = cfg.momentum * buf + d                           # buf = mu * buf + d
    ref_p = ref_p - (base * scales)[:, None, None] * buf   # p -= lr_i * buf
  np.testing.assert_allclose(p['kernel'], ref_p, rtol=1e-5, atol=1e-6)


def test_the_lr_is_chosen_on_held_out_train_never_on_test(tmp_path):
  rng, split = _clusters(1, 3.0, 8)
  train_set, (tx, ty) = split(320), split(64)
  fit, held = linear.holdout_split(320, 0.1, seed=0)
  assert len(held) == 32 and not set(fit) & set(held) and len(fit) + len(held) == 320
  cfg = linear_config('unused', num_epochs=2, fast=True)
  runs = [loop.run(linear.fast_experiment(cfg, train_set, (tx, labels), 4),
                   str(tmp_path / name))[1]['sweep']
          for name, labels in (('a', ty), ('b', rng.permutation(ty)), ('c', (ty + 1) % 4))]
  held_scores = [[h['holdout_top1'] for h in heads] for heads in runs]
  assert held_scores[0] == held_scores[1] == held_scores[2]   # test labels never enter
  assert [h['top1'] for h in runs[0]] != [h['top1'] for h in runs[2]]   # (they do count for test)
  assert len({h['lr'] for h in runs[0]}) == 6


def test_linear_eval_and_convert_take_paths_relative_to_another_folder(pretrained, tmp_path,
                                                                      monkeypatch):
  """Every path goes through etils.epath (checkpoints.path): relative paths from any working
  directory, as for gs:// URLs (which need the network, so are not tried here)."""
  from mocov2_jax import torch_io  # pylint: disable=g-import-not-at-top
  monkeypatch.chdir(tmp_path)
  rel = os.path.relpath(pretrained, tmp_path)
  r = linear_eval.evaluate(linear_config(rel, fast=True, sweep_lrs=()), 'lin')
  assert r['checkpoint']['path'] == os.path.join(pretrained, 'checkpoints', '2')
  assert json.load(open(tmp_path / 'lin' / 'results.json'))['step'] == 4
  torch_io.export(os.path.join(rel, 'checkpoints', '2'), 'safetensors', 'b.safetensors')
  assert (tmp_path / 'b.safetensors').stat().st_size > 1000


def test_a_garbage_checkpoint_is_its_message_not_an_orbax_traceback(tmp_path):
  (tmp_path / 'junk' / 'checkpoints' / '5' / 'default').mkdir(parents=True)
  (tmp_path / 'junk' / 'checkpoints' / '5' / 'default' / 'x').write_text('junk')
  from configs import linear_eval_cifar10  # pylint: disable=g-import-not-at-top
  c = linear_eval_cifar10.get_config()
  c.pretrained = str(tmp_path / 'junk')
  with pytest.raises(ValueError, match='not a readable checkpoint'):
    linear.check(*linear_eval.inputs(c))
