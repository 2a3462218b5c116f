"""Variance-scaling initializers that give jax.nn.initializers' values and compile faster.

With ``jax_threefry_partitionable`` (the default since jax 0.5), ``jax.random`` derives each
element's counter from its multi-dimensional index. For a rank-3 or rank-4 shape (a conv kernel)
XLA:CPU compiles that one sampling op several times slower than the same number of elements drawn
as a flat vector, and a ResNet's jitted ``init`` holds one such op per distinct conv shape (per
block when unrolled), so it dominated the compile time of small models (BENCHMARKS.md, section
4). The counters of a flat draw are the row-major linear indices of the shaped draw, so sampling
flat and reshaping yields bit-identical values (tested against ``jax.nn.initializers`` for every
mode and distribution). jaxnorm's conv layers and models use these initializers by default.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxnorm.functional._checks import check_choice

_LAYER = 'variance_scaling'
_MODES = ('fan_in', 'fan_out', 'fan_avg', 'fan_geo_avg')
_DISTRIBUTIONS = ('truncated_normal', 'normal', 'uniform')
# Standard deviation of a standard normal truncated to (-2, 2), as in jax.nn.initializers.
_TRUNCATED_STD = 0.87962566103423978


def _size(shape: Sequence[int], axes: int | Sequence[int]) -> int:
  return shape[axes] if isinstance(axes, int) else math.prod(shape[a] for a in axes)


def compute_fans(shape: Sequence[int], in_axis: int | Sequence[int] = -2,
                 out_axis: int | Sequence[int] = -1,
                 batch_axis: int | Sequence[int] = ()) -> tuple[float, float]:
  """(fan_in, fan_out) of a weight shape: in/out size times the receptive field (other axes)."""
  in_size, out_size = _size(shape, in_axis), _size(shape, out_axis)
  receptive = math.prod(shape) / in_size / out_size / _size(shape, batch_axis)
  return in_size * receptive, out_size * receptive


def variance_scaling(scale: float, mode: str, distribution: str,
                     in_axis: int | Sequence[int] = -2, out_axis: int | Sequence[int] = -1,
                     batch_axis: int | Sequence[int] = (), dtype=jnp.float_):
  """``jax.nn.initializers.variance_scaling``, sampled as a flat vector then reshaped.

  Draws with variance ``scale / n``, ``n`` the fan selected by ``mode``: the same values as
  ``jax.nn.initializers.variance_scaling`` with the same arguments (bit for bit, for floating
  dtypes), at a fraction of the compile time for rank >= 3 shapes (module docstring). Complex
  dtypes and shapes of rank <= 2 go to jax's initializer unchanged.

  Args:
    scale: the variance numerator (2.0 for He, 1.0 for LeCun).
    mode: 'fan_in', 'fan_out', 'fan_avg' or 'fan_geo_avg'.
    distribution: 'truncated_normal' (at +-2 std, rescaled to the target variance), 'normal' or
      'uniform'.
    in_axis: axis or axes of the input dimension.
    out_axis: axis or axes of the output dimension.
    batch_axis: axes ignored by the fan computation.
    dtype: the default dtype of the values.

  Returns:
    An initializer ``init(key, shape, dtype=dtype)``.
  """
  check_choice(_LAYER, 'mode', mode, _MODES)
  check_choice(_LAYER, 'distribution', distribution, _DISTRIBUTIONS)
  reference = jax.nn.initializers.variance_scaling(scale, mode, distribution, in_axis=in_axis,
                                                   out_axis=out_axis, batch_axis=batch_axis,
                                                   dtype=dtype)

  def init(key: jax.Array, shape: Sequence[int], dtype=dtype) -> jax.Array:
    shape = tuple(int(d) for d in shape)
    dtype = jax.dtypes.canonicalize_dtype(jnp.float_ if dtype is None else dtype)
    if len(shape) <= 2 or not jnp.issubdtype(dtype, np.floating):
      return reference(key, shape, dtype)
    fan_in, fan_out = compute_fans(shape, in_axis, out_axis, batch_axis)
    denominator = {'fan_in': fan_in, 'fan_out': fan_out, 'fan_avg': (fan_in + fan_out) / 2,
                   'fan_geo_avg': (fan_in * fan_out) ** 0.5}[mode]
    variance = jnp.array(scale / denominator, dtype=dtype)
    flat = (math.prod(shape),)
    if distribution == 'truncated_normal':
      stddev = jnp.sqrt(variance) / jnp.array(_TRUNCATED_STD, dtype)
      values = jax.random.truncated_normal(key, -2, 2, flat, dtype) * stddev
    elif distribution == 'normal':
      values = jax.random.normal(key, flat, dtype) * jnp.sqrt(variance)
    else:
      values = jax.random.uniform(key, flat, dtype, -1) * jnp.sqrt(3 * variance)
    return values.reshape(shape)

  return init


def lecun_normal(in_axis: int | Sequence[int] = -2, out_axis: int | Sequence[int] = -1,
                 batch_axis: int | Sequence[int] = (), dtype=jnp.float_):
  """LeCun normal (variance 1/fan_in, truncated normal), as ``jax.nn.initializers.lecun_normal``."""
  return variance_scaling(1.0, 'fan_in', 'truncated_normal', in_axis, out_axis, batch_axis, dtype)


def he_normal(in_axis: int | Sequence[int] = -2, out_axis: int | Sequence[int] = -1,
              batch_axis: int | Sequence[int] = (), dtype=jnp.float_):
  """He normal (variance 2/fan_in, truncated normal), as ``jax.nn.initializers.he_normal``."""
  return variance_scaling(2.0, 'fan_in', 'truncated_normal', in_axis, out_axis, batch_axis, dtype)
