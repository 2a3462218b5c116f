"""Flax linen convolutions: ``Conv`` and the weight-standardized ``WSConv``, ``ScaledWSConv``,
``PWSConv``.

All four own a kernel ``'kernel'`` (``HWIO``) and a bias ``'bias'`` in the ``'params'``
collection, as ``flax.linen.Conv`` does, and run the convolution through
``jaxnorm.functional.conv``, whose backward pass is a canonical-layout ``jax.custom_vjp`` (fast
inside ``nn.scan`` on XLA:CPU; ``custom_backward=False`` gives plain autodiff, e.g. for
``jax.jvp``). The standardized layers compute the standardized kernel in the forward pass only;
it is never written back into ``params`` (the update rule of the papers acts on the raw kernel).
They have no running statistics: the kernel used in evaluation is the training kernel.

References:
  Qiao et al. 2019 (WS), Brock et al. 2021a (Scaled WS, NF-ResNets), Liu et al. 2021 (PWS);
  papers.md §5 and §5b. Conv layout finding: ECOSYSTEM.md "Depth: scan vs unrolled".
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

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

Initializer = Any
Dtype = Any

__all__ = ['Conv', 'WSConv', 'ScaledWSConv', 'PWSConv']


def kernel_shape_for(layer: str, kernel_size, inputs_ndim: int, in_features: int,
                     features: int) -> tuple[int, ...]:
  """``(*K, Cin, Cout)``; an int ``kernel_size`` is square over all spatial axes of the input."""
  if isinstance(kernel_size, int):
    num_spatial = inputs_ndim - 2
    if num_spatial < 1:
      fail(layer, 'inputs', 'an array of rank >= 3 (N, *spatial, C)', f'rank {inputs_ndim}')
    kernel_size = (kernel_size,) * num_spatial
  kernel_size = tuple(kernel_size)
  if not all(isinstance(k, int) and k >= 1 for k in kernel_size):
    fail(layer, 'kernel_size', 'a positive int or a sequence of positive ints', repr(kernel_size))
  return kernel_size + (in_features, features)


def add_batch_axis(layer: str, inputs: jax.Array, num_spatial: int) -> tuple[jax.Array, bool]:
  """Accepts ``(N, *spatial, C)`` or an unbatched ``(*spatial, C)``; returns a batched array."""
  if inputs.ndim == num_spatial + 2:
    return inputs, False
  if inputs.ndim == num_spatial + 1:
    return inputs[None], True
  fail(layer, 'inputs', f'an array of rank {num_spatial + 2} (N, *spatial, C) or '
       f'{num_spatial + 1} (unbatched) for a {num_spatial}-D kernel',
       f'rank {inputs.ndim} (shape {inputs.shape})')


def _check_fan_in(module: nn.Module, layer: str, kernel_shape, method: str) -> None:
  """``check_fan_in`` at ``init`` only (its error is raised at every call, its warning once)."""
  if method == 'ws_std' or module.is_initializing():
    check_fan_in(layer, kernel_shape, method)


class _ConvBase(nn.Module):
  """Shared body: kernel and bias parameters, a kernel transform hook, the custom-VJP conv."""

  features: int
  kernel_size: int | Sequence[int]
  strides: int | Sequence[int] = 1
  padding: PaddingLike = 'SAME'
  kernel_dilation: int | Sequence[int] = 1
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  precision: Any = None
  custom_backward: bool = True

  def _layer_name(self) -> str:
    return type(self).__name__

  def _use_bias(self) -> bool:
    return True

  def _default_kernel_init(self) -> Initializer:
    return initializers.lecun_normal()

  def _kernel_init(self) -> Initializer:
    init = getattr(self, 'kernel_init', None)
    return self._default_kernel_init() if init is None else init

  def _bias_init(self) -> Initializer:
    return getattr(self, 'bias_init', None) or nn.initializers.zeros_init()

  def _transform_kernel(self, kernel: jax.Array, inputs: jax.Array, conv_fn) -> jax.Array:
    """Maps the raw kernel to the one used in the forward pass (identity for ``Conv``)."""
    del inputs, conv_fn
    return kernel

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    """Applies the convolution.

    Args:
      inputs: ``(N, *spatial, Cin)`` (NHWC for 2-D), or unbatched ``(*spatial, Cin)``.

    Returns:
      ``(N, *out_spatial, features)`` (unbatched in, unbatched out).
    """
    layer = self._layer_name()
    kshape = kernel_shape_for(layer, self.kernel_size, inputs.ndim, inputs.shape[-1],
                              self.features)
    inputs, unbatched = add_batch_axis(layer, inputs, len(kshape) - 2)
    kernel = self.param('kernel', self._kernel_init(), kshape, self.param_dtype)
    bias = (self.param('bias', self._bias_init(), (self.features,), self.param_dtype)
            if self._use_bias() else None)

    def conv_fn(x, k):
      x, k = nn.dtypes.promote_dtype(x, k, dtype=self.dtype)
      return conv(x, k, strides=self.strides, padding=self.padding,
                  kernel_dilation=self.kernel_dilation, precision=self.precision,
                  custom_backward=self.custom_backward)

    kernel = self._transform_kernel(kernel, inputs, conv_fn)
    y = conv_fn(inputs, kernel)
    if bias is not None:
      y, bias = nn.dtypes.promote_dtype(y, bias, dtype=self.dtype)
      y = y + bias
    return y[0] if unbatched else y


class Conv(_ConvBase):
  """Convolution like ``flax.linen.Conv``, with a canonical-layout custom backward pass.

  Same parameters (``'kernel'`` ``HWIO``, ``'bias'``), defaults (``strides=1``,
  ``padding='SAME'``, ``use_bias=True``, LeCun-normal kernel, zero bias) and dtype promotion as
  ``flax.linen.Conv``, so the outputs and gradients are equal for the same parameters. Differences:
  an int ``kernel_size`` means a square kernel over every spatial axis of a batched input
  (``inputs.ndim - 2`` axes; flax reads it as a 1-D kernel; pass a tuple for unbatched inputs);
  only ``feature_group_count=1``; no ``input_dilation``, ``mask`` or unshared weights; at most one
  batch axis.

  Example::

    >>> import jax, jax.numpy as jnp
    >>> layer = Conv(features=8, kernel_size=(3, 3), strides=2)
    >>> x = jnp.ones((2, 9, 9, 3))
    >>> variables = layer.init(jax.random.key(0), x)
    >>> layer.apply(variables, x).shape
    (2, 5, 5, 8)

  Attributes:
    features: number of output channels.
    kernel_size: spatial kernel size, an int (square) or a sequence.
    strides: window strides, an int or one per spatial axis.
    padding: ``'SAME'``, ``'VALID'``, ``'CIRCULAR'``, ``'REFLECT'``, an int, per-axis ints or
      ``(lo, hi)`` pairs.
    kernel_dilation: kernel (atrous) dilation.
    dtype: computation dtype (None: promoted from inputs and params, as flax).
    param_dtype: parameter dtype.
    precision: ``lax.Precision`` for every convolution.
    custom_backward: True (default) uses the custom VJP of ``jaxnorm.functional.conv``; False uses
      ``lax.conv_general_dilated`` autodiff (needed for ``jax.jvp`` / ``jax.jacfwd``).
    use_bias: whether to add a bias.
    kernel_init: kernel initializer (LeCun normal).
    bias_init: bias initializer (zeros).

  References:
    ``flax.linen.Conv``; ECOSYSTEM.md "Depth: scan vs unrolled (XLA:CPU)".
  """

  use_bias: bool = True
  kernel_init: Initializer = initializers.lecun_normal()
  bias_init: Initializer = nn.initializers.zeros_init()

  def _use_bias(self) -> bool:
    return self.use_bias


class WSConv(_ConvBase):
  """Weight-standardized convolution (Qiao et al. 2019).

  ``y = conv(x, (W - mean) / sqrt(var + eps)) + b`` (``method='ws'``, the paper's equation:
  biased variance, eps inside the sqrt) or ``(W - mean) / (std + eps)`` (``method='ws_std'``, the
  released PyTorch code: unbiased std, eps outside the sqrt), per output channel over ``(H, W, I)``.
  No scale: WS is meant to be followed by a normalization layer (GroupNorm / BatchNorm).

  A filter with zero spread and ``eps = 0`` standardizes to 0 (not 0 / 0). ``fan_in = 1``
  (``kh * kw * Cin = 1``): every standardized filter is 0, so the layer outputs only its bias;
  ``'ws'`` warns at ``init``, ``'ws_std'`` raises (its unbiased std needs 2 entries).

  Attributes:
    method: ``'ws'`` (paper) or ``'ws_std'`` (released code).
    eps: 1e-5 in both; a finite number >= 0 (nan, inf and negative values raise ValueError at
      ``init``/``apply``).
    use_bias: whether to add a bias (default True).
    kernel_init: kernel initializer (LeCun normal; the scale is removed by the standardization).
    bias_init: bias initializer (zeros).
    (the other attributes as in ``Conv``)

  References:
    Qiao et al. 2019, arXiv 1903.10520, papers.md §5b.
  """

  method: str = 'ws'
  eps: float = 1e-5
  use_bias: bool = True
  kernel_init: Initializer = initializers.lecun_normal()
  bias_init: Initializer = nn.initializers.zeros_init()

  def _use_bias(self) -> bool:
    return self.use_bias

  def _transform_kernel(self, kernel, inputs, conv_fn):
    check_choice('WSConv', 'method', self.method, ('ws', 'ws_std'))
    check_stabilizer('WSConv', 'eps', self.eps, allow_zero=True)
    _check_fan_in(self, 'WSConv', kernel.shape, self.method)
    return standardize_kernel(kernel, self.method, eps=self.eps)


class ScaledWSConv(_ConvBase):
  """Scaled weight-standardized convolution of NF-ResNets (Brock et al. 2021a).

  ``y = conv(x, gain * (W - mean) * rsqrt(max(fan_in * var, eps))) + b``, per output channel,
  biased variance, ``fan_in = kh * kw * Cin``. ``gain`` has one entry per output channel (init 1),
  the bias is always present (init 0), the kernel is initialized with
  ``variance_scaling(1.0, 'fan_in', 'normal')``. Each standardized filter has sum of squares
  ``gain^2`` exactly (while ``fan_in * var > eps``). ``fan_in = 1``: every standardized filter is
  0 (finite), so the layer outputs only its bias; a warning is emitted at ``init``.

  Attributes:
    eps: lower bound on ``fan_in * var`` (1e-4); a finite number > 0 (0, nan, inf and negative
      values raise ValueError at ``init``/``apply``).
    kernel_init: kernel initializer (None: variance scaling 1.0, fan-in, normal).
    bias_init: bias initializer (zeros).
    (the other attributes as in ``Conv``)

  References:
    Brock, De, Smith 2021a, ``nfnets/base.py::WSConv2D``; papers.md §5b.
  """

  eps: float = 1e-4
  kernel_init: Initializer | None = None
  bias_init: Initializer = nn.initializers.zeros_init()

  def _default_kernel_init(self):
    return initializers.variance_scaling(1.0, 'fan_in', 'normal')

  def _transform_kernel(self, kernel, inputs, conv_fn):
    check_stabilizer('ScaledWSConv', 'eps', self.eps, allow_zero=False)
    _check_fan_in(self, 'ScaledWSConv', kernel.shape, 'scaled_ws')
    gain = self.param('gain', nn.initializers.ones_init(), (self.features,), self.param_dtype)
    return standardize_kernel(kernel, 'scaled_ws', eps=self.eps, scale=gain)


class PWSConv(_ConvBase):
  """Parametric weight-standardized convolution (Liu, Ge, Li, Gui 2021), official semantics.

  ``y = conv(x, sqrt(2/fan) * alpha * (W - mean) / sqrt(var + gamma)) + b``, per output channel,
  biased variance with gamma inside the sqrt (``F.layer_norm`` in the official code),
  ``fan = kh*kw*Cin`` (``mode='fan_in'``) or ``kh*kw*Cout`` (``'fan_out'``); ``equiv=True`` uses
  ``gamma * 2 / fan``. ``alpha`` has one entry per output channel (init 1), the bias is always
  present (init 0), and the kernel is initialized He-normal for the chosen fan
  (``variance_scaling(2.0, mode, 'normal')``, as ``kaiming_normal_``).

  ``init_alpha=True`` performs the official data-dependent initialization at ``init`` time: the
  output is computed with ``alpha = 1`` and without the bias (the official bias is 0 then), then
  **all** alpha entries are set to the scalar ``sqrt(2 / var(output))`` with torch's unbiased
  ``var`` over the whole output tensor, so that the pre-activation variance on the init batch is
  2. (In the official code this happens on the first training forward; here it happens during
  ``Module.init`` with the init batch.) When that output carries no variance (an all-zeros or
  constant init batch, or ``fan_in = 1``), ``sqrt(2 / var)`` is not finite: alpha then falls back
  to its default **1.0** and a ``UserWarning`` naming ``PWSConv`` and ``init_alpha`` is emitted
  (under ``jit`` the fallback still applies and the warning comes from ``jax.debug.callback``);
  see :func:`jaxnorm.functional.kernel_standardization.pws_init_alpha`. Initialize on real data.

  With ``gamma = 0`` a constant filter standardizes to 0 (not 0 / 0). ``fan_in = 1``
  (``kh * kw * Cin = 1``): every standardized filter is 0, so the layer outputs only its bias; a
  warning is emitted at ``init``.

  Attributes:
    gamma: fixed gamma added to the variance (1e-5; the official configs use 1e-3 on CIFAR and
      1e-4 on ImageNet); a finite number >= 0 (nan, inf and negative values raise ValueError at
      ``init``/``apply``).
    mode: ``'fan_in'`` or ``'fan_out'``.
    equiv: scale gamma by ``2 / fan``.
    init_alpha: data-dependent scalar alpha init on the init batch (alpha 1.0 and a warning when
      that batch gives an output without variance).
    kernel_init: kernel initializer (None: He normal for ``mode``).
    bias_init: bias initializer (zeros).
    (the other attributes as in ``Conv``)

  References:
    Liu et al. 2021 (AAAI), official ``lyxzzz/PWSConv@39174be modules/utils/pws_layer.py``;
    papers.md §5(a).
  """

  gamma: float = 1e-5
  mode: str = 'fan_in'
  equiv: bool = False
  init_alpha: bool = False
  kernel_init: Initializer | None = None
  bias_init: Initializer = nn.initializers.zeros_init()

  def _default_kernel_init(self):
    check_choice('PWSConv', 'mode', self.mode, FAN_MODES)
    return initializers.variance_scaling(2.0, self.mode, 'normal')

  def _transform_kernel(self, kernel, inputs, conv_fn):
    check_choice('PWSConv', 'mode', self.mode, FAN_MODES)
    check_stabilizer('PWSConv', 'gamma', self.gamma, allow_zero=True)
    _check_fan_in(self, 'PWSConv', kernel.shape, 'pws')

    def standardize(alpha):
      return standardize_kernel(kernel, 'pws', scale=alpha, gamma=self.gamma, mode=self.mode,
                                equiv=self.equiv)

    def alpha_init(key, shape, dtype):
      del key
      if not self.init_alpha:
        return jnp.ones(shape, dtype)
      # Official `initalpha`: output with alpha = 1 (bias 0), then alpha <- sqrt(2 / var(out)),
      # var unbiased (torch `.var()`) over the whole tensor; alpha = 1 where that is not finite.
      out = conv_fn(inputs, standardize(jnp.ones(shape, kernel.dtype))).astype(jnp.float32)
      return pws_init_alpha(out, shape[0], dtype, layer='PWSConv', arg='init_alpha')

    alpha = self.param('alpha', alpha_init, (self.features,), self.param_dtype)
    return standardize(alpha)
