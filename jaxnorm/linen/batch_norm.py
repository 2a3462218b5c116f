"""``BatchNorm``: a drop-in replacement for ``flax.linen.BatchNorm`` with a closed-form backward.

A thin shell: it owns the parameters (``params``: ``scale``, ``bias``) and the running statistics
(``batch_stats``: ``mean``, ``var``) exactly as ``flax.linen.BatchNorm`` 0.12 does, and calls
``jaxnorm.functional.batch_norm`` for the math.

References:
  Ioffe & Szegedy (2015), arXiv:1502.03167 (the closed-form backward is that of
  ``jaxnorm.functional.batch_norm``); De & Smith (2020), arXiv:2002.10444 (ghost batch
  normalization).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.typing import Dtype, Initializer

from jaxnorm.functional._batch_norm import batch_norm, normalize
from jaxnorm.functional._checks import check_in_range
from jaxnorm.functional._layer_dtypes import resolve_dtypes, split_axes


class BatchNorm(nn.Module):
  """Batch normalization with the fields, collections and conventions of ``flax.linen.BatchNorm``.

  Training mode (``use_running_average=False``) normalizes with the biased batch statistics over
  every axis but ``axis`` and updates the running averages in ``batch_stats``::

    ra_mean = momentum * ra_mean + (1 - momentum) * batch_mean
    ra_var  = momentum * ra_var  + (1 - momentum) * batch_var     # biased variance

  Eval mode (``use_running_average=True``) normalizes with the running averages. While
  initializing, the running averages are not updated, ``axis_name`` is dropped (so ``init`` works
  outside ``pmap`` / ``shard_map``), ``ghost_batch_size`` is ignored and a batch of one is
  accepted, so a dummy batch of any size initializes the module.

  Differences from ``flax.linen.BatchNorm`` (everything else is the same):

  - The variance is always the centred two-pass one, ``mean((x - mean(x))^2)``: the
    ``use_fast_variance`` field is accepted for compatibility and ignored. Flax's default
    ``E[x^2] - E[x]^2`` agrees to float rounding on well-scaled inputs but loses all precision
    for inputs with a large common offset (1e4 in float32); this one stays exact.
  - In training mode, a channel whose statistics would be taken over a single value raises a
    ``ValueError`` (Flax silently uses variance 0). The same holds for a concrete ``mask`` that
    selects fewer than 2 values of a channel; with a traced ``mask`` (an argument of a jitted
    function) such a channel gets NaN statistics and outputs instead (Flax: finite outputs of
    order ``1/sqrt(epsilon)``).
  - With ``mask`` and ``axis_name``, the statistics are exact global ones (masked sums and counts
    summed over devices); Flax averages the per-device masked means.
  - A rank-0 input, an ``axis`` outside ``[-x.ndim, x.ndim)`` or repeated, and a ``momentum``
    outside ``[0, 1]`` raise a ``ValueError`` naming the argument.
  - ``ghost_batch_size`` and ``closed_form_backward`` (see ``jaxnorm.functional.batch_norm``).
    The closed-form backward rules out forward-mode AD (``jax.jvp``, ``jax.jacfwd``); set
    ``closed_form_backward=False`` for it. Its second derivatives (``jax.hessian``, grad of grad)
    are exact. With a ``mask``, and with an ``axis_name`` that is not a ``shard_map`` axis along
    which the input varies (a ``jax.vmap`` or ``pmap`` axis), the backward is plain autodiff.

  Per-example ``jax.vmap(..., axis_name=...)`` (the Equinox convention) works as in Flax: each
  call sees one example (e.g. of shape ``(C,)``), the statistics are averaged over the vmap axis,
  and ``jax.grad`` of the vmapped function and ``jax.vmap`` of ``jax.grad`` both work.

  Attributes:
    use_running_average: if True, use the running statistics instead of batch statistics.
    axis: the feature axis (or axes) of the input; statistics reduce over all other axes.
    momentum: decay rate of the running averages, in ``[0, 1]``.
    epsilon: added to the variance inside the square root.
    dtype: dtype of the result (default: inferred from input and parameters, as in Flax).
    param_dtype: dtype of ``scale`` and ``bias``.
    use_bias: add the learned ``bias`` (beta).
    use_scale: multiply by the learned ``scale`` (gamma).
    bias_init: initializer of ``bias`` (zeros).
    scale_init: initializer of ``scale`` (ones).
    axis_name: ``pmap`` / ``shard_map`` / ``vmap`` axis over which to average batch statistics
      (not needed under ``jit`` with a sharded batch).
    axis_index_groups: device groups within ``axis_name`` (see ``jax.lax.psum``).
    use_fast_variance: accepted for compatibility with Flax and ignored (see above).
    force_float32_reductions: compute statistics in at least float32 and keep the running
      statistics in float32 (Flax's default). If False, in the input / ``dtype`` precision.
    ghost_batch_size: if set, statistics per group of this many consecutive examples (axis 0),
      the ghost batch normalization of De & Smith; running averages use the group averages.
    closed_form_backward: use the closed-form ``jax.custom_vjp`` backward
      (``jaxnorm.functional.batch_norm``).

  References:
    Ioffe & Szegedy (2015), arXiv:1502.03167; De & Smith (2020), arXiv:2002.10444 (ghost batch
    normalization).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from jaxnorm.linen import BatchNorm
    >>> bn = BatchNorm(momentum=0.9, ghost_batch_size=4)
    >>> x = jax.random.normal(jax.random.key(0), (8, 6))
    >>> variables = bn.init(jax.random.key(1), x, use_running_average=False)
    >>> y, updates = bn.apply(variables, x, use_running_average=False, mutable=['batch_stats'])
    >>> jax.tree_util.tree_map(jnp.shape, updates)
    {'batch_stats': {'mean': (6,), 'var': (6,)}}
  """

  use_running_average: bool | None = None
  axis: int | tuple[int, ...] = -1
  momentum: float = 0.99
  epsilon: float = 1e-5
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  use_bias: bool = True
  use_scale: bool = True
  bias_init: Initializer = nn.initializers.zeros
  scale_init: Initializer = nn.initializers.ones
  axis_name: str | None = None
  axis_index_groups: Any = None
  use_fast_variance: bool = True
  force_float32_reductions: bool = True
  ghost_batch_size: int | None = None
  closed_form_backward: bool = True

  @nn.compact
  def __call__(self, x, use_running_average: bool | None = None, *, mask: jax.Array | None = None):
    """Normalizes ``x`` with batch statistics (training) or running statistics (eval).

    Args:
      x: the input, features on ``axis``.
      use_running_average: overrides the field of the same name.
      mask: optional boolean array broadcastable to ``x``; only ``True`` entries enter the
        batch statistics.

    Returns:
      The normalized input, shape of ``x``.

    Raises:
      ValueError / TypeError: naming the argument: a rank-0 ``x``, an ``axis`` out of range, a
        ``momentum`` outside ``[0, 1]``, fewer than 2 values per channel in training mode, and
        the errors of ``jaxnorm.functional.batch_norm``.
    """
    use_running_average = nn.merge_param(
        'use_running_average', self.use_running_average, use_running_average)
    check_in_range('BatchNorm', 'momentum', self.momentum, 0, 1)
    feature_axes, reduction_axes = split_axes(x, self.axis)
    feature_shape = tuple(jnp.shape(x)[a] for a in feature_axes)

    stat_param_dtype = jnp.float32 if self.force_float32_reductions else self.param_dtype
    ra_mean = self.variable('batch_stats', 'mean',
                            lambda s: jnp.zeros(s, stat_param_dtype), feature_shape)
    ra_var = self.variable('batch_stats', 'var',
                           lambda s: jnp.ones(s, stat_param_dtype), feature_shape)
    scale = (self.param('scale', self.scale_init, feature_shape, self.param_dtype)
             if self.use_scale else None)
    bias = (self.param('bias', self.bias_init, feature_shape, self.param_dtype)
            if self.use_bias else None)
    out_dtype, stats_dtype = resolve_dtypes(x, scale, bias, self.dtype,
                                            self.force_float32_reductions)

    if use_running_average:
      mean, var = ra_mean.value, ra_var.value
      if not self.force_float32_reductions:
        mean, var = (jnp.asarray(v, self.param_dtype) for v in (mean, var))
      return normalize(x, mean, var, scale, bias, axes=reduction_axes, epsilon=self.epsilon,
                       dtype=out_dtype)

    initializing = self.is_initializing()
    y, mean, var = batch_norm(
        x, scale, bias, axes=reduction_axes, epsilon=self.epsilon,
        axis_name=None if initializing else self.axis_name,
        axis_index_groups=None if initializing else self.axis_index_groups,
        ghost_batch_size=None if initializing else self.ghost_batch_size,
        mask=mask, closed_form_backward=self.closed_form_backward, dtype=out_dtype,
        stats_dtype=stats_dtype, check_count=not initializing)
    if not initializing:
      ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
      ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
    return y
