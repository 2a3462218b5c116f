"""Read per-block taps (sown intermediates, or gradients w.r.t. perturbations) in network order.

Models of this package record, per residual block, ``'branch'`` (residual-branch output before its
gain) and ``'skip'`` (skip-path activation after the block), plus ``'stem'`` once; the plain MLP
records ``'layer'`` per hidden layer. They sit in a collection tree whose nesting follows the
modules (``stage_0/block_0/skip``; scanned blocks hold one stacked leaf under ``scanned_blocks``).
These helpers turn such a tree into a flat list in network order.

References: papers.md §0 (signal-propagation metrics per block), §1 and §3 (per-block statistics).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import jax

from jaxnorm.models.stacking import SCANNED

_DIGITS = re.compile(r'(\d+)')


def _natural_key(key) -> tuple:
  """'block_10' after 'block_2'; 'scanned_blocks' after every 'block_<i>'."""
  key = str(key)
  if key == SCANNED:
    return ((2, '', 0),)
  parts = _DIGITS.split(key)
  return tuple((1, '', int(p)) if p.isdigit() else (0, p, 0) for p in parts if p)


def _values(leaf) -> list:
  # sow stores a tuple of values (one per call); a gradient tree holds the array itself.
  if isinstance(leaf, (tuple, list)):
    return list(leaf)
  return [leaf]


def _collect(tree, name: str, stacked: bool, out: list) -> None:
  for key in sorted(tree, key=_natural_key):
    value = tree[key]
    if key == name and not isinstance(value, Mapping):
      for v in _values(value):
        out.append(v if stacked else v[None])
    elif isinstance(value, Mapping):
      _collect(value, name, stacked or key == SCANNED, out)


def block_tap_groups(tree, name: str) -> list[jax.Array]:
  """Like ``block_taps``, but keeps scan-stacked taps stacked: one array per group of blocks.

  Every returned array has a leading block axis: length 1 for an unrolled block, ``n - 1`` for the
  ``scanned_blocks`` of a sequence. Concatenating the groups' leading axes gives ``block_taps``'
  list, in the same order. Use it to reduce many blocks at once (``jax.vmap`` over the leading
  axis) instead of tracing one reduction per block.

  Args:
    tree: as for ``block_taps``.
    name: as for ``block_taps``.

  Returns:
    A list of arrays, each with a leading block axis, in network order.
  """
  if not isinstance(tree, Mapping):
    raise TypeError(f'block_tap_groups: argument `tree` expected a mapping, got '
                    f'{type(tree).__name__}.')
  out: list = []
  _collect(tree, name, False, out)
  return out


def block_taps(tree, name: str) -> list[jax.Array]:
  """Returns every ``name`` tap of ``tree``, one array per block, in network order.

  Args:
    tree: a collection tree: ``'intermediates'`` from ``apply(..., mutable=['intermediates'])``
      (values are sow tuples), or the gradient w.r.t. the ``'perturbations'`` collection (values
      are arrays). The collection's own dict, not the whole ``{'intermediates': ...}`` dict,
      though the latter works too.
    name: the tap name: 'branch', 'skip' (residual blocks), 'layer' (plain MLP), 'stem'.

  Returns:
    A list of arrays, one per block (scan-stacked leaves unstacked), ordered by stage and block
    index with natural numeric ordering.
  """
  if not isinstance(tree, Mapping):
    raise TypeError(f'block_taps: argument `tree` expected a mapping, got {type(tree).__name__}.')
  return [a for group in block_tap_groups(tree, name) for a in group]


def stem_tap(tree) -> jax.Array:
  """Returns the ``'stem'`` tap (input projection of ResidualMLP) of a collection tree."""
  taps = block_taps(tree, 'stem')
  if len(taps) != 1:
    raise ValueError(f'stem_tap: argument `tree` expected exactly one `stem` entry, got '
                     f'{len(taps)}.')
  return taps[0]
