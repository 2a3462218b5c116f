"""Batch statistics for ``batch_norm``: argument checks, ghost-batch grouping, masked moments.

The statistics are the per-channel mean and biased (population) variance over the reduction axes,
computed in at least float32 with the centred two-pass variance ``mean((x - mu)^2)``, optionally
per group of ``ghost_batch_size`` consecutive examples (ghost batch normalization), over the
entries selected by a boolean ``mask``, and averaged over a named axis (``lax.pmean``). A channel
(ghost group) must hold at least 2 values: with one, the variance would silently be 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxnorm.functional._checks import check_floating, check_positive, fail, normalize_axes

_LAYER = 'batch_norm'

Axes = int | Sequence[int] | None


# ----------------------------------------------------------------------------------------------
# Argument handling
# ----------------------------------------------------------------------------------------------


def reduction_axes(x, axes: Axes, named: bool = False) -> tuple[int, ...]:
  """Validates ``x`` and returns the sorted non-negative reduction axes (default: all but last).

  ``named``: the statistics also run over a named axis (``axis_name``, e.g. the per-example
  ``jax.vmap`` convention), so no array axis needs to be reduced: rank 1 and ``axes=()`` are
  accepted. Otherwise rank >= 2 and at least one reduction axis are required.
  """
  check_floating(_LAYER, 'x', x)
  ndim = jnp.ndim(x)
  min_rank = 1 if named else 2
  if ndim < min_rank:
    what = ('an array of rank >= 1 (features last)' if named else
            'an array of rank >= 2 (batch axis first, features last)')
    fail(_LAYER, 'x', what, f'rank {ndim} (shape {jnp.shape(x)})')
  if axes is None:
    return tuple(range(ndim - 1))
  out = normalize_axes(_LAYER, 'axes', axes, ndim)
  if not out and not named:
    fail(_LAYER, 'axes', 'at least one reduction axis (or an `axis_name` to reduce over)',
         repr(axes))
  return out


def feature_shape(shape: Sequence[int], axes: tuple[int, ...]) -> tuple[int, ...]:
  """Shape of the statistics: ``shape`` with the reduction axes removed."""
  return tuple(d for a, d in enumerate(shape) if a not in axes)


def _check_ghost(shape: Sequence[int], axes: tuple[int, ...], ghost_batch_size) -> None:
  if ghost_batch_size is None:
    return
  if not isinstance(ghost_batch_size, (int, np.integer)) or isinstance(ghost_batch_size, bool):
    fail(_LAYER, 'ghost_batch_size', 'a positive int or None', repr(ghost_batch_size), TypeError)
  check_positive(_LAYER, 'ghost_batch_size', ghost_batch_size)
  if 0 not in axes:
    fail(_LAYER, 'ghost_batch_size', 'the batch axis 0 among the reduction axes', f'axes {axes}')
  if shape[0] % ghost_batch_size:
    fail(_LAYER, 'ghost_batch_size', f'a divisor of the batch size {shape[0]}', ghost_batch_size)


def check_param(arg: str, p, feature_shape: tuple[int, ...]) -> None:
  if p is None:
    return
  check_floating(_LAYER, arg, p)
  if tuple(jnp.shape(p)) != feature_shape:
    fail(_LAYER, arg, f'shape {feature_shape} (the non-reduced axes of x)',
         f'shape {tuple(jnp.shape(p))}')


def _check_mask(mask, shape: Sequence[int]) -> None:
  if mask is None:
    return
  try:
    np.broadcast_shapes(tuple(jnp.shape(mask)), tuple(shape))
  except ValueError:
    fail(_LAYER, 'mask', f'a boolean array broadcastable to x.shape {tuple(shape)}',
         f'shape {tuple(jnp.shape(mask))}')


def axis_size(axis_name, axis_index_groups) -> int:
  """Number of devices one statistic is averaged over (1 without ``axis_name``)."""
  if axis_name is None:
    return 1
  if axis_index_groups is not None:
    return len(axis_index_groups[0])
  try:
    return int(lax.axis_size(axis_name))
  except Exception:  # axis not bound here: the collective later raises JAX's own error
    return 1


def _stats_dtype(x, stats_dtype) -> Any:
  """At least float32 (float64 inputs keep float64)."""
  if stats_dtype is not None:
    return jnp.dtype(stats_dtype)
  return jnp.promote_types(jnp.result_type(x), jnp.float32)


# ----------------------------------------------------------------------------------------------
# Grouping (ghost batches) and moments
# ----------------------------------------------------------------------------------------------


def _group(x, axes: tuple[int, ...], ghost_batch_size):
  """Reshapes ``(N, ...)`` to ``(N // k, k, ...)`` for ghost batches; returns (xg, reduce axes).

  Without ghost batches it returns ``x`` and ``axes`` unchanged. With them, axis 0 of the result
  indexes the groups (never reduced) and every original axis ``a`` moves to ``a + 1``.
  """
  if ghost_batch_size is None:
    return x, axes
  shape = jnp.shape(x)
  xg = jnp.reshape(x, (shape[0] // ghost_batch_size, ghost_batch_size) + tuple(shape[1:]))
  return xg, tuple(a + 1 for a in axes)


def moments(xg, gaxes, sdtype, axis_name, axis_index_groups, mask, check_count=False):
  """Centred two-pass mean and biased variance over ``gaxes`` (keepdims), in ``sdtype``.

  mu = mean(x); var = mean((x - mu)^2). With ``axis_name`` each mean is a ``lax.pmean`` of the
  per-device means (equal per-device counts). With a ``mask`` the means are sums over the selected
  entries divided by their count, both summed over devices, so the statistics are exact global ones
  even when devices select different numbers of entries. With ``check_count``, a channel (group)
  whose mask selects fewer than 2 values gets NaN statistics: a traced mask cannot be counted
  when tracing (a concrete one was, by ``_check_count``), and a variance of 0 would give finite
  but meaningless outputs of order ``1/sqrt(eps)``.
  """
  xs = xg.astype(sdtype)
  if mask is None:
    mu = jnp.mean(xs, axis=gaxes, keepdims=True)
    if axis_name is not None:
      mu = lax.pmean(mu, axis_name, axis_index_groups=axis_index_groups)
    d = xs - mu
    var = jnp.mean(d * d, axis=gaxes, keepdims=True)
    if axis_name is not None:
      var = lax.pmean(var, axis_name, axis_index_groups=axis_index_groups)
    return mu, var

  def total(v):
    s = jnp.sum(v, axis=gaxes, keepdims=True)
    if axis_name is not None:
      s = lax.psum(s, axis_name, axis_index_groups=axis_index_groups)
    return s

  count = total(mask.astype(sdtype))
  mu = total(jnp.where(mask, xs, 0)) / count
  d = jnp.where(mask, xs - mu, 0)
  var = total(d * d) / count
  if check_count:
    enough = count >= 2
    mu, var = (jnp.where(enough, v, jnp.nan) for v in (mu, var))
  return mu, var


def summarize(stat_k, gaxes, ghost: bool, axis_name, axis_index_groups):
  """Keepdims group statistics -> one statistic per feature (averaged over ghost groups)."""
  stat = jnp.squeeze(stat_k, axis=gaxes)
  if ghost:
    stat = jnp.mean(stat, axis=0)
    if axis_name is not None:
      stat = lax.pmean(stat, axis_name, axis_index_groups=axis_index_groups)
  return stat


def _concrete(a):
  """``a`` as a numpy array, or None if it is traced (its values unknown while tracing) or not
  fully addressable from this process (a multi-host global array)."""
  if isinstance(a, jax.core.Tracer):
    return None
  if isinstance(a, jax.Array) and not a.is_fully_addressable:
    return None
  return np.asarray(a)


def _check_count(shape, axes, xg_shape, gaxes, ghost_batch_size, mask, stat_axis, stat_groups):
  """Raises unless every channel (and ghost group) has >= 2 values to take statistics over.

  Without a mask the count is static. With a concrete mask the selected entries are counted
  now; a traced mask is not checked here (``moments`` makes such statistics NaN instead).
  """
  devices = axis_size(stat_axis, stat_groups)
  ghost = ghost_batch_size is not None
  expected = (f'at least 2 values per channel to take training-mode statistics over (axes '
              f'{axes}); the biased variance of one value is 0')
  if mask is None:
    count = math.prod(xg_shape[a] for a in gaxes) * devices
    if count < 2:
      what = f'ghost batches of {ghost_batch_size}' if ghost else f'x.shape {shape}'
      fail(_LAYER, 'x', expected, f'1 value per channel with {what} (use the running '
           'averages, i.e. eval mode, for single examples)')
    return
  m = _concrete(mask)
  if m is None:
    return
  m = np.broadcast_to(m.astype(bool), shape).reshape(xg_shape)
  low = int(m.sum(axis=gaxes).min()) * devices
  if low < 2:
    where = 'in some ghost group and channel' if ghost else 'in some channel'
    fail(_LAYER, 'mask', expected, f'{low} selected value(s) {where}')


def prepare(x, axes, ghost_batch_size, mask, axis_name, axis_index_groups, stats_dtype,
             check_count):
  """Shared validation and grouping of ``batch_norm`` and ``batch_statistics``."""
  # Rank 1 / no array axis to reduce: fine with a named axis, or when the count is not checked
  # (Flax modules initializing on one example of the per-example ``vmap`` convention).
  axes = reduction_axes(x, axes, named=axis_name is not None or not check_count)
  shape = tuple(jnp.shape(x))
  _check_ghost(shape, axes, ghost_batch_size)
  _check_mask(mask, shape)
  if axis_index_groups is not None and axis_name is None:
    fail(_LAYER, 'axis_index_groups', 'to be used together with `axis_name`',
         'axis_name=None')
  ghost = ghost_batch_size is not None
  xg, gaxes = _group(x, axes, ghost_batch_size)
  maskg = None
  if mask is not None:
    maskg = jnp.broadcast_to(jnp.asarray(mask, dtype=bool), shape)
    maskg, _ = _group(maskg, axes, ghost_batch_size)
  # Ghost groups take their statistics on the local batch only.
  stat_axis = None if ghost else axis_name
  stat_groups = None if ghost else axis_index_groups
  if check_count:
    _check_count(shape, axes, jnp.shape(xg), gaxes, ghost_batch_size, mask, stat_axis,
                 stat_groups)
  sdtype = _stats_dtype(x, stats_dtype)
  return axes, shape, ghost, xg, gaxes, maskg, stat_axis, stat_groups, sdtype


