"""Argument checks shared by every jaxnorm layer.

Each check raises a ``ValueError`` or ``TypeError`` whose message names the layer, the argument,
what was expected and what was given, e.g.::

    BatchNorm: argument `ghost_batch_size` expected a divisor of the batch size 12, got 5.

Checks run on static information only (shapes, dtypes, Python values), so they are free under
``jit`` and never inspect traced values.
"""

from __future__ import annotations

import numbers
from collections.abc import Collection, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def fail(layer: str, arg: str, expected: str, got: Any, exc: type[Exception] = ValueError):
  """Raises ``exc`` with jaxnorm's standard message."""
  raise exc(f'{layer}: argument `{arg}` expected {expected}, got {got}.')


def check_floating(layer: str, arg: str, x) -> None:
  """Raises TypeError unless ``x`` has a floating-point dtype."""
  dtype = jnp.result_type(x)
  if not jnp.issubdtype(dtype, jnp.floating):
    fail(layer, arg, 'a floating-point array (float32, bfloat16, ...)', f'dtype {dtype}', TypeError)


def check_rank(layer: str, arg: str, x, ranks: Collection[int]) -> None:
  """Raises ValueError unless ``x.ndim`` is one of ``ranks``."""
  ndim = jnp.ndim(x)
  if ndim not in ranks:
    want = ' or '.join(str(r) for r in sorted(ranks))
    fail(layer, arg, f'an array of rank {want}', f'rank {ndim} (shape {jnp.shape(x)})')


def check_choice(layer: str, arg: str, value: Any, choices: Sequence[Any]) -> None:
  """Raises ValueError unless ``value`` is one of ``choices``."""
  if value not in choices:
    fail(layer, arg, 'one of ' + ', '.join(repr(c) for c in choices), repr(value))


def check_positive(layer: str, arg: str, value: Any, *, allow_zero: bool = False) -> None:
  """Raises ValueError unless ``value`` is a positive (or non-negative) Python number."""
  bad = value < 0 if allow_zero else value <= 0
  if bad:
    fail(layer, arg, 'a non-negative number' if allow_zero else 'a positive number', repr(value))


def check_in_range(layer: str, arg: str, value: Any, low: float, high: float) -> None:
  """Raises unless ``value`` is a real number with ``low <= value <= high`` (NaN is outside).

  A traced value (an argument of a jitted function) cannot be compared while tracing and is let
  through; anything that is not a real scalar (a bool, a string, an array of size > 1) raises a
  ``TypeError``.
  """
  if isinstance(value, jax.core.Tracer):
    return
  real_scalar = (isinstance(value, numbers.Real) or (
      hasattr(value, 'dtype') and jnp.ndim(value) == 0
      and jnp.issubdtype(value.dtype, jnp.floating) | jnp.issubdtype(value.dtype, jnp.integer)))
  if isinstance(value, (bool, np.bool_)) or not real_scalar:
    fail(layer, arg, f'a real number in [{low}, {high}]', repr(value), TypeError)
  if not low <= float(value) <= high:
    fail(layer, arg, f'a number in [{low}, {high}]', repr(value))


def normalize_axes(layer: str, arg: str, axes, ndim: int) -> tuple[int, ...]:
  """Returns ``axes`` as a sorted tuple of non-negative ints, checking the range."""
  if isinstance(axes, int):
    axes = (axes,)
  out = []
  for a in axes:
    if not -ndim <= a < ndim:
      fail(layer, arg, f'axes in [-{ndim}, {ndim}) for an input of rank {ndim}', tuple(axes))
    out.append(a % ndim)
  if len(set(out)) != len(out):
    fail(layer, arg, 'distinct axes', tuple(axes))
  return tuple(sorted(out))
