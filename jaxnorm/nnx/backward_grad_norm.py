"""Flax NNX Backward Gradient Normalization: the layer of ``jaxnorm.linen`` for NNX users.

References:
  Cabana & Lago-Fernandez, "Backward Gradient Normalization in Deep Neural Networks",
  arXiv 2106.09475 (2021), https://arxiv.org/abs/2106.09475.
"""

from __future__ import annotations

from typing import Any

from flax import nnx

from jaxnorm.functional import _backward_grad_norm as bgn_lib


class BackwardGradNorm(nnx.Module):
  """Backward Gradient Normalization node: ``y = x``; backward ``g -> target * g / (||g|| + eps)``.

  Same semantics as :class:`jaxnorm.linen.BackwardGradNorm` (no parameters, no state); see
  :func:`jaxnorm.functional.backward_grad_norm` for the rule, its behaviour
  under transformations and its reconstructed defaults.

  Args:
    mode: ``'per_sample'`` (norm over all axes but 0) or ``'per_batch'`` (whole tensor).
    target: ``'sqrt_units'``, ``'unit'`` or a positive float.
    eps: positive constant added to the norm.
    enabled: if False the layer is the identity in both passes.
    rngs: accepted for signature uniformity with other NNX layers; unused.

  References:
    Cabana & Lago-Fernandez, "Backward Gradient Normalization in Deep Neural Networks",
    arXiv 2106.09475 (2021); the defaults are a reconstruction (the paper's code is not public).
  """

  def __init__(self, mode: str = 'per_sample', target: Any = 'sqrt_units', eps: float = 1e-6,
               *, enabled: bool = True, rngs: nnx.Rngs | None = None):
    del rngs
    bgn_lib.validate_args(mode, target, eps, layer='BackwardGradNorm')
    self.mode = mode
    self.target = target
    self.eps = eps
    self.enabled = enabled

  def __call__(self, x):
    """Returns ``x`` unchanged; its gradient is normalized in the backward pass."""
    bgn_lib.check_input(x, self.mode, layer='BackwardGradNorm')
    if not self.enabled:
      return x
    return bgn_lib.backward_grad_norm(x, mode=self.mode, target=self.target, eps=self.eps)
