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
result has the kernel's dtype. They are shifted two-pass statistics: an entry of each filter
(held constant for differentiation) is subtracted before summing, so a large common offset
(e.g. 1e4) costs no float32 precision, and the variance is that of the centred values.

Every method is invariant to adding a constant to a filter, so the kernel gradient through it is
orthogonal to the all-ones direction of each filter (the "average gradient" component is
projected out).

Derivative (``closed_form_backward=True``, the default). Every method is
``y_o = c s_o W_c r(v_o)`` with ``W_c = W_o - mu_o`` (one filter), ``v_o = mean(W_c^2)`` its biased
variance, ``c`` a constant (``sqrt(2 / fan)`` for PWS, else 1), ``s_o`` the optional scale and
``r`` the method's inverse spread (``(v + eps)^(-1/2)``, ``1 / (sqrt(n v / (n - 1)) + eps)``,
``max(n v, eps)^(-1/2)``, ``(v + gamma)^(-1/2)``). With ``d mu = mean(dW)`` and
``d v = 2 mean(W_c dW)``, its derivative per filter is the closed form::

  dy = c s r (dW - mean(dW)) + c s a W_c sum(W_c dW) + c r W_c ds,    a = 2 r'(v) / n,

and its transpose, the backward pass for a cotangent ``g`` (``y_hat = W_c r``, ``a = -r^3 / n``
for WS and PWS, where it is BatchNorm's formula over the filter)::

  dL/dW = c s r (g - mean(g) - y_hat mean(g y_hat)),   dL/ds = c sum(g y_hat).

``standardize_kernel`` computes it as a ``jax.custom_jvp`` whose tangent rule is that (linear)
formula: JAX transposes it for reverse mode, so forward mode (``jax.jvp``, ``jax.jacfwd``),
reverse mode and every composition (``jax.hessian``, grad of grad) work, and since the rule
recomputes the statistics with ordinary JAX operations, second derivatives are the true ones.
The backward pass is two column sums (of ``g`` and of ``W_c g``) and one elementwise pass on the
``(n, Cout)`` view of the kernel, instead of autodiff's transposes of the shifted two-pass
statistics (in a ResNet-50 conv layer, 12 kernel-sized float32 reads or writes per forward +
backward instead of 26; times in BENCHMARKS.md, section 3). In
``'scaled_ws'`` the clamped branch ``n v <= eps`` does not depend on the filter (``a = 0``
there; ``jnp.maximum``'s 1/2 at an exact tie). ``closed_form_backward=False`` differentiates the
direct formula by autodiff instead (the same function; tests and benchmarks compare the two).

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
  (Parametric Weight Standardization), AAAI 2021 (official PyTorch ``pws_layer.py``). The
  derivative through the mean and variance: Ioffe & Szegedy (2015), "Batch Normalization:
  Accelerating Deep Network Training by Reducing Internal Covariate Shift", arXiv:1502.03167,
  section 3.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero

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
    closed_form_backward: bool = True,
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
    closed_form_backward: differentiate through the closed-form ``jax.custom_jvp`` (default; see
      the module docstring); False: autodiff of the direct formula (same values and
      derivatives, more passes over the kernel).

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

  n = math.prod(kernel.shape[:-1])  # entries per filter = fan_in
  if method == 'ws_std' and n < 2:
    fail(_LAYER, 'kernel', "at least 2 entries per filter for the unbiased std of 'ws_std'",
         f'shape {kernel.shape}')
  if method == 'pws':
    fan = pws_fan(kernel.shape, mode)
    const, stabilizer = math.sqrt(2.0 / fan), (gamma * 2.0 / fan if equiv else gamma)
  else:
    const, stabilizer = 1.0, eps

  dtype = kernel.dtype
  w = kernel.astype(_stats_dtype(dtype))
  if scale is not None:
    scale = jnp.asarray(scale, w.dtype)
  if not closed_form_backward:
    return _standardize_autodiff(w, method, n, const, stabilizer, scale).astype(dtype)
  # One column per filter: the per-filter vectors broadcast along rows only, and their
  # transposes are plain column sums (XLA:CPU runs the keepdims HWIO sums much slower).
  filters = w.reshape(n, cout)
  out = _closed_form(method, n, const, stabilizer)(filters, scale)
  return out.reshape(kernel.shape).astype(dtype)


def _standardize_autodiff(w, method, n, const, stabilizer, scale):
  """The direct formula on the ``HWIO`` kernel (statistics dtype), differentiated by autodiff."""
  axes = tuple(range(w.ndim - 1))  # every axis but the output channels
  # Shifted two-pass statistics: subtract one entry of each filter first (exact in floating point
  # for nearby values), so a large common offset (e.g. 1e4) does not swamp the float32 sums.
  shift = jax.lax.stop_gradient(w[(0,) * len(axes)])
  shifted = w - shift
  centred = shifted - jnp.mean(shifted, axis=axes, keepdims=True)
  # Centred two-pass (biased) variance: exact for filters with a large common offset.
  var = jnp.mean(jnp.square(centred), axis=axes, keepdims=True)
  if method == 'ws':
    out = centred * _safe_rsqrt(var + stabilizer)
  elif method == 'ws_std':
    var_unbiased = var * (n / (n - 1))
    # sqrt with a finite gradient for a constant filter (std 0): d std / d W is then taken as 0.
    positive = var_unbiased > 0
    std = jnp.where(positive, jnp.sqrt(jnp.where(positive, var_unbiased, 1.0)), 0.0)
    denom = std + stabilizer  # 0 only for a constant filter with eps = 0: standardized to 0
    nonzero = denom > 0
    out = jnp.where(nonzero, centred / jnp.where(nonzero, denom, 1.0), 0.0)
  elif method == 'scaled_ws':
    out = centred * jax.lax.rsqrt(jnp.maximum(n * var, stabilizer))
  else:  # 'pws'
    out = const * centred * _safe_rsqrt(var + stabilizer)
  return out if scale is None else out * scale


def _divisor(method: str, n: int, const: float, stabilizer: float, var: jax.Array):
  """Per-filter ``r(var)`` (the factor of the centred filter, ``c`` included) and
  ``a = 2 r'(var) / n``, with the derivative of every degenerate branch (0, finite).

  ``'ws'`` / ``'pws'``: ``r = c (var + e)^(-1/2)``, ``a = -c (var + e)^(-3/2) / n`` (``e`` the
  stabilizer: eps, or PWS's gamma);
  ``'scaled_ws'``: ``r = max(n var, eps)^(-1/2)``, ``a = -r^3`` above the clamp, 0 below it (the
  clamped branch does not depend on the filter), ``-r^3 / 2`` at a tie (``jnp.maximum``'s
  derivative there); ``'ws_std'``: ``r = 1 / (std_u + eps)``, ``std_u = sqrt(n var / (n - 1))``,
  ``a = -r^2 / ((n - 1) std_u)`` (0 for a constant filter, whose std gets a zero derivative).
  A zero divisor (``'ws'`` / ``'pws'`` / ``'ws_std'`` with a zero stabilizer on a constant filter)
  gives ``r = a = 0``.
  """
  if method in ('ws', 'pws'):
    inv = _safe_rsqrt(var + stabilizer)
    return const * inv, (-const / n) * inv * inv * inv
  if method == 'scaled_ws':
    nvar = n * var
    inv = jax.lax.rsqrt(jnp.maximum(nvar, stabilizer))
    slope = jnp.where(nvar > stabilizer, 1.0, jnp.where(nvar == stabilizer, 0.5, 0.0))
    return inv, -(inv * inv * inv) * slope
  # 'ws_std'
  var_unbiased = var * (n / (n - 1))
  positive = var_unbiased > 0
  std = jnp.where(positive, jnp.sqrt(jnp.where(positive, var_unbiased, 1.0)), 0.0)
  denom = std + stabilizer
  nonzero = denom > 0
  r = jnp.where(nonzero, 1.0 / jnp.where(nonzero, denom, 1.0), 0.0)
  a = jnp.where(positive, -(r * r) / ((n - 1) * jnp.where(positive, std, 1.0)), 0.0)
  return r, a


def _closed_form(method: str, n: int, const: float, stabilizer: float):
  """Returns ``f(filters, scale)``: the standardization of ``(n, Cout)`` filters (one per column,
  statistics dtype; ``scale`` ``(Cout,)``, ``()`` or None) as a ``jax.custom_jvp`` whose tangent
  rule is the closed form of the module docstring, linear in the tangents.

  JAX transposes the rule for reverse mode: ``dW = m (g - mean(g)) + a s W_c sum(W_c g)``,
  ``ds = r sum(W_c g)`` (``m = r s``): two column sums and one elementwise pass. The statistics are
  recomputed inside the rule by plain JAX, so differentiating the rule (grad of grad,
  ``jax.hessian``) gives the true second derivatives. Hyperparameters are closed-over Python
  values.

  Each column sum over the kernel subtracts its own stop-gradient row of the filters (rows 0,
  ``n - 1`` and ``n // 2``: every one is an entry of each filter, so each keeps the shifted sums
  exact under a large common offset). Mathematically the same centred filter, they are distinct
  expressions: XLA:CPU fuses each subtraction into its reduction instead of writing a shared
  shifted copy of the kernel to memory and reading it back. In the ResNet-50 conv5_x 3x3 layer
  of BENCHMARKS.md section 3 (forward + gradients) that makes 12 kernel-sized reads or writes
  (a plain convolution: 4; a single shift row: 16; autodiff of the direct formula: 26).
  """

  def statistics(filters):
    row = lambda i: jax.lax.stop_gradient(filters[i])
    s0, s1, s2 = row(0), row(n - 1), row(n // 2)
    # mu: the mean of filters - s0, summed as filters - s1 (exact difference of two entries).
    mu = jnp.mean(filters - s1, axis=0) + (s1 - s0)
    # Centred two-pass variance around t = s0 + mu, rounded; its rounding error d (exact for a
    # large offset, |s0| >> |mu|) is removed: mean((W_c - d)^2) = var + d^2 as mean(W_c) = 0.
    t = s0 + mu
    d = (t - s0) - mu
    var = jnp.maximum(jnp.mean(jnp.square(filters - t), axis=0) - d * d, 0.0)
    return s0, s2, mu, *_divisor(method, n, const, stabilizer, var)

  @jax.custom_jvp
  def standardize(filters, scale):
    s0, _, mu, r, _ = statistics(filters)
    return ((filters - s0) - mu) * (r if scale is None else r * scale)

  def standardize_jvp(primals, tangents):
    filters, scale = primals
    d_filters, d_scale = tangents
    s0, s2, mu, r, a = statistics(filters)
    m = r if scale is None else r * scale
    centred = (filters - s0) - mu
    # d out = m dW - m mean(dW) + W_c (a s sum(W_c dW) + r ds): per-filter vectors broadcast
    # along the rows, so the transpose is column sums of g and W_c g (sum(W_c) = 0: the result
    # stays orthogonal to each filter's all-ones direction). The last factor W_c is written
    # around the row s2: its transpose is the backward's sum of W_c g.
    tangent = jnp.zeros_like(centred)
    coef = jnp.zeros_like(r)
    if not isinstance(d_filters, SymbolicZero):
      am = a if scale is None else a * scale
      coef = am * jnp.sum(centred * d_filters, axis=0)
      tangent = m * d_filters - m * jnp.mean(d_filters, axis=0)
    if scale is not None and not isinstance(d_scale, SymbolicZero):
      coef = coef + r * d_scale
    tangent = tangent + (filters - s2) * coef - (mu + (s0 - s2)) * coef
    return centred * m, tangent

  standardize.defjvp(standardize_jvp, symbolic_zeros=True)
  return standardize
