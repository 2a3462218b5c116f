"""Depth without pain: run a sequence of identical blocks unrolled or under ``nn.scan``.

Layout of a sequence of ``n`` blocks (a ResNet stage, or the blocks of a ResidualMLP):

- unrolled: submodules ``block_0, ..., block_{n-1}``;
- scanned: ``block_0`` (the stage's first block, which may change width or stride) and
  ``scanned_blocks``, one module whose variables (every collection: params, batch_stats,
  intermediates, perturbations, ...) carry a leading axis of length ``n - 1`` = blocks 1..n-1.

Both run the same operations for the same parameters (``stack_blocks`` / ``unstack_blocks``
convert a variable tree between the two layouts). The outputs agree to float32 rounding, and often
bit for bit: XLA compiles a loop body separately from the rest of the graph, so it may fuse (and,
on XLA:CPU, pick conv kernels) differently than in the unrolled graph; the differences measured are
<= 5e-7 relative on the logits. (Barriers between unrolled blocks did not remove them.)

Why both: ``nn.scan`` keeps compile time flat in depth (ResNet-1202 compiles like ResNet-20),
while unrolled graphs give XLA more freedom within a step. See ``jaxnorm/models/__init__.py``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

SCANNED = 'scanned_blocks'
_BLOCK = re.compile(r'^block_(\d+)$')


# What ``scan=None`` picks on XLA:CPU. Measured here (BENCHMARKS.md section 4; jax 0.10.2, 2 cores,
# batch 16, SGD step, jaxnorm's custom-VJP convs): ResNet-20 0.131 s scanned vs 0.124 s unrolled;
# ResNet-110 0.615 s scanned vs 1.19 s unrolled, compiling in 5.6 s vs 18.8 s; ResNet-1202 only
# compiles scanned (6.8 s, like ResNet-20). So scanning is the default on CPU too.
CPU_SCAN_DEFAULT = True


def default_scan() -> bool:
  """What ``scan=None`` means: scan on GPU/TPU; on CPU ``CPU_SCAN_DEFAULT`` (True, measured)."""
  return jax.default_backend() != 'cpu' or CPU_SCAN_DEFAULT


def run_blocks(block_cls: type[nn.Module], kwargs_first: Mapping[str, Any],
               kwargs_rest: Mapping[str, Any], n: int, carry, train: bool, *, scan: bool,
               remat: bool):
  """Applies ``n`` blocks in sequence, unrolled or with blocks 1..n-1 under ``nn.scan``.

  Must be called inside a compact method (the blocks become the caller's submodules). Each block
  maps ``block(carry, train) -> carry`` (or ``(carry, None)`` when built with
  ``scan_carry=True``, as the scanned blocks are). The carry is the activation, or any pytree of
  arrays with the same structure in and out (e.g. NF-ResNet blocks carry ``(x, block index)``).

  Args:
    block_cls: the block module class; called as ``block(carry, train)``.
    kwargs_first: constructor arguments of block 0.
    kwargs_rest: constructor arguments of blocks 1..n-1 (identical blocks).
    n: number of blocks.
    carry: input of block 0.
    train: training mode (broadcast to every block).
    scan: scan blocks 1..n-1.
    remat: rematerialise each block in the backward pass (``nn.remat``).

  Returns:
    The output (carry) of the last block.
  """
  cls = nn.remat(block_cls, static_argnums=(2,)) if remat else block_cls
  carry = cls(**kwargs_first, name='block_0')(carry, train)
  if n == 1:
    return carry
  if scan:
    scanned = nn.scan(cls, variable_axes={True: 0}, split_rngs={True: True},
                      in_axes=nn.broadcast, length=n - 1)
    carry, _ = scanned(**kwargs_rest, scan_carry=True, name=SCANNED)(carry, train)
    return carry
  for i in range(1, n):
    carry = cls(**kwargs_rest, name=f'block_{i}')(carry, train)
  return carry


def _is_sequence_node(node) -> bool:
  return isinstance(node, Mapping) and 'block_0' in node


def stack_blocks(tree):
  """Converts a variable tree from the unrolled layout to the scanned one.

  Every mapping holding ``block_0 .. block_{n-1}`` gets ``block_1..`` stacked on a new leading
  axis under ``scanned_blocks``. Works on any collection tree (a whole ``variables`` dict too).
  """
  if not isinstance(tree, Mapping):
    return tree
  out = {}
  blocks = {}
  for key, value in tree.items():
    m = _BLOCK.match(key) if isinstance(key, str) else None
    if m and int(m.group(1)) > 0 and _is_sequence_node(tree):
      blocks[int(m.group(1))] = value
    else:
      out[key] = stack_blocks(value)
  if blocks:
    order = sorted(blocks)
    if order != list(range(1, len(order) + 1)):
      raise ValueError(f'stack_blocks: expected block_1..block_{len(order)}, got {order}.')
    out[SCANNED] = jax.tree.map(lambda *xs: jnp.stack(xs), *[blocks[i] for i in order])
  return out


def unstack_blocks(tree):
  """Converts a variable tree from the scanned layout to the unrolled one (inverse of stack)."""
  if not isinstance(tree, Mapping):
    return tree
  out = {}
  for key, value in tree.items():
    if key == SCANNED:
      n = len(jax.tree.leaves(value)[0]) if jax.tree.leaves(value) else 0
      for i in range(n):
        out[f'block_{i + 1}'] = jax.tree.map(lambda a, i=i: a[i], value)
    else:
      out[key] = unstack_blocks(value)
  return out
