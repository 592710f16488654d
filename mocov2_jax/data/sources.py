"""Where examples come from: one DataSource class per kind, behind `get(cfg)`.

A source knows its splits, sizes and labels, checks itself before any long work, and gives one
process's shard of a split as records {'image': encoded bytes, a path or uint8 pixels, 'label':
int32} in an order fixed by a seed (None: the split's own order), the function that decodes
'image' to uint8 [H, W, 3], and the records' names (for messages about an unreadable one).
Sources with random access (`random_access`: image folders, synthetic data) also give the whole
split as arrays (`table`) and one global order of it (`order`), from which every process picks
its own examples of each global batch (the pipeline's `epoch_dataset`). Everything else (views,
batches, epochs) is the pipeline's.
"""
import functools
import os

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging
from etils import epath

from mocov2_jax import errors
from mocov2_jax.data import synthetic

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif')
NUM_DECODE_CHECKS = 16   # files of each split decoded by `check`


def decode(data):
  """Any JPEG / PNG / BMP / GIF (grayscale, RGBA, CMYK, 16-bit) as uint8 RGB [H, W, 3]."""
  image = tf.io.decode_image(data, channels=3, expand_animations=False, dtype=tf.uint8)
  image.set_shape([None, None, 3])
  return image


class DataSource:
  """The interface; subclasses fill it for one kind of data."""

  random_access = False   # True: `table` and `order` (any process reads any record)
  can_fail = True         # False: no record can be unreadable (pixels held in memory)

  def __init__(self, cfg):
    self.cfg = cfg

  def check(self):
    """Fails, with what to change, before any long work."""

  def num_examples(self, split) -> int:
    raise NotImplementedError

  def num_classes(self) -> int:
    """0 for unlabelled data."""
    raise NotImplementedError

  def records(self, split, process_index=0, process_count=1, seed=None) -> tf.data.Dataset:
    raise NotImplementedError

  def decode(self, image):
    return decode(image)

  def names(self, split, process_index=0, process_count=1, seed=None):
    """What record i of `records(...)` is, for messages about an unreadable one (None: not
    known before reading, e.g. behind a shuffle buffer)."""
    return None



class _Indexed(DataSource):
  """Sources held as arrays in memory (files or pixels): any order is a NumPy permutation."""

  random_access = True

  def _arrays(self, split):
    """(images or paths, int32 labels) of the whole split."""
    raise NotImplementedError

  def num_examples(self, split):
    return len(self._arrays(split)[1])

  def table(self, split):
    """(images or paths, int32 labels) of the whole split as NumPy arrays, record i at row i."""
    images, labels = self._arrays(split)
    return np.asarray(images), np.asarray(labels)

  def order(self, split, seed=None):
    """The record ids of the whole split in an order fixed by `seed` (None: the split's own)."""
    order = np.arange(self.num_examples(split))
    if seed is not None:
      order = np.random.default_rng(seed).permutation(order)
    return order

  def _order(self, split, process_index, process_count, seed):
    return self.order(split, seed)[process_index::process_count]

  def records(self, split, process_index=0, process_count=1, seed=None):
    images, labels = self._arrays(split)
    order = self._order(split, process_index, process_count, seed)
    return tf.data.Dataset.from_tensor_slices(dict(image=np.asarray(images)[order],
                                                   label=labels[order]))

  def names(self, split, process_index=0, process_count=1, seed=None):
    return self._names(self._arrays(split)[0],
                       self._order(split, process_index, process_count, seed))

  def record_names(self, split, ids):
    """The names of records `ids` (ids into `table`)."""
    return self._names(self._arrays(split)[0], np.asarray(ids))

  def _names(self, images, order):
    return np.asarray(images)[order]   # file paths


class Synthetic(_Indexed):
  """The offline demo's generated shapes (`synthetic.make_shapes`), held in memory."""

  can_fail = False

  def check(self):
    if self.cfg.num_train <= 0 or self.cfg.num_eval <= 0:
      raise ValueError('Synthetic data needs data.num_train > 0 and data.num_eval > 0.')

  def _arrays(self, split):
    if split not in (self.cfg.train_split, self.cfg.eval_split):
      raise ValueError(f'Synthetic data has splits {self.cfg.train_split!r} and '
                       f'{self.cfg.eval_split!r}, not {split!r}.')
    train = split == self.cfg.train_split
    return _shapes(self.cfg.num_train if train else self.cfg.num_eval,
                   self.cfg.synthetic_seed + (0 if train else 1))

  def num_classes(self):
    return len(synthetic.CLASSES)

  def decode(self, image):
    return image

  def _names(self, images, order):
    return np.char.add('generated example ', order.astype(str))


@functools.lru_cache(maxsize=4)
def _shapes(num, seed):
  return synthetic.make_shapes(num, seed=seed)


class ImageFolder(_Indexed):
  """ROOT/<split>/<class>/<image> (labels: the train split's sorted class folders, as
  torchvision's ImageFolder), or ROOT/<split>/<image> / a flat ROOT for unlabelled images."""

  def check(self):
    cfg = self.cfg
    if not cfg.folder or not epath.Path(cfg.folder).is_dir():
      raise ValueError(f'data.folder={cfg.folder!r} is not a directory.')
    for split in (cfg.train_split, cfg.eval_split):
      files = self._arrays(split)[0]
      if not files:
        raise ValueError(f'No images ({", ".join(IMAGE_EXTENSIONS)}) in '
                         f'{str(self._dir(split))!r} or its class sub-folders.')
      self._check_decodes(files)

  def _check_decodes(self, files):
    """Decodes a sample of the files: an unreadable one obeys data.on_bad_image like any other
    (the stream skips and counts it, or stops); a sample that reads nowhere is a wrong folder."""
    sample = [files[i] for i in np.unique(np.linspace(0, len(files) - 1, NUM_DECODE_CHECKS)
                                          .astype(int))]
    unreadable = []
    for f in sample:
      try:
        decode(tf.io.read_file(f))
      except tf.errors.OpError as e:
        message = f'Cannot decode image {f!r} ({e.message.splitlines()[0]})'
        if self.cfg.on_bad_image == 'error':
          raise errors.BadInput(f'{message}; remove or re-encode it, or set '
                                '--config.data.on_bad_image=skip.') from e
        logging.warning('%s: it will be skipped and counted (data.on_bad_image=skip).', message)
        unreadable.append(f)
    if len(unreadable) == len(sample):
      raise errors.BadInput(f'None of {len(sample)} sampled files of {self.cfg.folder!r} decodes '
                            f'(e.g. {unreadable[0]!r}): is data.folder the image folder?')

  def _dir(self, split) -> epath.Path:
    """ROOT/<split>; a ROOT with no split sub-folders is the train split itself."""
    root = epath.Path(self.cfg.folder)
    if (root / split).is_dir():
      return root / split
    has_splits = any((root / s).is_dir() for s in (self.cfg.train_split, self.cfg.eval_split))
    if split == self.cfg.train_split and root.is_dir() and not has_splits:
      return root
    raise ValueError(f'No folder {str(root / split)!r} for split {split!r}: data.folder must '
                     'hold <split>/<class>/<image> (or <split>/<image> for unlabelled images).')

  def class_names(self):
    return tuple(_subfolders(self._dir(self.cfg.train_split)))

  def _arrays(self, split):
    return _list_images(str(self._dir(split)), self.class_names())

  def num_classes(self):
    return len(self.class_names())

  def decode(self, image):
    return decode(tf.io.read_file(image))   # records hold the file's path


def _subfolders(directory):
  return sorted(p.name for p in epath.Path(directory).iterdir()
                if p.is_dir() and not p.name.startswith('.'))


def _is_image_name(name):
  """The one rule for what is an image: its name's extension. Other files are not read; a file
  named like an image that does not decode is an unreadable image (`data.on_bad_image`)."""
  return name.lower().endswith(IMAGE_EXTENSIONS)


def _walk_images(top):
  """The image files under `top`, sorted. Symlinks to files are read; a linked folder is read
  once, and only if it leads to a folder inside `top` not yet read: one that leads back into
  the tree (a loop), elsewhere in it again, or out of it is skipped with a warning naming it."""
  if '://' in top:   # object stores have no links: tf.io.gfile walks them
    return sorted(f'{root.rstrip("/")}/{n}' for root, _, names in tf.io.gfile.walk(top)
                  for n in names if _is_image_name(n))
  real_top, seen, found = os.path.realpath(top), set(), []
  for root, dirs, names in os.walk(top, followlinks=True):
    real = os.path.realpath(root)
    seen.add(real)
    kept = []
    for d in sorted(dirs):
      target = os.path.realpath(os.path.join(root, d))
      inside = target == real_top or target.startswith(real_top + os.sep)
      if target in seen or not inside:   # ancestors are in `seen`: a loop is caught here
        logging.warning('Skipped the folder %s: it links to %s, %s.', os.path.join(root, d),
                        target, 'outside ' + top if not inside else 'a folder read already')
        continue
      seen.add(target)
      kept.append(d)
    dirs[:] = kept
    found += [os.path.join(root, n) for n in names if _is_image_name(n)]
  return sorted(found)


@functools.lru_cache(maxsize=8)
def _list_images(directory, class_names):
  """(files, labels) of `directory`'s class sub-folders; a flat folder is unlabelled (-1)."""
  directory = epath.Path(directory)
  classes = _subfolders(directory)
  if not classes:
    files = sorted(str(p) for p in directory.iterdir() if _is_image_name(p.name)
                   and not p.is_dir())
    return files, np.full(len(files), -1, np.int32)
  unknown = sorted(set(classes) - set(class_names))
  if unknown:
    raise errors.BadInput(f'{str(directory)!r} has classes the train split lacks: '
                          f"{unknown[:5]}; every split must use the train split's class folders.")
  files, labels = [], []
  for name in classes:
    found = _walk_images(str(directory / name))
    files += found
    labels += [class_names.index(name)] * len(found)
  return files, np.array(labels, np.int32)


class Tfds(DataSource):
  """A prepared tensorflow-datasets dataset (nothing is downloaded by the trainer)."""

  @functools.cached_property
  def builder(self):
    try:
      return tfds.builder(self.cfg.name, data_dir=self.cfg.data_dir or None)
    except tfds.core.registered.DatasetNotFoundError as e:
      raise ValueError(f'Unknown TFDS dataset data.name={self.cfg.name!r}.') from e

  def check(self):
    cfg, builder = self.cfg, self.builder
    if not builder.is_prepared():
      if not cfg.manual_dir:
        raise ValueError(
            f'TFDS dataset {cfg.name!r} is not prepared in data.data_dir={cfg.data_dir!r}. Either '
            f'prepare it once (`tfds build {cfg.name} --data_dir=DIR`, needs internet for most '
            'datasets; for imagenet2012 put the ILSVRC2012 tar files in a folder and set '
            'data.manual_dir=FOLDER to have it prepared here), or point data.data_dir at a '
            "prepared copy, or use data.source='folder' with data.folder=ROOT "
            '(ROOT/<split>/<class>/*.jpg).')
      _prepare_once(builder, cfg.manual_dir)
    for split in (cfg.train_split, cfg.eval_split):
      try:
        builder.info.splits[split].num_examples
      except (KeyError, ValueError) as e:
        raise ValueError(f'TFDS dataset {cfg.name!r} has no split {split!r}; it has '
                         f'{list(builder.info.splits)}.') from e

  def num_examples(self, split):
    return self.builder.info.splits[split].num_examples

  def num_classes(self):
    features = self.builder.info.features
    return int(features['label'].num_classes) if 'label' in features.keys() else 0

  def records(self, split, process_index=0, process_count=1, seed=None):
    if process_count > 1:
      split = tfds.even_splits(split, process_count)[process_index]
    ds = self.builder.as_dataset(
        split=split, shuffle_files=seed is not None,
        decoders={'image': tfds.decode.SkipDecoding()},   # decode after the shuffle buffer
        read_config=tfds.ReadConfig(shuffle_seed=seed, skip_prefetch=True))
    ds = ds.map(lambda ex: dict(image=ex['image'],
                                label=tf.cast(ex.get('label', -1), tf.int32)))
    if seed is not None:
      ds = ds.shuffle(self.cfg.shuffle_buffer, seed=seed)
    return ds


def _prepare_once(builder, manual_dir):
  """Process 0 prepares the dataset; the other processes wait for it (no race on the files)."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  if jax.process_index() == 0:
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('tfds prepared')
    builder.download_and_prepare()   # now a no-op that reloads the prepared info


SOURCES = dict(synthetic=Synthetic, folder=ImageFolder, tfds=Tfds)


def get(cfg) -> DataSource:
  if cfg.source not in SOURCES:
    raise ValueError(f'Unknown data.source={cfg.source!r}: use one of {", ".join(SOURCES)}.')
  return SOURCES[cfg.source](cfg)
