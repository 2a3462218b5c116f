"""Resumable batching: a deterministic stream of host-local batches whose position is one int.

A :class:`BatchIterator` turns a :class:`~jaxnorm.training.data.Dataset` into an endless stream of
host-local numpy batches with a deterministic order and augmentation, whose whole position is a
single integer (the number of batches drawn), so a checkpoint can save it and a resumed run sees
exactly the same batches. :func:`eval_batches` covers a split once, padded to whole batches.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from jaxnorm.functional._checks import check_positive, fail
from jaxnorm.training.data.sources import Dataset


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
