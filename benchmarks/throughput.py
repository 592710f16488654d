r"""Feeding the accelerators: what host and device augmentation cost, and what the step moves.

One command, one table (host augmentation, all of the recipe in tf.data, beside device
augmentation, where tf.data only decodes and takes the two uint8 crops):

- host input cost: CPU time of the whole process (all threads) per image (both views) over
  passes of the real `pipeline.epoch_dataset` with one tf.data thread, on JPEGs of ImageNet size
  (500x375, quality 90, smooth random content) that it writes itself; decoding alone beside it;
- device augmentation time per image (both views): the jitted `augment_kernel.augment_batch`;
- train step img/s: the real `methods.jit_train_step` on synthetic uint8 / float32 views (NumPy);
- end to end img/s: `pipeline.train_batches` feeding that step, as the trainer does;
- host -> device bytes per image, from the batch arrays;
- collective bytes per device per step, from the compiled step's HLO on an 8-device CPU mesh (a
  subprocess with 8 fake devices), the key shuffle apart from the gradient all-reduce;
- FLOPs per image of the step over a forward pass of the query encoder in train mode (XLA's cost
  analysis; MoCo: forward + backward of the queries + forward of the keys = 4.0x);
- float32 against bfloat16: the activations the backward pass keeps (the residuals of the query
  encoder's VJP, as JAX saves them on any backend) and XLA's memory analysis of the step (temp).

  python benchmarks/throughput.py            # ResNet-50, 224 px, batch 256 (for a GPU)
  python benchmarks/throughput.py --quick    # ResNet-18 width 16, batch 32: minutes on 2 cores

The step parts run without TensorFlow (the host input parts are then skipped, saying so). The
last line is `host core-ms per image: device-aug A, host-aug B (Rx)`, R = B / A.
"""
import argparse
import atexit
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top
from mocov2_jax import defaults, methods, optim, xla_stats  # noqa: E402
from mocov2_jax.data import augment_kernel, device_augment  # noqa: E402

VIEWS = ('view1', 'view2')


# ------------------------------------------------------------------------------------------------
# Setup shared by the parts

def make_config(args, augment_on='device', dtype=None):
  c = defaults.base_config()
  c.batch_size = args.batch
  c.model.update(arch=args.arch, width=args.width, dtype=dtype or args.dtype)
  c.data.update(image_size=args.image_size, augment_on=augment_on)
  return c


def view_spec(args, augment_on, sharding):
  dtype = np.uint8 if augment_on == 'device' else np.float32
  shape = (args.batch, args.image_size, args.image_size, 3)
  return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding) for k in VIEWS}


def synthetic_views(args, augment_on, seed=0):
  """NumPy views as the pipeline sends them: uint8 crops, or finished float32 views."""
  rng = np.random.default_rng(seed)
  shape = (args.batch, args.image_size, args.image_size, 3)
  if augment_on == 'device':
    return {k: rng.integers(0, 256, shape, np.uint8) for k in VIEWS}
  return {k: rng.normal(size=shape).astype(np.float32) for k in VIEWS}


def compile_step(config, args, devices):
  """(the compiled step, a fresh state for it on `devices`, the batch sharding)."""
  _, repl, data = methods.mesh_and_shardings(devices)
  sched = optim.schedule(config.optim, config.batch_size, 1000, config.num_epochs)
  model = methods.create_model(config)
  state = jax.device_put(methods.create_train_state(jax.random.PRNGKey(0), config, model, sched,
                                                    args.image_size), repl)
  step = methods.jit_train_step(config, sched, repl, data)
  return step.lower(state, view_spec(args, config.data.augment_on, data)).compile(), state, data


def timed(fn, reps, warmup=1):
  """Median wall seconds of `fn()` (which blocks on its result) after `warmup` calls."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(reps):
    tick = time.perf_counter()
    fn()
    times.append(time.perf_counter() - tick)
  return float(np.median(times))


# ------------------------------------------------------------------------------------------------
# Host input (tf.data): needs TensorFlow

def write_jpegs(folder, num, seed=0):
  """ImageNet-sized JPEGs (500x375, quality 90): smooth random colour fields plus grain, so the
  decoder sees a photo's entropy, not flat colour. Returns their mean file size in bytes."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  sizes = []
  for i in range(num):
    low = rng.uniform(0, 255, (12, 16, 3)).astype(np.float32)
    image = tf.image.resize(low[None], [375, 500], 'bicubic')[0].numpy()
    image = np.clip(image + rng.normal(0, 12, image.shape), 0, 255).astype(np.uint8)
    data = tf.io.encode_jpeg(image, quality=90).numpy()
    with open(os.path.join(folder, f'{i:05d}.jpg'), 'wb') as f:
      f.write(data)
    sizes.append(len(data))
  return float(np.mean(sizes))


def cpu_seconds():
  """CPU time of this process, all threads (tf.data's included)."""
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def single_threaded(ds):
  """One tf.data thread and no autotuning threads, so the CPU time is the work itself."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  options = tf.data.Options()
  options.threading.private_threadpool_size = 1
  options.autotune.enabled = False
  return ds.with_options(options)


def host_input(args, data_cfg, num_images, reps=3):
  """Core-ms per image (both views) of the pipeline with host / device augmentation, and of
  decoding alone; each the median of `reps` passes over all images (after a warm-up pass)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from mocov2_jax.data import pipeline, sources  # pylint: disable=g-import-not-at-top
  batch = min(args.host_batch, num_images)

  def views_pass(crops_only, epoch):
    ds = pipeline.epoch_dataset(data_cfg, local_batch_size=batch, steps=num_images // batch,
                                seed=0, epoch=epoch, crops_only=crops_only)
    ds = ds[0] if isinstance(ds, tuple) else ds   # (dataset, source, records args) or dataset
    return single_threaded(ds), (num_images // batch) * batch

  def decode_pass(epoch):
    source = sources.get(data_cfg)
    ds = source.records(data_cfg.train_split, seed=epoch).map(
        lambda ex: tf.shape(source.decode(ex['image'])))
    return single_threaded(ds), num_images

  def cost(make):
    out = []
    for epoch in range(reps + 1):
      ds, n = make(epoch)
      tick = cpu_seconds()
      for _ in ds.as_numpy_iterator():
        pass
      out.append((cpu_seconds() - tick) / n * 1e3)
    return float(np.median(out[1:]))

  return dict(device=cost(lambda e: views_pass(True, e)), host=cost(lambda e: views_pass(False, e)),
              decode=cost(decode_pass))


def end_to_end(args, data_cfg, augment_on, step, steps):
  """Images/s of `pipeline.train_batches` + `loop.prefetch` + the step (the trainer's path)."""
  from mocov2_jax import loop  # pylint: disable=g-import-not-at-top  (clu's writers: TensorFlow)
  from mocov2_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  compiled, state, data = step
  num = len(os.listdir(data_cfg.folder))
  stream = pipeline.train_batches(data_cfg, local_batch_size=args.batch,
                                  steps_per_epoch=max(1, num // args.batch), seed=0,
                                  crops_only=augment_on == 'device')
  batches = loop.prefetch(({k: b[k] for k in VIEWS} for b in stream), data)
  state, m = compiled(state, next(batches))   # warm-up (the pipeline's threads start)
  jax.block_until_ready(m)
  tick = time.perf_counter()
  for _ in range(steps):
    state, m = compiled(state, next(batches))
  jax.block_until_ready((state, m))
  return args.batch * steps / (time.perf_counter() - tick)


# ------------------------------------------------------------------------------------------------
# Compiled step: collectives (8 fake CPU devices, in a subprocess), FLOPs, memory

def collectives_part(args):
  """Runs in the 8-device subprocess: collective bytes of host- and device-augmented steps."""
  devices = jax.devices()
  assert len(devices) == 8, f'{len(devices)} devices: XLA_FLAGS did not reach the subprocess'
  out = {}
  for augment_on in ('host', 'device'):
    compiled, _, _ = compile_step(make_config(args, augment_on, 'float32'), args, devices)
    out[augment_on] = xla_stats.collectives(compiled.as_text(), args.image_size)
  print(json.dumps(out))


def collectives(args):
  flags = os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'
  env = dict(os.environ, XLA_FLAGS=flags.strip(), JAX_PLATFORMS='cpu')
  cmd = [sys.executable, os.path.abspath(__file__), '--part=collectives', f'--arch={args.arch}',
         f'--width={args.width}', f'--batch={args.batch}', f'--image_size={args.image_size}']
  result = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
  if result.returncode:
    raise RuntimeError(f'collectives subprocess failed:\n{result.stderr[-3000:]}')
  return json.loads(result.stdout.strip().splitlines()[-1])


def forward_flops(config, args):
  """FLOPs of one forward pass of the query encoder in train mode over the batch."""
  model = methods.create_model(config)
  x = jax.ShapeDtypeStruct((args.batch, args.image_size, args.image_size, 3), jnp.float32)
  variables = jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), jnp.zeros((2 * methods.bn_groups(config),) + x.shape[1:]),
      train=False))
  fwd = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats']))
  return xla_stats.cost(fwd.lower(variables, x).compile())['flops']


def saved_activations(config, args):
  """Bytes the backward pass of the query encoder keeps (the residuals of its VJP in train mode,
  as JAX saves them: no backend's choices in it)."""
  model = methods.create_model(config)
  x = jax.ShapeDtypeStruct((args.batch, args.image_size, args.image_size, 3), jnp.float32)
  v = jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), jnp.zeros((2 * methods.bn_groups(config),) + x.shape[1:]),
      train=False))

  def residuals(params, stats, x):
    def loss(p):
      (_, z), _ = model.apply({'params': p, 'batch_stats': stats}, x, train=True,
                              mutable=['batch_stats'])
      return z.sum()
    return jax.vjp(loss, params)[1]
  leaves = jax.tree.leaves(jax.eval_shape(residuals, v['params'], v['batch_stats'], x))
  return sum(int(np.prod(l.shape)) * np.dtype(l.dtype).itemsize for l in leaves)


# ------------------------------------------------------------------------------------------------
# The table

def machine():
  cpu = 'unknown CPU'
  try:
    with open('/proc/cpuinfo') as f:
      cpu = next(l.split(':', 1)[1].strip() for l in f if l.startswith('model name'))
  except (OSError, StopIteration):
    pass
  dev = jax.devices()[0]
  load = os.getloadavg()[0] if hasattr(os, 'getloadavg') else float('nan')
  return (f'{cpu}, {os.cpu_count()} cores (load average {load:.1f}); JAX {jax.__version__}: '
          f'{jax.device_count()} x {dev.platform} ({dev.device_kind})')


def say(*args):
  print(*args, file=sys.stderr, flush=True)


# ---- one function per part of the table: {row name: (host aug, device aug, format)} ----
def host_rows(args):
  """Host core-ms per image of the input pipeline: (costs, data config, rows); (None, None, {})
  without TensorFlow (the accelerator machine's path)."""
  try:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    tf.config.set_visible_devices([], 'GPU')
  except ImportError:
    print('# host input parts skipped: TensorFlow is not installed')
    return None, None, {}
  except RuntimeError:
    pass
  folder = tempfile.mkdtemp(prefix='throughput_jpegs_')
  atexit.register(shutil.rmtree, folder, True)
  say(f'writing {args.images} JPEGs to {folder} ...')
  jpeg_bytes = write_jpegs(folder, args.images)
  data_cfg = make_config(args).data
  data_cfg.update(source='folder', folder=folder)
  say('host input cost ...')
  host = host_input(args, data_cfg, args.images)
  print(f'# host input: {args.images} JPEGs 500x375 q90 (mean {jpeg_bytes / 1e3:.0f} kB), '
        'process CPU time with one tf.data thread, median of 3 passes')
  return host, data_cfg, {
      'host input cost (core-ms / image, both views)': (host['host'], host['device'], '.2f'),
      '  of which decoding (core-ms / image)': (host['decode'], host['decode'], '.2f')}


def device_augmentation_rows(args):
  """The recipe's device half alone, timed, and its FLOPs per image: (rows, FLOPs)."""
  say('device augmentation ...')
  recipe = make_config(args).data.augment
  crops = jax.device_put(synthetic_views(args, 'device')['view1'])
  keys = [device_augment.example_keys(0, 0, args.batch, v) for v in (0, 1)]
  aug = jax.jit(lambda x: [augment_kernel.augment_batch(x, k, recipe) for k in keys])
  seconds = timed(lambda: jax.block_until_ready(aug(crops)), args.steps)
  flops = xla_stats.cost(aug.lower(crops).compile())['flops'] / args.batch
  return {'device augmentation (ms / image, both views)': (None, seconds / args.batch * 1e3,
                                                           '.3f')}, flops


def step_images_per_second(compiled, state, batch, reps, batch_size):
  """(img/s, the latest state): the step donates its state, so each call takes the last one's."""
  def run():
    nonlocal state
    state, m = compiled(state, batch)
    jax.block_until_ready(m)
  return batch_size / timed(run, reps), state


def step_rows(args, devices):
  """The train step of each mode on synthetic batches: (rows, {mode: (compiled, state,
  sharding)}, {mode: FLOPs per image})."""
  rate, flops, h2d, steps = {}, {}, {}, {}
  for augment_on in ('host', 'device'):
    say(f'train step ({augment_on} augmentation) ...')
    compiled, state, data = compile_step(make_config(args, augment_on), args, devices)
    flops[augment_on] = xla_stats.cost(compiled)['flops'] / args.batch
    batch = jax.device_put(synthetic_views(args, augment_on), data)
    h2d[augment_on] = sum(v.nbytes for v in batch.values()) / args.batch
    rate[augment_on], state = step_images_per_second(compiled, state, batch, args.steps,
                                                     args.batch)
    steps[augment_on] = (compiled, state, data)
  return {'train step (img/s)': (rate['host'], rate['device'], '.1f'),
          'host -> device bytes / image': (h2d['host'], h2d['device'], ',.0f')}, steps, flops


def end_to_end_rows(args, data_cfg, steps):
  e2e = {}
  for augment_on in ('host', 'device'):
    say(f'end to end ({augment_on} augmentation) ...')
    e2e[augment_on] = end_to_end(args, data_cfg, augment_on, steps[augment_on], args.steps)
  return {'end to end (img/s)': (e2e['host'], e2e['device'], '.1f')}


def collective_rows(args):
  say('collectives on 8 CPU devices (subprocess) ...')
  coll = collectives(args)
  return {f'{name} (bytes / device / step, 8 devices)': (coll['host'][kind],
                                                         coll['device'][kind], ',.0f')
          for kind, name in (('views', 'key shuffle'), ('all-reduce', 'all-reduce (gradients)'),
                             ('other', 'other collectives'))}


def flops_rows(args, step_flops, aug_flops):
  """The step's FLOPs in forward passes: (rows, forward FLOPs per image)."""
  say('FLOPs of a forward pass ...')
  fwd = forward_flops(make_config(args), args) / args.batch
  return {'step FLOPs / image (x forward)': (step_flops['host'] / fwd,
                                             step_flops['device'] / fwd, '.3f'),
          '  minus device augmentation (x forward)': (
              step_flops['host'] / fwd, (step_flops['device'] - aug_flops) / fwd, '.3f')}, fwd


def print_table(rows):
  print('\n| per image or step | host augmentation | device augmentation | device / host |')
  print('|---|---|---|---|')
  for name, (a, b, fmt) in rows.items():
    ratio = f'{b / a:.3f}' if a and b is not None else '-'
    print(f"| {name} | {'-' if a is None else format(a, fmt)} | {format(b, fmt)} | {ratio} |")


def memory_table(args, devices, compiled_device_step):
  say('float32 vs bfloat16 memory ...')
  mem = {}
  for dtype in ('float32', 'bfloat16'):
    config = make_config(args, 'device', dtype)
    compiled = (compiled_device_step if dtype == args.dtype else
                compile_step(config, args, devices)[0])
    mem[dtype] = (saved_activations(config, args), compiled.memory_analysis().temp_size_in_bytes)
  print('\n| memory at batch {} | float32 (MB) | bfloat16 (MB) | bf16 / f32 |'.format(args.batch))
  print('|---|---|---|---|')
  for i, name in enumerate(('saved activations (VJP residuals of the query encoder)',
                            f'XLA temp bytes of the step ({devices[0].platform})')):
    a, b = mem['float32'][i], mem['bfloat16'][i]
    print(f'| {name} | {a / 1e6:,.1f} | {b / 1e6:,.1f} | {b / a:.3f} |')
  if devices[0].platform == 'cpu':
    print('(XLA:CPU runs bf16 convolutions in float32, converting their inputs: its temp bytes '
          'overstate a bf16 step; accelerators convolve in bf16)')


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--quick', action='store_true',
                 help='ResNet-18 width 16, batch 32, few images and steps (a 2-core CPU)')
  p.add_argument('--arch', default=None)
  p.add_argument('--width', type=int, default=None)
  p.add_argument('--batch', type=int, default=None)
  p.add_argument('--image_size', type=int, default=224)
  p.add_argument('--dtype', default='float32')
  p.add_argument('--images', type=int, default=None, help='JPEGs written for the host parts')
  p.add_argument('--host_batch', type=int, default=32)
  p.add_argument('--steps', type=int, default=None, help='timed steps')
  p.add_argument('--collectives', action=argparse.BooleanOptionalAction, default=True,
                 help='the collective rows (8 fake CPU devices: the same on any backend)')
  p.add_argument('--part', default='all', choices=('all', 'collectives'), help=argparse.SUPPRESS)
  args = p.parse_args()
  quick = dict(arch='resnet18', width=16, batch=32, images=128, steps=3)
  full = dict(arch='resnet50', width=64, batch=256, images=512, steps=10)
  for k, v in (quick if args.quick else full).items():
    if getattr(args, k) is None:
      setattr(args, k, v)
  if args.part == 'collectives':
    return collectives_part(args)

  devices = jax.devices()
  print(f'# {machine()}')
  print(f'# MoCo v2 step: {args.arch} width {args.width}, batch {args.batch}, {args.image_size} '
        f'px, {args.dtype}; host input at {args.image_size} px')
  host_costs, data_cfg, rows = host_rows(args)
  aug_rows, aug_flops = device_augmentation_rows(args)
  rows.update(aug_rows)
  step_table, steps, step_flops = step_rows(args, devices)
  rows.update(step_table)
  if data_cfg is not None:
    rows.update(end_to_end_rows(args, data_cfg, steps))
  if args.collectives:
    rows.update(collective_rows(args))
  fwd_rows, fwd = flops_rows(args, step_flops, aug_flops)
  rows.update(fwd_rows)
  print_table(rows)
  print(f'\nforward pass: {fwd / 1e9:.3f} GFLOP / image; device augmentation '
        f'{aug_flops / 1e6:.1f} MFLOP / image (both views)')
  if devices[0].platform == 'gpu':
    print('(XLA:GPU runs convolutions as cuDNN custom calls, which its cost analysis does not '
          'count: the FLOP figures above are the rest of the program, not the model)')
  memory_table(args, devices, steps['device'][0])
  if host_costs is None:
    print('host core-ms per image: skipped (TensorFlow is not installed)')
  else:
    a, b = host_costs['device'], host_costs['host']
    print(f'host core-ms per image: device-aug {a:.2f}, host-aug {b:.2f} ({b / a:.2f}x)')


if __name__ == '__main__':
  main()
