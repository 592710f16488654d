"""tf.data input: this process's shard of a source (`sources.get`), views, batches, epochs.

Every process reads its own shard and builds its part of the global batch. The stream is a pure
function of (seed, step): epoch e reads the shard in an order seeded by (seed, e), and the views
of its i-th example are drawn from (seed, e, process, i). So a run resumed at step s reads exactly
what the run that never stopped read from step s on, whatever the number of tf.data threads.
"""
import numpy as np
import tensorflow as tf

from mocov2_jax.data import augment, sources

try:
  tf.config.set_visible_devices([], 'GPU')   # tf.data must never take accelerator memory from JAX
except RuntimeError:   # TensorFlow was initialised before: leave it
  pass


def check_data(cfg):
  """Fail fast, with what to change, before any long work. Prepares tfds data only if asked."""
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


def epoch_dataset(cfg, *, local_batch_size, steps, seed, epoch, skip_steps=0, process_index=0,
                  process_count=1, num_views=2, crops_only=False):
  """`steps` batches of one epoch, from its step `skip_steps` on: dict(view1, view2: float32
  [B, S, S, 3], label: int32 [B]); `num_views=1` gives dict(image, label) instead (the linear
  classifier's training input). `crops_only`: the views are the uint8 random-resized crops and
  the device does the rest of the recipe (`device_augment`)."""
  source = sources.get(cfg)
  order_seed = int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0] >> 1)
  ds = source.records(cfg.train_split, process_index, process_count, seed=order_seed)
  ds = ds.take(steps * local_batch_size).enumerate().skip(skip_steps * local_batch_size)
  base_seed = tf.constant([seed, epoch * process_count + process_index], tf.int64)
  names = ('image',) if num_views == 1 else tuple(f'view{i + 1}' for i in range(num_views))

  def views(i, ex):
    example_seed = tf.random.experimental.stateless_fold_in(base_seed, i)
    seeds = tf.unstack(tf.random.experimental.stateless_split(example_seed, num_views))
    image = source.decode(ex['image'])   # once, for every view
    make = augment.crop_uint8 if crops_only else augment.view
    out = {name: make(image, s, cfg.augment, cfg.image_size) for name, s in zip(names, seeds)}
    return dict(out, label=ex['label'])

  ds = ds.map(views, num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(local_batch_size, drop_remainder=True)
  return _options(ds.prefetch(tf.data.AUTOTUNE))


def train_batches(cfg, *, local_batch_size, steps_per_epoch, seed, start_step=0,
                  process_index=0, process_count=1, num_views=2, crops_only=False):
  """Process-local NumPy batches from global step `start_step` on, epoch after epoch."""
  epoch, skip = divmod(start_step, steps_per_epoch)
  while True:
    yield from epoch_dataset(
        cfg, local_batch_size=local_batch_size, steps=steps_per_epoch, seed=seed, epoch=epoch,
        skip_steps=skip, process_index=process_index, process_count=process_count,
        num_views=num_views, crops_only=crops_only).as_numpy_iterator()
    epoch, skip = epoch + 1, 0


def eval_dataset(cfg, split, *, local_batch_size, process_index=0, process_count=1):
  """One deterministic pass of dict(image: float32 [B, S, S, 3], label: int32 [B], mask: int32
  [B]); padded (mask 0) so that every process yields the same number of full batches."""
  source = sources.get(cfg)
  ds = source.records(split, process_index, process_count)
  per_process = -(-source.num_examples(split) // process_count)
  num_batches = -(-per_process // local_batch_size)
  size = cfg.image_size

  def prepare(ex):
    image = augment.eval_view(source.decode(ex['image']), cfg.augment, size, cfg.eval_crop_frac)
    return dict(image=image, label=ex['label'], mask=tf.constant(1, tf.int32))

  pad = dict(image=tf.zeros([size, size, 3]), label=tf.constant(-1, tf.int32),
             mask=tf.constant(0, tf.int32))
  ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.concatenate(tf.data.Dataset.from_tensors(pad).repeat())
  ds = ds.take(num_batches * local_batch_size).batch(local_batch_size)
  return _options(ds.prefetch(tf.data.AUTOTUNE))
