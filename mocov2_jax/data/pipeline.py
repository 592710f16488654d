"""tf.data input: this process's shard of a source (`sources.get`), views, batches, epochs.

Every process reads its own shard and builds its part of the global batch. The stream is a pure
function of (seed, step): epoch e reads the shard in an order seeded by (seed, e), and the views
of its i-th example are drawn from (seed, e, process, i). So a run resumed at step s reads exactly
what the run that never stopped read from step s on, whatever the number of tf.data threads.
"""
import numpy as np
import tensorflow as tf

from mocov2_jax import cli
from mocov2_jax.data import augment, sources
from mocov2_jax.data.bad_images import BadImages

try:
  tf.config.set_visible_devices([], 'GPU')   # tf.data must never take accelerator memory from JAX
except RuntimeError:   # TensorFlow was initialised before: leave it
  pass


def check_data(cfg):
  """Fail fast, with what to change, before any long work. Prepares tfds data only if asked."""
  if cfg.on_bad_image not in ('skip', 'error'):
    raise ValueError(f"data.on_bad_image={cfg.on_bad_image!r}: 'skip' (count and name them) or "
                     "'error' (stop at the first).")
  if cfg.augment.interpolation not in ('bilinear', 'bicubic'):
    raise ValueError(f"data.augment.interpolation must be 'bilinear' or 'bicubic', not "
                     f'{cfg.augment.interpolation!r}.')
  sources.get(cfg).check()


def num_examples(cfg, split) -> int:
  """Number of examples of `split`, over all processes."""
  return sources.get(cfg).num_examples(split)


def num_classes(cfg) -> int:
  """From the tfds info or the class folders of the train split (0: unlabelled data)."""
  return sources.get(cfg).num_classes()


def _options(ds):
  options = tf.data.Options()
  options.deterministic = True
  return ds.with_options(options)


def _order_seed(seed, epoch):
  return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0] >> 1)


def _read(ds, source, records_args, bad, on_bad, start, total=None):
  """NumPy batches of `ds` (with an 'index': the record's position) minus the index. Records
  missing from the batches were unreadable: skipped and added to `bad`, or ('error') the first
  one stops the run, named. `total`: the number of records (the end's missing ones count too)."""
  names = source.names(*records_args)
  name = lambda i: (names[i % len(names)] if names is not None and len(names)
                    else f'record {i} of {records_args[0]!r} (process {records_args[1]})')
  expected, it = start, ds.as_numpy_iterator()
  while True:
    try:
      batch = next(it)
    except StopIteration:
      break
    except tf.errors.OpError as e:
      raise cli.Stop(f'cannot read {_first_bad(source, records_args, expected, name)} '
                     f'({e.message.splitlines()[0]}): remove or re-encode it, or set '
                     "--config.data.on_bad_image=skip", cli.EXIT_BAD_INPUT) from None
    index = batch.pop('index')
    real = np.sort(index[index >= 0])
    if len(real):
      bad.add([name(i) for i in sorted(set(range(expected, real[-1] + 1)) - set(real))])
      expected = real[-1] + 1
    yield batch
  if total is not None and expected < total:
    bad.add([name(i) for i in range(expected, total)])


def _first_bad(source, records_args, start, name):
  """The first record from `start` on that does not decode (the error mode's message)."""
  ds = source.records(*records_args).skip(start)
  for i, ex in enumerate(ds, start):
    try:
      source.decode(ex['image'])
    except tf.errors.OpError:
      return name(i)
  return f'a record after {name(start)}'


def epoch_dataset(cfg, *, local_batch_size, steps, seed, epoch, skip_steps=0, process_index=0,
                  process_count=1, num_views=2, crops_only=False):
  """`steps` batches of one epoch, from its step `skip_steps` on: dict(view1, view2: float32
  [B, S, S, 3], label: int32 [B], index: int64 [B]); `num_views=1` gives dict(image, label,
  index) instead (the linear classifier's training input). `crops_only`: the views are the
  uint8 random-resized crops and the device does the rest of the recipe (`device_augment`).
  Unreadable records are dropped ('skip') and made up for from the shard's start, so every
  process yields `steps` batches whatever it met (no host waits on another)."""
  source = sources.get(cfg)
  args = (cfg.train_split, process_index, process_count, _order_seed(seed, epoch))
  ds = source.records(*args).repeat(2).enumerate().skip(skip_steps * local_batch_size)
  base_seed = tf.constant([seed, epoch * process_count + process_index], tf.int64)
  names = ('image',) if num_views == 1 else tuple(f'view{i + 1}' for i in range(num_views))

  def views(i, ex):
    example_seed = tf.random.experimental.stateless_fold_in(base_seed, i)
    seeds = tf.unstack(tf.random.experimental.stateless_split(example_seed, num_views))
    image = source.decode(ex['image'])   # once, for every view
    make = augment.crop_uint8 if crops_only else augment.view
    out = {name: make(image, s, cfg.augment, cfg.image_size) for name, s in zip(names, seeds)}
    return dict(out, label=ex['label'], index=i)

  ds = ds.map(views, num_parallel_calls=tf.data.AUTOTUNE)
  if cfg.on_bad_image == 'skip':
    ds = ds.ignore_errors()
  ds = ds.take((steps - skip_steps) * local_batch_size)
  ds = ds.batch(local_batch_size, drop_remainder=True)
  return _options(ds.prefetch(tf.data.AUTOTUNE)), source, args


def train_batches(cfg, *, local_batch_size, steps_per_epoch, seed, start_step=0,
                  process_index=0, process_count=1, num_views=2, crops_only=False, bad=None):
  """Process-local NumPy batches from global step `start_step` on, epoch after epoch.
  `bad`: a BadImages that counts the unreadable examples met."""
  bad = bad if bad is not None else BadImages()
  epoch, skip = divmod(start_step, steps_per_epoch)
  while True:
    ds, source, args = epoch_dataset(
        cfg, local_batch_size=local_batch_size, steps=steps_per_epoch, seed=seed, epoch=epoch,
        skip_steps=skip, process_index=process_index, process_count=process_count,
        num_views=num_views, crops_only=crops_only)
    yield from _read(ds, source, args, bad, cfg.on_bad_image, skip * local_batch_size)
    epoch, skip = epoch + 1, 0


def eval_batches(cfg, split, *, local_batch_size, process_index=0, process_count=1, bad=None):
  """One deterministic pass of NumPy dict(image: float32 [B, S, S, 3], label: int32 [B], mask:
  int32 [B]); padded (mask 0) so that every process yields the same number of full batches.
  Unreadable records are skipped (and counted in `bad`) or stop the run, as in training."""
  source = sources.get(cfg)
  args = (split, process_index, process_count, None)
  n = source.num_examples(split)
  per_process = -(-n // process_count)
  num_batches = -(-per_process // local_batch_size)
  size = cfg.image_size

  def prepare(i, ex):
    image = augment.eval_view(source.decode(ex['image']), cfg.augment, size, cfg.eval_crop_frac)
    return dict(image=image, label=ex['label'], mask=tf.constant(1, tf.int32), index=i)

  pad = dict(image=tf.zeros([size, size, 3]), label=tf.constant(-1, tf.int32),
             mask=tf.constant(0, tf.int32), index=tf.constant(-1, tf.int64))
  ds = source.records(*args).enumerate().map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
  if cfg.on_bad_image == 'skip':
    ds = ds.ignore_errors()
  ds = ds.concatenate(tf.data.Dataset.from_tensors(pad).repeat())
  ds = ds.take(num_batches * local_batch_size).batch(local_batch_size)
  ds = _options(ds.prefetch(tf.data.AUTOTUNE))
  shard = len(range(process_index, n, process_count))
  return _read(ds, source, args, bad if bad is not None else BadImages(), cfg.on_bad_image, 0,
               total=shard)
