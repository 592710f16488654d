r"""Checkpoint conversion between this project and PyTorch.

Export a pre-training checkpoint (a workdir: its latest step; or one WORKDIR/checkpoints/<step>):

  python -m mocov2_jax.convert --checkpoint=WORKDIR --format=torchvision --out=resnet50.pth

  torchvision  backbone state_dict for torchvision.models.resnetNN() (only fc.* missing)
  moco         the reference's {'epoch', 'arch', 'state_dict'}: module.encoder_q.* (backbone and
               head), module.encoder_k.*, module.queue [dim, K], module.queue_ptr
  detectron2   pickle {'model': {name: numpy array}, ...}, names as the reference's
               convert-pretrain-to-detectron2.py (backbone only)
  safetensors  the torchvision state_dict as .safetensors (no PyTorch needed)

Import PyTorch weights into a workdir that pre-training starts from (step 0):

  python -m mocov2_jax.convert --from=torchvision resnet50.pth --out=WORKDIR [--config=...]
  python -m mocov2_jax.convert --from=moco moco_v2_800ep_pretrain.pth.tar --out=WORKDIR

The architecture (arch, width, CIFAR stem; head and dim for 'moco') is read from the weights'
names and shapes; --arch/--width/--cifar_stem only check it. Everything else comes from --config
(default: defaults.base_config()); pre-train with the same --config and the printed overrides.
PyTorch is optional (pip install -e '.[torch]'); safetensors files are read and written without it.
"""
import json
import os
import pickle
import sys

import numpy as np

FORMATS = ('torchvision', 'moco', 'detectron2', 'safetensors')
_INSTALL = "pip install -e '.[torch]'"


# ---------------------------------------------------------------------------------------------
# Names and layouts: the one mapping every format uses.

_MODULES = {'downsample_conv': 'downsample.0', 'downsample_bn': 'downsample.1',
            'fc0': 'fc.0', 'fc2': 'fc.2', 'classifier': 'fc'}
_LEAVES = {'kernel': 'weight', 'scale': 'weight', 'mean': 'running_mean', 'var': 'running_var'}


def torch_name(path) -> str:
  """('backbone', 'layer2_0', 'downsample_bn', 'scale') -> 'layer2.0.downsample.1.weight'.

  'backbone' and 'head' disappear (torchvision's model is flat; the MoCo head is its `fc`), and a
  linear-eval 'classifier' is torchvision's `fc`.
  """
  *mods, leaf = path
  parts = [_MODULES.get(m, m.replace('_', '.')) for m in mods if m not in ('backbone', 'head')]
  return '.'.join(parts + [_LEAVES.get(leaf, leaf)])


def to_torch(path, x) -> np.ndarray:
  """Conv HWIO -> OIHW, Dense [in, out] -> [out, in]; everything else as is."""
  x = np.asarray(x)
  if path[-1] != 'kernel':
    return x
  return x.transpose(3, 2, 0, 1) if x.ndim == 4 else x.T


def from_torch(path, x) -> np.ndarray:
  x = np.asarray(x)
  if path[-1] != 'kernel':
    return x
  return x.transpose(2, 3, 1, 0) if x.ndim == 4 else x.T


def _flatten(tree, prefix=()):
  """{('a', 'b'): leaf} of a nested dict (raw checkpoints and flax params are plain dicts)."""
  out = {}
  for k, v in tree.items():
    out.update(_flatten(v, prefix + (k,)) if isinstance(v, dict) else {prefix + (k,): v})
  return out


def _unflatten(flat):
  out = {}
  for path, v in flat.items():
    node = out
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = v
  return out


def state_dict(params, batch_stats, num_batches_tracked=0) -> dict:
  """Flax variables -> {torchvision name: numpy array}, with BN's int64 num_batches_tracked."""
  sd = {torch_name(p): to_torch(p, x) for p, x in _flatten(params).items()}
  for p, x in _flatten(batch_stats).items():
    sd[torch_name(p)] = np.asarray(x)
    if p[-1] == 'var':
      sd[torch_name(p[:-1] + ('num_batches_tracked',))] = np.array(num_batches_tracked, np.int64)
  return sd


def variables(sd, params_like, stats_like):
  """The inverse: picks the arrays `params_like`/`stats_like` (shape templates) need from `sd`.

  Every name must be there with the right shape, and every array of `sd` must be used
  (num_batches_tracked aside), so nothing is silently dropped.
  """
  missing, wrong, used = [], [], set()
  def take(tree):
    flat = {}
    for p, like in _flatten(tree).items():
      name = torch_name(p)
      if name not in sd:
        missing.append(name)
        continue
      x = from_torch(p, sd[name])
      if x.shape != tuple(like.shape):
        wrong.append(f'{name} {x.shape} (expected {tuple(like.shape)})')
      flat[p] = x.astype(like.dtype)
      used.add(name)
    return _unflatten(flat)
  params, stats = take(params_like), take(stats_like)
  unused = sorted(k for k in sd if k not in used and not k.endswith('num_batches_tracked'))
  if missing or wrong or unused:
    raise ValueError('the weights do not fit the model: ' + '; '.join(
        f'{what}: {", ".join(v[:5])}{" ..." if len(v) > 5 else ""}'
        for what, v in (('missing', missing), ('wrong shape', wrong), ('unused', unused)) if v))
  return params, stats


def detectron2_name(name: str) -> str:
  """The reference's convert-pretrain-to-detectron2.py renaming of a torchvision name."""
  if 'layer' not in name:
    name = 'stem.' + name
  for t in (1, 2, 3, 4):
    name = name.replace(f'layer{t}', f'res{t + 1}')
  for t in (1, 2, 3):
    name = name.replace(f'bn{t}', f'conv{t}.norm')
  return name.replace('downsample.0', 'shortcut').replace('downsample.1', 'shortcut.norm')


def infer_model(sd) -> dict:
  """arch, width, cifar_stem (and head, dim when fc.* is a MoCo head) from names and shapes."""
  if 'conv1.weight' not in sd:
    raise ValueError('no conv1.weight: not a torchvision-layout ResNet state_dict')
  from mocov2_jax.models import resnet  # pylint: disable=g-import-not-at-top
  blocks = tuple(len({k.split('.')[1] for k in sd if k.startswith(f'layer{i}.')})
                 for i in (1, 2, 3, 4))
  expansion = 4 if 'layer1.0.conv3.weight' in sd else 1
  arch = next((a for a, (cls, n) in resnet.ARCHS.items()
               if tuple(n) == blocks and cls.expansion == expansion), f'unknown{blocks}')
  stem = sd['conv1.weight'].shape  # [width, 3, k, k]
  found = dict(arch=arch, width=int(stem[0]), cifar_stem=int(stem[-1]) == 3)
  if 'fc.2.weight' in sd:
    found.update(head='mlp', dim=int(sd['fc.2.weight'].shape[0]))
  elif 'fc.weight' in sd:
    found.update(head='linear', dim=int(sd['fc.weight'].shape[0]))
  return found


def check_model(found, wanted, source, by):
  """A clear error when the weights are not the model `by` asks for (arch, width, stem, head)."""
  diff = [k for k, v in wanted.items() if v is not None and k in found and found[k] != v]
  if diff:
    have = ', '.join(f'{k}={v}' for k, v in found.items())
    raise ValueError(f'{source} holds a model with {have}, but {by} says '
                     + ', '.join(f'{k}={wanted[k]}' for k in diff))


# ---------------------------------------------------------------------------------------------
# Export

def find_checkpoint(path):
  """(step dir, workdir) for a workdir (its latest step) or a WORKDIR/checkpoints/<step> dir."""
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f'{path} does not exist: pass a pre-training workdir or one of its '
                            'checkpoints/<step> folders')
  if os.path.basename(path).isdigit() and os.path.basename(os.path.dirname(path)) == 'checkpoints':
    return path, os.path.dirname(os.path.dirname(path))
  ckdir = os.path.join(path, 'checkpoints')
  steps = [int(d) for d in os.listdir(ckdir) if d.isdigit()] if os.path.isdir(ckdir) else []
  if not steps:
    raise FileNotFoundError(f'no checkpoint in {ckdir}: has pre-training saved one yet?')
  return os.path.join(ckdir, str(max(steps))), path


def restore_raw(step_dir) -> dict:
  """The saved TrainState as nested dicts of NumPy arrays: no model, no target tree, and no
  devices (the saving run's device layout need not exist here)."""
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from etils import epath  # pylint: disable=g-import-not-at-top
  item = epath.Path(step_dir) / 'default'  # CheckpointManager's name for a single item
  handler = ocp.PyTreeCheckpointHandler()
  try:
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                        handler.metadata(item).tree)
    return handler.restore(item, args=ocp.args.PyTreeRestore(restore_args=args))
  finally:
    handler.close()


def load_config(workdir):
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    return None
  import ml_collections  # pylint: disable=g-import-not-at-top
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def _epoch(config, step):
  """Completed epochs, where the config says how many examples an epoch has (else 0)."""
  from mocov2_jax import defaults  # pylint: disable=g-import-not-at-top
  if config is None:
    return 0
  n = config.data.num_train
  if not n and config.data.name == 'imagenet2012' and config.data.train_split == 'train':
    n = defaults.IMAGENET_EXAMPLES
  return step // max(n // config.batch_size, 1) if n else 0


def export(checkpoint, fmt, out) -> str:
  """Writes `checkpoint` (a workdir or a step dir) to `out` in format `fmt`; returns a summary."""
  if fmt not in FORMATS:
    raise ValueError(f'unknown format {fmt!r}: choose one of {", ".join(FORMATS)}')
  step_dir, workdir = find_checkpoint(checkpoint)
  raw, config = restore_raw(step_dir), load_config(workdir)
  step = int(raw['step'])
  params, stats = raw['params'], raw['batch_stats']
  query = state_dict(params, stats, step)
  found = infer_model(query)
  if config is not None:
    check_model(found, {k: config.model.get(k) for k in found}, f'checkpoint {step_dir}',
                f'{workdir}/config.json')
  backbone = state_dict({k: v for k, v in params.items() if k != 'head'},
                        {'backbone': stats['backbone']}, step)
  if fmt == 'safetensors':
    from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
    save_file({k: np.ascontiguousarray(v) for k, v in backbone.items()}, out,
              metadata={'format': 'pt'})
  elif fmt == 'detectron2':
    model = {detectron2_name(k): v for k, v in backbone.items()
             if not k.endswith('num_batches_tracked')}
    with open(out, 'wb') as f:
      pickle.dump({'model': model, '__author__': 'mocov2_jax', 'matching_heuristics': True}, f)
  elif fmt == 'torchvision':
    _torch_save(backbone, out)
  else:  # moco
    if 'key_params' not in raw:
      raise ValueError(f'{step_dir} has no key encoder (an end-to-end / SimCLR run?): the moco '
                       'layout holds MoCo checkpoints; export the backbone with '
                       '--format=torchvision, safetensors or detectron2')
    sd = {f'module.encoder_q.{k}': v for k, v in query.items()}
    sd.update({f'module.encoder_k.{k}': v for k, v in
               state_dict(raw['key_params'], raw['key_batch_stats'], step).items()})
    sd['module.queue'] = np.asarray(raw['queue']).T  # the reference's buffer is [dim, K]
    sd['module.queue_ptr'] = np.asarray(raw['queue_ptr'], np.int64).reshape(1)
    _torch_save(sd, out, epoch=_epoch(config, step), arch=found['arch'])
  return f'{fmt}: {step_dir} (step {step}, {found}) -> {out}'


def _import_torch():
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f'PyTorch is needed for .pth files: {_INSTALL} (or pip install torch). '
                      '--format=safetensors works without it.') from e
  return torch


def _torch_save(sd, out, **meta):
  """Plain tensors, ints and strings only, so torch.load(out, weights_only=True) reads it."""
  torch = _import_torch()
  sd = {k: torch.from_numpy(np.array(v)) for k, v in sd.items()}
  torch.save(dict(meta, state_dict=sd) if meta else sd, out)


# ---------------------------------------------------------------------------------------------
# Import

def read_weights(path) -> dict:
  """{name: numpy array} of a .safetensors file or a .pth (a state_dict or {'state_dict': ...})."""
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} does not exist')
  if path.endswith('.safetensors'):
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    return load_file(path)
  torch = _import_torch()
  try:
    obj = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # a pickled model object, not a state_dict: no code is run
    raise ValueError(f'torch.load({path}, weights_only=True) failed ({type(e).__name__}): '
                     'pass a state_dict file, not a pickled model') from e
  if not isinstance(obj, dict):
    raise ValueError(f'{path} holds a {type(obj).__name__}, not a state_dict')
  obj = obj.get('state_dict', obj)
  return {k: (v.float() if v.is_floating_point() else v).numpy() for k, v in obj.items()
          if isinstance(v, torch.Tensor)}


def build_state(config, query, key=None, queue=None, queue_ptr=0):
  """The TrainState `step.create_train_state(config)` makes, with the imported arrays in it.

  `query`/`key`: {torchvision name: array} of the query and key encoders (key None: a copy of the
  query, as at init). A head not in `query`, the queue (if None), the optimizer state and the rng
  are fresh. Built without running a full random init (slow to compile on CPU), then checked leaf
  by leaf against create_train_state's own tree, so the pre-training program resumes from it.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from mocov2_jax import moco, optim, step as step_lib  # pylint: disable=g-import-not-at-top
  from mocov2_jax.models import resnet  # pylint: disable=g-import-not-at-top
  model = step_lib.create_model(config)
  lr = optim.schedule(config.optim, config.batch_size, 1, config.num_epochs)
  rng = jax.random.PRNGKey(config.seed)
  like = jax.eval_shape(lambda r: step_lib.create_train_state(
      r, config, model, lr, config.data.image_size), rng)
  init_rng, queue_rng, step_rng = jax.random.split(rng, 3)
  has_head = any(k.startswith('fc.') for k in query)
  params_like = like.params if has_head else {'backbone': like.params['backbone']}
  params, stats = variables(query, params_like, like.batch_stats)
  if not has_head:
    feat = resnet.feature_dim(config.model.arch, config.model.width)
    params['head'] = resnet.Head(config.model.head, config.model.dim).init(
        init_rng, jnp.zeros((1, feat)), train=False)['params']
  key_params, key_stats = (params, stats) if key is None else variables(key, like.params,
                                                                       like.batch_stats)
  if queue is None:
    queue = moco.init_queue(queue_rng, config.moco.queue_size, config.model.dim)
  arrays = jax.tree.map(jnp.asarray, (params, stats, key_params, key_stats, queue))
  state = step_lib.MoCoState.create(
      apply_fn=model.apply, params=arrays[0], tx=optim.create(config.optim, lr),
      batch_stats=arrays[1], key_params=arrays[2], key_batch_stats=arrays[3], queue=arrays[4],
      queue_ptr=jnp.asarray(queue_ptr, jnp.int32), rng=step_rng)
  state = jax.device_put(state)  # as train.py: every leaf an array (step too)
  shapes = lambda t: [(jax.tree_util.keystr(p), x.shape, x.dtype)
                      for p, x in jax.tree_util.tree_flatten_with_path(t)[0]]
  if shapes(state) != shapes(like):
    raise RuntimeError('imported state does not match create_train_state: please report')
  return state


def import_weights(fmt, path, out, config=None, arch=None, width=None, cifar_stem=None):
  """Writes OUT/config.json and OUT/checkpoints/0 from a torchvision or reference MoCo file.

  torchvision: the backbone (fc.* ignored), copied into both encoders; head and queue fresh.
  moco: both encoders with their heads, the queue and its pointer. Returns the config written.
  """
  from mocov2_jax import defaults  # pylint: disable=g-import-not-at-top
  if fmt not in ('torchvision', 'moco'):
    raise ValueError(f"unknown --from {fmt!r}: choose 'torchvision' or 'moco'")
  sd = {k[len('module.'):] if k.startswith('module.') else k: v
        for k, v in read_weights(path).items()}
  queue = ptr = key = None
  if fmt == 'moco':
    part = lambda p: {k[len(p):]: v for k, v in sd.items() if k.startswith(p)}
    query, key = part('encoder_q.'), part('encoder_k.') or None
    if not query:
      raise ValueError(f'{path} has no module.encoder_q.* weights: not a MoCo checkpoint '
                       '(use --from=torchvision for a plain ResNet state_dict)')
    if 'queue' in sd:
      queue, ptr = sd['queue'].T, int(np.asarray(sd.get('queue_ptr', 0)).reshape(-1)[0])
  else:
    query = {k: v for k, v in sd.items() if not k.startswith('fc.')}
  found = infer_model(query)
  check_model(found, dict(arch=arch, width=width, cifar_stem=cifar_stem), path, 'the command line')
  config = (config or defaults.base_config()).copy_and_resolve_references()
  if config.get('method', 'moco') != 'moco':
    raise ValueError(f'--from={fmt} writes a MoCo checkpoint; the config given is '
                     f'method={config.method!r}: use a MoCo config')
  config.model.update(found)
  if queue is not None:
    if queue.shape[1] != config.model.dim:
      raise ValueError(f'{path}: queue of dim {queue.shape[1]} but a head of dim '
                       f'{config.model.dim}')
    config.moco.queue_size = queue.shape[0]
  if os.path.isdir(os.path.join(out, 'checkpoints')) and os.listdir(os.path.join(out,
                                                                                 'checkpoints')):
    raise ValueError(f'{out}/checkpoints is not empty: import into a new workdir')
  state = build_state(config, query, key, queue, ptr or 0)
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, 'config.json'), 'w') as f:  # as train.write_config
    f.write(config.to_json_best_effort(indent=2, sort_keys=True))
  with ocp.CheckpointManager(os.path.abspath(os.path.join(out, 'checkpoints'))) as mgr:
    mgr.save(0, args=ocp.args.StandardSave(state))
    mgr.wait_until_finished()
  return config


def _overrides(base, config, prefix='--config.'):
  """The --config.x=y flags that turn `base` into `config` (what to pass to the trainer)."""
  flat = lambda c: {'.'.join(p): v for p, v in _flatten(c.to_dict()).items()}
  b = flat(base)
  return [f'{prefix}{k}={v}' for k, v in flat(config).items() if b.get(k) != v]


# ---------------------------------------------------------------------------------------------
# Command line

def _parse(argv):
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  from mocov2_jax.models import resnet  # pylint: disable=g-import-not-at-top
  fv = flags.FlagValues()  # not the global FLAGS: main.py's --config lives there
  flags.DEFINE_string('checkpoint', None, 'Export: a workdir (latest step) or a step dir.',
                      flag_values=fv)
  flags.DEFINE_enum('format', 'torchvision', FORMATS, 'Export format.', flag_values=fv)
  flags.DEFINE_string('out', None, 'Export: the file to write. Import: the workdir.',
                      flag_values=fv)
  flags.DEFINE_enum('from', None, ['torchvision', 'moco'], 'Import FILE (positional) of this '
                    'kind into --out.', flag_values=fv)
  flags.DEFINE_enum('arch', None, sorted(resnet.ARCHS), 'Import: check the file is this arch.',
                    flag_values=fv)
  flags.DEFINE_integer('width', None, 'Import: check the first stage has this width.',
                       flag_values=fv)
  flags.DEFINE_bool('cifar_stem', None, 'Import: check the stem (3x3, no max-pool).',
                    flag_values=fv)
  config_flags.DEFINE_config_file('config', None, 'Import: the pre-training config the workdir '
                                  'is for (default: defaults.base_config()).', flag_values=fv,
                                  lock_config=False, sys_argv=argv)
  if {'--help', '-h', '--helpfull'} & set(argv):
    raise SystemExit(f'{__doc__}\n{fv.get_help()}')
  try:
    rest = fv(argv)
  except flags.Error as e:
    raise SystemExit(f'convert: {e} (see --help)') from e
  return fv, rest[1:]


def main(argv=None):
  argv = list(sys.argv if argv is None else argv)
  fv, rest = _parse(argv)
  try:
    if not fv.out:
      raise ValueError('--out is required')
    if fv['from'].value:
      if len(rest) != 1:
        raise ValueError('--from needs one FILE argument: --from=moco FILE --out=WORKDIR')
      from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
      from mocov2_jax import defaults  # pylint: disable=g-import-not-at-top
      base = fv.config or defaults.base_config()
      config = import_weights(fv['from'].value, rest[0], fv.out, base, fv.arch, fv.width,
                              fv.cifar_stem)
      name = config_flags.get_config_filename(fv['config']) if fv.config else 'configs/mocov2.py'
      print(f'wrote {fv.out}/checkpoints/0; pre-train from it with your --config.* flags and:\n'
            f'  python -m mocov2_jax.main --config={name} --workdir={fv.out} '
            + ' '.join(_overrides(base, config)))
    elif fv.checkpoint:
      print(export(fv.checkpoint, fv.format, fv.out))
    else:
      raise ValueError('pass --checkpoint=WORKDIR --format=FORMAT --out=FILE (export) or '
                       '--from=torchvision|moco FILE --out=WORKDIR (import); see --help')
  except (ValueError, FileNotFoundError, ImportError) as e:
    raise SystemExit(f'convert: {e}') from e


if __name__ == '__main__':
  main()
