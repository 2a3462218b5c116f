"""Weight standardization of convolution kernels, per output channel (WS, Scaled WS, PWS).

For an ``HWIO`` kernel ``W`` (any number of spatial axes, ``(*K, Cin, Cout)``), every output
channel ``o`` is one filter ``W_o`` of ``n = prod(K) * Cin`` entries. For a grouped convolution
(``feature_group_count = G``) the kernel is ``(*K, Cin / G, Cout)``: each filter only sees its
group's ``Cin / G`` channels, so ``n = fan_in = prod(K) * Cin / G`` is again the product of every
axis but the last, and nothing here needs to know ``G``. Each method centres the filter,
``W_o - mean(W_o)``, and divides by a measure of its spread:

- ``'ws'``: ``(W_o - mu_o) / sqrt(var_o + eps)``, biased variance, eps inside the sqrt, eps 1e-5
  (Qiao et al. 2019, the paper's equation).
- ``'ws_std'``: ``(W_o - mu_o) / (std_o + eps)``, **unbiased** std, eps outside the sqrt, eps 1e-5
  (the official PyTorch README code of Weight Standardization, ``torch.std_mean``).
- ``'scaled_ws'``: ``gain_o * (W_o - mu_o) * rsqrt(max(fan_in * var_o, eps))``, biased variance,
  ``fan_in = n``, eps 1e-4 (NF-ResNets, ``nfnets/base.py::WSConv2D``: ``np.prod(shape[:-1])``).
  Per-filter sum of squares is ``gain_o^2`` exactly (while ``fan_in * var_o > eps``).
- ``'pws'``: ``sqrt(2 / fan) * alpha_o * (W_o - mu_o) / sqrt(var_o + gamma)``, biased variance,
  gamma inside the sqrt (``F.layer_norm`` semantics), ``fan = prod(K) * Cin / G``
  (``mode='fan_in'``) or ``prod(K) * Cout`` (``mode='fan_out'``), both read off the kernel shape as
  torch's ``_calculate_fan_in_and_fan_out`` does (see :func:`pws_fan`); ``equiv=True`` uses
  ``gamma * 2 / fan`` instead of gamma. Per-filter sum of squares is
  ``2 * alpha_o^2 * var_o / (var_o + gamma) * n / fan`` (``= 2 alpha^2 sigma^2 / (sigma^2 + gamma)``
  for ``fan_in``): gamma is not negligible for wide layers (He init, ``sigma^2 = 2 / fan_in``,
  gamma 1e-3: the ratio to 2 is ``1 / (1 + gamma fan_in / 2)``, 0.78 at ``fan_in = 576``).

Statistics are computed in float32 (float64 for float64 kernels) whatever the kernel dtype; the
result has the kernel's dtype. Every method is invariant to adding a constant to a filter, so the
kernel gradient through it is orthogonal to the all-ones direction of each filter (the "average
gradient" component is projected out).

Degenerate filters standardize to **zeros**, with a zero (finite) gradient. A constant filter
with ``eps = 0`` (``'ws'``, ``'ws_std'``) or ``gamma = 0`` (``'pws'``) has a zero divisor: its
standardized value is defined as 0 instead of ``0 / 0``. A filter of a single entry
(``fan_in = 1``) is its own mean, so its centred and standardized values are 0 for every method:
such a layer outputs only its bias; :func:`check_fan_in` lets layers warn about it (``'ws_std'``
raises: its unbiased std needs 2 entries). Stabilizers that are nan, inf or negative raise.

References:
  Qiao, Wang, Liu, Shen, Yuille (2019), "Micro-Batch Training with Batch-Channel Normalization and
  Weight Standardization", arXiv:1903.10520. Brock, De, Smith (2021), "Characterizing signal
  propagation to close the performance gap in unnormalized ResNets", arXiv:2101.08692
  (``deepmind-research/nfnets/base.py::WSConv2D``). Liu, Ge, Li, Gui (2021), "Delving into
  Variance Transmission and Normalization: Shift of Average Gradient Makes the Network Collapse"
  (Parametric Weight Standardization), AAAI 2021 (official PyTorch ``pws_layer.py``).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxnorm.functional._checks import check_choice, check_floating, fail

_LAYER = 'standardize_kernel'

METHODS = ('ws', 'ws_std', 'scaled_ws', 'pws')
FAN_MODES = ('fan_in', 'fan_out')

# Default eps per method: WS paper / README 1e-5 (Qiao et al. 2019), NF-ResNets 1e-4 (Brock et al.).
DEFAULT_EPS = {'ws': 1e-5, 'ws_std': 1e-5, 'scaled_ws': 1e-4}


def _stats_dtype(dtype) -> jnp.dtype:
  """float32 for low-precision kernels, the kernel's own dtype when it is wider."""
  return jnp.promote_types(dtype, jnp.float32)


def check_stabilizer(layer: str, arg: str, value: Any, *, allow_zero: bool) -> None:
  """Raises ValueError unless ``value`` is a finite non-negative (or positive) real number.

  ``_checks.check_positive`` lets nan (every comparison with nan is False) and inf through; a
  stabilizer (``eps``, ``gamma``) that is nan makes every output nan, and one that is inf makes
  every standardized filter 0, so both are rejected here.

  Args:
    layer: the layer name for the message (e.g. ``'PWSConv'``).
    arg: the argument name (``'eps'``, ``'gamma'``).
    value: the value given (a Python number or a concrete scalar array; not a traced value).
    allow_zero: whether 0 is accepted.

  Returns:
    None.

  References:
    jaxnorm's error convention (``jaxnorm.functional._checks``).
  """
  expected = 'a finite ' + ('non-negative' if allow_zero else 'positive') + ' number'
  try:
    v = float(value)
  except (TypeError, ValueError, jax.errors.ConcretizationTypeError):
    fail(layer, arg, expected + ' (a Python float)', repr(value), TypeError)
  if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
    fail(layer, arg, expected, repr(value))


def check_fan_in(layer: str, kernel_shape, method: str) -> None:
  """Raises or warns when every filter of a kernel has a single entry (``fan_in = 1``).

  A filter of one entry is its own mean: its centred value, hence its standardized value, is 0
  for every method, and the layer outputs only its bias. ``'ws'``, ``'scaled_ws'`` and ``'pws'``
  stay finite (zeros, zero kernel gradient) and this warns; ``'ws_std'`` raises (its unbiased
  std needs at least 2 entries).

  Args:
    layer: the layer name for the message.
    kernel_shape: ``(*K, Cin / G, Cout)`` (``G`` the conv's ``feature_group_count``).
    method: one of ``METHODS``.

  Returns:
    None.

  References:
    Qiao et al. 2019 (WS standardizes over the ``prod(K) * Cin / G`` entries of each filter).
  """
  n = math.prod(kernel_shape[:-1])
  if n >= 2:
    return
  if method == 'ws_std':
    fail(layer, 'kernel_size', 'a filter of at least 2 entries (kernel_size x in_features / '
         "feature_group_count) for the unbiased std of method 'ws_std'",
         f'kernel shape {tuple(kernel_shape)}')
  warnings.warn(
      f'{layer}: fan_in is 1 (kernel shape {tuple(kernel_shape)}): every weight-standardized '
      'filter of a single entry is 0, so the layer outputs only its bias and its kernel gets '
      'no gradient.', UserWarning, stacklevel=3)


def _safe_rsqrt(x: jax.Array) -> jax.Array:
  """``rsqrt(x)`` where ``x > 0``, else 0 (a zero-spread filter standardizes to 0, not 0 / 0).

  The inner ``where`` keeps the gradient finite: the ``x <= 0`` branch is a constant.
  """
  positive = x > 0
  return jnp.where(positive, jax.lax.rsqrt(jnp.where(positive, x, 1.0)), 0.0)


def pws_fan(kernel_shape, mode: str = 'fan_in') -> int:
  """PWS fan, read off the kernel shape: ``prod(K) * kernel_shape[-2]`` or ``prod(K) * Cout``.

  For a grouped kernel ``(*K, Cin / G, Cout)`` that is ``prod(K) * Cin / G`` (``'fan_in'``: the
  entries of one filter) and ``prod(K) * Cout`` (``'fan_out'``, not divided by ``G``): the
  convention of torch's ``_calculate_fan_in_and_fan_out`` on the grouped weight
  ``(Cout, Cin / G, kh, kw)`` (what ``kaiming_normal_``, the official PWS init, uses) and of flax's
  ``variance_scaling``. The official PWS layer has no groups; there these are its
  ``C_in k k`` and ``C_out k k``.

  Args:
    kernel_shape: ``(*K, Cin / G, Cout)``.
    mode: ``'fan_in'`` or ``'fan_out'``.

  Returns:
    The fan as a Python int.

  References:
    Liu, Ge, Li, Gui (2021), AAAI, official ``pws_layer.py`` (``fan_in = C_in k k``,
    ``fan_out = C_out k k``); PyTorch ``torch.nn.init._calculate_fan_in_and_fan_out``.
  """
  check_choice(_LAYER, 'mode', mode, FAN_MODES)
  receptive = math.prod(kernel_shape[:-2])
  return receptive * (kernel_shape[-2] if mode == 'fan_in' else kernel_shape[-1])


def pws_init_alpha(output: jax.Array, num_features: int, dtype=jnp.float32, *,
                   layer: str = 'PWSConv', arg: str = 'init_alpha') -> jax.Array:
  """PWS's data-dependent alpha init, ``sqrt(2 / var(output))``, with a finite fallback.

  ``output`` is the layer's output on the init batch computed with ``alpha = 1`` and without the
  bias; ``var`` is torch's unbiased ``.var()`` over the whole tensor, and every channel gets the
  same scalar (official ``initalpha``). When that is not finite, i.e. ``var`` is 0 (an all-zeros
  or otherwise constant init batch, or ``fan_in = 1`` where every standardized filter is 0), nan,
  or so small that the alpha overflows ``dtype``, alpha falls back to its default init, **1.0**,
  and a ``UserWarning`` naming ``layer``, ``arg`` and the variance is emitted.

  The fallback is a ``jnp.where`` (works under ``jit``/``vmap``/``scan``). The warning is
  emitted at once for concrete values, and through ``jax.debug.callback`` when they are traced
  (then it fires when the compiled computation runs; ``jax.effects_barrier()`` waits for it; it
  does not fire under ``jax.eval_shape``).

  Args:
    output: the ``alpha = 1``, bias-free output on the init batch (at least 2 entries).
    num_features: number of output channels (the length of alpha).
    dtype: alpha's dtype (the parameter dtype).
    layer: layer name for the error and warning messages.
    arg: name of the option or method performing the init, for the messages.

  Returns:
    alpha, shape ``(num_features,)``, every entry the same finite scalar.

  References:
    Liu et al. 2021 (AAAI), official ``pws_layer.py`` (``initalpha``: ``alpha <- sqrt(2 /
    var(out))``); the fallback is jaxnorm's (the official code divides by 0 there).
  """
  out = jnp.asarray(output)
  out = out.astype(_stats_dtype(out.dtype))
  if out.size < 2:
    fail(layer, 'inputs', f'an init batch whose output has >= 2 entries for {arg} (unbiased '
         'variance)', f'output shape {out.shape}')
  var = jnp.var(out, ddof=1)
  positive = var > 0
  alpha = jnp.sqrt(2.0 / jnp.where(positive, var, 1.0)).astype(dtype)
  ok = positive & jnp.isfinite(alpha)
  alpha = jnp.where(ok, alpha, jnp.ones((), dtype))

  def warn(ok, var):
    if not np.all(ok):
      warnings.warn(
          f'{layer}: {arg}: the init batch gives an output (alpha = 1, no bias) of variance '
          f'{np.asarray(var)}, so the data-dependent alpha sqrt(2 / var) is not finite (an '
          'all-zeros or constant init batch, or fan_in 1 where every standardized filter is 0); '
          'alpha falls back to its default 1.0. Initialize on a batch of real data.',
          UserWarning, stacklevel=2)

  if isinstance(ok, jax.core.Tracer):
    jax.debug.callback(warn, ok, var)
  else:
    warn(ok, var)
  return jnp.full((num_features,), alpha, dtype)


def standardize_kernel(
    kernel: jax.Array,
    method: str,
    *,
    eps: float | None = None,
    scale: jax.Array | None = None,
    gamma: float = 1e-5,
    mode: str = 'fan_in',
    equiv: bool = False,
) -> jax.Array:
  """Standardizes each output filter of an ``HWIO`` kernel.

  Args:
    kernel: ``(*K, Cin, Cout)`` floating-point kernel (rank >= 2; rank 2 is a Dense kernel).
    method: ``'ws'``, ``'ws_std'``, ``'scaled_ws'`` or ``'pws'`` (see the module docstring).
    eps: stabilizer for ``'ws'`` (added to the variance, default 1e-5), ``'ws_std'`` (added to the
      std, default 1e-5) and ``'scaled_ws'`` (lower bound on ``fan_in * var``, default 1e-4). A
      finite number, >= 0 (> 0 for ``'scaled_ws'``). Not used by ``'pws'`` (pass ``gamma``);
      giving it there raises.
    scale: optional per-output-channel factor of shape ``(Cout,)``: NF-ResNets' ``gain`` for
      ``'scaled_ws'``, PWS's ``alpha`` for ``'pws'`` (1 when None). Also accepted by ``'ws'`` /
      ``'ws_std'`` (which have no scale in the paper).
    gamma: PWS's fixed gamma (added to the variance inside the sqrt); ``'pws'`` only. A finite
      number >= 0; with 0, a constant filter standardizes to 0 (see the module docstring).
    mode: PWS's fan mode, ``'fan_in'`` or ``'fan_out'``; ``'pws'`` only.
    equiv: PWS's ``equiv`` flag: use ``gamma * 2 / fan`` in place of gamma; ``'pws'`` only.

  Returns:
    The standardized kernel, same shape and dtype as ``kernel``. A filter whose divisor is 0
    (constant with ``eps = 0`` / ``gamma = 0``, or ``fan_in = 1``) gives zeros, gradient 0.

  Raises:
    ValueError: on an unknown method or mode, an ``eps``/``gamma`` that is nan, inf or negative
      (``eps = 0`` too for ``'scaled_ws'``), ``eps`` with ``'pws'``, a bad ``scale`` shape, a
      kernel of rank < 2, or ``'ws_std'`` on single-entry filters.
    TypeError: on a non-floating kernel or scale.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import jaxnorm.functional as F
    >>> w = jax.random.normal(jax.random.key(0), (3, 3, 16, 8)) * 0.1 + 0.5
    >>> v = F.standardize_kernel(w, 'ws')          # per output filter: mean 0, variance 1
    >>> bool(jnp.allclose(v.mean((0, 1, 2)), 0, atol=1e-5)), v.shape
    (True, (3, 3, 16, 8))

  References:
    Qiao et al. 2019 (WS; ``'ws'`` is the paper's equation, ``'ws_std'`` the released code);
    Brock et al. 2021 (``nfnets/base.py::WSConv2D``); Liu et al. 2021 (PWS, official
    ``pws_layer.py``); full citations in the module docstring.
  """
  check_choice(_LAYER, 'method', method, METHODS)
  check_floating(_LAYER, 'kernel', kernel)
  if jnp.ndim(kernel) < 2:
    fail(_LAYER, 'kernel', 'an array of rank >= 2 (*K, Cin, Cout)',
         f'rank {jnp.ndim(kernel)} (shape {jnp.shape(kernel)})')
  if method == 'pws':
    if eps is not None:
      fail(_LAYER, 'eps', "None for method 'pws' (its stabilizer is `gamma`)", repr(eps))
    check_choice(_LAYER, 'mode', mode, FAN_MODES)
    check_stabilizer(_LAYER, 'gamma', gamma, allow_zero=True)
  else:
    eps = DEFAULT_EPS[method] if eps is None else eps
    check_stabilizer(_LAYER, 'eps', eps, allow_zero=method != 'scaled_ws')
  cout = kernel.shape[-1]
  if scale is not None:
    check_floating(_LAYER, 'scale', scale)
    if jnp.shape(scale) not in ((cout,), ()):
      fail(_LAYER, 'scale', f'shape ({cout},) (one per output channel) or ()',
           f'shape {jnp.shape(scale)}')

  dtype = kernel.dtype
  w = kernel.astype(_stats_dtype(dtype))
  axes = tuple(range(kernel.ndim - 1))  # every axis but the output channels
  n = math.prod(kernel.shape[:-1])      # entries per filter = fan_in
  # Shifted two-pass statistics: subtract one entry of each filter first (exact in floating point
  # for nearby values), so a large common offset (e.g. 1e4) does not swamp the float32 sums.
  shift = jax.lax.stop_gradient(w[(0,) * len(axes)])
  shifted = w - shift
  centred = shifted - jnp.mean(shifted, axis=axes, keepdims=True)
  # Centred two-pass (biased) variance: exact for filters with a large common offset.
  var = jnp.mean(jnp.square(centred), axis=axes, keepdims=True)

  if method == 'ws':
    out = centred * _safe_rsqrt(var + eps)
  elif method == 'ws_std':
    if n < 2:
      fail(_LAYER, 'kernel', "at least 2 entries per filter for the unbiased std of 'ws_std'",
           f'shape {kernel.shape}')
    var_unbiased = var * (n / (n - 1))
    # sqrt with a finite gradient for a constant filter (std 0): d std / d W is then taken as 0.
    positive = var_unbiased > 0
    std = jnp.where(positive, jnp.sqrt(jnp.where(positive, var_unbiased, 1.0)), 0.0)
    denom = std + eps  # 0 only for a constant filter with eps = 0: standardized to 0
    nonzero = denom > 0
    out = jnp.where(nonzero, centred / jnp.where(nonzero, denom, 1.0), 0.0)
  elif method == 'scaled_ws':
    out = centred * jax.lax.rsqrt(jnp.maximum(n * var, eps))
  else:  # 'pws'
    fan = pws_fan(kernel.shape, mode)
    g = gamma * 2.0 / fan if equiv else gamma
    out = math.sqrt(2.0 / fan) * centred * _safe_rsqrt(var + g)

  if scale is not None:
    out = out * jnp.asarray(scale, out.dtype)
  return out.astype(dtype)
