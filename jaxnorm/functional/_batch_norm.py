"""Batch normalization as pure JAX functions, with a closed-form backward pass.

Training mode, per feature (channel) ``c``, with the statistics taken over the reduction axes
(NHWC: ``(0, 1, 2)``; NC: ``(0,)``), ``m`` entries per channel::

  mu     = mean_B(x)                       # batch mean
  var    = mean_B((x - mu)^2)              # biased variance, centred two-pass
  x_hat  = (x - mu) / sqrt(var + eps)
  y      = gamma * x_hat + beta

Its exact backward, with ``g = dL/dy``::

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
Its speed and memory against ``flax.linen.BatchNorm`` (whose default one-pass variance
``E[x^2] - E[x]^2`` reads ``x`` once less) are in BENCHMARKS.md, section 1.

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
  Ioffe & Szegedy (2015), "Batch Normalization: Accelerating Deep Network Training by Reducing
  Internal Covariate Shift", arXiv:1502.03167 (forward, running averages, the backward through the
  statistics); Panigrahi, Chen & Kuo (2018), arXiv:1812.00342 (the backward's identities); De &
  Smith (2020), "Batch
  Normalization Biases Residual Blocks Towards the Identity Function in Deep Networks" (ghost
  batch normalization). The closed form is standard algebra, checked against autodiff.
"""

from __future__ import annotations

import math
from typing import Any

import jax.numpy as jnp
from jax import lax

from jaxnorm.functional._batch_norm_stats import (
  _LAYER,
  Axes,
  axis_size,
  check_param,
  feature_shape,
  moments,
  prepare,
  reduction_axes,
  summarize,
)
from jaxnorm.functional._batch_norm_vjp import affine, closed_form_batch_norm, is_manual
from jaxnorm.functional._checks import check_positive
from jaxnorm.functional._layer_dtypes import resolve_dtypes as resolve_dtypes
from jaxnorm.functional._layer_dtypes import split_axes as split_axes


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
    Ioffe & Szegedy (2015), arXiv:1502.03167 (biased batch statistics); De & Smith (2020) for ghost
    batches.
  """
  _, _, ghost, xg, gaxes, maskg, stat_axis, stat_groups, sdtype = prepare(
      x, axes, ghost_batch_size, mask, axis_name, axis_index_groups, stats_dtype, check_count)
  mu_k, var_k = moments(xg, gaxes, sdtype, stat_axis, stat_groups, maskg, check_count)
  return (summarize(mu_k, gaxes, ghost, axis_name, axis_index_groups),
          summarize(var_k, gaxes, ghost, axis_name, axis_index_groups))


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
    Ioffe & Szegedy (2015), arXiv:1502.03167, Algorithm 2 (inference with population statistics).
  """
  axes = reduction_axes(x, axes, named=True)
  check_positive(_LAYER, 'epsilon', epsilon, allow_zero=True)
  fshape = feature_shape(jnp.shape(x), axes)
  for arg, p in (('mean', mean), ('var', var)):
    check_param(arg, p, fshape)
  check_param('scale', scale, fshape)
  check_param('bias', bias, fshape)
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
    closed_form_backward: use the closed-form ``jax.custom_vjp`` backward (module docstring). It
      rules out forward-mode AD (``jax.jvp``, ``jax.jacfwd``); pass ``False`` for plain autodiff.
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
    Ioffe & Szegedy (2015), arXiv:1502.03167 (closed-form backward); De & Smith (2020),
    arXiv:2002.10444
    (ghost batch normalization).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> x = jax.random.normal(jax.random.key(0), (8, 4, 4, 3)) * 3 + 1
    >>> y, mean, var = batch_norm(x, jnp.ones(3), jnp.zeros(3))
    >>> bool(jnp.allclose(y.mean((0, 1, 2)), 0, atol=1e-5)), mean.shape
    (True, (3,))
  """
  axes, shape, ghost, xg, gaxes, maskg, stat_axis, stat_groups, sdtype = prepare(
      x, axes, ghost_batch_size, mask, axis_name, axis_index_groups, stats_dtype, check_count)
  check_positive(_LAYER, 'epsilon', epsilon, allow_zero=True)
  fshape = feature_shape(shape, axes)
  check_param('scale', scale, fshape)
  check_param('bias', bias, fshape)
  out_dtype = jnp.result_type(x) if dtype is None else dtype

  # Parameters broadcast against the grouped array: 1 on reduced axes and on the group axis.
  pshape = tuple(1 if (a in gaxes or (ghost and a == 0)) else d
                 for a, d in enumerate(jnp.shape(xg)))
  scale_p = None if scale is None else jnp.reshape(scale, pshape)
  bias_p = None if bias is None else jnp.reshape(bias, pshape)
  if (closed_form_backward and mask is None
      and (stat_axis is None or is_manual(x, stat_axis))):
    param_axes = tuple(a for a, d in enumerate(pshape) if d == 1)
    n_total = math.prod(jnp.shape(xg)[a] for a in gaxes) * axis_size(stat_axis, stat_groups)
    bn = closed_form_batch_norm(gaxes, param_axes, epsilon, sdtype, stat_axis, stat_groups,
                                 n_total)
    y, mu_k, var_k = bn(xg, scale_p, bias_p)
  else:
    # Direct formula, differentiated by autodiff (same operation order as flax.linen.BatchNorm).
    mu_k, var_k = moments(xg, gaxes, sdtype, stat_axis, stat_groups, maskg, check_count)
    y = affine(xg, mu_k, lax.rsqrt(var_k + epsilon), scale_p, bias_p)
  y = jnp.reshape(y, shape).astype(out_dtype)
  return (y, summarize(mu_k, gaxes, ghost, axis_name, axis_index_groups),
          summarize(var_k, gaxes, ghost, axis_name, axis_index_groups))
