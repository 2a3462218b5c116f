"""Flax linen convolutions: ``Conv`` and the weight-standardized ``WSConv``, ``ScaledWSConv``,
``PWSConv``, all drop-ins for ``flax.linen.Conv``.

All four accept ``flax.linen.Conv``'s whole signature with flax's meanings (``kernel_size`` with
flax's int rule, ``strides``, every padding form, ``input_dilation``, ``kernel_dilation``,
``feature_group_count``, ``use_bias``, ``mask``, ``dtype``, ``param_dtype``, ``precision``,
``kernel_init``, ``bias_init``, ``promote_dtype``), own a kernel ``'kernel'``
(``(*kernel_size, in_features // feature_group_count, features)``) and a bias ``'bias'`` in the
``'params'`` collection, as ``flax.linen.Conv`` does, and run the convolution through
``jaxnorm.functional.conv``, whose backward pass is a canonical-layout ``jax.custom_vjp`` (fast
inside ``nn.scan`` on XLA:CPU; ``custom_backward=False`` gives plain autodiff, e.g. for
``jax.jvp``). The standardized layers compute the standardized kernel in the forward pass only;
it is never written back into ``params`` (the update rule of the papers acts on the raw kernel).
They have no running statistics: the kernel used in evaluation is the training kernel.

References:
  Qiao et al. (2019), "Micro-Batch Training with Batch-Channel Normalization and Weight
  Standardization", arXiv:1903.10520 (WS). Brock, De, Smith (2021), "Characterizing signal
  propagation to close the performance gap in unnormalized ResNets", arXiv:2101.08692 (Scaled WS).
  Liu, Ge, Li, Gui (2021), "Delving into Variance Transmission and Normalization: Shift of Average
  Gradient Makes the Network Collapse", AAAI 2021 (PWS).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxnorm.functional import _initializers as initializers
from jaxnorm.functional._checks import check_choice, fail
from jaxnorm.functional._conv import PaddingLike, conv
from jaxnorm.functional._conv_layout import canonical_kernel_size, check_groups, flatten_batch
from jaxnorm.functional._kernel_standardization import (
  FAN_MODES,
  check_fan_in,
  check_stabilizer,
  pws_init_alpha,
  standardize_kernel,
)

Initializer = Any
Dtype = Any

__all__ = ['Conv', 'WSConv', 'ScaledWSConv', 'PWSConv']


def _check_fan_in(module: nn.Module, layer: str, kernel_shape, method: str) -> None:
  """``check_fan_in`` at ``init`` only (its error is raised at every call, its warning once)."""
  if method == 'ws_std' or module.is_initializing():
    check_fan_in(layer, kernel_shape, method)


class _ConvBase(nn.Module):
  """Shared body: ``flax.linen.Conv``'s fields and semantics, a kernel transform hook.

  The fields up to ``conv_general_dilated_cls`` are ``flax.linen.Conv``'s, in its order and with
  its defaults (``kernel_init`` excepted in ``ScaledWSConv`` / ``PWSConv``).
  """

  features: int
  kernel_size: int | Sequence[int]
  strides: None | int | Sequence[int] = 1
  padding: PaddingLike = 'SAME'
  input_dilation: None | int | Sequence[int] = 1
  kernel_dilation: None | int | Sequence[int] = 1
  feature_group_count: int = 1
  use_bias: bool = True
  mask: jax.Array | None = None
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  precision: Any = None
  kernel_init: Initializer | None = initializers.lecun_normal()
  bias_init: Initializer = nn.initializers.zeros_init()
  promote_dtype: Any = nn.dtypes.promote_dtype
  conv_general_dilated: Any = None
  conv_general_dilated_cls: Any = None
  custom_backward: bool = True

  def _default_kernel_init(self) -> Initializer:
    return initializers.lecun_normal()

  def _kernel_init(self) -> Initializer:
    return self._default_kernel_init() if self.kernel_init is None else self.kernel_init

  def _transform_kernel(self, kernel: jax.Array, output) -> jax.Array:
    """Maps the raw kernel to the one used in the forward pass (identity for ``Conv``).

    ``output(k)`` is the layer's bias-free output for an effective kernel ``k`` on this call's
    inputs (PWS's data-dependent init uses it).
    """
    del output
    return kernel

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    """Applies the convolution.

    Args:
      inputs: ``(*batch, *spatial, Cin)`` (NHWC for 2-D with one batch axis), the number of
        spatial axes given by ``kernel_size``: every leading axis is a batch axis (flattened for
        the convolution and restored), none is allowed (unbatched in, unbatched out), as in
        ``flax.linen.Conv``.

    Returns:
      ``(*batch, *out_spatial, features)``.
    """
    layer = type(self).__name__
    kernel_size = canonical_kernel_size(layer, self.kernel_size)
    inputs = jnp.asarray(inputs)
    inputs, batch_shape = flatten_batch(layer, inputs, len(kernel_size))
    in_features = inputs.shape[-1]
    groups = check_groups(layer, self.feature_group_count, in_features, self.features)
    kshape = kernel_size + (in_features // groups, self.features)
    if self.mask is not None and tuple(jnp.shape(self.mask)) != kshape:
      fail(layer, 'mask', f'the kernel shape {kshape}', f'shape {tuple(jnp.shape(self.mask))}')
    kernel = self.param('kernel', self._kernel_init(), kshape, self.param_dtype)
    bias = (self.param('bias', self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias else None)
    if self.conv_general_dilated_cls is not None:
      conv_general_dilated = self.conv_general_dilated_cls()
    else:
      conv_general_dilated = self.conv_general_dilated

    def output(k, b=None):
      if self.mask is not None:
        k = k * self.mask
      x, k, b = self.promote_dtype(inputs, k, b, dtype=self.dtype)
      y = conv(x, k, strides=self.strides, padding=self.padding,
               input_dilation=self.input_dilation, kernel_dilation=self.kernel_dilation,
               feature_group_count=groups, precision=self.precision,
               custom_backward=self.custom_backward, conv_general_dilated=conv_general_dilated,
               layer=layer)
      return y if b is None else y + b

    y = output(self._transform_kernel(kernel, output), bias)
    return y if batch_shape is None else y.reshape(batch_shape + y.shape[1:])


class Conv(_ConvBase):
  """Convolution, a drop-in for ``flax.linen.Conv``, with a canonical-layout custom backward.

  ``y[n, p, o] = sum_{k, i} x_pad[n, p * s + k * d, g(o) * Cin / G + i] * W[k, i, o] + b[o]``
  (``G = feature_group_count`` groups, ``g(o)`` the group of output channel ``o``): the function
  ``flax.linen.Conv`` computes, with its whole signature and meanings: the same fields in the same
  order with the same defaults (``strides=1``, ``padding='SAME'``, ``input_dilation=1``,
  ``kernel_dilation=1``, ``feature_group_count=1``, ``use_bias=True``, ``mask=None``, LeCun-normal
  kernel, zero bias, ``promote_dtype``), the same parameters (``'kernel'`` of shape
  ``(*kernel_size, in_features // feature_group_count, features)``, ``'bias'``), the same int
  ``kernel_size`` rule (``k`` means the 1-D kernel ``(k,)``, so a rank-4 input is then a batch of
  ``(N, H)`` rows: pass a tuple for 2-D), the same batch handling (any number of leading batch
  axes, or none) and the same dtype promotion, so the outputs and gradients are those of
  ``flax.linen.Conv`` for the same parameters (tested over the signature). The convolution runs
  through :func:`jaxnorm.functional.conv`, whose backward pass is a ``jax.custom_vjp`` of
  canonical-layout forward convolutions (fast inside ``nn.scan`` on XLA:CPU).

  Example::

    >>> import jax, jax.numpy as jnp
    >>> layer = Conv(features=8, kernel_size=(3, 3), strides=2)
    >>> x = jnp.ones((2, 9, 9, 3))
    >>> variables = layer.init(jax.random.key(0), x)
    >>> layer.apply(variables, x).shape
    (2, 5, 5, 8)

  Attributes:
    features: number of output channels.
    kernel_size: spatial kernel size, a sequence of ints (an int ``k`` is ``(k,)``, as in flax).
    strides: window strides, an int or one per spatial axis (None: 1).
    padding: ``'SAME'``, ``'SAME_LOWER'``, ``'VALID'``, ``'CIRCULAR'``, ``'REFLECT'``,
      ``'CAUSAL'`` (1-D), an int, per-axis ints or per-axis ``(lo, hi)`` pairs.
    input_dilation: input dilation (a transposed conv with that stride); an int or per axis. As
      in flax it needs explicit (not string) padding when it is not 1.
    kernel_dilation: kernel (atrous) dilation; an int or per axis.
    feature_group_count: number of groups ``G`` (``G = in_features``: depthwise); must divide the
      input channels and ``features``.
    use_bias: whether to add a bias.
    mask: optional array of the kernel's shape multiplying the kernel (masked convolution).
    dtype: computation dtype (None: promoted from inputs and params, as flax).
    param_dtype: parameter dtype.
    precision: ``lax.Precision`` for every convolution.
    kernel_init: kernel initializer (LeCun normal).
    bias_init: bias initializer (zeros).
    promote_dtype: ``promote_dtype(inputs, kernel, bias, dtype=...)`` (flax's by default).
    conv_general_dilated: optional replacement for ``lax.conv_general_dilated`` (deprecated in
      flax); when given (or ``conv_general_dilated_cls``) it is differentiated by autodiff.
    conv_general_dilated_cls: optional class whose instance is that replacement.
    custom_backward: True (default) uses the custom VJP of ``jaxnorm.functional.conv``; False uses
      ``lax.conv_general_dilated`` autodiff (needed for ``jax.jvp`` / ``jax.jacfwd``).

  References:
    ``flax.linen.Conv`` (the semantics reproduced); Dumoulin and Visin (2016), "A guide to
    convolution arithmetic for deep learning", arXiv:1603.07285.
  """


class WSConv(_ConvBase):
  r"""Weight-standardized convolution (Qiao et al. 2019), a drop-in for ``flax.linen.Conv``.

  .. math::

    \hat W_o = \frac{W_o - \mu_o}{\sqrt{\sigma_o^2 + \epsilon}}, \qquad
    y = \mathrm{conv}(x, \hat W) + b

  (``method='ws'``, the paper's equation: biased variance, eps inside the sqrt) or
  ``(W_o - mu_o) / (std_o + eps)`` (``method='ws_std'``, the released PyTorch code: unbiased
  std, eps outside the sqrt). Each output filter ``W_o`` is standardized over its
  ``kh * kw * (Cin / G)`` entries, i.e. over every kernel axis but the last (with
  ``feature_group_count = G`` each filter only sees its group's ``Cin / G`` channels, as in the
  reference implementation's grouped ``F.conv2d``). No scale: WS is meant to be followed by a
  normalization layer (GroupNorm / BatchNorm).

  Every ``flax.linen.Conv`` field is accepted with flax's meaning (see :class:`Conv`; the bias
  is on by default, as in ``nn.Conv`` and the reference ``nn.Conv2d``, and ``use_bias=False``
  removes it). ``mask`` multiplies the standardized kernel (the statistics are over all entries).

  A filter with zero spread and ``eps = 0`` standardizes to 0 (not 0 / 0). ``fan_in = 1``
  (``kh * kw * Cin / G = 1``): every standardized filter is 0, so the layer outputs only its bias;
  ``'ws'`` warns at ``init``, ``'ws_std'`` raises (its unbiased std needs 2 entries).

  The attributes not listed below are those of :class:`Conv`.

  Attributes:
    method: ``'ws'`` (paper) or ``'ws_std'`` (released code).
    eps: 1e-5 in both; a finite number >= 0 (nan, inf and negative values raise ValueError at
      ``init``/``apply``).
    kernel_init: kernel initializer (LeCun normal; the scale is removed by the standardization).
    closed_form_backward: the closed-form derivative of the kernel standardization (default
      True); False differentiates its direct formula by autodiff (same values; see
      :func:`jaxnorm.functional.standardize_kernel`). Independent of ``custom_backward`` (the
      convolution's).

  References:
    Qiao, Wang, Liu, Shen, Yuille (2019), "Micro-Batch Training with Batch-Channel Normalization
    and Weight Standardization", arXiv:1903.10520.
  """

  method: str = 'ws'
  eps: float = 1e-5
  closed_form_backward: bool = True

  def _transform_kernel(self, kernel, output):
    check_choice('WSConv', 'method', self.method, ('ws', 'ws_std'))
    check_stabilizer('WSConv', 'eps', self.eps, allow_zero=True)
    _check_fan_in(self, 'WSConv', kernel.shape, self.method)
    return standardize_kernel(kernel, self.method, eps=self.eps,
                              closed_form_backward=self.closed_form_backward)


class ScaledWSConv(_ConvBase):
  r"""Scaled weight-standardized convolution of NF-ResNets (Brock et al. 2021a).

  .. math::

    \hat W_o = g_o \, \frac{W_o - \mu_o}{\sqrt{\max(N \sigma_o^2, \epsilon)}}, \qquad
    y = \mathrm{conv}(x, \hat W) + b,

  per output filter, biased variance, ``N = fan_in = kh * kw * Cin / G`` (the filter's entries,
  as ``np.prod(weight.shape[:-1])`` in the reference ``WSConv2D``, which also takes
  ``feature_group_count``). ``gain`` ``g`` has one entry per output channel (init 1); the kernel
  is initialized with ``variance_scaling(1.0, 'fan_in', 'normal')``. Each standardized filter has
  sum of squares ``gain^2`` exactly (while ``fan_in * var > eps``). ``fan_in = 1``: every
  standardized filter is 0 (finite), so the layer outputs only its bias; a warning is emitted at
  ``init``.

  Every ``flax.linen.Conv`` field is accepted with flax's meaning (see :class:`Conv`). The bias
  is on by default (the reference ``WSConv2D`` is an ``hk.Conv2D`` with ``with_bias=True``);
  ``use_bias=False`` removes it. ``mask`` multiplies the standardized kernel.

  The attributes not listed below are those of :class:`Conv`.

  Attributes:
    eps: lower bound on ``fan_in * var`` (1e-4); a finite number > 0 (0, nan, inf and negative
      values raise ValueError at ``init``/``apply``).
    kernel_init: kernel initializer (None: variance scaling 1.0, fan-in, normal).
    closed_form_backward: the closed-form derivative of the kernel standardization (default
      True); False differentiates its direct formula by autodiff (same values; see
      :func:`jaxnorm.functional.standardize_kernel`). Independent of ``custom_backward`` (the
      convolution's).

  References:
    Brock, De, Smith (2021), "Characterizing signal propagation to close the performance gap in
    unnormalized ResNets", arXiv:2101.08692 (ICLR 2021); ``deepmind/deepmind-research``
    ``nfnets/base.py::WSConv2D``.
  """

  kernel_init: Initializer | None = None
  eps: float = 1e-4
  closed_form_backward: bool = True

  def _default_kernel_init(self):
    return initializers.variance_scaling(1.0, 'fan_in', 'normal')

  def _transform_kernel(self, kernel, output):
    check_stabilizer('ScaledWSConv', 'eps', self.eps, allow_zero=False)
    _check_fan_in(self, 'ScaledWSConv', kernel.shape, 'scaled_ws')
    gain = self.param('gain', nn.initializers.ones_init(), (self.features,), self.param_dtype)
    return standardize_kernel(kernel, 'scaled_ws', eps=self.eps, scale=gain,
                              closed_form_backward=self.closed_form_backward)


class PWSConv(_ConvBase):
  r"""Parametric weight-standardized convolution (Liu, Ge, Li, Gui 2021), official semantics.

  .. math::

    \hat W_o = \sqrt{2 / \mathrm{fan}} \; \alpha_o \,
    \frac{W_o - \mu_o}{\sqrt{\sigma_o^2 + \gamma}}, \qquad y = \mathrm{conv}(x, \hat W) + b,

  per output filter (its ``kh * kw * Cin / G`` entries), biased variance with gamma inside the
  sqrt (``F.layer_norm`` in the official code). ``fan`` is computed on the kernel shape
  ``(kh, kw, Cin / G, Cout)`` as torch's ``_calculate_fan_in_and_fan_out`` does on the grouped
  weight ``(Cout, Cin / G, kh, kw)``: ``kh * kw * Cin / G`` (``mode='fan_in'``) or
  ``kh * kw * Cout`` (``'fan_out'``; the official layer has no groups, where these are its
  ``C_in k k`` and ``C_out k k``); ``equiv=True`` uses ``gamma * 2 / fan``. ``alpha`` has one
  entry per output channel (init 1) and the kernel is initialized He-normal for the chosen fan
  (``variance_scaling(2.0, mode, 'normal')``, as ``kaiming_normal_``, same fans).

  Every ``flax.linen.Conv`` field is accepted with flax's meaning (see :class:`Conv`). The bias
  is on by default (the official layer's ``bias=True``); ``use_bias=False`` removes it. ``mask``
  multiplies the standardized kernel.

  ``init_alpha=True`` performs the official data-dependent initialization at ``init`` time: the
  output is computed with ``alpha = 1`` and without the bias (the official bias is 0 then), then
  **all** alpha entries are set to the scalar ``sqrt(2 / var(output))`` with torch's unbiased
  ``var`` over the whole output tensor, so that the pre-activation variance on the init batch is
  2. (In the official code this happens on the first training forward; here it happens during
  ``Module.init`` with the init batch.) When that output carries no variance (an all-zeros or
  constant init batch, or ``fan_in = 1``), ``sqrt(2 / var)`` is not finite: alpha then falls back
  to its default **1.0** and a ``UserWarning`` naming ``PWSConv`` and ``init_alpha`` is emitted
  (under ``jit`` the fallback still applies and the warning comes from ``jax.debug.callback``);
  see :func:`jaxnorm.functional.pws_init_alpha`. Initialize on real data.

  With ``gamma = 0`` a constant filter standardizes to 0 (not 0 / 0). ``fan_in = 1``
  (``kh * kw * Cin / G = 1``): every standardized filter is 0, so the layer outputs only its bias;
  a warning is emitted at ``init``.

  The attributes not listed below are those of :class:`Conv`.

  Attributes:
    gamma: fixed gamma added to the variance (1e-5; the official configs use 1e-3 on CIFAR and
      1e-4 on ImageNet); a finite number >= 0 (nan, inf and negative values raise ValueError at
      ``init``/``apply``).
    mode: ``'fan_in'`` or ``'fan_out'``.
    equiv: scale gamma by ``2 / fan``.
    init_alpha: data-dependent scalar alpha init on the init batch (alpha 1.0 and a warning when
      that batch gives an output without variance).
    kernel_init: kernel initializer (None: He normal for ``mode``).
    closed_form_backward: the closed-form derivative of the kernel standardization (default
      True); False differentiates its direct formula by autodiff (same values; see
      :func:`jaxnorm.functional.standardize_kernel`). Independent of ``custom_backward`` (the
      convolution's).

  References:
    Liu, Ge, Li, Gui (2021), "Delving into Variance Transmission and Normalization: Shift of
    Average Gradient Makes the Network Collapse" (Parametric Weight Standardization), AAAI 2021;
    official code ``lyxzzz/PWSConv@39174be modules/utils/pws_layer.py``.
  """

  kernel_init: Initializer | None = None
  gamma: float = 1e-5
  mode: str = 'fan_in'
  equiv: bool = False
  init_alpha: bool = False
  closed_form_backward: bool = True

  def _default_kernel_init(self):
    check_choice('PWSConv', 'mode', self.mode, FAN_MODES)
    return initializers.variance_scaling(2.0, self.mode, 'normal')

  def _transform_kernel(self, kernel, output):
    check_choice('PWSConv', 'mode', self.mode, FAN_MODES)
    check_stabilizer('PWSConv', 'gamma', self.gamma, allow_zero=True)
    _check_fan_in(self, 'PWSConv', kernel.shape, 'pws')

    def standardize(alpha):
      return standardize_kernel(kernel, 'pws', scale=alpha, gamma=self.gamma, mode=self.mode,
                                equiv=self.equiv, closed_form_backward=self.closed_form_backward)

    def alpha_init(key, shape, dtype):
      del key
      if not self.init_alpha:
        return jnp.ones(shape, dtype)
      # Official `initalpha`: output with alpha = 1 (bias 0), then alpha <- sqrt(2 / var(out)),
      # var unbiased (torch `.var()`) over the whole tensor; alpha = 1 where that is not finite.
      out = output(standardize(jnp.ones(shape, kernel.dtype))).astype(jnp.float32)
      return pws_init_alpha(out, shape[0], dtype, layer='PWSConv', arg='init_alpha')

    alpha = self.param('alpha', alpha_init, (self.features,), self.param_dtype)
    return standardize(alpha)
