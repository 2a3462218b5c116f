"""Layer helpers shared by the linen and NNX BatchNorm modules: feature axes and Flax's dtypes."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxnorm.functional._checks import fail, normalize_axes


def split_axes(x, axis, layer: str = 'BatchNorm') -> tuple[tuple[int, ...], tuple[int, ...]]:
  """Returns ``(feature_axes, reduction_axes)`` of ``x`` for the feature axis (or axes) ``axis``.

  Raises:
    ValueError: naming ``layer``, for a rank-0 ``x`` (no feature axis) or an ``axis`` outside
      ``[-x.ndim, x.ndim)`` or repeated (``flax.linen.BatchNorm`` raises too; a modulo would
      silently pick another axis).
  """
  ndim = jnp.ndim(x)
  if ndim < 1:
    fail(layer, 'x', 'an array of rank >= 1 with the features on `axis`',
         f'rank 0 (shape {jnp.shape(x)})')
  if isinstance(axis, bool) or not isinstance(axis, (int, np.integer, tuple, list)):
    fail(layer, 'axis', 'an int or a tuple of ints', repr(axis), TypeError)
  feature_axes = normalize_axes(layer, 'axis', axis, ndim)
  return feature_axes, tuple(a for a in range(ndim) if a not in feature_axes)


def resolve_dtypes(x, scale, bias, dtype, force_float32_reductions: bool):
  """``(output dtype, statistics dtype)`` by the rules of ``flax.linen.BatchNorm``.

  The output dtype is ``dtype`` or else the promotion of the input and parameters (float32 for a
  bf16 input with float32 parameters, as in ``flax.linen.BatchNorm``); statistics are computed in
  ``dtype`` or the input dtype, promoted to at least float32 if ``force_float32_reductions``.
  """
  if dtype is None:
    out_dtype = jnp.result_type(*(a for a in (x, scale, bias) if a is not None))
    if not jnp.issubdtype(out_dtype, jnp.inexact):
      out_dtype = jnp.promote_types(out_dtype, jnp.float32)
  else:
    out_dtype = jnp.dtype(dtype)
  stats_dtype = jnp.result_type(x) if dtype is None else jnp.dtype(dtype)
  if force_float32_reductions:
    stats_dtype = jnp.promote_types(stats_dtype, jnp.float32)
  return out_dtype, stats_dtype


