r"""The real jitted steps compiled by libtpu for TPU slices, on a host without TPUs: estimates.

libtpu compiles for a TPU topology with no TPU present, so the TPU compiler's own memory and cost
analyses of our steps can be read on any Linux x86 host. Not part of the project's install (CI
never sees libtpu): a separate venv holds the project and `jax[tpu]` at the project's jax.

  python3 -m venv /tmp/tpu-venv
  /tmp/tpu-venv/bin/pip install -e . 'jax[tpu]==0.10.2' -c constraints.txt
  /tmp/tpu-venv/bin/python benchmarks/tpu_aot.py --quick   # MoCo v2 R50 bf16 + peers, v5e:2x2
  /tmp/tpu-venv/bin/python benchmarks/tpu_aot.py           # every case and topology

Per case, per device (a chip; on v4, whose topologies list both TensorCores of a chip, a core with
half the chip's figures): HBM (arguments + temporaries + outputs not aliased to a donated argument)
against the chip's capacity; FLOPs and bytes accessed per image (XLA's cost analysis of the
per-chip program); collective bytes per step per chip (from the partitioned HLO); and a roofline
time, max(FLOPs / peak, bytes / HBM bandwidth), from the chip's published figures (CHIPS), turned
into images/s per chip. All of it is an estimate: a roofline ignores overlap, the VPU (element-
wise work counts as FLOPs at the MXU's peak) and the ICI. The compiler's own `optimal_seconds`
is not used: it came out negative for these programs. f32 matmuls run as one bf16 pass on TPUs
by default (jax's default precision), so f32 and bf16 share the peak.

The supervised peer is a plain ResNet-50 classifier step (cross-entropy over 1000 classes, the
same SGD, weight decay and global BN) on the same per-chip batch of finished views. The last line:
`tpu-aot v5e:2x2 mocov2 resnet50 bf16: HBM X GiB/chip, est. Y img/s/chip, aug Z% of step,
MoCo/supervised W` (Z: the device augmentation's share of the step's time, the recipe compiled
alone for both views of the batch, a Pallas kernel per view on TPUs; W: the MoCo v2 step's time
over the supervised step's, per image).
"""
import argparse
import dataclasses
import os
import sys
import time

os.environ.setdefault('TPU_WORKER_HOSTNAMES', 'localhost')   # one host, no TPU attached
os.environ.setdefault('JAX_PLATFORMS', 'cpu')                # compile for TPU; run nothing

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from flax.training import train_state  # noqa: E402
from jax.experimental import topologies  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top
from mocov2_jax import defaults, linear, methods, optim, xla_stats  # noqa: E402
from mocov2_jax.models import resnet  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 2**30
# Published per-chip figures (cloud.google.com/tpu/docs/v5e, .../v4): peak bf16 FLOP/s, HBM
# bandwidth (bytes/s), HBM capacity (GiB).
CHIPS = {'v5e': (197e12, 819e9, 16), 'v4': (275e12, 1200e9, 32)}


@dataclasses.dataclass(frozen=True)
class Case:
  job: str                 # mocov2, mocov1, simclr, supervised, linear, augment
  dtype: str = 'bfloat16'
  augment_on: str = 'device'
  per_chip: int = 32       # images per device (a chip, or a v4 TensorCore) per step
  topology: str = 'v5e:2x2'
  image_size: int = 224

  @property
  def name(self):
    aug = '' if self.job in ('supervised', 'linear', 'augment') else f' {self.augment_on}-aug'
    dtype = {'bfloat16': 'bf16', 'float32': 'f32'}[self.dtype]
    return f'{self.topology} {self.job} {dtype}{aug} {self.per_chip}/chip'


def config_of(case, chips):
  if case.job == 'mocov1':
    c = defaults.sibling_config(os.path.join(REPO, 'configs', 'mocov2.py'), 'mocov1').get_config()
  else:
    c = defaults.base_config()
  if case.job == 'simclr':
    c = defaults.use_simclr(c)
  c.batch_size = case.per_chip * chips
  c.model.dtype = case.dtype
  c.data.update(image_size=case.image_size, augment_on=case.augment_on)
  return c


def abstract(build, sharding):
  """Shapes of what `build()` returns (traced, nothing computed), placed with `sharding`."""
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
                      jax.eval_shape(build))


class Supervised(nn.Module):
  """ResNet-50 + a 1000-way linear classifier: the standard supervised ImageNet step's model."""
  dtype: str

  @nn.compact
  def __call__(self, x, train):
    h = resnet.ResNet('resnet50', dtype=resnet.DTYPES[self.dtype], name='backbone')(x, train)
    return nn.Dense(1000, name='fc')(h)


class SupervisedState(train_state.TrainState):
  batch_stats: dict


def supervised_step(state, batch):
  def loss_fn(params):
    logits, new = state.apply_fn({'params': params, 'batch_stats': state.batch_stats},
                                 batch['image'], train=True, mutable=['batch_stats'])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch['label']).mean()
    return loss, new['batch_stats']
  (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  return state.apply_gradients(grads=grads, batch_stats=stats), loss


def lowered(case, devices):
  """The case's jitted step, traced with abstract inputs and lowered for TPU."""
  chips = len(devices)
  c = config_of(case, chips)
  _, repl, data = methods.mesh_and_shardings(devices)
  n, s = c.batch_size, case.image_size
  views = lambda dtype: jax.ShapeDtypeStruct((n, s, s, 3), dtype, sharding=data)
  labels = jax.ShapeDtypeStruct((n,), jnp.int32, sharding=data)
  sched = optim.schedule(c.optim, c.batch_size, 5000, c.num_epochs)
  if case.job == 'augment':   # the recipe alone, both views of the batch, as the step runs it
    finish = methods.view_finisher(c, 0, data)
    return jax.jit(lambda v: (finish(v['view1'], 0), finish(v['view2'], 1)), in_shardings=data,
                   out_shardings=data).trace(dict(view1=views(jnp.uint8), view2=views(jnp.uint8)))
  if case.job in ('mocov2', 'mocov1', 'simclr'):
    model = methods.create_model(c)
    state = abstract(lambda: methods.create_train_state(jax.random.key(0), c, model, sched, s),
                     repl)
    view = views(jnp.uint8 if case.augment_on == 'device' else jnp.float32)
    step = methods.jit_train_step(c, sched, repl, data)
    return step.trace(state, dict(view1=view, view2=view))
  if case.job == 'supervised':
    model = Supervised(case.dtype)
    def init():
      v = model.init(jax.random.key(0), jnp.zeros((2, s, s, 3)), train=False)
      return SupervisedState.create(apply_fn=model.apply, params=v['params'],
                                    batch_stats=v['batch_stats'], tx=optim.sgd(c.optim, sched))
    step = jax.jit(supervised_step, in_shardings=(repl, data), out_shardings=(repl, repl),
                   donate_argnums=0)
    return step.trace(abstract(init, repl), dict(image=views(jnp.float32), label=labels))
  # linear: the protocol's step, one head (lr 30) on the frozen ResNet-50 in inference mode.
  backbone = resnet.ResNet('resnet50', dtype=resnet.DTYPES[case.dtype])
  classifier = linear.Classifier(1000, 1)
  lr = optim.schedule(c.optim, c.batch_size, 5000, 100)
  frozen = abstract(lambda: backbone.init(jax.random.key(0), jnp.zeros((2, s, s, 3)), False),
                    repl)
  def init():
    params = classifier.init(jax.random.key(0), jnp.zeros((1, 2048)))['params']
    return train_state.TrainState.create(apply_fn=classifier.apply, params=params,
                                         tx=linear.per_head_sgd(c.optim, lr, [1.0]))
  protocol_lr = float(c.optim.base_lr)
  step = jax.jit(lambda st, fr, b: linear.train_step(
      st, fr, b, features=linear.make_features(backbone), lrs=[protocol_lr],
      protocol_lr=protocol_lr, lr_schedule=lr), in_shardings=(repl, repl, data),
                 out_shardings=(repl, repl), donate_argnums=0)
  return step.trace(abstract(init, repl), frozen, dict(image=views(jnp.float32), label=labels))


def measure(case, devices):
  """A row of the table: the compiled case's figures, or the compiler's error."""
  peak, bandwidth, capacity = CHIPS[case.topology.split(':')[0]]
  # A v4 topology lists each chip's two TensorCores as devices: a device gets half the chip.
  cores = len(devices) // len({tuple(d.coords) for d in devices})
  peak, bandwidth, capacity = peak / cores, bandwidth / cores, capacity / cores
  tick = time.perf_counter()
  try:
    compiled = lowered(case, devices).lower(lowering_platforms=('tpu',)).compile()
  except Exception as e:  # pylint: disable=broad-except  (the compiler's error is the row)
    return dict(case=case, error=f'{type(e).__name__}: {str(e).splitlines()[0][:200]}')
  cost, mem = xla_stats.cost(compiled), xla_stats.memory(compiled)
  seconds, bound = xla_stats.roofline(cost['flops'], cost['bytes'], peak, bandwidth)
  comm = xla_stats.collectives(compiled.as_text(), case.image_size)
  return dict(case=case, compile_s=time.perf_counter() - tick, hbm_gib=mem['peak'] / GIB,
              capacity_gib=capacity, fits=mem['peak'] <= capacity * GIB,
              flops_per_image=cost['flops'] / case.per_chip,
              bytes_per_image=cost['bytes'] / case.per_chip,
              collective_mb=sum(comm.values()) / 1e6, collectives=comm, seconds=seconds,
              bound=bound, images_per_s=case.per_chip / seconds)


def cases(quick):
  main = Case('mocov2')
  peers = [Case('mocov2', augment_on='host'), Case('supervised'), Case('augment')]
  if quick:
    return [main] + peers
  out = [main] + peers
  for job in ('mocov2', 'mocov1'):
    for dtype in ('bfloat16', 'float32'):
      for aug in ('device', 'host'):
        out.append(Case(job, dtype, aug))
  out += [Case('supervised', 'float32'), Case('linear')]
  # Table 3: MoCo and end-to-end (SimCLR) at a global batch of 256 and 4096 on the 2x2 slice.
  out += [Case('mocov2', per_chip=64), Case('simclr', per_chip=64), Case('simclr', per_chip=1024)]
  # ... and SimCLR at 4096 where it fits: 64 chips of 64 (on 4 chips it asks for 43.6 GB a chip).
  out += [Case('simclr', per_chip=64, topology='v5e:8x8')]
  for topology in ('v4:2x2x1', 'v5e:8x8'):
    out += [Case('mocov2', topology=topology), Case('mocov2', augment_on='host', topology=topology),
            Case('supervised', topology=topology)]
  return list(dict.fromkeys(out))   # unique, in order


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--quick', action='store_true',
                      help='v5e:2x2 MoCo v2 ResNet-50 bf16 and its two peers only')
  args = parser.parse_args()
  print(f'jax {jax.__version__}, libtpu {_libtpu_version()}; all figures are estimates '
        '(TPU compiler analyses + roofline), compiled on this CPU host', flush=True)
  devices, rows = {}, []
  header = (f'{"case":44s} {"HBM GiB/chip":>13s} {"GFLOP/img":>10s} {"MB/img":>8s} '
            f'{"coll. MB/step":>13s} {"est. img/s/chip":>15s} {"bound":>8s} {"compile s":>9s}')
  print(header)
  for case in cases(args.quick):
    if case.topology not in devices:
      devices[case.topology] = topologies.get_topology_desc(
          platform='tpu', topology_name=case.topology).devices
    row = measure(case, devices[case.topology])
    rows.append(row)
    if 'error' in row:
      print(f'{case.name:44s} did not compile: {row["error"]}', flush=True)
      continue
    hbm = f'{row["hbm_gib"]:.2f}/{row["capacity_gib"]:g}' + ('' if row['fits'] else ' (!)')
    print(f'{case.name:44s} {hbm:>13s} {row["flops_per_image"] / 1e9:10.2f} '
          f'{row["bytes_per_image"] / 1e6:8.1f} {row["collective_mb"]:13.1f} '
          f'{row["images_per_s"]:15.0f} {row["bound"]:>8s} {row["compile_s"]:9.0f}', flush=True)
  if any(not r.get('fits', True) for r in rows):
    print('(!): does not fit in the chip\'s HBM')
  for r in rows:
    if 'error' not in r and r['collective_mb'] > 0:
      c = r['collectives']
      print(f'{r["case"].name}: collectives per step per chip: image batches '
            f'{c["views"] / 1e6:.1f} MB, all-reduce {c["all-reduce"] / 1e6:.1f} MB, '
            f'other {c["other"] / 1e6:.1f} MB')
  summary(rows)


def summary(rows):
  by_case = {r['case']: r for r in rows if 'error' not in r}
  main_case = Case('mocov2')
  moco, host, sup, alone = (by_case.get(c) for c in (
      main_case, Case('mocov2', augment_on='host'), Case('supervised'), Case('augment')))
  if not (moco and host and sup):
    print('tpu-aot: the main case or a peer did not compile')
    return
  per_image = lambda r: r['seconds'] / r['case'].per_chip
  # The recipe's share: its own roofline time, compiled alone (both views of the batch). The
  # difference of the steps with and without it also counts the f32 views the host path reads.
  diff = (moco['seconds'] - host['seconds']) / moco['seconds']
  print(f'device - host augmentation step: {100 * diff:+.1f}% of the step\'s roofline time')
  aug = alone['seconds'] / moco['seconds'] if alone else diff
  if alone:
    print(f'device augmentation alone: {alone["bytes_per_image"] / 1e6:.1f} MB / image (both '
          f'views), {100 * aug:.1f}% of the step\'s roofline time ({alone["bound"]}-bound)')
  print(f'MoCo v2 / supervised FLOPs per image: '
        f'{host["flops_per_image"] / sup["flops_per_image"]:.2f} (4 forward passes / 3: 1.33)')
  f32 = by_case.get(Case('mocov2', 'float32'))
  if f32:
    print(f'bf16 / f32 HBM per chip (MoCo v2, device aug): {moco["hbm_gib"] / f32["hbm_gib"]:.2f}')
  print(f'tpu-aot {main_case.topology} mocov2 resnet50 bf16: HBM {moco["hbm_gib"]:.2f} GiB/chip, '
        f'est. {moco["images_per_s"]:.0f} img/s/chip, aug {100 * aug:.1f}% of step, '
        f'MoCo/supervised {per_image(moco) / per_image(sup):.2f}')


def _libtpu_version():
  try:
    from importlib import metadata
    return metadata.version('libtpu')
  except Exception:  # pylint: disable=broad-except
    return 'unknown'


if __name__ == '__main__':
  main()
