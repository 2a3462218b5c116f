"""Flax NNX convolutions: ``Conv``, ``WSConv``, ``ScaledWSConv``, ``PWSConv``.

The layers of ``jaxnorm.linen.conv`` as ``nnx.Module`` s over the same functional code
(``jaxnorm.functional.conv`` with its canonical-layout custom VJP, and
``jaxnorm.functional.standardize_kernel``). Parameters have the linen names and shapes
(``kernel`` ``HWIO``, ``bias``, ``gain``, ``alpha``), so the same values give the same outputs and
gradients (tested). The standardized kernel is computed in ``__call__`` only and never written back
into the ``kernel`` parameter (unlike ``nnx.WeightNorm``, flax#5576): the optimizer updates the raw
kernel, as in the papers.

Constructors follow ``flax.nnx.Conv`` (``in_features, out_features, kernel_size, strides``, then
keywords and ``rngs``). An int ``kernel_size`` means a square 2-D kernel (``(k, k)``); pass a
tuple for 1-D or 3-D.

References:
  Qiao et al. 2019 (WS), Brock et al. 2021a (Scaled WS), Liu et al. 2021 (PWS); papers.md §5,
  §5b. Conv layout finding: ECOSYSTEM.md "Depth: scan vs unrolled".
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes
from flax.typing import Dtype, Initializer

from jaxnorm.functional import initializers
from jaxnorm.functional._checks import check_choice, fail
from jaxnorm.functional.conv import PaddingLike, conv
from jaxnorm.functional.kernel_standardization import (
    FAN_MODES,
    check_fan_in,
    check_stabilizer,
    pws_init_alpha,
    standardize_kernel,
)

__all__ = ['Conv', 'WSConv', 'ScaledWSConv', 'PWSConv']

_LECUN_NORMAL = initializers.lecun_normal()
_ZEROS = nnx.initializers.zeros_init()


def _kernel_size(layer: str, kernel_size) -> tuple[int, ...]:
  if isinstance(kernel_size, int):
    kernel_size = (kernel_size, kernel_size)
  kernel_size = tuple(kernel_size)
  if not kernel_size or not all(isinstance(k, int) and k >= 1 for k in kernel_size):
    fail(layer, 'kernel_size', 'a positive int or a sequence of positive ints', repr(kernel_size))
  return kernel_size


class _ConvBase(nnx.Module):
  """Shared constructor and ``__call__``; subclasses override ``_transform_kernel``."""

  _default_use_bias = True

  def __init__(self, in_features: int, out_features: int, kernel_size: int | Sequence[int],
               strides: int | Sequence[int] = 1, *, padding: PaddingLike = 'SAME',
               kernel_dilation: int | Sequence[int] = 1, use_bias: bool = True,
               dtype: Dtype | None = None, param_dtype: Dtype = jnp.float32,
               precision: Any = None, kernel_init: Initializer,
               bias_init: Initializer = _ZEROS,
               custom_backward: bool = True, rngs: nnx.Rngs):
    self.in_features = in_features
    self.out_features = out_features
    self.kernel_size = _kernel_size(type(self).__name__, kernel_size)
    self.strides = strides
    self.padding = padding
    self.kernel_dilation = kernel_dilation
    self.use_bias = use_bias
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.precision = precision
    self.custom_backward = custom_backward
    shape = self.kernel_size + (in_features, out_features)
    self.kernel = nnx.Param(kernel_init(rngs.params(), shape, param_dtype))
    self.bias = (nnx.Param(bias_init(rngs.params(), (out_features,), param_dtype))
                 if use_bias else None)

  def _conv(self, x: jax.Array, kernel: jax.Array) -> jax.Array:
    x, kernel = dtypes.promote_dtype((x, kernel), dtype=self.dtype)
    return conv(x, kernel, strides=self.strides, padding=self.padding,
                kernel_dilation=self.kernel_dilation, precision=self.precision,
                custom_backward=self.custom_backward)

  def _transform_kernel(self, kernel: jax.Array) -> jax.Array:
    return kernel

  def __call__(self, inputs: jax.Array) -> jax.Array:
    """Applies the convolution.

    Args:
      inputs: ``(N, *spatial, in_features)`` (NHWC for 2-D), or unbatched ``(*spatial, C)``.

    Returns:
      ``(N, *out_spatial, out_features)`` (unbatched in, unbatched out).
    """
    n = len(self.kernel_size)
    unbatched = inputs.ndim == n + 1
    if inputs.ndim not in (n + 1, n + 2):
      fail(type(self).__name__, 'inputs', f'an array of rank {n + 2} (N, *spatial, C) or '
           f'{n + 1} (unbatched)', f'rank {inputs.ndim} (shape {inputs.shape})')
    if unbatched:
      inputs = inputs[None]
    # The standardized kernel is a local value: never assigned back into self.kernel.
    y = self._conv(inputs, self._transform_kernel(self.kernel[...]))
    if self.bias is not None:
      y, bias = dtypes.promote_dtype((y, self.bias[...]), dtype=self.dtype)
      y = y + bias
    return y[0] if unbatched else y


class Conv(_ConvBase):
  """Convolution like ``flax.nnx.Conv``, with the canonical-layout custom backward pass.

  Same computation as :class:`jaxnorm.linen.Conv` (parameters ``kernel`` ``HWIO`` and ``bias``,
  LeCun-normal kernel, zero bias). ``custom_backward=False`` uses plain autodiff (for ``jax.jvp``).

  Args:
    in_features: input channels.
    out_features: output channels.
    kernel_size: spatial kernel size (an int means ``(k, k)``).
    strides: window strides.
    padding: ``'SAME'``, ``'VALID'``, ``'CIRCULAR'``, ``'REFLECT'``, an int, per-axis ints or
      ``(lo, hi)`` pairs.
    kernel_dilation: kernel dilation.
    use_bias: whether to add a bias.
    dtype: computation dtype (None: promoted from inputs and parameters).
    param_dtype: parameter dtype.
    precision: ``lax.Precision`` for every convolution.
    kernel_init: kernel initializer (LeCun normal).
    bias_init: bias initializer (zeros).
    custom_backward: use the custom VJP of ``jaxnorm.functional.conv`` (default True).
    rngs: ``nnx.Rngs`` with a ``params`` stream.

  References:
    ``flax.nnx.Conv``; ECOSYSTEM.md "Depth: scan vs unrolled (XLA:CPU)".
  """

  def __init__(self, in_features: int, out_features: int, kernel_size: int | Sequence[int],
               strides: int | Sequence[int] = 1, *,
               kernel_init: Initializer = _LECUN_NORMAL, rngs: nnx.Rngs,
               **kwargs):
    super().__init__(in_features, out_features, kernel_size, strides, kernel_init=kernel_init,
                     rngs=rngs, **kwargs)


class WSConv(_ConvBase):
  """Weight-standardized convolution (Qiao et al. 2019); see :class:`jaxnorm.linen.WSConv`.

  Args:
    in_features, out_features, kernel_size, strides: as :class:`Conv`.
    method: ``'ws'`` (paper: biased variance, eps inside the sqrt) or ``'ws_std'`` (released code:
      unbiased std + eps).
    eps: 1e-5; a finite number >= 0 (nan, inf, negative: ValueError). With 0, a constant filter
      standardizes to 0. ``fan_in = 1`` (``prod(kernel_size) * in_features``): every
      standardized filter is 0 and the layer outputs its bias; ``'ws'`` warns, ``'ws_std'``
      raises ValueError.
    **kwargs: the remaining :class:`Conv` arguments (``use_bias``, ``dtype``, ..., ``rngs``).

  References:
    Qiao et al. 2019, arXiv 1903.10520, papers.md §5b.
  """

  def __init__(self, in_features: int, out_features: int, kernel_size: int | Sequence[int],
               strides: int | Sequence[int] = 1, *, method: str = 'ws', eps: float = 1e-5,
               kernel_init: Initializer = _LECUN_NORMAL, rngs: nnx.Rngs,
               **kwargs):
    check_choice('WSConv', 'method', method, ('ws', 'ws_std'))
    check_stabilizer('WSConv', 'eps', eps, allow_zero=True)
    check_fan_in('WSConv', _kernel_size('WSConv', kernel_size) + (in_features, out_features),
                 method)
    self.method = method
    self.eps = eps
    super().__init__(in_features, out_features, kernel_size, strides, kernel_init=kernel_init,
                     rngs=rngs, **kwargs)

  def _transform_kernel(self, kernel):
    return standardize_kernel(kernel, self.method, eps=self.eps)


class ScaledWSConv(_ConvBase):
  """Scaled WS convolution of NF-ResNets; see :class:`jaxnorm.linen.ScaledWSConv`.

  ``W_hat = gain * (W - mean) * rsqrt(max(fan_in * var, eps))``; ``gain`` per output channel
  (init 1); bias always present (init 0); kernel init ``variance_scaling(1.0, 'fan_in',
  'normal')``.

  Args:
    in_features, out_features, kernel_size, strides: as :class:`Conv`.
    eps: lower bound on ``fan_in * var`` (1e-4); a finite number > 0 (0, nan, inf, negative:
      ValueError). ``fan_in = 1``: every standardized filter is 0 (the layer outputs its bias);
      a warning is emitted.
    kernel_init: kernel initializer (None: variance scaling 1.0, fan-in, normal).
    **kwargs: the remaining :class:`Conv` arguments except ``use_bias``.

  References:
    Brock, De, Smith 2021a, ``nfnets/base.py::WSConv2D``; papers.md §5b.
  """

  def __init__(self, in_features: int, out_features: int, kernel_size: int | Sequence[int],
               strides: int | Sequence[int] = 1, *, eps: float = 1e-4,
               kernel_init: Initializer | None = None, rngs: nnx.Rngs, **kwargs):
    if 'use_bias' in kwargs:
      fail('ScaledWSConv', 'use_bias', 'no value (the bias is always present)', kwargs['use_bias'])
    check_stabilizer('ScaledWSConv', 'eps', eps, allow_zero=False)
    check_fan_in('ScaledWSConv',
                 _kernel_size('ScaledWSConv', kernel_size) + (in_features, out_features),
                 'scaled_ws')
    self.eps = eps
    kernel_init = kernel_init or initializers.variance_scaling(1.0, 'fan_in', 'normal')
    super().__init__(in_features, out_features, kernel_size, strides, kernel_init=kernel_init,
                     rngs=rngs, **kwargs)
    self.gain = nnx.Param(jnp.ones((out_features,), self.param_dtype))

  def _transform_kernel(self, kernel):
    return standardize_kernel(kernel, 'scaled_ws', eps=self.eps, scale=self.gain[...])


class PWSConv(_ConvBase):
  """Parametric WS convolution (Liu et al. 2021); see :class:`jaxnorm.linen.PWSConv`.

  ``W_hat = sqrt(2/fan) * alpha * (W - mean) / sqrt(var + gamma)``; ``alpha`` per output channel
  (init 1); bias always present (init 0); kernel He normal for ``mode``. NNX constructs parameters
  without data, so the official data-dependent alpha init is a separate step:
  ``layer.initialize_alpha(x)`` (equal to linen's ``init_alpha=True`` on the same batch).

  Args:
    in_features, out_features, kernel_size, strides: as :class:`Conv`.
    gamma: fixed gamma added to the variance (1e-5); a finite number >= 0 (nan, inf, negative:
      ValueError). With 0, a constant filter standardizes to 0. ``fan_in = 1``: every
      standardized filter is 0 (the layer outputs its bias); a warning is emitted.
    mode: ``'fan_in'`` or ``'fan_out'``.
    equiv: use ``gamma * 2 / fan``.
    kernel_init: kernel initializer (None: He normal, ``variance_scaling(2.0, mode, 'normal')``).
    **kwargs: the remaining :class:`Conv` arguments except ``use_bias``.

  References:
    Liu et al. 2021 (AAAI), official ``pws_layer.py``; papers.md §5(a).
  """

  def __init__(self, in_features: int, out_features: int, kernel_size: int | Sequence[int],
               strides: int | Sequence[int] = 1, *, gamma: float = 1e-5, mode: str = 'fan_in',
               equiv: bool = False, kernel_init: Initializer | None = None, rngs: nnx.Rngs,
               **kwargs):
    if 'use_bias' in kwargs:
      fail('PWSConv', 'use_bias', 'no value (the bias is always present)', kwargs['use_bias'])
    check_choice('PWSConv', 'mode', mode, FAN_MODES)
    check_stabilizer('PWSConv', 'gamma', gamma, allow_zero=True)
    check_fan_in('PWSConv', _kernel_size('PWSConv', kernel_size) + (in_features, out_features),
                 'pws')
    self.gamma = gamma
    self.mode = mode
    self.equiv = equiv
    kernel_init = kernel_init or initializers.variance_scaling(2.0, mode, 'normal')
    super().__init__(in_features, out_features, kernel_size, strides, kernel_init=kernel_init,
                     rngs=rngs, **kwargs)
    self.alpha = nnx.Param(jnp.ones((out_features,), self.param_dtype))

  def _standardize(self, kernel, alpha):
    return standardize_kernel(kernel, 'pws', scale=alpha, gamma=self.gamma, mode=self.mode,
                              equiv=self.equiv)

  def _transform_kernel(self, kernel):
    return self._standardize(kernel, self.alpha[...])

  def initialize_alpha(self, inputs: jax.Array) -> jax.Array:
    """Official data-dependent init: all alpha <- sqrt(2 / var(output with alpha = 1)).

    The variance is torch's unbiased ``var`` over the whole output tensor, computed without the
    bias (zero in the official code at that point), so the pre-activation variance on ``inputs``
    becomes 2. Writes the new value into ``self.alpha`` (a parameter initialization, not a
    kernel standardization) and returns it. When that output carries no variance (an all-zeros or
    constant batch, or ``fan_in = 1``), alpha falls back to its default **1.0** and a
    ``UserWarning`` naming ``PWSConv`` and ``init_alpha`` is emitted (under ``nnx.jit`` the
    fallback still applies; the warning comes from ``jax.debug.callback``); see
    :func:`jaxnorm.functional.kernel_standardization.pws_init_alpha`.

    Args:
      inputs: the init batch, ``(N, *spatial, in_features)``.

    Returns:
      The new alpha, shape ``(out_features,)``, always finite.

    References:
      Liu et al. 2021 (AAAI), official ``pws_layer.py`` (``initalpha``).
    """
    kernel = self.kernel[...]
    out = self._conv(inputs, self._standardize(kernel, jnp.ones((self.out_features,),
                                                                 kernel.dtype)))
    alpha = pws_init_alpha(out.astype(jnp.float32), self.out_features, self.param_dtype,
                           layer='PWSConv', arg='initialize_alpha (init_alpha)')
    self.alpha[...] = alpha
    return alpha
