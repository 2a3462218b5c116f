"""Backward Gradient Normalization (BGN): identity forward, gradient rescaled to a fixed norm.

A BGN node leaves forward propagation untouched and replaces the upstream gradient ``g = dL/dy``
by ``target * g / (||g|| + eps)`` in the backward pass, so that the gradient reaching earlier layers
of a very deep network neither vanishes nor explodes.

References:
  Cabana & Lago-Fernandez, "Backward Gradient Normalization in Deep Neural Networks",
  arXiv 2106.09475 (2021); jaxnorm papers.md section 2. The paper body and official code are not
  public: the axes of the norm, the target scale and eps are a reconstruction (see
  :func:`backward_grad_norm`).
"""

from __future__ import annotations

import functools
import math
from numbers import Real

import jax
import jax.numpy as jnp

from jaxnorm.functional import _checks

_LAYER = 'backward_grad_norm'
MODES = ('per_sample', 'per_batch')
TARGETS = ('sqrt_units', 'unit')

_JVP_HINT = (
    'backward_grad_norm: forward-mode autodiff (jax.jvp, jax.jacfwd, jax.linearize evaluated '
    'forward) is undefined through a Backward Gradient Normalization node. BGN is a backward-only '
    'op: its forward pass is the identity but its backward pass rescales the cotangent '
    'non-linearly (g -> target * g / (||g|| + eps)), so there is no tangent map to push forward. '
    'What to do: use reverse mode (jax.grad / jax.vjp / jax.jacrev; second order works as '
    'jax.jacrev(jax.grad(f)) or jax.hessian = jacfwd(jacrev)), or remove / disable the BGN node '
    '(its forward is the identity, so the forward pass does not change), e.g. '
    'BackwardGradNorm(enabled=False).'
)


def validate_args(mode: str, target, eps: float, layer: str = _LAYER) -> None:
  """Checks BGN hyperparameters (Python values only); raises ValueError/TypeError."""
  _checks.check_choice(layer, 'mode', mode, MODES)
  if isinstance(target, str):
    _checks.check_choice(layer, 'target', target, TARGETS)
  elif isinstance(target, Real) and not isinstance(target, bool):
    if not math.isfinite(target):
      _checks.fail(layer, 'target', 'a finite positive number', repr(target))
    _checks.check_positive(layer, 'target', target)
  else:
    _checks.fail(layer, 'target', "'sqrt_units', 'unit' or a positive Python float",
                 f'{type(target).__name__} {target!r}', TypeError)
  if not isinstance(eps, Real) or isinstance(eps, bool):
    _checks.fail(layer, 'eps', 'a positive Python float', f'{type(eps).__name__} {eps!r}',
                 TypeError)
  if not math.isfinite(eps):
    _checks.fail(layer, 'eps', 'a finite positive number', repr(eps))
  _checks.check_positive(layer, 'eps', eps)


def check_input(x, mode: str, layer: str = _LAYER) -> None:
  """Checks the input array of a BGN node: floating, rank >= 2 (per_sample) or >= 1 (per_batch)."""
  _checks.check_floating(layer, 'x', x)
  ndim = jnp.ndim(x)
  if mode == 'per_sample' and ndim < 2:
    _checks.fail(layer, 'x', "an array of rank >= 2 (batch axis 0 plus feature axes) for "
                 "mode='per_sample' (inside jax.vmap, where the batch axis is hidden, use "
                 "mode='per_batch')", f'rank {ndim} (shape {jnp.shape(x)})')
  if mode == 'per_batch' and ndim < 1:
    _checks.fail(layer, 'x', "an array of rank >= 1 for mode='per_batch'",
                 f'rank {ndim} (shape {jnp.shape(x)})')


def norm_axes(ndim: int, mode: str) -> tuple[int, ...]:
  """Axes the gradient norm is taken over: all but axis 0 (per_sample) or all (per_batch)."""
  return tuple(range(1, ndim)) if mode == 'per_sample' else tuple(range(ndim))


def target_scale(shape: tuple[int, ...], mode: str, target) -> float:
  """The norm each normalized gradient slice is given.

  Args:
    shape: shape of the gradient.
    mode: ``'per_sample'`` or ``'per_batch'``.
    target: ``'sqrt_units'`` (sqrt of the number of elements the norm is taken over: the
      per-sample size, or the whole size for ``per_batch``), ``'unit'`` (1.0) or a positive float.

  Returns:
    The target norm as a Python float.
  """
  if target == 'unit':
    return 1.0
  if target == 'sqrt_units':
    units = math.prod(shape[a] for a in norm_axes(len(shape), mode))
    return math.sqrt(units)
  return float(target)


def _safe_norm(sq_sum):
  # ||g|| = sqrt(sum g^2), with a gradient of 0 (not NaN) at g = 0 for reverse-over-reverse.
  positive = sq_sum > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq_sum, 1.0)), 0.0)


def normalize_gradient(g, mode: str, target, eps: float):
  """The BGN backward map: ``target * g / (||g|| + eps)``, norm computed in float32.

  Args:
    g: cotangent array (any float dtype).
    mode: ``'per_sample'`` (norm over all axes but 0) or ``'per_batch'`` (over all axes).
    target: ``'sqrt_units'``, ``'unit'`` or a positive float (see :func:`target_scale`).
    eps: positive constant added to the norm; a zero gradient maps to zero.

  Returns:
    The rescaled gradient, in ``g``'s dtype.

  References:
    Cabana & Lago-Fernandez (2021), papers.md section 2(a).
  """
  s = target_scale(g.shape, mode, target)
  g32 = g.astype(jnp.float32)
  norm = _safe_norm(jnp.sum(g32 * g32, axis=norm_axes(g.ndim, mode), keepdims=True))
  return (g32 * (s / (norm + eps))).astype(g.dtype)


@functools.cache
def _make_bgn(mode: str, target, eps: float):
  """Builds the custom_vjp identity with the hyperparameters closed over (never traced)."""

  @jax.custom_vjp
  def bgn(x):
    return x

  def fwd(x):
    return x, None

  def bwd(_, g):
    return (normalize_gradient(g, mode, target, eps),)

  bgn.defvjp(fwd, bwd)
  return bgn


def backward_grad_norm(x, *, mode: str = 'per_sample', target='sqrt_units', eps: float = 1e-6):
  """Backward Gradient Normalization: returns ``x`` unchanged; rescales the gradient backward.

  Forward: ``y = x`` (bit-identical, same dtype). Backward, with ``g = dL/dy``::

      dL/dx = s * g / (||g||_2 + eps)

  **Reconstruction.** The paper's axes, target ``s`` and ``eps`` are not public; third-party
  implementations disagree (papers.md section 2). The default here follows Sombressoul/dyna:
  per-sample L2 norm over all non-batch axes, ``s = sqrt(units per sample)`` (RMS 1 per unit),
  ``eps = 1e-6`` added to the norm. Alternatives, all reachable through the arguments:

  - llm-random ``scale_norm`` v1: norm over the whole tensor (``mode='per_batch'``) with
    ``s = sqrt(units per sample)``: pass that value as a float ``target``.
  - llm-random v2: whole tensor with ``s = sqrt(d_model)`` (a float ``target``); its extra
    exponent ``c`` on the norm is not offered.
  - unit-norm gradients: ``target='unit'``.

  Transformations:

  - ``jit``: free (all hyperparameters are Python values closed over).
  - ``vmap``: JAX vmaps the backward rule, so its norm is computed *inside each mapped example*
    and never across the mapped axis. Inside ``vmap`` the function sees one example (no batch
    axis): ``mode='per_batch'`` then normalizes each example's whole gradient, which equals
    ``mode='per_sample'`` applied outside ``vmap`` (``'sqrt_units'`` counts that example's
    units). A norm over the whole batch cannot be expressed inside ``vmap``; apply BGN outside it.
  - ``lax.scan`` / ``nn.scan``: each step's node normalizes the gradient of that step's value,
    exactly as the unrolled loop does.
  - ``jax.checkpoint`` / ``nn.remat``: unchanged gradients (the node stores no residuals).
  - Forward-mode AD (``jax.jvp``, ``jax.jacfwd``, ``jax.linearize``) is undefined: BGN has no
    tangent map. Eagerly this raises a TypeError explaining why and what to do; under ``jit``
    JAX raises its own "can't apply forward-mode autodiff (jvp) to a custom_vjp function".
    Use reverse mode, or remove the node (its forward is the identity). Forward-over-reverse
    (``jax.hessian`` = ``jacfwd(jacrev(f))``) *does* work: it differentiates the BGN-modified
    gradient field, which is not the Hessian of the loss.

  Args:
    x: floating-point array; axis 0 is the batch axis for ``mode='per_sample'`` (rank >= 2).
    mode: ``'per_sample'`` (norm over all axes but 0) or ``'per_batch'`` (over the whole tensor).
    target: ``'sqrt_units'`` (sqrt of the number of units the norm is taken over), ``'unit'``
      (1.0) or a positive Python float.
    eps: positive Python float added to the norm; a zero gradient maps to zero (no NaN).

  Returns:
    ``x`` itself (identity forward).

  References:
    Cabana & Lago-Fernandez, "Backward Gradient Normalization in Deep Neural Networks",
    arXiv 2106.09475, papers.md section 2(a); default [recon] after Sombressoul/dyna [3p].
  """
  validate_args(mode, target, eps)
  check_input(x, mode)
  fn = _make_bgn(mode, target if isinstance(target, str) else float(target), float(eps))
  try:
    return fn(x)
  except TypeError as e:
    # Eager jax.jvp evaluates JAX's custom_lin placeholder right here: explain the failure.
    if 'forward-mode' in str(e):
      raise TypeError(_JVP_HINT) from e
    raise
