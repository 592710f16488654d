"""The device recipe as one Pallas kernel per view on TPUs; the jnp recipe everywhere else.

On TPUs XLA materialises every step of the jnp recipe (`device_augment.finish`): about 50 float32
passes over each view (26 MB at 224 px, libtpu's estimate). In this kernel a view stays in VMEM
from its uint8 planes to its finished float32 planes, and each op runs once, only where it is
drawn: the kernel's HBM traffic is the crop in and the view out. The layout is planar, [3, S, S],
with the width on the lanes: a trailing channel axis of 3 would pad to 128 lanes. The ops are
`device_augment`'s, and the tests compare the two paths in interpret mode.
"""
import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import PartitionSpec as P

from mocov2_jax.data import device_augment, recipes

# Per view, one row of a float32 table in SMEM: these, then the blur's taps.
SCALARS = ('jitter', 'brightness', 'contrast', 'saturation', 'hue', 'order0', 'order1', 'order2',
           'order3', 'gray', 'flip')


def scalar_table(params, recipe, size: int):
  """`sample_params` of N views (vmapped) -> float32 [N, len(SCALARS) + 2 radius + 1]. The taps
  are the identity's (a single 1) where no blur is drawn or the recipe has none."""
  radius = recipes.blur_radius(recipe, size)
  taps = jax.vmap(lambda s: device_augment.blur_taps(s, radius))(params['blur_sigma'])
  identity = (jnp.arange(-radius, radius + 1) == 0).astype(jnp.float32)
  blurred = params['blur'][:, None] & (recipe.blur_p > 0)   # as `device_augment.finish`
  taps = jnp.where(blurred, taps, identity)
  f = params['jitter_factors']
  cols = [params['jitter'], f[:, 0], f[:, 1], f[:, 2], f[:, 3], *params['jitter_order'].T,
          params['gray'], params['flip']]
  return jnp.concatenate([jnp.stack([c.astype(jnp.float32) for c in cols], axis=1), taps], 1)


def _kernel(scalars, crop, out, *, recipe):
  """One view: uint8 planes [1, 3, S, S] -> float32 planes, worked in `out`'s VMEM block."""
  i = pl.program_id(0)
  s = lambda name: scalars[i, SCALARS.index(name)]
  size = crop.shape[-1]
  out[0] = crop[0].astype(jnp.float32) / 255.0

  def gray():
    w = device_augment.GRAY_WEIGHTS
    return w[0] * out[0, 0] + w[1] * out[0, 1] + w[2] * out[0, 2]

  def blend(other, factor):   # torchvision's `_blend`, against a plane or a scalar
    for c in range(3):
      out[0, c] = jnp.clip(factor * out[0, c] + (1 - factor) * other, 0.0, 1.0)

  def hue(delta):
    out[0] = device_augment.adjust_hue(out[0], delta, channel_axis=0)

  ops = (lambda f: blend(0.0, f),                  # brightness
         lambda f: blend(jnp.mean(gray()), f),     # contrast
         lambda f: blend(gray(), f),               # saturation
         hue)

  def to_gray():
    @pl.when(s('gray') > 0)
    def _():
      g = gray()
      for c in range(3):
        out[0, c] = g

  def jitter():
    for k in range(4):   # only the op drawn at position k runs there
      for op, name in enumerate(('brightness', 'contrast', 'saturation', 'hue')):
        if recipe.jitter[op]:   # ops of strength 0 are skipped, as torchvision does
          @pl.when((s('jitter') > 0) & (s(f'order{k}') == op))
          def _(op=op, name=name):
            ops[op](s(name))

  for stage in ((to_gray, jitter) if recipe.gray_before_jitter else (jitter, to_gray)):
    stage()
  mean = recipe.mean or (0.0,) * 3
  std = recipe.std or (1.0,) * 3
  # The blur K x K^T (`device_augment.gaussian_blur`; the identity's taps where none is drawn).
  # The flip commutes with the colour ops (they act on each pixel; the contrast's mean does not
  # see the order), so it joins the blur: x J K^T = x (K J)^T.
  taps = [scalars[i, j] for j in range(len(SCALARS), scalars.shape[1])]
  left = device_augment.blur_matrix(taps, size)
  right = device_augment.blur_matrix(taps, size, flip=s('flip') > 0)
  dot = lambda a, b, dims: jax.lax.dot_general(a, b, (dims, ((), ())),
                                               precision=jax.lax.Precision.HIGHEST,
                                               preferred_element_type=jnp.float32)
  for c in range(3):
    plane = dot(dot(left, out[0, c], ((1,), (0,))), right, ((1,), (1,)))   # K x (K J)^T
    out[0, c] = (plane - mean[c]) / std[c]


def finish_planes(crops, params, recipe, interpret=False):
  """uint8 planes [N, 3, S, S] and their `sample_params` -> float32 view planes [N, 3, S, S]."""
  n, _, size, _ = crops.shape
  table = scalar_table(params, recipe, size)
  planes = pl.BlockSpec((1, 3, size, size), lambda i, table: (i, 0, 0, 0))
  # Per view: the matrices (~6 operations a tap and entry); two float32 products a channel, six
  # bf16 passes of the matrix unit each (HIGHEST); the blends, gray planes and the hue's round
  # trip, ~40 operations a value. HBM: the uint8 crop in, the float32 view out.
  taps = table.shape[1] - len(SCALARS)
  cost = pl.CostEstimate(
      flops=n * (12 * taps * size**2 + 6 * 3 * 2 * 2 * size**3 + 40 * 3 * size**2),
      transcendentals=0, bytes_accessed=n * 3 * size**2 * (1 + 4))
  return pl.pallas_call(
      lambda *refs: _kernel(*refs, recipe=recipe),
      grid_spec=pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=1, grid=(n,),
                                             in_specs=[planes], out_specs=planes),
      out_shape=jax.ShapeDtypeStruct(crops.shape, jnp.float32),
      compiler_params=pltpu.CompilerParams(dimension_semantics=('parallel',)),
      cost_estimate=cost, interpret=interpret,
  )(table, crops)


def finish_batch(images, params, recipe, interpret=False):
  """uint8 crops [N, S, S, 3] -> float32 views [N, S, S, 3] through the kernel (planar inside)."""
  planes = finish_planes(jnp.transpose(images, (0, 3, 1, 2)), params, recipe, interpret)
  return jnp.transpose(planes, (0, 2, 3, 1))


def augment_batch(images, keys, recipe, sharding=None):
  """`device_augment.augment_batch`, as the kernel when lowered for TPUs.

  `sharding`: the batch's NamedSharding inside a jitted step. A Pallas call is not partitioned by
  XLA, so on TPUs each device runs the kernel on its own rows (shard_map)."""
  params = jax.vmap(lambda k: device_augment.sample_params(k, recipe))(keys)

  def tpu(images, params):
    fn = lambda x, p: finish_batch(x, p, recipe)
    if sharding is None:
      return fn(images, params)
    rows = P(sharding.spec[0])
    return jax.shard_map(fn, mesh=sharding.mesh, in_specs=(rows, rows), out_specs=rows,
                         check_vma=False)(images, params)

  return jax.lax.platform_dependent(
      images, params, tpu=tpu,
      default=lambda images, params: device_augment.finish_batch(images, params, recipe))
