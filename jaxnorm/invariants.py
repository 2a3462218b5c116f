"""Checks of the invariants jaxnorm's layers promise, for users' tests and for jitted code.

Each check is built on chex assertions, so it works

- eagerly, on concrete arrays: it raises ``AssertionError`` with a message naming the check;
- inside ``jax.jit`` (or ``pmap`` / ``shard_map``) when the jitted function is wrapped with
  ``chex.chexify``: the value checks are functionalized with ``jax.experimental.checkify`` and
  raise (a ``checkify.JaxRuntimeError``) when the result is ready::

      @chex.chexify          # or chex.chexify(f, async_check=False) to raise at once
      @jax.jit
      def step(x):
        y = normalize(x)
        invariants.assert_normalized(y, atol=1e-3)
        return y

  Without ``chexify``, a value check on traced values raises chex's RuntimeError ("Value
  assertions can only be called from functions wrapped with `@chex.chexify`").

Shape checks (:func:`assert_nhwc`, :func:`assert_hwio`) are static and raise at trace time.

References:
  BatchNorm statistics: Ioffe & Szegedy (2015), arXiv:1502.03167. Weight standardization:
  Qiao et al. (2019), arXiv:1903.10520; Liu, Ge, Li & Gui (2021), arXiv:2103.11590. Backward
  Gradient Normalization: Cabana & Lago-Fernandez (2021), arXiv:2106.09475.
"""

from __future__ import annotations

from collections.abc import Sequence

import chex
import jax.numpy as jnp

from jaxnorm.functional import _backward_grad_norm as bgn_lib
from jaxnorm.functional import _checks

_MOD = 'jaxnorm.invariants'


def _reduce_axes(x, axes, name: str) -> tuple[int, ...]:
  if axes is None:
    return tuple(range(jnp.ndim(x) - 1))
  return _checks.normalize_axes(f'{_MOD}.{name}', 'axes', axes, jnp.ndim(x))


def assert_finite(tree) -> None:
  """Asserts every leaf of ``tree`` is free of NaN and +-inf.

  Args:
    tree: a pytree of arrays (activations, gradients, parameters, optimizer state).
  """
  chex.assert_tree_all_finite(tree, custom_message=f'{_MOD}.assert_finite: NaN or inf found')


def assert_normalized(x, axes: int | Sequence[int] | None = None, *, mean: float = 0.0,
                      var: float = 1.0, atol: float = 1e-3) -> None:
  """Asserts per-channel mean ``mean`` and (biased) variance ``var`` over ``axes``, within ``atol``.

  For BatchNorm-normalized activations in training mode (with ``scale=1, bias=0``), the
  statistics over the batch axes are exactly 0 and ``sigma^2 / (sigma^2 + eps)``, i.e. 1 up to
  the epsilon correction.

  Args:
    x: floating-point array, NHWC or NC (channels last by default).
    axes: axes the statistics are taken over; default all axes but the last.
    mean: expected per-channel mean.
    var: expected per-channel population variance.
    atol: absolute tolerance on each channel's mean and variance.

  References:
    BatchNorm, Ioffe & Szegedy (2015), arXiv:1502.03167.
  """
  name = 'assert_normalized'
  _checks.check_floating(f'{_MOD}.{name}', 'x', x)
  _checks.check_positive(f'{_MOD}.{name}', 'atol', atol)
  red = _reduce_axes(x, axes, name)
  x32 = jnp.asarray(x, jnp.float32)
  mu = jnp.mean(x32, axis=red)
  sigma2 = jnp.mean(jnp.square(x32 - jnp.expand_dims(mu, red)), axis=red)
  chex.assert_trees_all_close(
      mu, jnp.full_like(mu, mean), atol=atol, rtol=0.0,
      custom_message=f'{_MOD}.{name}: per-channel mean over axes {red} is not {mean} '
                     f'(atol {atol})')
  chex.assert_trees_all_close(
      sigma2, jnp.full_like(sigma2, var), atol=atol, rtol=0.0,
      custom_message=f'{_MOD}.{name}: per-channel variance over axes {red} is not {var} '
                     f'(atol {atol})')


def assert_zero_mean_filters(kernel, *, atol: float = 1e-5) -> None:
  """Asserts every output filter of a standardized kernel has mean 0 within ``atol``.

  Weight standardization (WS, Scaled WS, PWS) subtracts the per-output-channel mean over
  ``(H, W, I)`` of an HWIO kernel (or ``(I,)`` of a Dense kernel): all axes but the last.

  Args:
    kernel: floating-point kernel of rank >= 2 with output channels last (HWIO, IO).
    atol: absolute tolerance on each filter's mean.

  References:
    Qiao et al. (2019), arXiv:1903.10520; Liu, Ge, Li & Gui (2021), arXiv:2103.11590.
  """
  name = 'assert_zero_mean_filters'
  _checks.check_floating(f'{_MOD}.{name}', 'kernel', kernel)
  if jnp.ndim(kernel) < 2:
    _checks.fail(f'{_MOD}.{name}', 'kernel', 'a kernel of rank >= 2 (HWIO or IO)',
                 f'rank {jnp.ndim(kernel)} (shape {jnp.shape(kernel)})')
  _checks.check_positive(f'{_MOD}.{name}', 'atol', atol)
  k32 = jnp.asarray(kernel, jnp.float32)
  mu = jnp.mean(k32, axis=tuple(range(k32.ndim - 1)))
  chex.assert_trees_all_close(
      mu, jnp.zeros_like(mu), atol=atol, rtol=0.0,
      custom_message=f'{_MOD}.{name}: a filter mean over all axes but the last is not 0 '
                     f'(atol {atol})')


def assert_per_sample_grad_norm(g, target='sqrt_units', *, mode: str = 'per_sample',
                                rtol: float = 1e-4, atol: float = 0.0,
                                allow_zero: bool = False) -> None:
  """Asserts each sample's gradient (or the whole tensor's) has L2 norm ``target``.

  After a Backward Gradient Normalization node the gradient of each sample has norm
  ``target * ||g|| / (||g|| + eps)``, i.e. ``target`` up to a relative ``eps / ||g||``.

  Args:
    g: floating-point gradient, batch on axis 0 for ``mode='per_sample'``.
    target: ``'sqrt_units'``, ``'unit'`` or a positive float, as in
      :func:`jaxnorm.functional.backward_grad_norm`.
    mode: ``'per_sample'`` (norm over all axes but 0) or ``'per_batch'`` (whole tensor).
    rtol: relative tolerance on each norm.
    atol: absolute tolerance on each norm.
    allow_zero: also accept samples whose gradient is exactly zero (BGN maps 0 to 0).

  References:
    Cabana & Lago-Fernandez (2021), arXiv:2106.09475.
  """
  name = 'assert_per_sample_grad_norm'
  bgn_lib.validate_args(mode, target, 1.0, layer=f'{_MOD}.{name}')
  bgn_lib.check_input(g, mode, layer=f'{_MOD}.{name}')
  s = bgn_lib.target_scale(jnp.shape(g), mode, target)
  g32 = jnp.asarray(g, jnp.float32)
  norms = jnp.sqrt(jnp.sum(jnp.square(g32), axis=bgn_lib.norm_axes(g32.ndim, mode)))
  expected = jnp.full_like(norms, s)
  if allow_zero:
    expected = jnp.where(norms == 0, 0.0, expected)
  chex.assert_trees_all_close(
      norms, expected, atol=atol, rtol=rtol,
      custom_message=f'{_MOD}.{name}: a {mode} gradient norm is not the target {s:.6g} '
                     f'(rtol {rtol}, atol {atol})')


def assert_nhwc(x, *, channels: int | None = None) -> None:
  """Asserts ``x`` is a rank-4 NHWC array (with ``channels`` channels when given). Static.

  Args:
    x: array to check.
    channels: expected size of the last axis, or None.
  """
  chex.assert_rank(x, 4, custom_message=f'{_MOD}.assert_nhwc: expected an NHWC array')
  if channels is not None:
    chex.assert_axis_dimension(x, 3, channels,
                               custom_message=f'{_MOD}.assert_nhwc: channel count')


def assert_hwio(kernel, *, in_features: int | None = None,
                out_features: int | None = None) -> None:
  """Asserts ``kernel`` is a rank-4 HWIO conv kernel with the given I and O sizes. Static.

  Args:
    kernel: array to check.
    in_features: expected size of axis 2 (I), or None.
    out_features: expected size of axis 3 (O), or None.
  """
  chex.assert_rank(kernel, 4, custom_message=f'{_MOD}.assert_hwio: expected an HWIO kernel')
  if in_features is not None:
    chex.assert_axis_dimension(kernel, 2, in_features,
                               custom_message=f'{_MOD}.assert_hwio: input features (I)')
  if out_features is not None:
    chex.assert_axis_dimension(kernel, 3, out_features,
                               custom_message=f'{_MOD}.assert_hwio: output features (O)')
