"""SkipInit: a learnable scalar gain at the end of a residual branch, initialized at 0 or 1/sqrt(d).

References:
  De & Smith, "Batch Normalization Biases Residual Blocks Towards the Identity Function in Deep
  Networks" (NeurIPS 2020, arXiv 2002.10444); deepmind-research ``nfnets/skipinit_resnet.py``.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxnorm.functional._skip_init import check_init_value, skip_init


class SkipInit(nn.Module):
  """Multiplies its input (a residual branch's output) by a learnable scalar ``gain``.

  A SkipInit residual block computes ``x_{l+1} = x_l + alpha_l * f_l(x_l)``; this module is the
  ``alpha_l *`` factor, placed at the end of the branch ``f_l``. De & Smith initialize
  ``alpha = 0`` (recommended: each block starts as the identity) or ``alpha = 1/sqrt(d)`` with
  ``d`` the number of residual blocks (their condition is ``alpha <~ 1/sqrt(d)``). Models compute
  ``d`` and pass ``init_value=1 / math.sqrt(d)``.

  Example::

    >>> import jax, jax.numpy as jnp
    >>> from jaxnorm.linen import SkipInit
    >>> variables = SkipInit().init(jax.random.key(0), jnp.ones((2, 3)))
    >>> variables['params']['gain'].shape
    ()

  Attributes:
    init_value: initial value of ``gain`` (a finite float; 0.0 by default).
    dtype: output dtype; None keeps the input's dtype (bf16 in, bf16 out). The product is
      computed in the promoted dtype of the input and the parameter.
    param_dtype: dtype of ``gain``.

  References:
    De & Smith (2020), section 4 "SkipInit"; deepmind ``SkipInit_ResNet`` (``skip_gain``, shape
    ``()``, init zeros).
  """

  init_value: float = 0.0
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    """Returns ``gain * x``.

    Args:
      x: floating-point array (the residual branch output).

    Returns:
      ``gain * x`` in ``dtype`` (or ``x.dtype``).
    """
    check_init_value(self.init_value)
    gain = self.param('gain', nn.initializers.constant(self.init_value), (), self.param_dtype)
    return skip_init(x, gain, self.dtype)
