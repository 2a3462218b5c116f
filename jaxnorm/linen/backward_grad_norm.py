"""Flax linen shell over Backward Gradient Normalization (identity forward, normalized backward).

References:
  Cabana & Lago-Fernandez, "Backward Gradient Normalization in Deep Neural Networks",
  arXiv 2106.09475 (2021), https://arxiv.org/abs/2106.09475.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn

from jaxnorm.functional import _backward_grad_norm as bgn_lib


class BackwardGradNorm(nn.Module):
  """Backward Gradient Normalization node: ``y = x``; backward ``g -> target * g / (||g|| + eps)``.

  A parameter-free layer. See :func:`jaxnorm.functional.backward_grad_norm`
  for the exact rule, its behaviour under ``vmap`` / ``scan`` / ``remat``, and why forward-mode AD
  (``jax.jvp``, ``jax.jacfwd``) through it is undefined. The defaults (per-sample norm, target
  ``sqrt(units)``, ``eps=1e-6``) are a reconstruction (the paper's code is not public).

  The forward pass is bit-identical to the input, so the layer has no ``dtype``: it never casts.
  ``enabled=False`` turns it into a plain identity (nothing in the backward pass either), e.g.
  to run forward-mode AD or to compare a network with and without BGN on the same parameters.

  Example::

    >>> import jax, jax.numpy as jnp
    >>> from jaxnorm.linen import BackwardGradNorm
    >>> layer = BackwardGradNorm()
    >>> x = jnp.ones((2, 4))
    >>> bool((layer.apply({}, x) == x).all())
    True

  Attributes:
    mode: ``'per_sample'`` (norm over all axes but 0) or ``'per_batch'`` (whole tensor).
    target: ``'sqrt_units'``, ``'unit'`` or a positive float: the norm of each normalized slice.
    eps: positive constant added to the norm.
    enabled: if False the layer is the identity in both passes.

  References:
    Cabana & Lago-Fernandez, "Backward Gradient Normalization in Deep Neural Networks",
    arXiv 2106.09475 (2021); defaults reconstructed after the third-party Sombressoul/dyna
    implementation.
  """

  mode: str = 'per_sample'
  target: Any = 'sqrt_units'
  eps: float = 1e-6
  enabled: bool = True

  @nn.compact
  def __call__(self, x):
    """Returns ``x`` unchanged; its gradient is normalized in the backward pass.

    Args:
      x: floating-point array, batch on axis 0 for ``mode='per_sample'``.

    Returns:
      ``x`` (same values and dtype).
    """
    bgn_lib.validate_args(self.mode, self.target, self.eps, layer='BackwardGradNorm')
    bgn_lib.check_input(x, self.mode, layer='BackwardGradNorm')
    if not self.enabled:
      return x
    return bgn_lib.backward_grad_norm(x, mode=self.mode, target=self.target, eps=self.eps)
