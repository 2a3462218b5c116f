"""Batch normalization as pure JAX functions, with a closed-form backward pass.

Training mode, per feature (channel) ``c``, with the statistics taken over the reduction axes
(NHWC: ``(0, 1, 2)``; NC: ``(0,)``), ``m`` entries per channel::

  mu     = mean_B(x)                       # batch mean
  var    = mean_B((x - mu)^2)              # biased variance, centred two-pass
  x_hat  = (x - mu) / sqrt(var + eps)
  y      = gamma * x_hat + beta

Its exact backward (papers.md §0), with ``g = dL/dy``::

  dL/dx     = gamma / sqrt(var + eps) * (g - mean_B(g) - x_hat * mean_B(g * x_hat))
  dL/dgamma = sum_B(g * x_hat),   dL/dbeta = sum_B(g)

``batch_norm`` implements the whole training-mode layer (statistics, normalization and affine
step) as one ``jax.custom_vjp`` with that closed form (``closed_form_backward=True``, the default)
or as plain autodiff of the direct formula (``closed_form_backward=False``). The custom function
returns ``y`` and the statistics, so a loss that also uses the returned ``(mean, var)`` gets their
part of ``dL/dx`` too (``d mu/dx = 1/m``, ``d var/dx = 2 (x - mu)/m``, added to the per-channel
coefficients of the same fused pass). Inside ``shard_map``, the cotangents of replicated
``gamma`` / ``beta`` are ``psum``-ed over the axes along which the batch varies, as autodiff would
do (tested against the single-device computation).

Memory and time: the closed-form backward keeps ``x`` itself (in its own dtype: bf16 stays bf16)
plus per-channel ``mu``, ``1/sqrt(var + eps)`` and ``gamma``, and recomputes ``x_hat`` inside its
two fused passes (the sums of ``g`` and ``g * x_hat``, then ``dL/dx``). Autodiff of the direct
formula keeps the centred input ``x - mu`` (float32) for the variance and ``x_hat`` for ``dgamma``.
On XLA:CPU the layer alone (forward + backward) runs at 0.78-0.95x ``flax.linen.BatchNorm`` with
the same two-pass variance and 1.01-1.06x flax's default one-pass ``E[x^2] - E[x]^2`` variance,
which reads ``x`` once less, with the same peak memory (BENCHMARKS.md, section 1, on a 2-core
machine shared with other jobs).

What the custom VJP rules out: forward-mode AD of the layer itself. ``jax.jvp``, ``jax.jacfwd``
and evaluating the result of ``jax.linearize`` through ``closed_form_backward=True`` fail with
JAX's error "can't apply forward-mode autodiff (jvp) to a custom_vjp function"; pass
``closed_form_backward=False`` for those. Derivatives of the gradient are exact: the statistics
are computed inside the custom VJP's forward rule, so its residuals (``x``, ``mu``,
``1/sqrt(var + eps)``, ``gamma``) are differentiable functions of the inputs, and the backward rule
(plain JAX, an exact formula of them) is differentiated by JAX as any other code. Reverse over
reverse (``jax.grad`` of a function of ``jax.grad``, ``jax.jacrev(jax.grad(f))``) and forward over
reverse (``jax.hessian``, ``jax.jvp`` of ``jax.grad``: Hessian-vector products) equal the
second derivatives of the autodiff path, with respect to the input, anything upstream of it and
``gamma`` / ``beta``, with ghost batches and under ``shard_map`` with ``axis_name`` (tested in
float64 to 1e-8 relative).

Batch statistics are always computed in at least float32 (``stats_dtype``), whatever the input
dtype (bf16 in, bf16 out, float32 statistics), with the centred two-pass variance, so a common
offset of 1e4 on float32 inputs costs no precision (``E[x^2] - E[x]^2`` would lose it all).

Multi-device: under ``jit`` with the batch sharded over a ``Mesh``, a plain mean over the batch is
already global; no ``axis_name`` is needed. Under ``shard_map`` / ``pmap`` pass ``axis_name`` (and
optionally ``axis_index_groups``): the mean and then the centred variance are ``lax.pmean``-ed, and
so are the two ``mean_B`` terms of the backward pass.

Named axes and the closed form: the backward's ``lax.pmean`` needs its axis bound where JAX runs
the backward rule, which holds for a ``shard_map`` mesh axis but not for a ``jax.vmap`` axis (JAX
maps a custom VJP's backward rule without binding the vmap's ``axis_name``). So the closed form is
used with ``axis_name`` only when every named axis is a ``shard_map`` mesh axis along which ``x``
varies (visible in the type of ``x``); otherwise (``jax.vmap(..., axis_name=...)``, the
per-example convention of Equinox, and also ``pmap`` and ``shard_map(check_vma=False)``, whose
axes are not in that type) the layer silently takes the autodiff path: the same values and
gradients as ``flax.linen.BatchNorm(axis_name=...)``, with its speed. With ``axis_name`` no
array axis needs to be reduced: a rank-1 ``x`` (one example under ``vmap``) or ``axes=()``
takes its statistics over the named axis alone.

Masks: only ``True`` entries of ``mask`` enter the statistics, and the backward is plain autodiff.
As without a mask, a channel (ghost group) needs at least 2 selected values. A concrete mask (a
numpy or committed jax array, also one closed over by a jitted function) is counted when the
function is traced and raises the same ``ValueError`` as a too-small batch. A traced mask (an
argument of a jitted function) cannot be counted then: such a channel gets NaN statistics, hence
NaN outputs and NaN running averages, instead of the meaningless finite outputs of order
``1/sqrt(eps)`` that a variance of 0 would give (``jax.debug_nans`` finds the first one).

Ghost batch normalization (De & Smith, after Hoffer et al.): ``ghost_batch_size=k`` splits axis 0
into ``N // k`` groups of ``k`` consecutive examples and normalizes each group with its own
statistics; this is a reshape, so it works under plain ``jit``. The backward's ``mean_B`` terms are
then per group. The returned ``(mean, var)`` (for running averages) are the averages over groups of
the group means and of the group (biased) variances. With ``axis_name`` as well, groups are formed
from each device's local batch (no communication in the normalization itself) and only the
returned ``(mean, var)`` are averaged over devices, so replicas keep identical running statistics.

References:
  Ioffe & Szegedy (2015), "Batch Normalization" (forward, running averages); papers.md §0 (exact
  backward and its identities; Panigrahi, Chen & Kuo); papers.md §3 and De & Smith (2020), "Batch
  Normalization Biases Residual Blocks Towards the Identity Function in Deep Networks" (ghost
  batch normalization). The backward's closed form is standard algebra ([recon] in papers.md).
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


def _reduction_axes(x, axes: Axes, named: bool = False) -> tuple[int, ...]:
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


def _feature_shape(shape: Sequence[int], axes: tuple[int, ...]) -> tuple[int, ...]:
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


def _check_param(arg: str, p, feature_shape: tuple[int, ...]) -> None:
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


def _axis_size(axis_name, axis_index_groups) -> int:
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


def _moments(xg, gaxes, sdtype, axis_name, axis_index_groups, mask, check_count=False):
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


def _summarize(stat_k, gaxes, ghost: bool, axis_name, axis_index_groups):
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
  now; a traced mask is not checked here (``_moments`` makes such statistics NaN instead).
  """
  devices = _axis_size(stat_axis, stat_groups)
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


def _prepare(x, axes, ghost_batch_size, mask, axis_name, axis_index_groups, stats_dtype,
             check_count):
  """Shared validation and grouping of ``batch_norm`` and ``batch_statistics``."""
  # Rank 1 / no array axis to reduce: fine with a named axis, or when the count is not checked
  # (Flax modules initializing on one example of the per-example ``vmap`` convention).
  axes = _reduction_axes(x, axes, named=axis_name is not None or not check_count)
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


# ----------------------------------------------------------------------------------------------
# Closed-form backward
# ----------------------------------------------------------------------------------------------


def _varying_axes(a) -> frozenset:
  """The ``shard_map`` mesh axes along which ``a`` varies (empty outside ``shard_map``)."""
  aval = jax.typeof(a)
  manual = getattr(aval, 'manual_axis_type', None)  # jax >= 0.9; older: ``aval.vma``
  return frozenset(manual.varying if manual is not None else getattr(aval, 'vma', ()))


def _like(cotangent, primal):
  """``cotangent`` in the dtype and the ``shard_map`` device-variance of ``primal``.

  Inside ``shard_map`` a parameter replicated over a mesh axis (the usual case) must get a
  cotangent replicated over it too: the per-device sums are ``psum``-ed over every axis along which
  the cotangent varies and the parameter does not, which is what autodiff does for
  ``x_hat * scale`` (the transpose of the implicit ``pvary`` of ``scale``).
  """
  extra = tuple(sorted(_varying_axes(cotangent) - _varying_axes(primal)))
  if extra:
    cotangent = lax.psum(cotangent, extra)
  return cotangent.astype(primal.dtype)


def _is_manual(x, axis_name) -> bool:
  """Whether every name in ``axis_name`` is a ``shard_map`` mesh axis along which ``x`` varies.

  Only then may a collective sit in the closed-form backward: ``jax.vmap``'s batching rule for a
  ``custom_vjp`` maps the backward without binding the axis name (an "unbound axis name" error),
  and a ``pmap`` axis or a ``shard_map(check_vma=False)`` axis is not visible in the type of ``x``.
  """
  names = tuple(axis_name) if isinstance(axis_name, (tuple, list)) else (axis_name,)
  return set(names) <= _varying_axes(x)


def _affine(x, mu, inv_std, scale, bias):
  """``(x - mu) * (inv_std * scale) + bias`` in the statistics dtype (flax's operation order);
  ``scale`` / ``bias`` may be None."""
  mul = inv_std if scale is None else inv_std * scale
  y = (x.astype(mu.dtype) - mu) * mul
  return y if bias is None else y + bias


def _batch_norm_closed_form(gaxes, param_axes, epsilon, sdtype, axis_name, axis_index_groups,
                            n_total):
  """Returns ``f(x, scale, bias) = (y, mu, var)``, the whole training-mode layer (statistics,
  normalization, affine step) as one ``jax.custom_vjp`` with the closed-form backward.

  ``mu`` and ``var`` are the keepdims statistics of ``x`` over ``gaxes`` (``pmean``-ed over
  ``axis_name``; ``n_total`` values per channel in all). The statistics are computed inside the
  forward rule, so the residuals (``x`` itself in its own dtype, ``mu``, ``1/sqrt(var + eps)``,
  ``scale``, ``bias``) are differentiable functions of the primal inputs and the backward rule,
  plain JAX, is an exact formula of them: differentiating it (reverse-over-reverse,
  ``jax.hessian``) gives the true second derivatives. The backward also takes the cotangents of
  the returned statistics: ``d mu/dx = 1/n`` and ``d var/dx = 2 (x - mu)/n`` per channel.
  ``x_hat`` is recomputed inside the backward's fused passes instead of being stored.
  ``scale`` and ``bias`` are broadcastable against ``x`` (1 on ``param_axes``) or None.
  Hyperparameters are closed-over Python values.
  """

  def forward(x, scale, bias):
    mu, var = _moments(x, gaxes, sdtype, axis_name, axis_index_groups, None)
    inv_std = lax.rsqrt(var + epsilon)
    return (_affine(x, mu, inv_std, scale, bias), mu, var), (x, mu, inv_std, scale, bias)

  @jax.custom_vjp
  def bn(x, scale, bias):
    return forward(x, scale, bias)[0]

  def bwd(res, cotangents):
    x, mu, inv_std, scale, bias = res
    g, g_mu, g_var = cotangents
    x_hat = (x.astype(mu.dtype) - mu) * inv_std
    g = g.astype(jnp.promote_types(g.dtype, mu.dtype))
    # sum_B(g) and sum_B(g * x_hat): dbeta and dgamma summed over this device's batch (the
    # cotangents of replicated parameters, as autodiff gives them), and, divided by the count
    # and averaged across devices when axis_name is given, the two means of dL/dx.
    sum_g = jnp.sum(g, axis=gaxes, keepdims=True)
    sum_gx = jnp.sum(g * x_hat, axis=gaxes, keepdims=True)
    count = math.prod(x.shape[a] for a in gaxes)
    terms = (sum_g / count, sum_gx / count)
    if axis_name is not None:
      terms = lax.pmean(terms, axis_name, axis_index_groups=axis_index_groups)
    mul = inv_std if scale is None else inv_std * scale
    # dL/dx = mul (g - mean_B(g) - x_hat mean_B(g x_hat)) + (g_mu + 2 g_var (x - mu)) / n, with
    # x - mu = x_hat / inv_std: per-channel coefficients of 1 and of x_hat, one fused pass.
    c0 = mul * terms[0] - g_mu / n_total
    c1 = mul * terms[1] - (2.0 / n_total) * g_var / inv_std
    dx = mul * g - c0 - x_hat * c1
    # Ghost groups: the parameters are shared by every group (axis 0 of x), sum over it as well.
    extra = tuple(a for a in param_axes if a not in gaxes)
    dscale = None if scale is None else _like(jnp.sum(sum_gx, axis=extra, keepdims=True), scale)
    dbias = None if bias is None else _like(jnp.sum(sum_g, axis=extra, keepdims=True), bias)
    return dx.astype(x.dtype), dscale, dbias

  bn.defvjp(forward, bwd)
  return bn


# ----------------------------------------------------------------------------------------------
# Layer helpers (shared by the linen and NNX modules)
# ----------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------


def batch_statistics(
    x,
    *,
    axes: Axes = None,
    axis_name: str | None = None,
    axis_index_groups: Any = None,
    ghost_batch_size: int | None = None,
    mask=None,
    stats_dtype=None,
    check_count: bool = True,
):
  """Batch mean and biased variance per feature (centred two-pass, at least float32).

  Args:
    x: input array, batch axis first (e.g. NHWC or NC), floating dtype; rank >= 2, or >= 1
      with ``axis_name`` or ``check_count=False``.
    axes: reduction axes (default: every axis but the last); may be empty with ``axis_name``.
    axis_name: ``shard_map`` / ``pmap`` / ``vmap`` axis to average the statistics over
      (``lax.pmean``). Not needed under ``jit`` with a sharded batch.
    axis_index_groups: device groups within ``axis_name`` (see ``jax.lax.psum``).
    ghost_batch_size: if given, statistics per group of this many consecutive examples along
      axis 0, then averaged over groups (see the module docstring).
    mask: optional boolean array broadcastable to ``x``: only ``True`` entries enter the
      statistics. Fewer than 2 selected values in a channel: ``ValueError`` if the mask is
      concrete, NaN statistics if it is traced (see the module docstring); with
      ``check_count=False``, 0/0 = NaN for none and variance 0 for one, as in Flax.
    stats_dtype: dtype of the statistics (default: ``promote_types(x.dtype, float32)``).
    check_count: raise if a channel's statistics would be taken over a single value (its
      variance would silently be 0). Flax modules pass ``False`` while initializing.

  Returns:
    ``(mean, var)``, each of shape ``x.shape`` without the reduction axes, in ``stats_dtype``.

  Raises:
    TypeError / ValueError: non-floating ``x``, rank < 2 (< 1 with ``axis_name``), bad axes, a
      ``ghost_batch_size`` that does not divide the batch, fewer than 2 values per channel
      (also selected by a concrete ``mask``).

  References:
    Ioffe & Szegedy (2015); papers.md §0 (biased batch statistics); De & Smith (2020) for ghost
    batches.
  """
  _, _, ghost, xg, gaxes, maskg, stat_axis, stat_groups, sdtype = _prepare(
      x, axes, ghost_batch_size, mask, axis_name, axis_index_groups, stats_dtype, check_count)
  mu_k, var_k = _moments(xg, gaxes, sdtype, stat_axis, stat_groups, maskg, check_count)
  return (_summarize(mu_k, gaxes, ghost, axis_name, axis_index_groups),
          _summarize(var_k, gaxes, ghost, axis_name, axis_index_groups))


def normalize(
    x,
    mean,
    var,
    scale=None,
    bias=None,
    *,
    axes: Axes = None,
    epsilon: float = 1e-5,
    dtype=None,
):
  """Eval-mode batch normalization: ``(x - mean) * (scale / sqrt(var + eps)) + bias``.

  Computed in ``promote_types(x.dtype, mean.dtype)`` (float32 for bf16 inputs and float32
  statistics), in the same order of operations as ``flax.linen.BatchNorm``, and plain autodiff.

  Args:
    x: input array, floating dtype, rank >= 1.
    mean: per-feature mean, shape ``x.shape`` without ``axes``.
    var: per-feature (biased) variance, same shape as ``mean``.
    scale: optional per-feature gamma (same shape as ``mean``).
    bias: optional per-feature beta (same shape as ``mean``).
    axes: the reduction axes ``mean`` and ``var`` were taken over (default: all but the last;
      may be empty, e.g. for one example of shape ``(C,)``).
    epsilon: added to ``var`` inside the square root.
    dtype: output dtype (default: ``x.dtype``).

  Returns:
    The normalized array, shape of ``x``, dtype ``dtype``.

  References:
    Ioffe & Szegedy (2015), Algorithm 2 (inference with population statistics); papers.md §0.
  """
  axes = _reduction_axes(x, axes, named=True)
  check_positive(_LAYER, 'epsilon', epsilon, allow_zero=True)
  fshape = _feature_shape(jnp.shape(x), axes)
  for arg, p in (('mean', mean), ('var', var)):
    _check_param(arg, p, fshape)
  _check_param('scale', scale, fshape)
  _check_param('bias', bias, fshape)
  out_dtype = jnp.result_type(x) if dtype is None else dtype
  cdtype = jnp.promote_types(jnp.result_type(x), jnp.result_type(mean))
  mean = jnp.expand_dims(mean, axes)
  var = jnp.expand_dims(var, axes)
  mul = lax.rsqrt(var.astype(cdtype) + epsilon)
  if scale is not None:
    mul = mul * jnp.expand_dims(scale, axes)
  y = (x.astype(cdtype) - mean) * mul
  if bias is not None:
    y = y + jnp.expand_dims(bias, axes)
  return y.astype(out_dtype)


def batch_norm(
    x,
    scale=None,
    bias=None,
    *,
    axes: Axes = None,
    epsilon: float = 1e-5,
    axis_name: str | None = None,
    axis_index_groups: Any = None,
    ghost_batch_size: int | None = None,
    mask=None,
    closed_form_backward: bool = True,
    dtype=None,
    stats_dtype=None,
    check_count: bool = True,
):
  """Training-mode batch normalization; returns the output and the batch statistics.

  ``y = scale * (x - mu_B) / sqrt(var_B + epsilon) + bias`` with ``mu_B``, ``var_B`` the biased
  batch statistics over ``axes`` (per ghost group if ``ghost_batch_size``), computed in
  ``stats_dtype`` (at least float32) with the centred two-pass variance.

  Args:
    x: input array, batch axis first (NHWC, NC, ...), floating dtype; rank >= 2, or >= 1 with
      ``axis_name`` or ``check_count=False``.
    scale: optional gamma, shape ``x.shape`` without ``axes`` (e.g. ``(C,)``).
    bias: optional beta, same shape as ``scale``.
    axes: reduction axes (default: every axis but the last); may be empty with ``axis_name``.
    epsilon: added to the variance inside the square root (>= 0).
    axis_name: ``shard_map`` / ``pmap`` / ``vmap`` axis over which statistics (and the backward's
      two ``mean_B`` terms) are averaged. Not needed under ``jit`` with a sharded batch. The
      closed form is used only if it is a ``shard_map`` axis along which ``x`` varies; otherwise
      (``vmap``, ``pmap``) the backward is plain autodiff (see the module docstring).
    axis_index_groups: device groups within ``axis_name`` (see ``jax.lax.psum``).
    ghost_batch_size: statistics per group of this many consecutive examples along axis 0; must
      divide ``x.shape[0]``. Works under plain ``jit``.
    mask: optional boolean array broadcastable to ``x``; only ``True`` entries enter the
      statistics (all entries are normalized). With a mask the backward is plain autodiff.
      Fewer than 2 selected values in a channel: ``ValueError`` for a concrete mask, NaN
      statistics and outputs for a traced one (see the module docstring).
    closed_form_backward: use the closed-form ``jax.custom_vjp`` backward (papers.md §0). It rules
      out forward-mode AD (``jax.jvp``, ``jax.jacfwd``); pass ``False`` for plain autodiff.
      Reverse-over-reverse and forward-over-reverse derivatives are exact either way.
    dtype: output dtype (default: ``x.dtype``; bf16 in gives bf16 out).
    stats_dtype: dtype of the statistics (default: ``promote_types(x.dtype, float32)``).
    check_count: raise if a channel's statistics would be taken over a single value.

  Returns:
    ``(y, mean, var)``: ``y`` of the shape of ``x`` in ``dtype``; ``mean`` and ``var`` of shape
    ``x.shape`` without ``axes`` in ``stats_dtype`` (averaged over ghost groups), differentiable,
    ready for a running average.

  Raises:
    TypeError / ValueError: non-floating input or parameters, rank < 2 (< 1 with
      ``axis_name``), bad axes, parameter shapes, a ``ghost_batch_size`` that does not divide
      the batch, fewer than 2 values per channel (also selected by a concrete ``mask``).

  References:
    Ioffe & Szegedy (2015); papers.md §0 (closed-form backward); De & Smith (2020), papers.md §3
    (ghost batch normalization).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> x = jax.random.normal(jax.random.key(0), (8, 4, 4, 3)) * 3 + 1
    >>> y, mean, var = batch_norm(x, jnp.ones(3), jnp.zeros(3))
    >>> bool(jnp.allclose(y.mean((0, 1, 2)), 0, atol=1e-5)), mean.shape
    (True, (3,))
  """
  axes, shape, ghost, xg, gaxes, maskg, stat_axis, stat_groups, sdtype = _prepare(
      x, axes, ghost_batch_size, mask, axis_name, axis_index_groups, stats_dtype, check_count)
  check_positive(_LAYER, 'epsilon', epsilon, allow_zero=True)
  fshape = _feature_shape(shape, axes)
  _check_param('scale', scale, fshape)
  _check_param('bias', bias, fshape)
  out_dtype = jnp.result_type(x) if dtype is None else dtype

  # Parameters broadcast against the grouped array: 1 on reduced axes and on the group axis.
  pshape = tuple(1 if (a in gaxes or (ghost and a == 0)) else d
                 for a, d in enumerate(jnp.shape(xg)))
  scale_p = None if scale is None else jnp.reshape(scale, pshape)
  bias_p = None if bias is None else jnp.reshape(bias, pshape)
  if (closed_form_backward and mask is None
      and (stat_axis is None or _is_manual(x, stat_axis))):
    param_axes = tuple(a for a, d in enumerate(pshape) if d == 1)
    n_total = math.prod(jnp.shape(xg)[a] for a in gaxes) * _axis_size(stat_axis, stat_groups)
    bn = _batch_norm_closed_form(gaxes, param_axes, epsilon, sdtype, stat_axis, stat_groups,
                                 n_total)
    y, mu_k, var_k = bn(xg, scale_p, bias_p)
  else:
    # Direct formula, differentiated by autodiff (same operation order as flax.linen.BatchNorm).
    mu_k, var_k = _moments(xg, gaxes, sdtype, stat_axis, stat_groups, maskg, check_count)
    y = _affine(xg, mu_k, lax.rsqrt(var_k + epsilon), scale_p, bias_p)
  y = jnp.reshape(y, shape).astype(out_dtype)
  return (y, _summarize(mu_k, gaxes, ghost, axis_name, axis_index_groups),
          _summarize(var_k, gaxes, ghost, axis_name, axis_index_groups))
