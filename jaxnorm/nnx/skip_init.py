"""Flax NNX SkipInit: a learnable scalar gain at the end of a residual branch.

References:
  De & Smith, "Batch Normalization Biases Residual Blocks Towards the Identity Function in Deep
  Networks" (NeurIPS 2020).
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import nnx

from jaxnorm.functional._skip_init import check_init_value, skip_init


class SkipInit(nnx.Module):
  """Multiplies its input (a residual branch's output) by a learnable scalar ``gain``.

  Same semantics and parameter (``gain``, shape ``()``) as :class:`jaxnorm.linen.SkipInit`:
  ``x_{l+1} = x_l + alpha * f(x_l)`` with ``alpha`` initialized at 0 (recommended) or
  ``1/sqrt(d)`` for ``d`` residual blocks.

  Args:
    init_value: initial value of ``gain`` (finite float, 0.0 by default).
    dtype: output dtype; None keeps the input's dtype.
    param_dtype: dtype of ``gain``.
    rngs: accepted for signature uniformity with other NNX layers; unused (deterministic init).

  References:
    De & Smith (2020), arXiv:2002.10444, SkipInit.
  """

  def __init__(self, init_value: float = 0.0, *, dtype: Any = None,
               param_dtype: Any = jnp.float32, rngs: nnx.Rngs | None = None):
    del rngs
    check_init_value(init_value)
    self.init_value = init_value
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.gain = nnx.Param(jnp.asarray(init_value, param_dtype))

  def __call__(self, x):
    """Returns ``gain * x`` in ``dtype`` (or ``x.dtype``)."""
    return skip_init(x, self.gain[...], self.dtype)
