r"""The MoCo v2 paper's Table 3: memory and time of MoCo against the end-to-end mechanism.

For MoCo v2 and SimCLR (end-to-end) at the same batch, and SimCLR at a large batch, builds the
real train step (`methods.jit_train_step`) on one device, reads its peak memory from XLA's memory
analysis of the compiled step (arguments + outputs - donated aliases + temporaries), and times
steps on synthetic batches (no input pipeline: this measures the step). Prints a Markdown table
with the ratios beside the paper's (8 V100: 5.0 vs 7.4 GB per GPU, 53 vs 65 hours).

  python benchmarks/table3.py                                   # ResNet-50, 224 px, batch 256
  python benchmarks/table3.py --arch=resnet18 --width=16 --image_size=32 --cifar_stem \
      --batch=256 --large_batch=1024 --steps=5                  # small enough for 2 CPU cores

The paper's batch 256 is 32 per V100; here the whole batch runs on one device.
"""
import argparse
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mocov2_jax import defaults, optim, methods  # noqa: E402  pylint: disable=g-import-not-at-top

PAPER = {'memory': (5.0, 7.4), 'hours': (53.0, 65.0)}  # MoCo, end-to-end; 8 V100, batch 256


def make_config(method, args, batch):
  c = defaults.base_config()
  if method == 'simclr':
    defaults.use_simclr(c)
  c.batch_size = batch
  c.model.update(arch=args.arch, width=args.width, cifar_stem=args.cifar_stem, dtype=args.dtype)
  c.data.image_size = args.image_size
  return c


def measure(method, args, batch, time_it=True):
  config = make_config(method, args, batch)
  _, repl, data = methods.mesh_and_shardings(jax.devices()[:1])
  sched = optim.schedule(config.optim, batch, 1000, config.num_epochs)
  model = methods.create_model(config)
  state = methods.create_train_state(jax.random.PRNGKey(0), config, model, sched, args.image_size)
  state = jax.device_put(state, repl)
  shape = (batch, args.image_size, args.image_size, 3)
  train_step = methods.jit_train_step(config, sched, repl, data)
  spec = {k: jax.ShapeDtypeStruct(shape, np.float32, sharding=data) for k in ('view1', 'view2')}
  tick = time.time()
  compiled = train_step.lower(state, spec).compile()
  compile_s = time.time() - tick
  mem = compiled.memory_analysis()
  peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes +
          mem.temp_size_in_bytes)
  out = dict(method=method, batch=batch, peak=peak, temp=mem.temp_size_in_bytes,
             compile_s=compile_s, step_s=None)
  if time_it:
    rng = np.random.default_rng(0)
    batch_arrays = {k: jax.device_put(rng.uniform(size=shape).astype(np.float32), data)
                    for k in ('view1', 'view2')}
    for _ in range(args.warmup):
      state, m = compiled(state, batch_arrays)
    jax.block_until_ready(state)
    times = []
    for _ in range(args.steps):
      tick = time.time()
      state, m = compiled(state, batch_arrays)
      jax.block_until_ready((state, m))
      times.append(time.time() - tick)
    out['step_s'] = float(np.median(times))
  print(f"# {method} batch {batch}: compiled in {compile_s:.0f} s, peak {peak / 1e9:.2f} GB"
        + ('' if out['step_s'] is None else f", step {out['step_s']:.3f} s"), flush=True)
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--arch', default='resnet50')
  p.add_argument('--width', type=int, default=64)
  p.add_argument('--image_size', type=int, default=224)
  p.add_argument('--cifar_stem', action='store_true')
  p.add_argument('--dtype', default='float32')
  p.add_argument('--batch', type=int, default=256)
  p.add_argument('--large_batch', type=int, default=4096)
  p.add_argument('--time_large', action='store_true', help='also time the large batch')
  p.add_argument('--memory_only', action='store_true',
                 help='compile and read memory only (the paper scale on a CPU)')
  p.add_argument('--steps', type=int, default=10)
  p.add_argument('--warmup', type=int, default=2)
  args = p.parse_args()

  dev = jax.devices()[0]
  print(f'# {dev.platform} ({dev.device_kind}), jax {jax.__version__}; {args.arch} width '
        f'{args.width}, {args.image_size} px{", CIFAR stem" if args.cifar_stem else ""}, '
        f'{args.dtype}', flush=True)
  timed = not args.memory_only
  rows = [measure('moco', args, args.batch, timed), measure('simclr', args, args.batch, timed),
          measure('simclr', args, args.large_batch, timed and args.time_large)]
  moco = rows[0]
  print('\n| mechanism | batch | peak memory (GB) | x MoCo | paper x MoCo | step (s) | '
        'images/s | x MoCo time | paper x MoCo time | compile (s) |')
  print('|---|---|---|---|---|---|---|---|---|---|')
  paper_mem, paper_time = PAPER['memory'][1] / PAPER['memory'][0], PAPER['hours'][1] / PAPER[
      'hours'][0]
  for i, r in enumerate(rows):
    name = 'MoCo v2' if r['method'] == 'moco' else 'end-to-end (SimCLR)'
    same_batch = r['batch'] == moco['batch']
    ref_mem = '1.00' if i == 0 else f'{paper_mem:.2f}' if same_batch else '~18.6 (93 GB)'
    ref_time = '1.00' if i == 0 else f'{paper_time:.2f}' if same_batch else '-'
    t = r['step_s']
    timing = (['-'] * 3 if t is None or moco['step_s'] is None else
              [f'{t:.3f}', f"{r['batch'] / t:.0f}", f"{t / moco['step_s']:.2f}"])
    print(f"| {name} | {r['batch']} | {r['peak'] / 1e9:.2f} | {r['peak'] / moco['peak']:.2f} | "
          f"{ref_mem} | {timing[0]} | {timing[1]} | {timing[2]} | {ref_time} | "
          f"{r['compile_s']:.0f} |")
  print('\npaper: 8 V100 16 GB, batch 256: MoCo 5.0 GB/GPU and 53 h per 200 epochs; end-to-end '
        '7.4 GB/GPU and 65 h; end-to-end at batch 4096 ~93 GB/GPU (does not fit).')


if __name__ == '__main__':
  main()
