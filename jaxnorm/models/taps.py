"""Read per-block taps (sown intermediates, or gradients w.r.t. perturbations) in network order.

Models of this package record, per residual block, ``'branch'`` (residual-branch output before its
gain) and ``'skip'`` (skip-path activation after the block), plus ``'stem'`` once; the plain MLP
records ``'layer'`` per hidden layer. They sit in a collection tree whose nesting follows the
modules (``stage_0/block_0/skip``; scanned blocks hold one stacked leaf under ``scanned_blocks``).
These helpers turn such a tree into a flat list in network order.

The ``'perturbations'`` taps are per call, never part of a model's variables: ``perturb`` (which
the models call instead of ``Module.perturb``) does nothing while the model is initializing, so
``init`` returns only what a user keeps (``params``, ``batch_stats``, ...) and the variables work
for any batch size. Build a zero perturbation tree for one batch with ``zero_perturbations``.

References:
  Brock, De & Smith (2021), 'Characterizing signal propagation to close the performance gap in
  unnormalized ResNets', arXiv:2101.08692 (signal-propagation metrics per block).
  Panigrahi, Chen & Kuo (2018), 'Analysis on Gradient Propagation in Batch Normalized Residual
  Networks', arXiv:1812.00342, and De & Smith (2020), 'Batch Normalization Biases Residual Blocks
  Towards the Identity Function in Deep Networks', arXiv:2002.10444 (per-block statistics).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxnorm.models.stacking import SCANNED

_DIGITS = re.compile(r'(\d+)')


# Per-call collections: never part of the variables a user keeps.
PER_CALL = ('intermediates', 'perturbations')


def perturb(module: nn.Module, name: str, value):
  """A gradient tap: ``module.perturb(name, value)``, skipped while the model is initializing.

  ``Module.perturb`` adds a zero variable of ``value``'s shape to the ``'perturbations'``
  collection whenever that collection is mutable, which it is in ``init``: the variables would then
  hold zeros shaped like the init batch, and an ``apply`` on another batch size would broadcast
  against them (a wrong number of rows) or fail. Skipping the tap during ``init`` (also inside
  ``nn.scan`` / ``nn.remat``, which propagate the flag) keeps the variables batch-independent; at
  ``apply`` the tap works as usual (created when 'perturbations' is mutable, added when passed,
  a no-op otherwise).

  Args:
    module: the calling module (bound, inside a compact method).
    name: the tap name ('stem', 'skip', 'layer').
    value: the activation to tap.

  Returns:
    ``value`` (plus the zero perturbation, when one is passed to ``apply``).
  """
  if module.is_initializing():
    return value
  return module.perturb(name, value)


def zero_perturbations(model: nn.Module, variables: Mapping[str, Any], *args, **kwargs):
  """A zero ``'perturbations'`` tree shaped for this call of ``model`` (no computation runs).

  Differentiate a loss w.r.t. it to read the gradient at every tap::

    perts = zero_perturbations(model, variables, x, train=True)
    def loss(p):
      logits, _ = model.apply({**variables, 'perturbations': p}, x, train=True,
                              mutable=['batch_stats'])
      return logits.sum()
    tap_grads = jax.grad(loss)(perts)    # block_taps(tap_grads, 'skip'), ...

  Args:
    model: a Flax linen module that taps with ``perturb``.
    variables: its variables; any 'intermediates' or 'perturbations' in them are ignored.
    *args: the positional arguments of ``model.apply`` after the variables (the input batch).
    **kwargs: its keyword arguments (``train=...``, ``rngs=...``); ``mutable`` is set here.

  Returns:
    The perturbation tree (zeros), ``{}`` if the model has no taps.
  """
  if not isinstance(variables, Mapping):
    raise TypeError(f'zero_perturbations: argument `variables` expected a mapping, got '
                    f'{type(variables).__name__}.')
  base = {k: v for k, v in variables.items() if k not in PER_CALL}
  kwargs = {k: v for k, v in kwargs.items() if k != 'mutable'}
  _, shapes = jax.eval_shape(lambda v: model.apply(v, *args, mutable=True, **kwargs), base)
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes.get('perturbations', {}))


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
