"""Backward Gradient Normalization (BGN): identity forward, gradient rescaled to a fixed norm.

A BGN node leaves forward propagation untouched and replaces the upstream gradient ``g = dL/dy``
by ``target * g / (||g|| + eps)`` in the backward pass, so that the gradient reaching earlier layers
of a very deep network neither vanishes nor explodes.

References:
  Cabana & Lago-Fernandez, "Backward Gradient Normalization in Deep Neural Networks",
  arXiv 2106.09475 (2021), https://arxiv.org/abs/2106.09475. The paper body and official code
  are not public: the axes of the norm, the target scale and eps are a reconstruction (see
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


def compute_dtype(dtype) -> jnp.dtype:
  """The dtype the BGN backward computes in: ``dtype`` promoted with float32.

  bfloat16 / float16 gradients are rescaled in float32 (and cast back); float32 and float64
  gradients in their own dtype.
  """
  return jnp.promote_types(dtype, jnp.float32)


def _rescale_factors(g, axes: tuple[int, ...], units: int, s: float, eps: float):
  """Per-slice factors ``(a, c)`` with ``s * g / (||g|| + eps) == (g * a) * c``, for any finite g.

  Fast path, the only work while every slice is in range: one reduction ``sq = sum(g^2)`` and
  ``a = 1``, ``c = s / (sqrt(sq) + eps)``. It is exact to the dtype's rounding whenever ``sq`` is
  finite (no square or partial sum overflowed: they are all <= ``sq``) and
  ``sqrt(sq) + eps >= floor = sqrt(units * tiny) / epsneg``: the squares that underflowed (each
  below ``tiny``, the smallest normal number) change the norm by at most ``sqrt(units * tiny)``,
  so the factor by less than one rounding. ``eps`` is a Python float, so when ``eps >= floor``
  (the default 1e-6 against ``floor`` ~1e-10 in float32 at 4096 units) only overflow is checked.

  The check is one scalar, ``max(sq) > max_float`` (or ``min(sq) < (floor - eps)^2`` with a tiny
  ``eps``), and a ``lax.cond`` on it; the fast branch computes ``(a, c)`` itself and returns them
  as one ``(..., 2)`` array, so that taking it costs one small fusion and no copies. Under
  ``vmap`` the cond becomes a select that computes both branches.

  Fallback, for the whole array when any slice is out of range: every slice is scaled by
  ``a = 1 / p`` with ``p = max|g|`` clipped to ``[2^-k, 2^k]``, ``k = 3 * maxexp // 4`` (96 in
  float32, 768 in float64), so that ``a`` is a normal number, the largest scaled entry is between
  ``2^-53`` and ``2^32`` and the sum of scaled squares neither overflows nor loses the largest
  entries to underflow; then ``c = s / (||g * a|| + eps * a)``. ``(g * a) * c`` is never formed
  as one product ``a * c``, which is subnormal when the norm exceeds ``s * 2^126`` in float32.
  ``p`` carries no gradient: the result does not depend on it (exactly), so second-order
  derivatives are those of ``s * g / (||g|| + eps)`` on both paths.
  """
  info = jnp.finfo(g.dtype)
  sq = jnp.sum(g * g, axis=axes, keepdims=True)
  out_of_range = jnp.max(sq) > float(info.max)
  floor = math.sqrt(units * float(info.tiny)) / float(info.epsneg)
  if eps < floor:
    out_of_range = out_of_range | (jnp.min(sq) < (floor - eps) ** 2)

  def fast(g, sq):
    del g
    c = s / (_safe_norm(sq) + eps)
    return jnp.concatenate([jnp.ones_like(c), c], axis=-1)

  def scaled(g, sq):
    del sq
    k = 3 * int(info.maxexp) // 4
    m = jnp.max(jnp.abs(g), axis=axes, keepdims=True, initial=0.0)
    p = jnp.clip(m, 2.0 ** -k, 2.0 ** k)
    a = 1.0 / jax.lax.stop_gradient(p)
    u = g * a
    den = _safe_norm(jnp.sum(u * u, axis=axes, keepdims=True)) + eps * a
    # den is 0 only for an all-zero slice when eps is subnormal (flushed to 0): output 0, no NaN.
    return jnp.concatenate([a, s / jnp.where(den > 0, den, 1.0)], axis=-1)

  ac = jax.lax.cond(out_of_range, scaled, fast, g, sq)
  return ac[..., :1], ac[..., 1:]


def normalize_gradient(g, mode: str, target, eps: float):
  """The BGN backward map ``target * g / (||g|| + eps)``, overflow- and underflow-safe.

  The norm and the rescaling are computed in ``g``'s dtype promoted with float32 (float64 stays
  float64; bfloat16 / float16 are computed in float32). Overflow-safe computation: one reduction,
  ``sum(g^2)``, plus one scalar check and a ``lax.cond`` that skips the fallback, whenever that
  sum is finite in every slice and its square root (plus ``eps``) is large enough that squares
  lost to underflow cannot change it by a rounding; otherwise (a gradient of scale 1e18
  over 4096 float32 units, whose sum of squares is ``inf``, or of scale 1e-30 with a tiny
  ``eps``, whose squares underflow to 0) every slice is first divided by its largest magnitude
  (clipped to a power-of-two range so that the reciprocal is a normal number) and the norm is
  taken of the scaled slice. Any finite gradient keeps its direction and gets norm
  ``target * ||g|| / (||g|| + eps)``; an all-zero slice maps to zero (no NaN, and a zero
  derivative of the norm there for second-order differentiation). Subnormal entries count as
  zero where the backend flushes denormals (XLA:CPU does), which moves the direction by less
  than ``2 * sqrt(units) * tiny / ||g||`` (relative); a slice made only of subnormals then maps
  to zero.

  Args:
    g: cotangent array (any float dtype).
    mode: ``'per_sample'`` (norm over all axes but 0) or ``'per_batch'`` (over all axes).
    target: ``'sqrt_units'``, ``'unit'`` or a positive float (see :func:`target_scale`).
    eps: positive constant added to the norm; a zero gradient maps to zero.

  Returns:
    The rescaled gradient, in ``g``'s dtype.

  References:
    Cabana & Lago-Fernandez, "Backward Gradient Normalization in Deep Neural Networks",
    arXiv 2106.09475 (2021), https://arxiv.org/abs/2106.09475. The fallback is the textbook
    overflow-safe 2-norm: divide by the largest magnitude before squaring.
  """
  s = target_scale(g.shape, mode, target)
  axes = norm_axes(g.ndim, mode)
  units = math.prod(g.shape[a] for a in axes)
  gc = jnp.asarray(g).astype(compute_dtype(g.dtype))
  a, c = _rescale_factors(gc, axes, units, s, eps)
  return ((gc * a) * c).astype(g.dtype)


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
  implementations disagree. The default here follows the GitHub project Sombressoul/dyna:
  per-sample L2 norm over all non-batch axes, ``s = sqrt(units per sample)`` (RMS 1 per unit),
  ``eps = 1e-6`` added to the norm. Alternatives, all reachable through the arguments:

  - llm-random (GitHub) ``scale_norm`` v1: norm over the whole tensor (``mode='per_batch'``) with
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

  The backward is overflow- and underflow-safe and keeps float64 in float64: see
  :func:`normalize_gradient`.

  Returns:
    ``x`` itself (identity forward).

  References:
    Cabana & Lago-Fernandez, "Backward Gradient Normalization in Deep Neural Networks",
    arXiv 2106.09475 (2021), https://arxiv.org/abs/2106.09475; the default is a reconstruction
    after the third-party Sombressoul/dyna implementation.
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
