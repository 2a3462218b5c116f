"""Shape rules shared by the linen and NNX conv layers: flax's kernel size, groups, batch axes."""

from __future__ import annotations

import jax
import numpy as np

from jaxnorm.functional._checks import fail


def canonical_kernel_size(layer: str, kernel_size) -> tuple[int, ...]:
  """flax's rule: an int ``k`` means the 1-D kernel ``(k,)``; a sequence is taken as given."""
  if isinstance(kernel_size, int | np.integer) and not isinstance(kernel_size, bool):
    kernel_size = (int(kernel_size),)
  try:
    kernel_size = tuple(kernel_size)
  except TypeError:
    fail(layer, 'kernel_size', 'a positive int (a 1-D kernel, as in flax) or a sequence of '
         'positive ints', repr(kernel_size))
  if not kernel_size or not all(isinstance(k, int | np.integer) and not isinstance(k, bool)
                                and k >= 1 for k in kernel_size):
    fail(layer, 'kernel_size', 'a positive int (a 1-D kernel, as in flax) or a sequence of '
         'positive ints', repr(kernel_size))
  return tuple(int(k) for k in kernel_size)


def check_groups(layer: str, feature_group_count, in_features: int, features: int) -> int:
  """``feature_group_count`` as an int dividing both ``in_features`` and ``features``."""
  g = feature_group_count
  if isinstance(g, bool) or not isinstance(g, int | np.integer) or g < 1:
    fail(layer, 'feature_group_count', 'a positive int', repr(g))
  if in_features % g:
    fail(layer, 'feature_group_count', f'a divisor of in_features {in_features}', int(g))
  if features % g:
    fail(layer, 'feature_group_count', f'a divisor of features {features}', int(g))
  return int(g)


def flatten_batch(layer: str, inputs: jax.Array, num_spatial: int):
  """flax's batch handling: every axis before ``(*spatial, C)`` is a batch axis (none: one added).

  Returns:
    ``(inputs as (B, *spatial, C), the original batch shape or None when there was exactly one)``.
  """
  num_batch = inputs.ndim - (num_spatial + 1)
  if num_batch < 0:
    fail(layer, 'inputs', f'an array of rank >= {num_spatial + 1} ((*batch, *spatial, C) for a '
         f'{num_spatial}-D kernel)', f'rank {inputs.ndim} (shape {inputs.shape})')
  if num_batch == 1:
    return inputs, None
  batch_shape = inputs.shape[:num_batch]
  return inputs.reshape((-1,) + inputs.shape[num_batch:]), batch_shape
