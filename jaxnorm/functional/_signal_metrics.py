"""Signal-propagation metrics of an activation tensor (Brock et al. 2021 SPPs).

References:
  Brock, De, Smith, "Characterizing signal propagation to close the performance gap in
  unnormalized ResNets" (ICLR 2021), arXiv:2101.08692; deepmind-research ``nfnets/base.py``
  ``signal_metrics``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxnorm.functional import _checks

_LAYER = 'signal_metrics'


class SignalMetrics(NamedTuple):
  """Average channel statistics of an activation tensor (float32 scalars).

  Attributes:
    avg_sq_mean: ``mean_c (mean_{N,H,W} x[..., c])^2``, the average channel squared mean.
    avg_var: ``mean_c var_{N,H,W} x[..., c]``, the average channel (population) variance. Taken
      on a residual branch's output before its skip gain, it is the SPP ``res_avg_var``.
  """

  avg_sq_mean: jax.Array
  avg_var: jax.Array


def signal_metrics(x) -> SignalMetrics:
  """Average channel squared mean and average channel variance of ``x`` (channels last).

  For ``x`` of shape ``(N, H, W, C)`` (or ``(N, C)``, or any rank >= 2 with channels last), the
  per-channel statistics are taken over all axes but the last, in float32 whatever ``x``'s dtype::

      mu_c  = mean_{N,H,W} x[..., c]
      avg_sq_mean = mean_c mu_c^2
      avg_var     = mean_c mean_{N,H,W} (x[..., c] - mu_c)^2     (population variance, two-pass)

  Args:
    x: floating-point array of rank >= 2, channels on the last axis.

  Returns:
    ``SignalMetrics(avg_sq_mean, avg_var)``, float32 scalars.

  Example:
    >>> import jax
    >>> import jaxnorm.functional as F
    >>> m = F.signal_metrics(2.0 * jax.random.normal(jax.random.key(0), (4096, 8)) + 1.0)
    >>> round(float(m.avg_var)), round(float(m.avg_sq_mean))
    (4, 1)

  References:
    Brock, De & Smith (2021), arXiv:2101.08692, signal propagation plots; deepmind nfnets
    ``base.signal_metrics``.
  """
  _checks.check_floating(_LAYER, 'x', x)
  if jnp.ndim(x) < 2:
    _checks.fail(_LAYER, 'x', 'an array of rank >= 2 with channels last (NC, NHWC, ...)',
                 f'rank {jnp.ndim(x)} (shape {jnp.shape(x)})')
  axes = tuple(range(x.ndim - 1))
  x32 = jnp.asarray(x, jnp.float32)
  mean = jnp.mean(x32, axis=axes)
  var = jnp.mean(jnp.square(x32 - mean), axis=axes)
  return SignalMetrics(avg_sq_mean=jnp.mean(jnp.square(mean)), avg_var=jnp.mean(var))
