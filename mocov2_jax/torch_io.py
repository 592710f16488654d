"""Checkpoints to and from PyTorch files (torchvision, the reference MoCo layout, detectron2,
safetensors). PyTorch is optional: safetensors files are read and written without it.
"""
import io
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath
from flax import traverse_util

from mocov2_jax import checkpoints, defaults, methods, moco, optim
from mocov2_jax import torch_names as names
from mocov2_jax.models import resnet

FORMATS = ('torchvision', 'moco', 'detectron2', 'safetensors')
_INSTALL = "pip install -e '.[torch]'"


def _steps_per_epoch(config):
  """Where the config says how many examples an epoch has (else 0)."""
  n = config.data.num_train
  if not n and config.data.name == 'imagenet2012' and config.data.train_split == 'train':
    n = defaults.IMAGENET_EXAMPLES
  return max(n // config.batch_size, 1) if n else 0


def _epoch(config, step):
  """Completed epochs, where the config says how many examples an epoch has (else 0)."""
  spe = 0 if config is None else _steps_per_epoch(config)
  return step // spe if spe else 0


def export(checkpoint, fmt, out) -> str:
  """Writes `checkpoint` (a workdir or a step dir) to `out` in format `fmt`; returns a summary."""
  if fmt not in FORMATS:
    raise ValueError(f'unknown format {fmt!r}: choose one of {", ".join(FORMATS)}')
  step_dir, workdir = checkpoints.find(checkpoint)
  raw, config = checkpoints.restore_raw(step_dir), checkpoints.read_config(workdir)
  step = int(raw['step'])
  params, stats = raw['params'], raw['batch_stats']
  query = names.state_dict(params, stats, step)
  found = names.infer_model(query)
  if config is not None:
    names.check_model(found, {k: config.model.get(k) for k in found}, f'checkpoint {step_dir}',
                      f'{workdir}/config.json')
  backbone = names.state_dict({k: v for k, v in params.items() if k != 'head'},
                              {'backbone': stats['backbone']}, step)
  out = epath.Path(out)
  if fmt == 'safetensors':
    from safetensors.numpy import save  # pylint: disable=g-import-not-at-top
    out.write_bytes(save({k: np.ascontiguousarray(v) for k, v in backbone.items()},
                         metadata={'format': 'pt'}))
  elif fmt == 'detectron2':
    model = {names.detectron2_name(k): v for k, v in backbone.items()
             if not k.endswith('num_batches_tracked')}
    out.write_bytes(pickle.dumps(
        {'model': model, '__author__': 'mocov2_jax', 'matching_heuristics': True}))
  elif fmt == 'torchvision':
    _torch_save(backbone, out)
  else:  # moco
    if 'key_params' not in raw:
      raise ValueError(f'{step_dir} has no key encoder (an end-to-end / SimCLR run?): the moco '
                       'layout holds MoCo checkpoints; export the backbone with '
                       '--format=torchvision, safetensors or detectron2')
    sd = {f'module.encoder_q.{k}': v for k, v in query.items()}
    sd.update({f'module.encoder_k.{k}': v for k, v in
               names.state_dict(raw['key_params'], raw['key_batch_stats'], step).items()})
    sd['module.queue'] = np.asarray(raw['queue']).T  # the reference's buffer is [dim, K]
    sd['module.queue_ptr'] = np.asarray(raw['queue_ptr'], np.int64).reshape(1)
    meta = dict(epoch=_epoch(config, step), arch=found['arch'])
    if config is not None and config.optim.optimizer == 'sgd':
      meta['optimizer'] = _torch_sgd_state(raw, config, step)
    _torch_save(sd, out, **meta)
  return f'{fmt}: {step_dir} (step {step}, {found}) -> {out}'


def _momentum(raw_opt_state):
  """The SGD momentum buffers of `optim.sgd`'s state (optax's `trace`), found by name."""
  return optax.tree_utils.tree_get(raw_opt_state, 'trace')


def _torch_sgd_state(raw, config, step):
  """torch.optim.SGD(model.parameters()).state_dict() of the reference's MoCo: parameters in
  registration order, the query encoder's then the key encoder's (which get no gradient, hence
  no state); the momentum buffers in PyTorch's layout (its buffer holds g + wd * p, as optax's
  trace does)."""
  torch = _import_torch()
  buffers = {names.torch_name(p): torch.from_numpy(np.array(names.to_torch(p, x)))
             for p, x in traverse_util.flatten_dict(_momentum(raw['opt_state'])).items()}
  order = names.parameter_names(raw['params'])
  spe = _steps_per_epoch(config)
  lr = optim.schedule(config.optim, config.batch_size, spe or 1, config.num_epochs)(step)
  group = dict(lr=float(lr), momentum=config.optim.momentum, dampening=0,
               weight_decay=config.optim.weight_decay, nesterov=False, maximize=False,
               foreach=None, differentiable=False, fused=None, params=list(range(2 * len(order))))
  state = {i: {'momentum_buffer': buffers[n]} for i, n in enumerate(order)}
  return dict(state=state, param_groups=[group])


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
  buffer = io.BytesIO()
  torch.save(dict(meta, state_dict=sd) if meta else sd, buffer)
  epath.Path(out).write_bytes(buffer.getvalue())


def read_weights(path) -> dict:
  """{name: numpy array} of a .safetensors file or a .pth (a state_dict or {'state_dict': ...})."""
  return read_checkpoint(path)[0]


def read_checkpoint(path):
  """({name: numpy array}, the file's other entries such as 'epoch' and 'optimizer')."""
  path = epath.Path(path)
  if not path.exists():
    raise FileNotFoundError(f'{path} does not exist')
  data = path.read_bytes()
  if path.name.endswith('.safetensors'):
    from safetensors.numpy import load  # pylint: disable=g-import-not-at-top
    try:
      return load(data), {}
    except Exception as e:  # pylint: disable=broad-except  (safetensors raises its own types)
      raise ValueError(f'{path} is not a readable safetensors file ({e})') from e
  torch = _import_torch()
  try:
    obj = torch.load(io.BytesIO(data), map_location='cpu', weights_only=True)
  except pickle.UnpicklingError as e:   # a pickled model object: weights_only runs no code
    raise ValueError(f'torch.load({path}, weights_only=True) refused it ({type(e).__name__}): '
                     'pass a state_dict file written by torch.save, not a pickled model') from e
  except Exception as e:  # pylint: disable=broad-except  (truncated, damaged, not a torch file)
    first = (str(e).strip().splitlines() or [''])[0].split('. ')[0][:200]
    raise ValueError(f'{path} is not a readable PyTorch file ({type(e).__name__}: {first}): is '
                     'it truncated or damaged? Copy it again.') from e
  if not isinstance(obj, dict):
    raise ValueError(f'{path} holds a {type(obj).__name__}, not a state_dict')
  extras = {k: v for k, v in obj.items() if k != 'state_dict'} if 'state_dict' in obj else {}
  obj = obj.get('state_dict', obj)
  return {k: (v.float() if v.is_floating_point() else v).numpy() for k, v in obj.items()
          if isinstance(v, torch.Tensor)}, extras


def build_state(config, query, key=None, queue=None, queue_ptr=0, momentum=None, step=0):
  """The TrainState `methods.create_train_state` makes, with the imported arrays in it.

  `query`/`key`: {torchvision name: array} of the query and key encoders (key None: a copy of the
  query, as at init). A head not in `query`, the queue (if None), the optimizer state and the rng
  are fresh, or `momentum` ({torchvision name: buffer}, PyTorch SGD's) and `step` continue a run.
  Built without running a full random init (slow to compile on CPU), then checked leaf by leaf
  against its tree, so the pre-training program resumes from it.
  """
  model = methods.create_model(config)
  lr = optim.schedule(config.optim, config.batch_size, 1, config.num_epochs)
  rng = jax.random.PRNGKey(config.seed)
  like = jax.eval_shape(lambda r: methods.create_train_state(
      r, config, model, lr, config.data.image_size), rng)
  init_rng, queue_rng, step_rng = jax.random.split(rng, 3)
  has_head = any(k.startswith('fc.') for k in query)
  params_like = like.params if has_head else {'backbone': like.params['backbone']}
  params, stats = names.variables(query, params_like, like.batch_stats)
  if not has_head:
    feat = resnet.feature_dim(config.model.arch, config.model.width)
    params['head'] = resnet.Head(config.model.head, config.model.dim).init(
        init_rng, jnp.zeros((1, feat)), train=False)['params']
  key_params, key_stats = (params, stats) if key is None else names.variables(
      key, like.params, like.batch_stats)
  if queue is None:
    queue = moco.init_queue(queue_rng, config.moco.queue_size, config.model.dim)
  arrays = jax.tree.map(jnp.asarray, (params, stats, key_params, key_stats, queue))
  state = methods.MoCoState.create(
      apply_fn=model.apply, params=arrays[0], tx=optim.create(config.optim, lr),
      batch_stats=arrays[1], key_params=arrays[2], key_batch_stats=arrays[3], queue=arrays[4],
      queue_ptr=jnp.asarray(queue_ptr, jnp.int32), rng=step_rng)
  if momentum is not None:
    trace, _ = names.variables(momentum, params, {})
    state = state.replace(opt_state=optax.tree_utils.tree_set(
        state.opt_state, trace=jax.tree.map(jnp.asarray, trace)))
  state = jax.device_put(state.replace(step=step))  # as the loop: every leaf an array
  shapes = lambda t: [(jax.tree_util.keystr(p), x.shape, x.dtype)
                      for p, x in jax.tree_util.tree_flatten_with_path(t)[0]]
  if shapes(state) != shapes(like):
    raise RuntimeError('imported state does not match methods.create_train_state: please report')
  return state


def _momentum_from_torch(optimizer, query):
  """{torchvision name: momentum buffer} of the query encoder from SGD's state_dict."""
  order = sorted((k for k in query if not k.endswith(('running_mean', 'running_var',
                                                      'num_batches_tracked'))),
                 key=names.parameter_order)
  state = optimizer.get('state', {})
  if any(i not in state or 'momentum_buffer' not in state[i] for i in range(len(order))):
    raise ValueError('the optimizer state has no momentum buffer for every query parameter: '
                     'not torch.optim.SGD with momentum of the reference MoCo')
  return {n: state[i]['momentum_buffer'].float().numpy() for i, n in enumerate(order)}


def import_weights(fmt, path, out, config=None, arch=None, width=None, cifar_stem=None):
  """Writes OUT/config.json and OUT/checkpoints/0 from a torchvision or reference MoCo file.

  torchvision: the backbone (fc.* ignored), copied into both encoders; head and queue fresh.
  moco: both encoders with their heads, the queue and its pointer. Returns the config written.
  """
  if fmt not in ('torchvision', 'moco'):
    raise ValueError(f"unknown --from {fmt!r}: choose 'torchvision' or 'moco'")
  weights, extras = read_checkpoint(path)
  sd = {k[len('module.'):] if k.startswith('module.') else k: v for k, v in weights.items()}
  queue = ptr = key = momentum = None
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
  found = names.infer_model(query)
  names.check_model(found, dict(arch=arch, width=width, cifar_stem=cifar_stem), path,
                    'the command line')
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
  ckdir = checkpoints.path(out) / 'checkpoints'
  if ckdir.is_dir() and any(ckdir.iterdir()):
    raise ValueError(f'{ckdir} is not empty: import into a new workdir')
  step = 0
  if fmt == 'moco' and 'optimizer' in extras:   # continue the run: momentum, step
    momentum = _momentum_from_torch(extras['optimizer'], query)
    step = int(extras.get('epoch', 0)) * _steps_per_epoch(config)
  state = build_state(config, query, key, queue, ptr or 0, momentum, step)
  checkpoints.path(out).mkdir(parents=True, exist_ok=True)
  checkpoints.write_config(config, out)
  with checkpoints.manager(out, keep=1) as mgr:
    checkpoints.save(mgr, state)
  return config
