"""Statistics of weights: the PWS paper's "shift" of the average weight.

References:
  Liu, Ge, Li & Gui (2021), "Delving into Variance Transmission and Normalization: Shift of
  Average Gradient Makes the Network Collapse", AAAI 2021, arXiv:2103.11590 (the shift
  diagnostic); the authors' TensorFlow code, lyxzzz/PWSConv_backup ``tf_layer.py``,
  ``wn_conv.__cal_shift``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxnorm.functional._checks import check_floating, fail

_LAYER = 'shift_statistic'


def shift_statistic(kernel: jax.Array) -> jax.Array:
  """``Var_o(n * mean(W_o))``: spread over output channels of each filter's summed mean.

  For a kernel with output channels on the last axis (conv HWIO, or dense ``(in, out)``), with
  ``n = prod(kernel.shape[:-1])`` the fan-in and ``mean(W_o)`` the mean of filter ``o``. A
  post-ReLU input with mean ``m > 0`` gives output channel ``o`` the offset ``n mean(W_o) m``, so
  this statistic times ``m^2`` is the variance those offsets add. Weight standardization (WS, PWS,
  scaled WS) makes every filter mean zero, so it is exactly 0 (up to rounding) for their kernels.

  Args:
    kernel: floating array of rank >= 2, output channels last.

  Returns:
    float32 scalar (population variance over the output channels).

  References:
    Liu, Ge, Li & Gui (2021), "Delving into Variance Transmission and Normalization: Shift of
    Average Gradient Makes the Network Collapse", AAAI 2021, arXiv:2103.11590; their TensorFlow
    ``__cal_shift``: ``shift = Var_o(n * mean(W_o))``.
  """
  check_floating(_LAYER, 'kernel', kernel)
  if jnp.ndim(kernel) < 2:
    fail(_LAYER, 'kernel', 'a kernel of rank >= 2 with output channels last (HWIO, IO)',
         f'shape {jnp.shape(kernel)}')
  k = jnp.asarray(kernel, jnp.float32)
  k = jnp.reshape(k, (-1, k.shape[-1]))
  n = k.shape[0]
  return jnp.var(n * jnp.mean(k, axis=0))
