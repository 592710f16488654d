"""tf.data input: this process's part of each global batch of a source (`sources.get`), views,
batches, epochs.

The stream is a pure function of (seed, step). With image folders and synthetic data (random
access), epoch e is one permutation of the split seeded by (seed, e), process p builds its rows of
each global batch from it, and the views of the example at position g of the epoch are drawn from
(seed, e, g): the global batch is the same on any number of processes and devices. With tfds
(a stream), each process reads its own shard in an order seeded by (seed, e). Either way a run
resumed at step s reads exactly what the run that never stopped read from step s on, whatever the
number of tf.data threads (and, with random access, whatever the number of processes).
"""
import jax
import numpy as np
import tensorflow as tf
from absl import logging

from mocov2_jax import errors
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


def _inline(ds):
  """A dataset run inside another's map function: no threads, buffers or tuning of its own."""
  options = tf.data.Options()
  options.autotune.enabled = False
  options.experimental_optimization.apply_default_optimizations = False
  options.experimental_optimization.inject_prefetch = False
  options.threading.private_threadpool_size = 1
  return ds.with_options(options)


def _order_seed(seed, epoch):
  return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0] >> 1)


MAX_TRIES = 8   # records tried for one position of an epoch before a blank example fills it


def global_position(i, local_batch_size, process_index, process_count):
  """The position in the epoch of a process's i-th example (NumPy or TensorFlow integers).

  Of each global batch of P x L examples, process p builds the rows [p L, (p + 1) L): the rows its
  devices hold, since the mesh lists the devices process by process. So P processes of D devices
  feed the same global batch, row for row, as one process of P x D devices (or one device)."""
  lb = local_batch_size
  return (i // lb) * (lb * process_count) + process_index * lb + i % lb


def _read(ds, bad, first_bad, name, start, total=None, holes=True):
  """NumPy batches of `ds` minus 'index' (the stream's position of each example), with the
  unreadable records they met added to `bad`: the positions missing from the batches, `name(i)`
  (`holes=False`: the batches are given on with their 'index', for `_filled`). In 'error' mode
  the first unreadable record stops the run, named by `first_bad(i)` (the first one from the
  stream's i-th record on). `total`: the stream's length (its missing last positions count too).
  """
  expected, it = start, ds.as_numpy_iterator()
  while True:
    try:
      batch = next(it)
    except StopIteration:
      break
    except tf.errors.OpError as e:
      raise errors.BadInput(
          f'cannot read {first_bad(expected)} ({e.message.splitlines()[0]}): remove or '
          're-encode it, or set --config.data.on_bad_image=skip') from None
    if not holes:
      yield batch
      continue
    index = batch.pop('index')
    real = np.sort(index[index >= 0])
    if len(real):
      bad.add([name(i) for i in sorted(set(range(expected, real[-1] + 1)) - set(real))])
      expected = real[-1] + 1
    yield batch
  if total is not None and expected < total:
    bad.add([name(i) for i in range(expected, total)])


def _filled(batches, bad, name, replacement, size, start, stop):
  """Batches of `size` examples for the positions [start, stop) from `batches` (the readable
  ones, in order, as `_read` gives them: the 'index' of each row kept), each missing position
  filled with `replacement(i)` and its unreadable records added to `bad`."""
  rows, done = None, False
  for t in range(start, stop, size):
    while not done and (rows is None or not len(rows['index']) or
                        rows['index'][-1] < t + size - 1):
      batch = next(batches, None)
      if batch is None:
        done = True
      elif rows is None:
        rows = batch
      else:
        rows = {k: np.concatenate([rows[k], batch[k]]) for k in rows}
    have = rows['index'] if rows is not None else np.zeros([0], np.int64)
    take = (have >= t) & (have < t + size)
    if take.sum() == size:
      out = {k: v[take] for k, v in rows.items()}
    else:   # unreadable records: their positions get replacements
      parts = {int(i): {k: v[j] for k, v in rows.items()} for j, i in enumerate(have) if take[j]}
      for i in range(t, t + size):
        if i not in parts:
          new = {k: v.numpy() for k, v in replacement(tf.constant(i, tf.int64)).items()}
          tries, candidates = int(new.pop('tries')), new.pop('candidates')
          bad.add([name(int(r)) for r in candidates[:tries]])
          parts[i] = new
      out = {k: np.stack([parts[i][k] for i in range(t, t + size)]) for k in parts[t]}
    if rows is not None:
      rows = {k: v[have >= t + size] for k, v in rows.items()}
    out.pop('index')
    yield out


def _first_bad(records, decode, start, name):
  """The first record of `records` (a dataset of (position, record)) that does not decode."""
  for i, ex in records:
    try:
      decode(ex['image'])
    except tf.errors.OpError:
      return name(i)
  return f'a record after {name(start)}'


def _map(ds, fn):
  """ds.map without autograph: our functions branch with tf.cond and on Python values only, and
  converting them again for each epoch's dataset cost about 2 s of a CPU core."""
  return ds.map(tf.autograph.experimental.do_not_convert(fn), num_parallel_calls=tf.data.AUTOTUNE)


def _views_fn(cfg, source, num_views, crops_only):
  """views(base_seed, position, record): the example's views, drawn from (seed, epoch, position)
  only; one tf.function for every epoch of the run."""
  names = ('image',) if num_views == 1 else tuple(f'view{i + 1}' for i in range(num_views))

  @tf.function(autograph=False)
  def views(base_seed, g, ex):
    example_seed = tf.random.experimental.stateless_fold_in(base_seed, g)
    seeds = tf.unstack(tf.random.experimental.stateless_split(example_seed, num_views))
    image = source.decode(ex['image'])   # once, for every view
    make = augment.crop_uint8 if crops_only else augment.view
    out = {name: make(image, s, cfg.augment, cfg.image_size) for name, s in zip(names, seeds)}
    return dict(out, label=ex['label'])
  return views


def epoch_dataset(cfg, *, local_batch_size, steps, seed, epoch, skip_steps=0, process_index=0,
                  process_count=1, num_views=2, crops_only=False, views=None):
  """`steps` batches of this process's part of one epoch, from its step `skip_steps` on:
  dict(view1, view2: float32 [B, S, S, 3], label: int32 [B]) plus bookkeeping for `_read`;
  `num_views=1` gives dict(image, label) instead (the linear classifier's training input).
  `crops_only`: the views are the uint8 random-resized crops and the device does the rest of the
  recipe (`device_augment`). Returns (dataset, first_bad, name, fill): `_read`'s arguments and
  None, or `_filled`'s (the dataset then holds the readable examples only, in batches of up to
  `local_batch_size`, and `_filled` puts the replacements of unreadable ones in their places).
  `views`: `_views_fn`'s function, to share one across epochs.

  Sources with random access (image folders, synthetic data): the epoch is one permutation of
  the split seeded by (seed, epoch); its global batch t is positions [t P L, (t + 1) P L), of
  which process p builds its slice (`global_position`), and the views of position g are drawn
  from (seed, epoch, g): the global batch, its examples, their order and their views do not depend
  on the number of processes or devices. An unreadable record ('skip') is replaced by records
  drawn from (seed, epoch, g) until one reads (`MAX_TRIES`, then a blank example), so the
  replacement does not depend on the process count either (readable records take tf.data's
  parallel path; only the rare replacement runs on its own).

  Streaming sources (tfds): each process reads its own shard (`tfds.even_splits`) through its
  own shuffle buffer, so the global batch depends on the process count. Unreadable records are
  dropped and made up for from the shard's start.

  Every process yields `steps - skip_steps` batches whatever it met (no host waits on another).
  """
  source = sources.get(cfg)
  lb, split = local_batch_size, cfg.train_split
  base_seed = tf.constant([seed, epoch], tf.int64)
  views_of = views or _views_fn(cfg, source, num_views, crops_only)
  views = lambda g, ex: views_of(base_seed, g, ex)
  position = lambda i: global_position(i, lb, process_index, process_count)
  local = tf.data.Dataset.range(skip_steps * lb, steps * lb)   # this process's examples
  if source.random_access:
    images, labels = source.table(split)
    order = source.order(split, _order_seed(seed, epoch))
    images_t, labels_t, order_t = (tf.constant(x) for x in (images, labels, order))
    record = lambda r: dict(image=tf.gather(images_t, r), label=tf.gather(labels_t, r))
    name = lambda r: source.record_names(split, [r])[0]

    def first_bad(i):
      ids = (int(order[position(j)]) for j in range(i, steps * lb))
      return _first_bad(((r, record(r)) for r in ids), source.decode, int(order[position(i)]),
                        name)

    ds = _map(local, lambda i: dict(views(position(i), record(order_t[position(i)])), index=i))
    if source.can_fail and cfg.on_bad_image == 'skip':
      other_seed = tf.random.experimental.stateless_fold_in(base_seed, -1)   # no position's

      @tf.function(autograph=False)
      def replacement(i):
        """Position i's example when its record is unreadable: records drawn from (seed, epoch,
        position) are tried in turn, then a blank example fills it (`_read` names them)."""
        g = position(i)
        others = tf.random.stateless_uniform(
            [MAX_TRIES - 1], tf.random.experimental.stateless_fold_in(other_seed, g),
            minval=0, maxval=len(labels), dtype=tf.int64)
        candidates = tf.concat([order_t[g][None], others], 0)
        tried = _map(tf.data.Dataset.range(MAX_TRIES),
                     lambda k: dict(views(g, record(candidates[k])), tries=k)).ignore_errors()
        blank = {n: tf.zeros(s.shape, s.dtype) for n, s in
                 tried.element_spec.items() if n != 'tries'}
        blank = tf.data.Dataset.from_tensors(dict(blank, label=tf.constant(-1, tf.int32),
                                                  tries=tf.constant(MAX_TRIES, tf.int64)))
        out = _inline(tried.concatenate(blank).take(1)).get_single_element()
        return dict(out, index=i, candidates=candidates)
      # The readable records take the fast path; `_read` fills the positions of unreadable ones.
      ds = _options(ds.ignore_errors().batch(lb).prefetch(tf.data.AUTOTUNE))
      fill = (replacement, lb, skip_steps * lb, steps * lb)
      return ds, first_bad, name, fill
  else:
    shard = source.records(split, process_index, process_count, _order_seed(seed, epoch))
    known = source.names(split, process_index, process_count, _order_seed(seed, epoch))
    name = lambda i: (known[i % len(known)] if known is not None and len(known) else
                      f'record {i} of {split!r} (process {process_index})')
    first_bad = lambda i: _first_bad(shard.repeat(2).enumerate().skip(i), source.decode, i, name)
    ds = shard.repeat(2).enumerate().skip(skip_steps * lb)
    ds = _map(ds, lambda i, ex: dict(views(position(i), ex), index=i))
    if cfg.on_bad_image == 'skip':
      ds = ds.ignore_errors()
    ds = ds.take((steps - skip_steps) * lb)
  ds = ds.batch(lb, drop_remainder=True)
  return _options(ds.prefetch(tf.data.AUTOTUNE)), first_bad, name, None


def train_batches(cfg, *, local_batch_size, steps_per_epoch, seed, start_step=0,
                  process_index=0, process_count=1, num_views=2, crops_only=False, bad=None):
  """Process-local NumPy batches from global step `start_step` on, epoch after epoch: each
  process's part of one global batch (`epoch_dataset`). `bad`: a BadImages that counts the
  unreadable examples met."""
  bad = bad if bad is not None else BadImages()
  if process_count > 1 and not sources.get(cfg).random_access:
    logging.warning(
        "data.source=%r: each of the %d processes reads its own shard through its own shuffle "
        'buffer, so the global batch depends on the number of processes (with image folders and '
        'synthetic data it does not).', cfg.source, process_count)
  epoch, skip = divmod(start_step, steps_per_epoch)
  views = _views_fn(cfg, sources.get(cfg), num_views, crops_only)
  while True:
    ds, first_bad, name, fill = epoch_dataset(
        cfg, local_batch_size=local_batch_size, steps=steps_per_epoch, seed=seed, epoch=epoch,
        skip_steps=skip, process_index=process_index, process_count=process_count,
        num_views=num_views, crops_only=crops_only, views=views)
    batches = _read(ds, bad, first_bad, name, skip * local_batch_size, holes=fill is None)
    yield from (batches if fill is None else _filled(batches, bad, name, *fill))
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
  ds = _map(source.records(*args).enumerate(), prepare)
  if cfg.on_bad_image == 'skip':
    ds = ds.ignore_errors()
  ds = ds.concatenate(tf.data.Dataset.from_tensors(pad).repeat())
  ds = ds.take(num_batches * local_batch_size).batch(local_batch_size)
  ds = _options(ds.prefetch(tf.data.AUTOTUNE))
  known = source.names(*args)
  name = lambda i: (known[i] if known is not None and len(known) else
                    f'record {i} of {split!r} (process {process_index})')
  first_bad = lambda i: _first_bad(source.records(*args).enumerate().skip(i), source.decode, i,
                                   name)
  shard = len(range(process_index, n, process_count))
  return _read(ds, bad if bad is not None else BadImages(), first_bad, name, 0, total=shard)


class Input:
  """A program's data, built by its main and handed to its experiment, which sees only this
  object (the experiment modules do not import the pipeline): the start-up checks, the sizes,
  and this process's part of every global batch of `batch_size`, in one layout: dict(view1,
  view2) or dict(image), label (+ mask in eval). `bad` counts the unreadable images met, over
  every pass."""

  def __init__(self, cfg, batch_size: int, seed: int = 0):
    self.cfg, self.batch_size, self.seed, self.bad = cfg, batch_size, seed, BadImages()

  def check(self):
    check_data(self.cfg)

  def num_examples(self, split) -> int:
    return num_examples(self.cfg, split)

  def num_classes(self) -> int:
    return num_classes(self.cfg)

  def train(self, steps_per_epoch, start_step, *, block=None, num_views=2, crops_only=False):
    """`train_batches` from `start_step` on; `block`: the rows of each global batch this
    process builds (default: its process index)."""
    return train_batches(
        self.cfg, local_batch_size=self.batch_size // jax.process_count(),
        steps_per_epoch=steps_per_epoch, seed=self.seed, start_step=start_step,
        process_index=jax.process_index() if block is None else block,
        process_count=jax.process_count(), num_views=num_views, crops_only=crops_only,
        bad=self.bad)

  def eval(self, split):
    """`eval_batches` of `split`: every example once, centre views, padded (mask 0)."""
    return eval_batches(self.cfg, split, local_batch_size=self.batch_size // jax.process_count(),
                        process_index=jax.process_index(), process_count=jax.process_count(),
                        bad=self.bad)
