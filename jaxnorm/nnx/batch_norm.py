"""``BatchNorm`` for Flax NNX: the layer of ``jaxnorm.linen.BatchNorm`` as an ``nnx.Module``.

References:
  Ioffe & Szegedy (2015), arXiv:1502.03167 (the closed-form backward is that of
  ``jaxnorm.functional.batch_norm``); De & Smith (2020), arXiv:2002.10444 (ghost batch
  normalization).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.typing import Dtype, Initializer

from jaxnorm.functional._batch_norm import batch_norm, normalize
from jaxnorm.functional._checks import check_in_range
from jaxnorm.functional._layer_dtypes import resolve_dtypes, split_axes


class BatchNorm(nnx.Module):
  """BatchNorm with ``nnx.Param`` ``scale``, ``bias`` and ``nnx.BatchStat`` ``mean``, ``var``.

  The constructor follows ``flax.nnx.BatchNorm`` (``num_features`` first, ``rngs`` keyword), plus
  ``force_float32_reductions``, ``ghost_batch_size`` and ``closed_form_backward``; the numerics are
  those of :class:`jaxnorm.linen.BatchNorm` (same ``jaxnorm.functional.batch_norm`` core, same
  dtype rules, same running averages ``ra = momentum * ra + (1 - momentum) * batch_stat``),
  tested equal to it. As in ``flax.nnx.BatchNorm``, the running-average update is wrapped in
  ``jax.lax.stop_gradient``. ``use_fast_variance`` is accepted and ignored (always the centred
  two-pass variance, see :class:`jaxnorm.linen.BatchNorm`). The argument checks (rank, ``axis``,
  ``momentum`` in ``[0, 1]``, at least 2 values per channel, the ``mask`` rule) and the
  per-example ``jax.vmap(..., axis_name=...)`` convention are those of
  :class:`jaxnorm.linen.BatchNorm`; ``momentum`` is checked in the constructor and at each call.
  Flax's ``promote_dtype`` argument is not offered (the dtype rules are fixed, Flax's defaults).

  Args:
    num_features: size of the feature axis (a tuple of sizes if ``axis`` is a tuple).
    use_running_average: if True, normalize with the running statistics (eval mode).
    axis: the feature axis (or axes); statistics reduce over all others.
    momentum: decay rate of the running averages, in ``[0, 1]``.
    epsilon: added to the variance inside the square root.
    dtype: output dtype (default: inferred from input and parameters).
    param_dtype: dtype of ``scale`` and ``bias``.
    use_bias: add the learned ``bias``.
    use_scale: multiply by the learned ``scale``.
    bias_init: initializer of ``bias`` (zeros).
    scale_init: initializer of ``scale`` (ones).
    axis_name: ``pmap`` / ``shard_map`` / ``vmap`` axis over which batch statistics are averaged.
    axis_index_groups: device groups within ``axis_name``.
    use_fast_variance: accepted for compatibility with Flax and ignored.
    force_float32_reductions: statistics in at least float32 (default True).
    ghost_batch_size: statistics per group of this many consecutive examples (De & Smith).
    closed_form_backward: closed-form ``jax.custom_vjp`` backward (rules out ``jax.jvp``).
    rngs: random streams; ``rngs.params()`` draws the keys of ``scale`` and then ``bias``.
    bias_metadata: metadata of the ``bias`` ``nnx.Param``.
    scale_metadata: metadata of the ``scale`` ``nnx.Param``.

  References:
    Ioffe & Szegedy (2015), arXiv:1502.03167; De & Smith (2020), arXiv:2002.10444.
  """

  def __init__(
      self,
      num_features: int | tuple[int, ...],
      *,
      use_running_average: bool | None = False,
      axis: int | tuple[int, ...] = -1,
      momentum: float = 0.99,
      epsilon: float = 1e-5,
      dtype: Dtype | None = None,
      param_dtype: Dtype = jnp.float32,
      use_bias: bool = True,
      use_scale: bool = True,
      bias_init: Initializer = nnx.initializers.zeros,
      scale_init: Initializer = nnx.initializers.ones,
      axis_name: str | None = None,
      axis_index_groups: Any = None,
      use_fast_variance: bool = True,
      force_float32_reductions: bool = True,
      ghost_batch_size: int | None = None,
      closed_form_backward: bool = True,
      rngs: nnx.Rngs,
      bias_metadata: Mapping[str, Any] = MappingProxyType({}),
      scale_metadata: Mapping[str, Any] = MappingProxyType({}),
  ):
    check_in_range('BatchNorm', 'momentum', momentum, 0, 1)
    feature_shape = (num_features,) if isinstance(num_features, int) else tuple(num_features)
    stat_dtype = jnp.float32 if force_float32_reductions else param_dtype
    self.mean = nnx.BatchStat(jnp.zeros(feature_shape, stat_dtype))
    self.var = nnx.BatchStat(jnp.ones(feature_shape, stat_dtype))
    if use_scale:
      self.scale = nnx.Param(scale_init(rngs.params(), feature_shape, param_dtype),
                             **scale_metadata)
    else:
      self.scale = nnx.data(None)
    if use_bias:
      self.bias = nnx.Param(bias_init(rngs.params(), feature_shape, param_dtype),
                            **bias_metadata)
    else:
      self.bias = nnx.data(None)
    self.num_features = num_features
    self.use_running_average = use_running_average
    self.axis = axis
    self.momentum = momentum
    self.epsilon = epsilon
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.use_bias = use_bias
    self.use_scale = use_scale
    self.axis_name = axis_name
    self.axis_index_groups = axis_index_groups
    self.use_fast_variance = use_fast_variance
    self.force_float32_reductions = force_float32_reductions
    self.ghost_batch_size = ghost_batch_size
    self.closed_form_backward = closed_form_backward

  def __call__(self, x, use_running_average: bool | None = None, *,
               mask: jax.Array | None = None):
    """Normalizes ``x`` with batch statistics (training) or running statistics (eval).

    Args:
      x: the input, features on ``axis``.
      use_running_average: overrides the constructor's value when given.
      mask: optional boolean array broadcastable to ``x``; only ``True`` entries enter the
        batch statistics.

    Returns:
      The normalized input, shape of ``x``.

    Raises:
      ValueError / TypeError: as :class:`jaxnorm.linen.BatchNorm`, naming the argument.
    """
    if use_running_average is None:
      use_running_average = self.use_running_average
    if use_running_average is None:
      raise ValueError('BatchNorm: argument `use_running_average` expected True or False (in '
                       'the constructor or the call), got None.')
    check_in_range('BatchNorm', 'momentum', self.momentum, 0, 1)  # may be set after init
    _, reduction_axes = split_axes(x, self.axis)
    scale = None if self.scale is None else self.scale[...]
    bias = None if self.bias is None else self.bias[...]
    out_dtype, stats_dtype = resolve_dtypes(x, scale, bias, self.dtype,
                                            self.force_float32_reductions)
    if use_running_average:
      mean, var = self.mean[...], self.var[...]
      if not self.force_float32_reductions:
        mean, var = (jnp.asarray(v, self.param_dtype) for v in (mean, var))
      return normalize(x, mean, var, scale, bias, axes=reduction_axes, epsilon=self.epsilon,
                       dtype=out_dtype)

    y, mean, var = batch_norm(
        x, scale, bias, axes=reduction_axes, epsilon=self.epsilon, axis_name=self.axis_name,
        axis_index_groups=self.axis_index_groups, ghost_batch_size=self.ghost_batch_size,
        mask=mask, closed_form_backward=self.closed_form_backward, dtype=out_dtype,
        stats_dtype=stats_dtype)
    m = self.momentum
    self.mean[...] = jax.lax.stop_gradient(m * self.mean[...] + (1 - m) * mean)
    self.var[...] = jax.lax.stop_gradient(m * self.var[...] + (1 - m) * var)
    return y

  def set_view(self, use_running_average: bool | None = None):
    """Used by ``nnx.view``: sets ``use_running_average`` when given."""
    if use_running_average is not None:
      self.use_running_average = use_running_average
