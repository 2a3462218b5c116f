"""Weight standardization of convolution kernels, per output channel (WS, Scaled WS, PWS).

For an ``HWIO`` kernel ``W`` (any number of spatial axes, ``(*K, Cin, Cout)``), every output
channel ``o`` is one filter ``W_o`` of ``n = prod(K) * Cin`` entries. Each method centres the
filter, ``W_o - mean(W_o)``, and divides by a measure of its spread:

- ``'ws'``: ``(W_o - mu_o) / sqrt(var_o + eps)``, biased variance, eps inside the sqrt, eps 1e-5
  (Qiao et al. 2019, the paper's equation).
- ``'ws_std'``: ``(W_o - mu_o) / (std_o + eps)``, **unbiased** std, eps outside the sqrt, eps 1e-5
  (the official PyTorch README code of Weight Standardization, ``torch.std_mean``).
- ``'scaled_ws'``: ``gain_o * (W_o - mu_o) * rsqrt(max(fan_in * var_o, eps))``, biased variance,
  ``fan_in = n``, eps 1e-4 (NF-ResNets, ``nfnets/base.py::WSConv2D``). Per-filter sum of squares is
  ``gain_o^2`` exactly (while ``fan_in * var_o > eps``).
- ``'pws'``: ``sqrt(2 / fan) * alpha_o * (W_o - mu_o) / sqrt(var_o + gamma)``, biased variance,
  gamma inside the sqrt (``F.layer_norm`` semantics), ``fan = prod(K) * Cin`` (``mode='fan_in'``)
  or ``prod(K) * Cout`` (``mode='fan_out'``); ``equiv=True`` uses ``gamma * 2 / fan`` instead of
  gamma. Per-filter sum of squares is ``2 * alpha_o^2 * var_o / (var_o + gamma) * n / fan``
  (``= 2 alpha^2 sigma^2 / (sigma^2 + gamma)`` for ``fan_in``): gamma is not negligible for wide
  layers (papers.md §5 table).

Statistics are computed in float32 (float64 for float64 kernels) whatever the kernel dtype; the
result has the kernel's dtype. Every method is invariant to adding a constant to a filter, so the
kernel gradient through it is orthogonal to the all-ones direction of each filter (the "average
gradient" component is projected out).

References:
  Qiao et al. 2019, "Micro-Batch Training with Batch-Channel Normalization and Weight
  Standardization" (arXiv 1903.10520), papers.md §5b. Brock, De, Smith 2021, "Characterizing signal
  propagation to close the performance gap in unnormalized ResNets", papers.md §5b. Liu, Ge, Li, Gui
  2021, "Delving into Variance Transmission and Normalization: Shift of Average Gradient Makes the
  Network Collapse" (AAAI), papers.md §5(a) (official PyTorch ``pws_layer.py``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxnorm.functional._checks import check_choice, check_floating, check_positive, fail

_LAYER = 'standardize_kernel'

METHODS = ('ws', 'ws_std', 'scaled_ws', 'pws')
FAN_MODES = ('fan_in', 'fan_out')

# Default eps per method (papers.md §5b): WS paper / README 1e-5, NF-ResNets 1e-4.
DEFAULT_EPS = {'ws': 1e-5, 'ws_std': 1e-5, 'scaled_ws': 1e-4}


def _stats_dtype(dtype) -> jnp.dtype:
  """float32 for low-precision kernels, the kernel's own dtype when it is wider."""
  return jnp.promote_types(dtype, jnp.float32)


def pws_fan(kernel_shape, mode: str = 'fan_in') -> int:
  """PWS fan: ``prod(K) * Cin`` for ``'fan_in'``, ``prod(K) * Cout`` for ``'fan_out'``.

  Args:
    kernel_shape: ``(*K, Cin, Cout)``.
    mode: ``'fan_in'`` or ``'fan_out'``.

  Returns:
    The fan as a Python int.

  References:
    Liu et al. 2021, papers.md §5(a) (``fan_in = C_in k k``, ``fan_out = C_out k k``).
  """
  check_choice(_LAYER, 'mode', mode, FAN_MODES)
  receptive = math.prod(kernel_shape[:-2])
  return receptive * (kernel_shape[-2] if mode == 'fan_in' else kernel_shape[-1])


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
      std, default 1e-5) and ``'scaled_ws'`` (lower bound on ``fan_in * var``, default 1e-4). Not
      used by ``'pws'`` (pass ``gamma``); giving it there raises.
    scale: optional per-output-channel factor of shape ``(Cout,)``: NF-ResNets' ``gain`` for
      ``'scaled_ws'``, PWS's ``alpha`` for ``'pws'`` (1 when None). Also accepted by ``'ws'`` /
      ``'ws_std'`` (which have no scale in the paper).
    gamma: PWS's fixed gamma (added to the variance inside the sqrt); ``'pws'`` only.
    mode: PWS's fan mode, ``'fan_in'`` or ``'fan_out'``; ``'pws'`` only.
    equiv: PWS's ``equiv`` flag: use ``gamma * 2 / fan`` in place of gamma; ``'pws'`` only.

  Returns:
    The standardized kernel, same shape and dtype as ``kernel``.

  References:
    Qiao et al. 2019 (WS; ``'ws'`` is the paper's equation, ``'ws_std'`` the released code);
    Brock et al. 2021a (``nfnets/base.py::WSConv2D``); Liu et al. 2021 (PWS, official
    ``pws_layer.py``). papers.md §5(a) and §5b.
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
    check_positive(_LAYER, 'gamma', gamma, allow_zero=True)
  else:
    eps = DEFAULT_EPS[method] if eps is None else eps
    check_positive(_LAYER, 'eps', eps, allow_zero=method != 'scaled_ws')
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
    out = centred * jax.lax.rsqrt(var + eps)
  elif method == 'ws_std':
    if n < 2:
      fail(_LAYER, 'kernel', "at least 2 entries per filter for the unbiased std of 'ws_std'",
           f'shape {kernel.shape}')
    var_unbiased = var * (n / (n - 1))
    # sqrt with a finite gradient for a constant filter (std 0): d std / d W is then taken as 0.
    positive = var_unbiased > 0
    std = jnp.where(positive, jnp.sqrt(jnp.where(positive, var_unbiased, 1.0)), 0.0)
    out = centred / (std + eps)
  elif method == 'scaled_ws':
    out = centred * jax.lax.rsqrt(jnp.maximum(n * var, eps))
  else:  # 'pws'
    fan = pws_fan(kernel.shape, mode)
    g = gamma * 2.0 / fan if equiv else gamma
    out = math.sqrt(2.0 / fan) * centred * jax.lax.rsqrt(var + g)

  if scale is not None:
    out = out * jnp.asarray(scale, out.dtype)
  return out.astype(dtype)
