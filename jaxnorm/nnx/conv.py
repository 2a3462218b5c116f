r"""Flax NNX convolutions: ``Conv``, ``WSConv``, ``ScaledWSConv``, ``PWSConv``.

The layers of ``jaxnorm.linen.conv`` as ``nnx.Module`` s over the same functional code
(``jaxnorm.functional.conv`` with its canonical-layout custom VJP, and
``jaxnorm.functional.standardize_kernel``), each a drop-in for ``flax.nnx.Conv``: its whole
constructor (``in_features, out_features, kernel_size, strides``, then the keywords ``padding``,
``input_dilation``, ``kernel_dilation``, ``feature_group_count``, ``use_bias``, ``mask``,
``dtype``, ``param_dtype``, ``precision``, ``kernel_init``, ``bias_init``,
``conv_general_dilated``, ``promote_dtype``, ``preferred_element_type``, ``rngs``,
``kernel_metadata``, ``bias_metadata``) and ``__call__(inputs, out_sharding=None)``, with flax's
meanings: an int ``kernel_size`` ``k`` is the 1-D kernel ``(k,)`` (as in ``flax.nnx.Conv``; pass
a tuple for 2-D and 3-D), the kernel has shape ``(*kernel_size, in_features //
feature_group_count, out_features)``, leading batch axes are flattened (none: one is added).

Parameters have the linen names and shapes (``kernel`` ``HWIO``, ``bias``, ``gain``,
``alpha``), so the same values give the same outputs and gradients (tested). The standardized
kernel is computed in ``__call__`` only and never written back into the ``kernel`` parameter
(unlike ``nnx.WeightNorm``, flax#5576): the optimizer updates the raw kernel, as in the papers.

References:
  Qiao et al. (2019), "Micro-Batch Training with Batch-Channel Normalization and Weight
  Standardization", arXiv:1903.10520 (WS). Brock, De, Smith (2021), "Characterizing signal
  propagation to close the performance gap in unnormalized ResNets", arXiv:2101.08692 (Scaled WS).
  Liu, Ge, Li, Gui (2021), "Delving into Variance Transmission and Normalization: Shift of Average
  Gradient Makes the Network Collapse", AAAI 2021 (PWS).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes
from flax.typing import Dtype, Initializer
from jax import lax

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

__all__ = ['Conv', 'WSConv', 'ScaledWSConv', 'PWSConv']

_LECUN_NORMAL = initializers.lecun_normal()
_ZEROS = nnx.initializers.zeros_init()


def _kernel_shape(layer: str, in_features: int, out_features: int, kernel_size,
                  feature_group_count: int) -> tuple[int, ...]:
  """``(*kernel_size, in_features // G, out_features)``, checking the group count."""
  groups = check_groups(layer, feature_group_count, in_features, out_features)
  return canonical_kernel_size(layer, kernel_size) + (in_features // groups, out_features)


class _ConvBase(nnx.Module):
  """``flax.nnx.Conv``'s constructor and ``__call__``; subclasses override ``_transform_kernel``."""

  def __init__(
      self,
      in_features: int,
      out_features: int,
      kernel_size: int | Sequence[int],
      strides: None | int | Sequence[int] = 1,
      *,
      padding: PaddingLike = 'SAME',
      input_dilation: None | int | Sequence[int] = 1,
      kernel_dilation: None | int | Sequence[int] = 1,
      feature_group_count: int = 1,
      use_bias: bool = True,
      mask: jax.Array | None = None,
      dtype: Dtype | None = None,
      param_dtype: Dtype = jnp.float32,
      precision: Any = None,
      kernel_init: Initializer = _LECUN_NORMAL,
      bias_init: Initializer = _ZEROS,
      conv_general_dilated: Any = lax.conv_general_dilated,
      promote_dtype: Any = dtypes.promote_dtype,
      preferred_element_type: Dtype | None = None,
      rngs: nnx.Rngs,
      kernel_metadata: Mapping[str, Any] = MappingProxyType({}),
      bias_metadata: Mapping[str, Any] = MappingProxyType({}),
      custom_backward: bool = True,
  ):
    layer = type(self).__name__
    kernel_shape = _kernel_shape(layer, in_features, out_features, kernel_size,
                                 feature_group_count)
    if mask is not None and tuple(jnp.shape(mask)) != kernel_shape:
      fail(layer, 'mask', f'the kernel shape {kernel_shape}', f'shape {tuple(jnp.shape(mask))}')
    self.kernel_shape = kernel_shape
    self.kernel = nnx.Param(kernel_init(rngs.params(), kernel_shape, param_dtype),
                            **kernel_metadata)
    self.bias: nnx.Param | None
    if use_bias:
      self.bias = nnx.Param(bias_init(rngs.params(), (out_features,), param_dtype),
                            **bias_metadata)
    else:
      self.bias = nnx.data(None)
    self.in_features = in_features
    self.out_features = out_features
    self.kernel_size = kernel_shape[:-2]
    self.strides = strides
    self.padding = padding
    self.input_dilation = input_dilation
    self.kernel_dilation = kernel_dilation
    self.feature_group_count = int(feature_group_count)
    self.use_bias = use_bias
    self.mask = mask
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.precision = precision
    self.conv_general_dilated = conv_general_dilated
    self.promote_dtype = promote_dtype
    self.preferred_element_type = preferred_element_type
    self.custom_backward = custom_backward

  def _output(self, inputs: jax.Array, kernel: jax.Array, bias: jax.Array | None = None,
              out_sharding=None) -> jax.Array:
    """conv(inputs, kernel * mask) + bias on batch-flattened inputs, flax's dtype promotion."""
    if self.mask is not None:
      kernel = kernel * self.mask
    x, kernel, bias = self.promote_dtype((inputs, kernel, bias), dtype=self.dtype)
    fn = self.conv_general_dilated
    y = conv(x, kernel, strides=self.strides, padding=self.padding,
             input_dilation=self.input_dilation, kernel_dilation=self.kernel_dilation,
             feature_group_count=self.feature_group_count, precision=self.precision,
             custom_backward=self.custom_backward,
             preferred_element_type=self.preferred_element_type, out_sharding=out_sharding,
             conv_general_dilated=None if fn is lax.conv_general_dilated else fn,
             layer=type(self).__name__)
    return y if bias is None else y + bias

  def _flat_inputs(self, inputs: jax.Array):
    layer = type(self).__name__
    inputs = jnp.asarray(inputs)
    inputs, batch_shape = flatten_batch(layer, inputs, len(self.kernel_size))
    if inputs.shape[-1] != self.in_features:
      fail(layer, 'inputs', f'{self.in_features} channels (in_features) in the last axis',
           f'shape {inputs.shape}')
    return inputs, batch_shape

  def _transform_kernel(self, kernel: jax.Array) -> jax.Array:
    return kernel

  def __call__(self, inputs: jax.Array, out_sharding=None) -> jax.Array:
    """Applies the convolution.

    Args:
      inputs: ``(*batch, *spatial, in_features)`` (NHWC for 2-D with one batch axis), the number
        of spatial axes given by ``kernel_size``: every leading axis is a batch axis (flattened
        for the convolution and restored), none is allowed (unbatched in, unbatched out).
      out_sharding: optional output sharding for ``lax.conv_general_dilated`` (explicit-sharding
        meshes); when given the backward pass is JAX's autodiff.

    Returns:
      ``(*batch, *out_spatial, out_features)``.
    """
    inputs, batch_shape = self._flat_inputs(inputs)
    bias = self.bias[...] if self.bias is not None else None
    # The standardized kernel is a local value: never assigned back into self.kernel.
    y = self._output(inputs, self._transform_kernel(self.kernel[...]), bias, out_sharding)
    return y if batch_shape is None else y.reshape(batch_shape + y.shape[1:])


class Conv(_ConvBase):
  """Convolution, a drop-in for ``flax.nnx.Conv``, with the canonical-layout custom backward.

  ``y[n, p, o] = sum_{k, i} x_pad[n, p * s + k * d, g(o) * Cin / G + i] * W[k, i, o] + b[o]``
  (``G = feature_group_count`` groups, ``g(o)`` the group of output channel ``o``): the function
  ``flax.nnx.Conv`` computes, with its whole constructor, defaults (LeCun-normal kernel, zero bias,
  ``use_bias=True``) and meanings (see the module docstring), and the same parameters drawn from
  the same ``rngs`` streams in the same order, so the same seed gives the same values (tested).

  Args:
    in_features: input channels.
    out_features: output channels.
    kernel_size: spatial kernel size, a sequence of ints (an int ``k`` is ``(k,)``, as in flax).
    strides: window strides, an int or one per spatial axis (None: 1).
    padding: ``'SAME'``, ``'SAME_LOWER'``, ``'VALID'``, ``'CIRCULAR'``, ``'REFLECT'``,
      ``'CAUSAL'`` (1-D), an int, per-axis ints or per-axis ``(lo, hi)`` pairs.
    input_dilation: input dilation (needs explicit padding when not 1, as in flax).
    kernel_dilation: kernel (atrous) dilation.
    feature_group_count: number of groups ``G``; must divide ``in_features`` and
      ``out_features`` (``G = in_features``: depthwise).
    use_bias: whether to add a bias.
    mask: optional array of the kernel's shape multiplying the kernel.
    dtype: computation dtype (None: promoted from inputs and parameters).
    param_dtype: parameter dtype.
    precision: ``lax.Precision`` for every convolution.
    kernel_init: kernel initializer (LeCun normal).
    bias_init: bias initializer (zeros).
    conv_general_dilated: the convolution (``lax.conv_general_dilated``: jaxnorm's custom-VJP
      conv; any other function is called instead and differentiated by autodiff).
    promote_dtype: ``promote_dtype((inputs, kernel, bias), dtype=...)`` (flax's by default).
    preferred_element_type: output dtype of the convolution (when given: autodiff backward).
    rngs: ``nnx.Rngs`` with a ``params`` stream.
    kernel_metadata: metadata of the kernel ``nnx.Param``.
    bias_metadata: metadata of the bias ``nnx.Param``.
    custom_backward: use the custom VJP of ``jaxnorm.functional.conv`` (default True); False for
      ``jax.jvp`` / ``jax.jacfwd``.

  References:
    ``flax.nnx.Conv`` (the semantics reproduced); Dumoulin and Visin (2016), "A guide to
    convolution arithmetic for deep learning", arXiv:1603.07285.
  """


class WSConv(_ConvBase):
  r"""Weight-standardized convolution (Qiao et al. 2019); see :class:`jaxnorm.linen.WSConv`.

  .. math::

    \hat W_o = \frac{W_o - \mu_o}{\sqrt{\sigma_o^2 + \epsilon}}, \qquad
    y = \mathrm{conv}(x, \hat W) + b,

  per output filter over its ``kh * kw * in_features / G`` entries. Bias on by default
  (``use_bias=False`` removes it); ``mask`` multiplies the standardized kernel.

  Args:
    in_features, out_features, kernel_size, strides: as :class:`Conv`.
    method: ``'ws'`` (paper: biased variance, eps inside the sqrt) or ``'ws_std'`` (released code:
      unbiased std + eps).
    eps: 1e-5; a finite number >= 0 (nan, inf, negative: ValueError). With 0, a constant filter
      standardizes to 0. ``fan_in = 1`` (``prod(kernel_size) * in_features / G``): every
      standardized filter is 0 and the layer outputs its bias; ``'ws'`` warns, ``'ws_std'``
      raises ValueError.
    closed_form_backward: the closed-form derivative of the kernel standardization (default
      True); False differentiates its direct formula by autodiff (same values; see
      :func:`jaxnorm.functional.standardize_kernel`).
    **kwargs: the remaining :class:`Conv` arguments (``use_bias``, ``feature_group_count``,
      ``dtype``, ..., ``rngs``).

  References:
    Qiao, Wang, Liu, Shen, Yuille (2019), "Micro-Batch Training with Batch-Channel Normalization
    and Weight Standardization", arXiv:1903.10520.
  """

  def __init__(self, in_features: int, out_features: int, kernel_size: int | Sequence[int],
               strides: None | int | Sequence[int] = 1, *, method: str = 'ws',
               eps: float = 1e-5, kernel_init: Initializer = _LECUN_NORMAL,
               closed_form_backward: bool = True, rngs: nnx.Rngs, **kwargs):
    check_choice('WSConv', 'method', method, ('ws', 'ws_std'))
    check_stabilizer('WSConv', 'eps', eps, allow_zero=True)
    check_fan_in('WSConv', _kernel_shape('WSConv', in_features, out_features, kernel_size,
                                         kwargs.get('feature_group_count', 1)), method)
    self.method = method
    self.eps = eps
    self.closed_form_backward = closed_form_backward
    super().__init__(in_features, out_features, kernel_size, strides, kernel_init=kernel_init,
                     rngs=rngs, **kwargs)

  def _transform_kernel(self, kernel):
    return standardize_kernel(kernel, self.method, eps=self.eps,
                              closed_form_backward=self.closed_form_backward)


class ScaledWSConv(_ConvBase):
  r"""Scaled WS convolution of NF-ResNets; see :class:`jaxnorm.linen.ScaledWSConv`.

  .. math::

    \hat W_o = g_o \, \frac{W_o - \mu_o}{\sqrt{\max(N \sigma_o^2, \epsilon)}}, \qquad
    y = \mathrm{conv}(x, \hat W) + b,

  ``N = fan_in = prod(kernel_size) * in_features / G``; ``gain`` ``g`` per output channel (init
  1); bias on by default (init 0; ``use_bias=False`` removes it); kernel init
  ``variance_scaling(1.0, 'fan_in', 'normal')``.

  Args:
    in_features, out_features, kernel_size, strides: as :class:`Conv`.
    eps: lower bound on ``fan_in * var`` (1e-4); a finite number > 0 (0, nan, inf, negative:
      ValueError). ``fan_in = 1``: every standardized filter is 0 (the layer outputs its bias);
      a warning is emitted.
    kernel_init: kernel initializer (None: variance scaling 1.0, fan-in, normal).
    closed_form_backward: the closed-form derivative of the kernel standardization (default
      True); False differentiates its direct formula by autodiff (same values; see
      :func:`jaxnorm.functional.standardize_kernel`).
    **kwargs: the remaining :class:`Conv` arguments.

  References:
    Brock, De, Smith (2021), "Characterizing signal propagation to close the performance gap in
    unnormalized ResNets", arXiv:2101.08692; ``nfnets/base.py::WSConv2D``.
  """

  def __init__(self, in_features: int, out_features: int, kernel_size: int | Sequence[int],
               strides: None | int | Sequence[int] = 1, *, eps: float = 1e-4,
               kernel_init: Initializer | None = None, closed_form_backward: bool = True,
               rngs: nnx.Rngs, **kwargs):
    check_stabilizer('ScaledWSConv', 'eps', eps, allow_zero=False)
    check_fan_in('ScaledWSConv',
                 _kernel_shape('ScaledWSConv', in_features, out_features, kernel_size,
                               kwargs.get('feature_group_count', 1)), 'scaled_ws')
    self.eps = eps
    self.closed_form_backward = closed_form_backward
    kernel_init = kernel_init or initializers.variance_scaling(1.0, 'fan_in', 'normal')
    super().__init__(in_features, out_features, kernel_size, strides, kernel_init=kernel_init,
                     rngs=rngs, **kwargs)
    self.gain = nnx.Param(jnp.ones((out_features,), self.param_dtype))

  def _transform_kernel(self, kernel):
    return standardize_kernel(kernel, 'scaled_ws', eps=self.eps, scale=self.gain[...],
                              closed_form_backward=self.closed_form_backward)


class PWSConv(_ConvBase):
  r"""Parametric WS convolution (Liu et al. 2021); see :class:`jaxnorm.linen.PWSConv`.

  .. math::

    \hat W_o = \sqrt{2 / \mathrm{fan}} \; \alpha_o \,
    \frac{W_o - \mu_o}{\sqrt{\sigma_o^2 + \gamma}}, \qquad y = \mathrm{conv}(x, \hat W) + b,

  ``fan`` from the kernel shape ``(*K, in_features / G, out_features)`` (torch's fan convention:
  ``prod(K) * in_features / G`` for ``'fan_in'``, ``prod(K) * out_features`` for ``'fan_out'``);
  ``alpha`` per output channel (init 1); bias on by default (init 0, the official layer's
  ``bias=True``; ``use_bias=False`` removes it); kernel He normal for ``mode``. NNX constructs
  parameters without data, so the official data-dependent alpha init is a separate step:
  ``layer.initialize_alpha(x)`` (equal to linen's ``init_alpha=True`` on the same batch).

  Args:
    in_features, out_features, kernel_size, strides: as :class:`Conv`.
    gamma: fixed gamma added to the variance (1e-5); a finite number >= 0 (nan, inf, negative:
      ValueError). With 0, a constant filter standardizes to 0. ``fan_in = 1``: every
      standardized filter is 0 (the layer outputs its bias); a warning is emitted.
    mode: ``'fan_in'`` or ``'fan_out'``.
    equiv: use ``gamma * 2 / fan``.
    kernel_init: kernel initializer (None: He normal, ``variance_scaling(2.0, mode, 'normal')``).
    closed_form_backward: the closed-form derivative of the kernel standardization (default
      True); False differentiates its direct formula by autodiff (same values; see
      :func:`jaxnorm.functional.standardize_kernel`).
    **kwargs: the remaining :class:`Conv` arguments.

  References:
    Liu, Ge, Li, Gui (2021), "Delving into Variance Transmission and Normalization: Shift of
    Average Gradient Makes the Network Collapse" (Parametric Weight Standardization), AAAI 2021;
    official code ``lyxzzz/PWSConv`` ``modules/utils/pws_layer.py``.
  """

  def __init__(self, in_features: int, out_features: int, kernel_size: int | Sequence[int],
               strides: None | int | Sequence[int] = 1, *, gamma: float = 1e-5,
               mode: str = 'fan_in', equiv: bool = False, kernel_init: Initializer | None = None,
               closed_form_backward: bool = True, rngs: nnx.Rngs, **kwargs):
    check_choice('PWSConv', 'mode', mode, FAN_MODES)
    check_stabilizer('PWSConv', 'gamma', gamma, allow_zero=True)
    check_fan_in('PWSConv', _kernel_shape('PWSConv', in_features, out_features, kernel_size,
                                          kwargs.get('feature_group_count', 1)), 'pws')
    self.gamma = gamma
    self.mode = mode
    self.equiv = equiv
    self.closed_form_backward = closed_form_backward
    kernel_init = kernel_init or initializers.variance_scaling(2.0, mode, 'normal')
    super().__init__(in_features, out_features, kernel_size, strides, kernel_init=kernel_init,
                     rngs=rngs, **kwargs)
    self.alpha = nnx.Param(jnp.ones((out_features,), self.param_dtype))

  def _standardize(self, kernel, alpha):
    return standardize_kernel(kernel, 'pws', scale=alpha, gamma=self.gamma, mode=self.mode,
                              equiv=self.equiv, closed_form_backward=self.closed_form_backward)

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
    :func:`jaxnorm.functional.pws_init_alpha`.

    Args:
      inputs: the init batch, ``(*batch, *spatial, in_features)``.

    Returns:
      The new alpha, shape ``(out_features,)``, always finite.

    References:
      Liu et al. (2021), AAAI, official ``pws_layer.py`` (``initalpha``).
    """
    inputs, _ = self._flat_inputs(inputs)
    kernel = self.kernel[...]
    out = self._output(inputs, self._standardize(kernel, jnp.ones((self.out_features,),
                                                                   kernel.dtype)))
    alpha = pws_init_alpha(out.astype(jnp.float32), self.out_features, self.param_dtype,
                           layer='PWSConv', arg='initialize_alpha (init_alpha)')
    self.alpha[...] = alpha
    return alpha
