"""tf.data pipeline: sources, per-process shards, reproducibility, eval padding, early errors.

Shard tests use images of one flat colour whose red value is the example's id: with the colour ops
switched off, every view of such an image is that colour, so the id survives augmentation.
"""
import itertools

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from mocov2_jax import errors
from mocov2_jax.data import pipeline, recipes, sources


def config(**overrides):
  cfg = ml_collections.ConfigDict(dict(
      source='synthetic', name='cifar10', data_dir=None, manual_dir=None, folder=None,
      train_split='train', eval_split='test', image_size=16, eval_crop_frac=1.0,
      on_bad_image='skip',
      shuffle_buffer=64, num_train=40, num_eval=10, synthetic_seed=0,
      augment=recipes.recipe('cifar')))
  cfg.update(overrides)
  return cfg


def plain_recipe():
  r = recipes.recipe('cifar')
  r.update(dict(jitter_p=0.0, gray_p=0.0, blur_p=0.0, mean=None, std=None))
  return r


def ids(images):
  """Example ids back from the red value of flat-coloured images."""
  return [int(i) for i in np.round(np.asarray(images)[:, 0, 0, 0] * 255)]


def take(ds, n):
  return [{k: v.numpy() for k, v in batch.items()} for batch in ds.take(n)]


def evals(cfg, split, n, **kwargs):
  """The first `n` eval batches (dict(image, label, mask))."""
  return list(itertools.islice(pipeline.eval_batches(cfg, split, **kwargs), n))


def train_take(cfg, n, *, local_batch_size, seed, start_step=0, process_index=0,
               process_count=1, steps=None, bad=None):
  """The first `n` training batches of one process from `start_step` on."""
  steps = steps or pipeline.num_examples(cfg, cfg.train_split) // (local_batch_size *
                                                                    process_count)
  it = pipeline.train_batches(cfg, local_batch_size=local_batch_size, steps_per_epoch=steps,
                              seed=seed, start_step=start_step, process_index=process_index,
                              process_count=process_count, bad=bad)
  return [next(it) for _ in range(n)]


def write_images(root, num, labelled):
  """`num` flat-colour PNGs of varied sizes, ids 1..num; class 'c<id % 3>' when labelled."""
  for i in range(1, num + 1):
    d = root / 'train' / f'c{i % 3}' if labelled else root / 'train'
    d.mkdir(parents=True, exist_ok=True)
    Image.new('RGB', (20 + i, 17 + 2 * i), (i, 100, 200)).save(d / f'{i:03d}.png')


# ---- synthetic source: batches, reproducibility ----
def test_pretrain_batches_are_reproducible():
  cfg = config()
  a = train_take(cfg, 6, local_batch_size=8, seed=1)   # > 1 epoch
  b = train_take(cfg, 6, local_batch_size=8, seed=1)
  c = train_take(cfg, 6, local_batch_size=8, seed=2)
  for key, dtype, shape in [('view1', np.float32, (8, 16, 16, 3)),
                            ('view2', np.float32, (8, 16, 16, 3)), ('label', np.int32, (8,))]:
    assert a[0][key].dtype == dtype and a[0][key].shape == shape
  for x, y in zip(a, b):
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])
  assert np.abs(a[0]['view1'] - c[0]['view1']).mean() > 0.1
  assert np.abs(a[0]['view1'] - a[0]['view2']).mean() > 0.1        # two independent views
  labels = np.concatenate([x['label'] for x in a[:5]])               # epoch 1: 40 examples
  np.testing.assert_array_equal(np.bincount(labels), [4] * 10)
  assert not (labels == sources._shapes(40, 0)[1]).all()             # shuffled
  assert not np.array_equal(np.concatenate([x['label'] for x in a[5:]]), labels[:8])  # reshuffled


def test_a_stream_re_entered_at_any_step_is_the_same():
  """Exact resume: the batches from step s on do not depend on where the stream started."""
  cfg = config()
  whole = train_take(cfg, 8, local_batch_size=8, seed=3)
  for start in (3, 5, 7):   # mid-epoch, an epoch's start, the next epoch's middle
    resumed = train_take(cfg, 8 - start, local_batch_size=8, seed=3, start_step=start)
    for x, y in zip(whole[start:], resumed):
      for key in x:
        np.testing.assert_array_equal(x[key], y[key])


def _assert_same_batches(a, b, where):
  assert len(a) == len(b), where
  for step, (x, y) in enumerate(zip(a, b)):
    assert x.keys() == y.keys(), where
    for key in x:
      np.testing.assert_array_equal(x[key], y[key], err_msg=f'{where}, step {step}: {key}')


def joined(parts):
  """The global batches of per-process batches (process p's rows after process p - 1's)."""
  return [{k: np.concatenate([p[i][k] for p in parts]) for k in parts[0][i]}
          for i in range(len(parts[0]))]


@pytest.mark.parametrize('source', ['synthetic', 'folder with unreadable files'])
def test_the_global_batch_does_not_depend_on_the_process_count(tmp_path, source):
  """P processes building their slices of each global batch give, row for row and bit for bit,
  the batches of one process (examples, order, views, the records that replace unreadable
  ones), over an epoch's end; and so does a stream resumed on another number of processes."""
  if source == 'synthetic':
    cfg, steps = config(), 6                                  # 40 examples: 5 steps an epoch
  else:
    write_odd_and_bad(tmp_path)
    cfg, steps = config(source='folder', folder=str(tmp_path), eval_split='train'), 4
  one_bad = pipeline.BadImages()
  one = train_take(cfg, steps, local_batch_size=8, seed=1, bad=one_bad)
  for count in (4,):   # 2 processes: the resumed stream below
    bads = [pipeline.BadImages() for _ in range(count)]
    parts = [train_take(cfg, steps, local_batch_size=8 // count, seed=1, process_index=p,
                        process_count=count, bad=bads[p]) for p in range(count)]
    _assert_same_batches(joined(parts), one, f'{count} processes')
    assert set().union(*(b.names for b in bads)) == set(one_bad.names)
  resumed = [train_take(cfg, steps - 3, local_batch_size=4, seed=1, start_step=3,
                        process_index=p, process_count=2) for p in range(2)]
  _assert_same_batches(joined(resumed), one[3:], 'resumed on 2 processes')
  if source != 'synthetic':
    assert 1 <= one_bad.count <= 3


# ---- image folder ----
@pytest.mark.parametrize('labelled', [True, False])
def test_folder_shards_are_disjoint_and_cover(tmp_path, labelled):
  write_images(tmp_path, 13, labelled)
  cfg = config(source='folder', folder=str(tmp_path), eval_split='train', augment=plain_recipe())
  pipeline.check_data(cfg)
  assert pipeline.num_examples(cfg, 'train') == 13
  seen, seen_eval = [], []
  for p in range(2):
    batches = train_take(cfg, 12, local_batch_size=1, seed=0, process_index=p, process_count=2)
    got = ids(np.concatenate([b['view1'] for b in batches]))   # 2 epochs of 13 // 2 = 6 steps
    assert len(set(got[:6])) == len(set(got[6:])) == 6 and got[:6] != got[6:]
    assert ids(np.concatenate([b['view2'] for b in batches])) == got
    labels = np.concatenate([b['label'] for b in batches])
    np.testing.assert_array_equal(labels, [i % 3 if labelled else -1 for i in got])
    seen.append(got)
    n = 7 - p                                 # the eval shard: files[p::2] of 13
    ev = evals(cfg, 'train', 10, local_batch_size=4, process_index=p, process_count=2)
    assert len(ev) == 2 and ev[0]['image'].shape == (4, 16, 16, 3)   # same count on both
    mask = np.concatenate([b['mask'] for b in ev])
    assert mask.sum() == n
    seen_eval.append(set(np.array(ids(np.concatenate([b['image'] for b in ev])))[mask == 1]))
  for epoch in (slice(0, 6), slice(6, 12)):   # the processes share out each epoch
    a, b = set(seen[0][epoch]), set(seen[1][epoch])
    assert not a & b and len(a | b) == 12 and a | b <= set(range(1, 14))
  assert not seen_eval[0] & seen_eval[1] and seen_eval[0] | seen_eval[1] == set(range(1, 14))


def test_folder_without_split_subfolders_is_the_train_split(tmp_path):
  for i, name in enumerate(['x', 'y']):
    (tmp_path / name).mkdir()
    Image.new('RGB', (30, 20), (i, 0, 0)).save(tmp_path / name / 'a.jpg')
  cfg = config(source='folder', folder=str(tmp_path))
  labels = train_take(cfg, 1, local_batch_size=2, seed=0)[0]['label']
  assert sorted(labels) == [0, 1]
  with pytest.raises(ValueError, match='test'):   # no eval split there
    pipeline.check_data(cfg)


# ---- eval: padding, mask, determinism ----
@pytest.mark.parametrize('process_count,masks', [(1, [4, 4, 2]), (3, [4, 3, 3])])
def test_eval_padding(process_count, masks):
  cfg = config(num_eval=10)
  got = []
  for p in range(process_count):
    ev = evals(cfg, 'test', 10, local_batch_size=4, process_index=p, process_count=process_count)
    again = evals(cfg, 'test', 10, local_batch_size=4, process_index=p, process_count=process_count)
    for x, y in zip(ev, again):
      for key in x:
        np.testing.assert_array_equal(x[key], y[key])
    assert len(ev) == 3 // process_count
    for b in ev:
      assert b['image'].shape == (4, 16, 16, 3) and b['image'].dtype == np.float32
      assert b['mask'].dtype == np.int32 and b['label'].dtype == np.int32
      pad = b['mask'] == 0
      assert (b['label'][pad] == -1).all() and (b['image'][pad] == 0).all()
      assert (b['label'][~pad] >= 0).all() and (np.abs(b['image'][~pad]).max() > 0.5)
    got += [int(b['mask'].sum()) for b in ev]
  assert got == masks


# ---- tfds ----
def test_tfds_mock_data_views():
  cfg = config(source='tfds', name='cifar10', image_size=32)
  with tfds.testing.mock_data(num_examples=12):
    batches = train_take(cfg, 4, local_batch_size=4, seed=0, steps=3)
  for b in batches:
    assert b['view1'].shape == b['view2'].shape == (4, 32, 32, 3)
    assert b['view1'].dtype == np.float32 and b['label'].dtype == np.int32
    assert ((b['label'] >= 0) & (b['label'] < 10)).all()
    assert np.abs(b['view1'] - b['view2']).mean() > 0.1


class MocoTestImages(tfds.core.GeneratorBasedBuilder):
  """A real (prepared) tiny TFDS dataset: split slicing and counts work as with cifar10."""
  VERSION = tfds.core.Version('1.0.0')
  # No checksums file to look up; also avoids tfds's lookup needing `importlib_resources`.
  code_path = None

  def _info(self):
    return self.dataset_info_from_configs(features=tfds.features.FeaturesDict(dict(
        image=tfds.features.Image(shape=(None, None, 3)),
        label=tfds.features.ClassLabel(num_classes=3))))

  def _split_generators(self, dl_manager):
    return dict(train=self._generate_examples(11), test=self._generate_examples(5))

  def _generate_examples(self, num):
    for i in range(1, num + 1):
      yield i, dict(image=np.full((20 + i, 24, 3), i, np.uint8), label=i % 3)


@pytest.fixture(scope='module')
def tfds_dir(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp('tfds')
  MocoTestImages(data_dir=str(data_dir)).download_and_prepare()
  return str(data_dir)


def test_tfds_shards_are_disjoint_and_cover(tfds_dir, caplog):
  """tfds streams: each process reads its own shard (so the global batch depends on the process
  count, which the log says)."""
  cfg = config(source='tfds', name='moco_test_images', data_dir=tfds_dir,
               augment=plain_recipe())
  pipeline.check_data(cfg)
  assert pipeline.num_examples(cfg, 'train') == 11
  seen, seen_eval = [], []
  for p in range(2):
    batches = train_take(cfg, 5, local_batch_size=1, seed=0, process_index=p, process_count=2)
    got = ids(np.concatenate([b['view1'] for b in batches]))
    assert len(set(got)) == 5
    seen.append(set(got))
    ev = evals(cfg, 'train', 10, local_batch_size=4, process_index=p, process_count=2)
    mask = np.concatenate([b['mask'] for b in ev])
    assert len(ev) == 2 and mask.sum() in (5, 6)
    seen_eval.append(set(np.array(ids(np.concatenate([b['image'] for b in ev])))[mask == 1]))
  assert not seen[0] & seen[1]
  assert not seen_eval[0] & seen_eval[1] and seen_eval[0] | seen_eval[1] == set(range(1, 12))
  assert 'the global batch depends on the number of processes' in caplog.text


# ---- check_data: errors that say what to change ----
def test_check_data_errors(tmp_path, tfds_dir):
  with pytest.raises(ValueError, match='not a directory'):
    pipeline.check_data(config(source='folder', folder=str(tmp_path / 'missing')))
  (tmp_path / 'train' / 'a').mkdir(parents=True)
  (tmp_path / 'test').mkdir()
  with pytest.raises(ValueError, match='No images'):
    pipeline.check_data(config(source='folder', folder=str(tmp_path)))
  for i in range(5):
    Image.new('RGB', (8, 8), (i, 0, 0)).save(tmp_path / 'train' / 'a' / f'{i}.jpg')
    Image.new('RGB', (8, 8), (i, 0, 0)).save(tmp_path / 'test' / f'{i}.jpg')
  sources._list_images.cache_clear()   # listings are cached per folder
  pipeline.check_data(config(source='folder', folder=str(tmp_path)))
  with pytest.raises(ValueError, match="No folder .*'val'"):
    pipeline.check_data(config(source='folder', folder=str(tmp_path), eval_split='val'))
  (tmp_path / 'test' / 'broken.jpg').write_bytes(b'\xff\xd8\xff\xe0 not really a jpeg')
  sources._list_images.cache_clear()
  pipeline.check_data(config(source='folder', folder=str(tmp_path)))   # 'skip': counted later
  with pytest.raises(ValueError, match='broken.jpg.*on_bad_image=skip'):
    pipeline.check_data(config(source='folder', folder=str(tmp_path), on_bad_image='error'))
  for i in range(5):
    (tmp_path / 'test' / f'{i}.jpg').write_bytes(b'')
  sources._list_images.cache_clear()
  with pytest.raises(ValueError, match='None of 6 sampled files .* decodes'):
    pipeline.check_data(config(source='folder', folder=str(tmp_path)))
  with pytest.raises(ValueError, match='not prepared.*manual_dir'):
    pipeline.check_data(config(source='tfds', name='moco_test_images',
                               data_dir=str(tmp_path / 'empty_tfds')))
  with pytest.raises(ValueError, match='no split'):
    pipeline.check_data(config(source='tfds', name='moco_test_images', data_dir=tfds_dir,
                               eval_split='validation'))
  with pytest.raises(ValueError, match='Unknown TFDS'):
    pipeline.check_data(config(source='tfds', name='no_such_dataset_xyz'))
  with pytest.raises(ValueError, match='data.source'):
    pipeline.check_data(config(source='hdf5'))
  with pytest.raises(ValueError, match='num_train'):
    pipeline.check_data(config(num_train=0))


def test_folder_labels_follow_the_train_classes(tmp_path):
  """A split missing a class keeps the train split's label ids; an extra class is refused."""
  for split, classes in [('train', 'abc'), ('test', 'bc')]:
    for c in classes:
      (tmp_path / split / c).mkdir(parents=True)
      Image.fromarray(np.full((8, 8, 3), 9, np.uint8)).save(tmp_path / split / c / 'x.png')
  cfg = config(source='folder', folder=str(tmp_path))
  assert pipeline.num_classes(cfg) == 3
  batch = evals(cfg, 'test', 1, local_batch_size=2)[0]
  assert sorted(batch['label'].tolist()) == [1, 2]
  (tmp_path / 'test' / 'd').mkdir()
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / 'test' / 'd' / 'y.png')
  sources._list_images.cache_clear()
  with pytest.raises(ValueError, match=r"classes the train split lacks: \['d'\]"):
    pipeline.check_data(cfg)


# ---- unreadable and odd images ----
def write_odd_and_bad(root):
  """Readable oddities (all must load as RGB) and unreadable files, in one class folder."""
  d = root / 'train' / 'a'
  d.mkdir(parents=True)
  for i in range(20):
    Image.new('RGB', (12, 10), (i, 50, 50)).save(d / f'ok{i:02d}.png')
  Image.new('L', (9, 9), 77).save(d / 'gray.png')
  Image.new('CMYK', (9, 9), (10, 20, 30, 40)).save(d / 'cmyk.jpg')
  Image.new('RGBA', (9, 9), (1, 2, 3, 4)).save(d / 'rgba.png')
  Image.fromarray(np.full((9, 9), 40000, np.uint16)).save(d / 'deep16.png')
  Image.new('RGB', (1, 1), (5, 5, 5)).save(d / 'one_pixel.png')
  Image.new('RGB', (9, 9), (6, 6, 6)).save(d / 'png_named.jpg', format='PNG')
  Image.new('RGB', (9, 9), (7, 7, 7)).save(d / 'UPPER.JPG')
  good = io_bytes(Image.new('RGB', (40, 40), (9, 9, 9)))
  bad = {'truncated.jpg': good[:len(good) // 2], 'empty.jpg': b'',
         'text.jpg': b'this is not an image'}
  for name, data in bad.items():
    (d / name).write_bytes(data)
  return sorted(bad)


def io_bytes(image):
  import io  # pylint: disable=g-import-not-at-top
  buffer = io.BytesIO()
  image.save(buffer, format='JPEG', quality=90)
  return buffer.getvalue()


def test_unreadable_images_are_skipped_counted_and_named(tmp_path):
  bad_names = write_odd_and_bad(tmp_path)
  cfg = config(source='folder', folder=str(tmp_path), eval_split='train')
  files = sources._list_images(str(tmp_path / 'train'), ('a',))[0]
  assert len(files) == 30 and any(f.endswith('UPPER.JPG') for f in files)
  bad = pipeline.BadImages()
  ev = evals(cfg, 'train', 10, local_batch_size=8, bad=bad)
  assert len(ev) == 4 and sum(int(b['mask'].sum()) for b in ev) == 27   # 30 - 3 unreadable
  assert bad.count == 3 and sorted(n.split('/')[-1] for n in bad.names) == bad_names
  for b in ev:
    assert b['image'].shape == (8, 16, 16, 3) and np.isfinite(b['image']).all()
  bad = pipeline.BadImages()
  batches = train_take(cfg, 6, local_batch_size=8, seed=0, bad=bad)   # 2 epochs of 3 steps
  assert all(b['view1'].shape == (8, 16, 16, 3) for b in batches)
  assert bad.count >= 1 and {n.split('/')[-1] for n in bad.names} <= set(bad_names)


def test_unreadable_image_in_error_mode_stops_naming_it(tmp_path):
  bad_names = write_odd_and_bad(tmp_path)
  cfg = config(source='folder', folder=str(tmp_path), eval_split='train', on_bad_image='error')
  with pytest.raises(errors.BadInput, match='|'.join(bad_names)) as e:   # exit 2 from the CLI
    evals(cfg, 'train', 10, local_batch_size=8)
  assert 'on_bad_image=skip' in str(e.value)
  with pytest.raises(errors.BadInput, match='|'.join(bad_names)):
    train_take(cfg, 4, local_batch_size=8, seed=0)
  with pytest.raises(ValueError, match='on_bad_image'):
    pipeline.check_data(config(on_bad_image='ignore'))
