"""SkipInit's branch scaling, as pure JAX: ``x_{l+1} = x_l + alpha_l * f_l(x_l)``.

De & Smith show that BatchNorm downscales a residual branch relative to the skip path by about
``sqrt(l)`` at block ``l``, so normalized residual blocks start close to the identity. SkipInit
reproduces that bias without normalization: a learnable scalar ``alpha_l`` at the end of each
branch, initialized at 0 (recommended) or ``1/sqrt(d)`` for ``d`` residual blocks (their condition
is ``alpha <~ 1/sqrt(d)``).

References:
  De & Smith, "Batch Normalization Biases Residual Blocks Towards the Identity Function in Deep
  Networks" (NeurIPS 2020, arXiv 2002.10444), section 4; deepmind-research
  ``nfnets/skipinit_resnet.py``.
"""

from __future__ import annotations

import math
from numbers import Real

import jax.numpy as jnp

from jaxnorm.functional import _checks


def check_init_value(init_value, layer: str = 'SkipInit') -> None:
  """Raises unless ``init_value`` is a finite real Python number."""
  if not isinstance(init_value, Real) or isinstance(init_value, bool):
    _checks.fail(layer, 'init_value', 'a finite Python float (0.0 or 1/sqrt(num_blocks))',
                 f'{type(init_value).__name__} {init_value!r}', TypeError)
  if not math.isfinite(init_value):
    _checks.fail(layer, 'init_value', 'a finite Python float', repr(init_value))


def skip_init(x, gain, dtype=None):
  """SkipInit's scaled residual branch ``alpha * f(x)``, in the dtype promoting ``x`` and ``gain``.

  The residual block is ``x + alpha * f(x)`` with a learnable scalar ``alpha`` initialized at 0
  (every block the identity at init) or at most ``1/sqrt(num_blocks)``.

  Args:
    x: the residual branch output ``f(x)``, floating dtype.
    gain: the scalar ``alpha``.
    dtype: output dtype (``x.dtype`` when None: bf16 in, bf16 out).

  Returns:
    ``gain * x`` in ``dtype``.

  Example:
    >>> import jax.numpy as jnp
    >>> import jaxnorm.functional as F
    >>> F.skip_init(jnp.ones(3, jnp.bfloat16), jnp.asarray(0.5))  # alpha f(x), bf16 stays bf16
    Array([0.5, 0.5, 0.5], dtype=bfloat16)

  References:
    De & Smith (2020), arXiv:2002.10444, SkipInit.
  """
  _checks.check_floating('SkipInit', 'x', x)
  out_dtype = x.dtype if dtype is None else dtype
  compute = jnp.promote_types(x.dtype, gain.dtype)
  return (x.astype(compute) * gain.astype(compute)).astype(out_dtype)
