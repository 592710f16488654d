"""tf.data input: a source (synthetic / tfds / image folder), this process's shard, two views.

Every process reads its own shard and builds its part of the global batch. Randomness is stateless:
the views of the i-th example of a process's stream depend only on (seed, process_index, i), so a
stream is reproducible whatever the number of tf.data threads.
"""
import functools
import os

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from mocov2_jax.data import augment, synthetic

try:
  tf.config.set_visible_devices([], 'GPU')   # tf.data must never take accelerator memory from JAX
except RuntimeError:   # TensorFlow was initialised before: leave it
  pass

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif')
NUM_DECODE_CHECKS = 16


# ---- sources ----
def _decode(data):
  image = tf.io.decode_image(data, channels=3, expand_animations=False)
  image.set_shape([None, None, 3])
  return image


@functools.lru_cache(maxsize=4)
def _synthetic(num, seed):
  return synthetic.make_shapes(num, seed=seed)


def _synthetic_split(cfg, split):
  if split == cfg.train_split:
    return _synthetic(cfg.num_train, cfg.synthetic_seed)
  if split == cfg.eval_split:
    return _synthetic(cfg.num_eval, cfg.synthetic_seed + 1)
  raise ValueError(f'Synthetic data has splits {cfg.train_split!r} and {cfg.eval_split!r}, '
                   f'not {split!r}.')


def _folder_dir(cfg, split):
  """`root/<split>`; a root with no split sub-folders is the train split itself."""
  path = os.path.join(cfg.folder, split)
  if os.path.isdir(path):
    return path
  has_splits = any(os.path.isdir(os.path.join(cfg.folder, s))
                   for s in (cfg.train_split, cfg.eval_split))
  if split == cfg.train_split and os.path.isdir(cfg.folder) and not has_splits:
    return cfg.folder
  raise ValueError(f'No folder {path!r} for split {split!r}: data.folder must hold '
                   f'<split>/<class>/<image> (or <split>/<image> for unlabelled images).')


def _subfolders(directory):
  return sorted(e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith('.'))


def _class_names(cfg):
  """The train split's class folders, sorted: label ids for every split, as torchvision's."""
  return tuple(_subfolders(_folder_dir(cfg, cfg.train_split)))


def _folder_images(cfg, split):
  return _list_images(_folder_dir(cfg, split), _class_names(cfg))


@functools.lru_cache(maxsize=8)
def _list_images(directory, class_names):
  """(files, labels) of `directory`'s class sub-folders; a flat folder is unlabelled (-1)."""
  is_image = lambda name: name.lower().endswith(IMAGE_EXTENSIONS)
  classes = _subfolders(directory)
  if not classes:
    files = sorted(os.path.join(directory, e) for e in os.listdir(directory) if is_image(e))
    return files, np.full(len(files), -1, np.int32)
  unknown = sorted(set(classes) - set(class_names))
  if unknown:
    raise ValueError(f'{directory!r} has classes the train split lacks: {unknown[:5]}; every '
                     'split must use the train split\'s class folders.')
  files, labels = [], []
  for name in classes:
    label = class_names.index(name)
    for root, dirs, names in os.walk(os.path.join(directory, name)):
      dirs.sort()
      found = [os.path.join(root, n) for n in sorted(names) if is_image(n)]
      files += found
      labels += [label] * len(found)
  return files, np.array(labels, np.int32)


def _tfds_builder(cfg):
  try:
    return tfds.builder(cfg.name, data_dir=cfg.data_dir or None)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(f'Unknown TFDS dataset data.name={cfg.name!r}.') from e


def _source(cfg, split, process_index, process_count, shuffle_seed=None):
  """This process's shard, one epoch of {'image': raw, 'label': int32}; its decode fn; its size."""
  shard = slice(process_index, None, process_count)
  if cfg.source == 'synthetic':
    images, labels = _synthetic_split(cfg, split)
    ds = tf.data.Dataset.from_tensor_slices(dict(image=images[shard], label=labels[shard]))
    return ds, lambda image: image, len(labels[shard])
  if cfg.source == 'folder':
    files, labels = _folder_images(cfg, split)
    ds = tf.data.Dataset.from_tensor_slices(dict(image=files[shard], label=labels[shard]))
    return ds, lambda path: _decode(tf.io.read_file(path)), len(labels[shard])
  if cfg.source == 'tfds':
    if process_count > 1:
      split = tfds.even_splits(split, process_count)[process_index]
    ds = _tfds_builder(cfg).as_dataset(
        split=split, shuffle_files=shuffle_seed is not None,
        decoders={'image': tfds.decode.SkipDecoding()},   # decode after the shuffle buffer
        read_config=tfds.ReadConfig(shuffle_seed=shuffle_seed, skip_prefetch=True))
    ds = ds.map(lambda ex: dict(image=ex['image'], label=tf.cast(ex.get('label', -1), tf.int32)))
    return ds, _decode, cfg.shuffle_buffer
  raise ValueError(f"Unknown data.source={cfg.source!r}: use 'synthetic', 'tfds' or 'folder'.")


def _options(ds):
  options = tf.data.Options()
  options.deterministic = True
  return ds.with_options(options)


# ---- public API ----
def check_data(cfg):
  """Fail fast, with what to change, before any long work. Prepares tfds data only if asked."""
  if cfg.source not in ('synthetic', 'tfds', 'folder'):
    raise ValueError(f"Unknown data.source={cfg.source!r}: use 'synthetic', 'tfds' or 'folder'.")
  if cfg.augment.interpolation not in ('bilinear', 'bicubic'):
    raise ValueError(f"data.augment.interpolation must be 'bilinear' or 'bicubic', not "
                     f'{cfg.augment.interpolation!r}.')
  if cfg.source == 'synthetic':
    if cfg.num_train <= 0 or cfg.num_eval <= 0:
      raise ValueError('Synthetic data needs data.num_train > 0 and data.num_eval > 0.')
  elif cfg.source == 'tfds':
    builder = _tfds_builder(cfg)
    if not builder.is_prepared():
      if not cfg.manual_dir:
        raise ValueError(
            f'TFDS dataset {cfg.name!r} is not prepared in data.data_dir={cfg.data_dir!r}. Either '
            f'prepare it once (`tfds build {cfg.name} --data_dir=DIR`, needs internet for most '
            'datasets; for imagenet2012 put the ILSVRC2012 tar files in a folder and set '
            'data.manual_dir=FOLDER to have it prepared here), or point data.data_dir at a '
            "prepared copy, or use data.source='folder' with data.folder=ROOT "
            '(ROOT/<split>/<class>/*.jpg).')
      builder.download_and_prepare(
          download_config=tfds.download.DownloadConfig(manual_dir=cfg.manual_dir))
    for split in (cfg.train_split, cfg.eval_split):
      try:
        builder.info.splits[split].num_examples
      except (KeyError, ValueError) as e:
        raise ValueError(f'TFDS dataset {cfg.name!r} has no split {split!r}; it has '
                         f'{list(builder.info.splits)}.') from e
  else:
    if not cfg.folder or not os.path.isdir(cfg.folder):
      raise ValueError(f'data.folder={cfg.folder!r} is not a directory.')
    for split in (cfg.train_split, cfg.eval_split):
      directory = _folder_dir(cfg, split)
      files, _ = _folder_images(cfg, split)
      if not files:
        raise ValueError(f'No images ({", ".join(IMAGE_EXTENSIONS)}) in {directory!r} or its '
                         'class sub-folders.')
      for i in np.unique(np.linspace(0, len(files) - 1, NUM_DECODE_CHECKS).astype(int)):
        try:
          _decode(tf.io.read_file(files[i]))
        except tf.errors.OpError as e:
          raise ValueError(f'Cannot decode image {files[i]!r} ({e.message}); remove or '
                           're-encode it.') from e


def num_examples(cfg, split):
  """Number of examples of `split`, over all processes."""
  if cfg.source == 'synthetic':
    return len(_synthetic_split(cfg, split)[1])
  if cfg.source == 'tfds':
    return _tfds_builder(cfg).info.splits[split].num_examples
  if cfg.source == 'folder':
    return len(_folder_images(cfg, split)[0])
  raise ValueError(f'Unknown data.source={cfg.source!r}.')


def pretrain_dataset(cfg, *, local_batch_size, seed, process_index=0, process_count=1,
                     num_views=2):
  """Infinite, shuffled batches of dict(view1, view2: float32 [B, S, S, 3], label: int32 [B]).

  `num_views=1` gives dict(image, label) instead: the linear classifier's training input.
  """
  shuffle_seed = (seed * 1_000_003 + process_index) % 2**31
  ds, decode, buffer = _source(cfg, cfg.train_split, process_index, process_count, shuffle_seed)
  ds = ds.shuffle(buffer, seed=shuffle_seed, reshuffle_each_iteration=True).repeat().enumerate()
  base_seed = tf.constant([seed, process_index], tf.int64)
  names = ('image',) if num_views == 1 else tuple(f'view{i + 1}' for i in range(num_views))

  def views(i, ex):
    example_seed = tf.random.experimental.stateless_fold_in(base_seed, i)
    seeds = tf.unstack(tf.random.experimental.stateless_split(example_seed, num_views))
    image = decode(ex['image'])
    out = {name: augment.view(image, s, cfg.augment, cfg.image_size)
           for name, s in zip(names, seeds)}
    return dict(out, label=ex['label'])

  ds = ds.map(views, num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(local_batch_size, drop_remainder=True)
  return _options(ds.prefetch(tf.data.AUTOTUNE))


def num_classes(cfg) -> int:
  """From the tfds info or the class folders of the train split (0: unlabelled data)."""
  if cfg.source == 'tfds':
    features = _tfds_builder(cfg).info.features
    return int(features['label'].num_classes) if 'label' in features.keys() else 0
  if cfg.source == 'synthetic':
    return len(synthetic.CLASSES)
  return len(_class_names(cfg))


def eval_dataset(cfg, split, *, local_batch_size, process_index=0, process_count=1):
  """One deterministic pass of dict(image: float32 [B, S, S, 3], label: int32 [B], mask: int32
  [B]); padded (mask 0) so that every process yields the same number of full batches."""
  ds, decode, _ = _source(cfg, split, process_index, process_count)
  per_process = -(-num_examples(cfg, split) // process_count)
  num_batches = -(-per_process // local_batch_size)
  size = cfg.image_size

  def prepare(ex):
    image = augment.eval_view(decode(ex['image']), cfg.augment, size, cfg.eval_crop_frac)
    return dict(image=image, label=ex['label'], mask=tf.constant(1, tf.int32))

  pad = dict(image=tf.zeros([size, size, 3]), label=tf.constant(-1, tf.int32),
             mask=tf.constant(0, tf.int32))
  ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.concatenate(tf.data.Dataset.from_tensors(pad).repeat())
  ds = ds.take(num_batches * local_batch_size).batch(local_batch_size)
  return _options(ds.prefetch(tf.data.AUTOTUNE))
