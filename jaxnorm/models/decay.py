"""Which parameters get weight decay: kernels yes; gains, alphas, norm scales and biases no.

References: De & Smith 2020 and Brock et al. 2021a (no weight decay on gains and biases; papers.md
§3, §5b); Liu et al. 2021 (PWS alpha in its own group with weight decay 0; papers.md §5(a)).
"""

from __future__ import annotations

import jax

# Leaf names that never get weight decay: biases, normalization scales (BatchNorm / GroupNorm
# 'scale'), SkipInit's 'gain', Scaled WS's per-channel 'gain', PWS's 'alpha'.
NO_DECAY = frozenset({'bias', 'scale', 'gain', 'alpha'})


def decay_mask(params):
  """Returns a pytree of bools, True where weight decay applies (for ``optax`` ``mask=``).

  Args:
    params: a parameter tree (``variables['params']``), unrolled or scanned.

  Returns:
    A tree of the same structure: False for leaves named 'bias', 'scale', 'gain' or 'alpha', True
    otherwise (conv and dense kernels).

  Example::

    tx = optax.chain(optax.add_decayed_weights(5e-4, mask=decay_mask), optax.sgd(0.1, 0.9))
  """

  def keep(path, _):
    last = path[-1]
    name = getattr(last, 'key', getattr(last, 'name', str(last)))
    return str(name) not in NO_DECAY

  return jax.tree_util.tree_map_with_path(keep, params)
