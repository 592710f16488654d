"""Checkpoint conversion: exported weights give the same model in PyTorch; imports round-trip.

Checkpoints are made as train.py makes them (orbax CheckpointManager, StandardSave of the
TrainState, config.json), from a state shaped by step.create_train_state and filled with random
values (BN running statistics included, so a wrong mapping cannot pass), without training.
"""
import json
import os
import pickle
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import optax
import torch
from flax import traverse_util
from safetensors.numpy import load_file

from mocov2_jax import defaults, methods, optim, torch_io
from mocov2_jax import torch_names as names
from tests.helpers import run_cli
from tests.torch_resnet import TorchResNet, torch_forward


# ---------------------------------------------------------------------------------------------
# Checkpoints as train.py writes them

def make_config(arch='resnet18', width=8, cifar_stem=True, head='mlp', dim=16, queue=64):
  c = defaults.base_config()
  c.model.update(arch=arch, width=width, cifar_stem=cifar_stem, head=head, dim=dim)
  c.moco.update(queue_size=queue, bn_groups=2)
  c.data.update(image_size=32, num_train=256)
  c.batch_size = 32  # 8 steps per epoch
  return c


def abstract_state(config):
  """What train.py builds: create_train_state's tree, shapes and dtypes (no compile)."""
  model = methods.create_model(config)
  lr = optim.schedule(config.optim, config.batch_size, 8, config.num_epochs)
  return jax.eval_shape(lambda r: methods.create_train_state(
      r, config, model, lr, config.data.image_size), jax.random.PRNGKey(config.seed))


def random_state(config, seed=0, step=7, ptr=3):
  """create_train_state's tree with random values: He-scaled kernels, non-trivial BN statistics
  and affine parameters, key encoder different from the query encoder."""
  rng = np.random.default_rng(seed)
  def fill(path, s):
    name = getattr(path[-1], 'key', None)
    if s.dtype != np.float32 or getattr(path[0], 'name', None) == 'opt_state':
      return np.zeros(s.shape, s.dtype)
    if name == 'var':
      return rng.uniform(0.5, 2.0, s.shape).astype(np.float32)
    if name == 'scale':
      return rng.uniform(0.5, 1.5, s.shape).astype(np.float32)
    std = np.sqrt(1.0 / np.prod(s.shape[:-1])) if name == 'kernel' else 0.1
    return rng.standard_normal(s.shape, np.float32) * np.float32(std)
  state = jax.tree_util.tree_map_with_path(fill, abstract_state(config))
  return state.replace(step=np.int32(step), queue_ptr=np.int32(ptr))


def save_workdir(workdir, config, state, steps=(7,)):
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(config.to_json_best_effort(indent=2, sort_keys=True))
  with ocp.CheckpointManager(os.path.join(workdir, 'checkpoints')) as mgr:
    for s in steps:
      mgr.save(s, args=ocp.args.StandardSave(jax.device_put(state.replace(step=np.int32(s)))))
    mgr.wait_until_finished()
  return str(workdir)


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
  """A ResNet-18 (width 8, CIFAR stem, MLP head) workdir with checkpoints at steps 3 and 7."""
  config = make_config()
  state = random_state(config)
  workdir = save_workdir(tmp_path_factory.mktemp('tiny'), config, state, steps=(3, 7))
  return workdir, config, state.replace(step=np.int32(7))


def assert_close(a, b):
  """Float32 rounding: about 1e-5 relative to the output's scale."""
  assert np.abs(b).max() > 1e-2  # not a comparison between zeros
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max())


# ---------------------------------------------------------------------------------------------
# Export: same model in PyTorch

@pytest.mark.parametrize('arch,width,cifar_stem,head,size', [
    ('resnet18', 8, False, 'linear', 64),
    ('resnet50', 16, True, 'mlp', 32),
])
def test_exported_weights_give_the_same_model_in_pytorch(tmp_path, arch, width, cifar_stem,
                                                         head, size):
  config = make_config(arch, width, cifar_stem, head, dim=32)
  state = random_state(config, seed=1)
  workdir = save_workdir(tmp_path / 'wd', config, state, steps=(17,))
  for fmt, ext in (('moco', 'pth.tar'), ('torchvision', 'pth'), ('safetensors', 'safetensors'),
                   ('detectron2', 'pkl')):
    torch_io.export(workdir, fmt, str(tmp_path / f'out.{ext}'))

  model = methods.create_model(config)
  apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
  x = np.random.default_rng(2).normal(size=(2, size, size, 3)).astype(np.float32)

  ckpt = torch.load(tmp_path / 'out.pth.tar', weights_only=True)
  assert ckpt['arch'] == arch and ckpt['epoch'] == 2  # 17 steps of 8 per epoch
  sd = ckpt['state_dict']
  for enc, params, stats in (('q', state.params, state.batch_stats),
                             ('k', state.key_params, state.key_batch_stats)):
    h, z = apply({'params': params, 'batch_stats': stats}, x)
    tmodel = TorchResNet(arch, width, cifar_stem, fc=head, dim=32)
    prefix = f'module.encoder_{enc}.'
    tmodel.load_state_dict({k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)})
    th, tz = torch_forward(tmodel, x)
    assert_close(th, np.asarray(h))
    assert_close(tz, np.asarray(z))
    if enc == 'q':
      features = np.asarray(h)
  np.testing.assert_array_equal(sd['module.queue'].numpy(), state.queue.T)
  assert sd['module.queue'].shape == (32, 64)
  assert sd['module.queue_ptr'].tolist() == [3] and sd['module.queue_ptr'].dtype == torch.int64

  # torchvision: the backbone, into a model with torchvision's 1000-class fc.
  tv = torch.load(tmp_path / 'out.pth', weights_only=True)
  tmodel = TorchResNet(arch, width, cifar_stem)
  missing, unexpected = tmodel.load_state_dict(tv, strict=False)
  assert sorted(missing) == ['fc.bias', 'fc.weight'] and not unexpected
  assert_close(torch_forward(tmodel, x)[0], features)
  assert tv['bn1.num_batches_tracked'].dtype == torch.int64
  assert tv['layer1.0.bn1.num_batches_tracked'].item() == 17

  st = load_file(str(tmp_path / 'out.safetensors'))  # the same dict, without torch
  assert st.keys() == tv.keys()
  for k, v in tv.items():
    np.testing.assert_array_equal(st[k], v.numpy(), err_msg=k)
    assert st[k].dtype == v.numpy().dtype

  # detectron2: the reference's renaming of the backbone (a BN of 4 arrays per conv).
  with open(tmp_path / 'out.pkl', 'rb') as f:
    d2 = pickle.load(f)
  assert d2['__author__'] == 'mocov2_jax' and d2['matching_heuristics'] is True
  d2 = d2['model']
  assert len(d2) == 5 * (53 if arch == 'resnet50' else 20)
  assert len(d2) == len([k for k in tv if 'num_batches' not in k])
  pairs = [('stem.conv1.weight', 'conv1.weight'), ('stem.conv1.norm.weight', 'bn1.weight'),
           ('stem.conv1.norm.running_var', 'bn1.running_var'),
           ('res2.0.conv1.weight', 'layer1.0.conv1.weight'),
           ('res3.0.shortcut.weight', 'layer2.0.downsample.0.weight'),
           ('res3.0.shortcut.norm.running_mean', 'layer2.0.downsample.1.running_mean'),
           ('res5.1.conv2.norm.bias', 'layer4.1.bn2.bias')]
  if arch == 'resnet50':
    pairs += [('res2.0.conv3.norm.weight', 'layer1.0.bn3.weight'),
              ('res2.0.shortcut.weight', 'layer1.0.downsample.0.weight')]
  for d2_name, tv_name in pairs:
    assert isinstance(d2[d2_name], np.ndarray)
    np.testing.assert_array_equal(d2[d2_name], tv[tv_name].numpy(), err_msg=d2_name)
  assert not any(s in k for k in d2 for s in ('layer', 'bn', 'downsample', 'fc', 'num_batches'))


def test_full_resnet50_loads_strictly_and_reference_tools_accept_it(tmp_path):
  """Exact ResNet-50 names and shapes, and the reference's lincls loading rule."""
  config = make_config('resnet50', 64, False, 'mlp', 128, queue=256)
  state = random_state(config, seed=3)
  workdir = save_workdir(tmp_path / 'wd', config, state)
  for fmt, name in (('torchvision', 'r50.pth'), ('moco', 'r50.pth.tar')):
    torch_io.export(workdir, fmt, str(tmp_path / name))

  ref = TorchResNet('resnet50')  # torchvision.models.resnet50()
  want = {k: tuple(v.shape) for k, v in ref.state_dict().items() if not k.startswith('fc.')}
  sd = torch.load(tmp_path / 'r50.pth', weights_only=True)
  assert {k: tuple(v.shape) for k, v in sd.items()} == want
  assert sum(v.numel() for k, v in sd.items() if 'running' not in k and 'num_batches' not in k
             ) == 23_508_032
  missing, unexpected = ref.load_state_dict(sd, strict=False)
  assert sorted(missing) == ['fc.bias', 'fc.weight'] and not unexpected

  # main_lincls.py: keep encoder_q except fc, strip the prefix, load non-strictly.
  state_dict = torch.load(tmp_path / 'r50.pth.tar', weights_only=True)['state_dict']
  for k in list(state_dict.keys()):
    if k.startswith('module.encoder_q') and not k.startswith('module.encoder_q.fc'):
      state_dict[k[len('module.encoder_q.'):]] = state_dict[k]
    del state_dict[k]
  lincls = TorchResNet('resnet50')
  msg = lincls.load_state_dict(state_dict, strict=False)
  assert set(msg.missing_keys) == {'fc.weight', 'fc.bias'} and not msg.unexpected_keys
  np.testing.assert_array_equal(lincls.layer4[2].bn3.running_var.numpy(),
                                state.batch_stats['backbone']['layer4_2']['bn3']['var'])


def test_demo_torchvision_variant_exports_a_stock_resnet18(tmp_path):
  """The README's round trip: configs/demo.py:torchvision -> convert -> torchvision resnet18()."""
  from configs import demo  # pylint: disable=g-import-not-at-top
  config = demo.get_config('torchvision')
  state = random_state(config, seed=4)
  workdir = save_workdir(tmp_path / 'wd', config, state)
  torch_io.export(workdir, 'torchvision', str(tmp_path / 'resnet18.pth'))

  ref = TorchResNet('resnet18')  # torchvision.models.resnet18(): width 64, ImageNet stem
  sd = torch.load(tmp_path / 'resnet18.pth', weights_only=True)
  assert {k: tuple(v.shape) for k, v in sd.items()} == {
      k: tuple(v.shape) for k, v in ref.state_dict().items() if not k.startswith('fc.')}
  missing, unexpected = ref.load_state_dict(sd, strict=False)
  assert sorted(missing) == ['fc.bias', 'fc.weight'] and not unexpected
  x = np.random.default_rng(5).normal(size=(2, 32, 32, 3)).astype(np.float32)
  model = methods.create_model(config)
  h, _ = model.apply({'params': state.params, 'batch_stats': state.batch_stats}, x, train=False)
  assert_close(torch_forward(ref, x)[0], np.asarray(h))

  with pytest.raises(ValueError, match='configs/demo.py:torchvision'):
    demo.get_config('torchvison')


# ---------------------------------------------------------------------------------------------
# Import: bit-exact round trips that the pre-training program resumes from

def restore_like_train_py(workdir, config, step=0):
  """train.py's resume: the latest step, restored into create_train_state's tree."""
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device),
                          abstract_state(config))
  with ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, 'checkpoints'))) as mgr:
    assert mgr.latest_step() == step
    return mgr.restore(step, args=ocp.args.StandardRestore(abstract))


def assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert np.asarray(x).dtype == np.asarray(y).dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_moco_round_trip_is_exact_and_resumable(tiny, tmp_path):
  workdir, config, state = tiny
  torch_io.export(workdir, 'moco', str(tmp_path / 'm.pth.tar'))
  out = str(tmp_path / 'imported')
  torch_io.import_weights('moco', str(tmp_path / 'm.pth.tar'), out)
  written = json.load(open(os.path.join(out, 'config.json')))
  assert written['model'] == dict(config.model.to_dict())
  assert written['moco']['queue_size'] == 64
  new = restore_like_train_py(out, config)
  for field in ('params', 'batch_stats', 'key_params', 'key_batch_stats', 'queue', 'queue_ptr'):
    assert_trees_equal(getattr(new, field), getattr(state, field))
  assert int(new.step) == 0
  # ... and out again: the same file.
  torch_io.export(out, 'moco', str(tmp_path / 'm2.pth.tar'))
  a, b = (torch.load(tmp_path / f, weights_only=True)['state_dict']
          for f in ('m.pth.tar', 'm2.pth.tar'))
  assert a.keys() == b.keys()
  assert all(torch.equal(a[k], b[k]) for k in a if 'num_batches' not in k)


@pytest.mark.parametrize('ext', ['pth', 'safetensors'])
def test_torchvision_round_trip_keeps_the_backbone(tiny, tmp_path, ext):
  workdir, config, state = tiny
  path = str(tmp_path / f'r18.{ext}')
  torch_io.export(workdir, 'torchvision' if ext == 'pth' else 'safetensors', path)
  out = str(tmp_path / 'imported')
  torch_io.import_weights('torchvision', path, out, config=make_config(dim=16),
                         arch='resnet18', width=8, cifar_stem=True)
  new = restore_like_train_py(out, config)
  assert_trees_equal(new.params['backbone'], state.params['backbone'])
  assert_trees_equal(new.batch_stats, state.batch_stats)
  assert_trees_equal(new.key_params, new.params)  # both encoders start from the import
  assert_trees_equal(new.key_batch_stats, new.batch_stats)
  head = np.asarray(new.params['head']['fc0']['kernel'])  # fresh, PyTorch's Linear init
  assert 0 < np.abs(head).max() <= 1 / np.sqrt(64)
  assert int(new.queue_ptr) == 0
  np.testing.assert_allclose(np.linalg.norm(np.asarray(new.queue), axis=1), 1, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# The command line, errors, and no PyTorch

def test_command_line_exports_a_step_dir_and_imports(tiny, tmp_path):
  workdir, _, _ = tiny
  out = str(tmp_path / 'r18.pth')
  run_cli('convert', f'--checkpoint={workdir}/checkpoints/3', '--format=torchvision',
          f'--out={out}')
  assert torch.load(out, weights_only=True)['bn1.num_batches_tracked'].item() == 3
  printed = run_cli('convert', '--from=torchvision', out, f'--out={tmp_path}/wd',
                    '--arch=resnet18').stdout
  assert '--config.model.arch=resnet18' in printed and '--config.model.width=8' in printed
  assert os.listdir(tmp_path / 'wd' / 'checkpoints') == ['0']
  bad = run_cli('convert', f'--checkpoint={tmp_path}/empty', f'--out={tmp_path}/x.pth', code=2)
  assert 'does not exist' in bad.stderr and 'Traceback' not in bad.stderr
  (tmp_path / 'garbage.safetensors').write_bytes(b'not a safetensors file at all')
  (tmp_path / 'garbage.pth').write_bytes(b'PK not a torch file')
  for name in ('garbage.safetensors', 'garbage.pth'):
    bad = run_cli('convert', '--from=torchvision', str(tmp_path / name), f'--out={tmp_path}/g',
                  code=2)
    assert name in bad.stderr and 'Traceback' not in bad.stderr and len(bad.stderr.split('\n')) < 4
    assert not (tmp_path / 'g').exists()


def test_clear_errors(tiny, tmp_path):
  workdir, _, _ = tiny
  with pytest.raises(FileNotFoundError, match='does not exist'):
    torch_io.export(str(tmp_path / 'nowhere'), 'torchvision', str(tmp_path / 'x.pth'))
  os.makedirs(tmp_path / 'empty')
  with pytest.raises(FileNotFoundError, match='no checkpoint'):
    torch_io.export(str(tmp_path / 'empty'), 'torchvision', str(tmp_path / 'x.pth'))

  # A config.json that does not describe the checkpoint: width, then arch.
  for field, value in (('width', 32), ('arch', 'resnet34')):
    os.makedirs(tmp_path / field)
    with open(tmp_path / field / 'config.json', 'w') as f:
      f.write(make_config(**{field: value}).to_json_best_effort())
    os.symlink(os.path.join(workdir, 'checkpoints'), tmp_path / field / 'checkpoints')
    with pytest.raises(ValueError, match=f'config.json says {field}={value}'):
      torch_io.export(str(tmp_path / field), 'torchvision', str(tmp_path / 'x.pth'))

  path = str(tmp_path / 'r18.pth')
  torch_io.export(workdir, 'torchvision', path)
  with pytest.raises(ValueError, match='arch=resnet18.*says arch=resnet50'):
    torch_io.import_weights('torchvision', path, str(tmp_path / 'a'), arch='resnet50')
  with pytest.raises(ValueError, match='says width=64'):
    torch_io.import_weights('torchvision', path, str(tmp_path / 'b'), width=64)
  with pytest.raises(ValueError, match='not a MoCo checkpoint'):
    torch_io.import_weights('moco', path, str(tmp_path / 'c'))
  with pytest.raises(ValueError, match='not empty'):
    torch_io.import_weights('torchvision', path, workdir)


def test_without_torch_safetensors_still_works(tiny, tmp_path, monkeypatch):
  workdir, _, state = tiny
  monkeypatch.setitem(sys.modules, 'torch', None)  # `import torch` now fails
  with pytest.raises(ImportError, match=r"pip install -e '\.\[torch\]'"):
    torch_io.export(workdir, 'torchvision', f'{tmp_path}/x.pth')
  out = str(tmp_path / 'x.safetensors')
  torch_io.export(workdir, 'safetensors', out)
  st = load_file(out)
  np.testing.assert_array_equal(st['layer1.0.conv1.weight'], np.asarray(
      state.params['backbone']['layer1_0']['conv1']['kernel']).transpose(3, 2, 0, 1))
  torch_io.import_weights('torchvision', out, str(tmp_path / 'wd'), config=make_config())
  assert os.listdir(tmp_path / 'wd' / 'checkpoints') == ['0']


# ---------------------------------------------------------------------------------------------
# Cross-framework resume: the SGD state travels with the moco file

def test_moco_file_continues_in_pytorch_sgd_and_back(tiny, tmp_path):
  """One SGD step in PyTorch from the exported file (the reference's main_moco.py --resume
  path) equals the same step of this project's optimizer from the checkpoint; re-importing the
  file continues the momentum and the step."""
  del tiny
  config = make_config()
  state = random_state(config, seed=3, step=17)   # 2 epochs of 8 steps and one more
  rng = np.random.default_rng(4)
  decay, (trace, lr_state) = state.opt_state
  trace = trace._replace(trace=jax.tree.map(
      lambda p: rng.normal(size=p.shape).astype(np.float32), trace.trace))
  state = state.replace(opt_state=(decay, (trace, lr_state)))
  workdir = save_workdir(tmp_path / 'wd', config, state, steps=(17,))
  torch_io.export(workdir, 'moco', str(tmp_path / 'm.pth.tar'))
  ckpt = torch.load(tmp_path / 'm.pth.tar', weights_only=True)
  assert ckpt['epoch'] == 2 and len(ckpt['optimizer']['param_groups']) == 1

  class MoCo(torch.nn.Module):   # builder.py's parameter registration: encoder_q, encoder_k
    def __init__(self):
      super().__init__()
      make = lambda: TorchResNet('resnet18', 8, cifar_stem=True, fc='mlp', dim=16)
      self.encoder_q, self.encoder_k = make(), make()
      self.register_buffer('queue', torch.zeros(16, 64))
      self.register_buffer('queue_ptr', torch.zeros(1, dtype=torch.long))

  model = MoCo()
  model.load_state_dict({k[len('module.'):]: v for k, v in ckpt['state_dict'].items()})
  lr, wd, mu = 0.05, config.optim.weight_decay, config.optim.momentum
  opt = torch.optim.SGD(model.parameters(), lr, momentum=mu, weight_decay=wd)
  opt.load_state_dict(ckpt['optimizer'])
  for g in opt.param_groups:
    g['lr'] = lr
  grads = jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), state.params)
  named = {names.torch_name(p): names.to_torch(p, g)
           for p, g in traverse_util.flatten_dict(grads).items()}
  for name, p in model.encoder_q.named_parameters():
    p.grad = torch.from_numpy(np.array(named[name]))
  opt.step()

  tx = optim.sgd(config.optim, lambda step: lr)
  updates, _ = tx.update(grads, state.opt_state, state.params)
  ours = optax.apply_updates(state.params, updates)
  after = model.encoder_q.state_dict()
  for p, x in traverse_util.flatten_dict(ours).items():
    np.testing.assert_allclose(names.to_torch(p, x), after[names.torch_name(p)].numpy(),
                               rtol=1e-5, atol=1e-6, err_msg=names.torch_name(p))

  out = str(tmp_path / 'continued')
  torch_io.import_weights('moco', str(tmp_path / 'm.pth.tar'), out, config=config)
  new = restore_like_train_py(out, config, step=16)
  assert_trees_equal(new.opt_state[1][0], state.opt_state[1][0])   # the momentum, bitwise
  assert int(new.step) == 2 * 8   # the start of the epoch the reference resumes at
