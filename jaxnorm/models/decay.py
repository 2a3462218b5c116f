"""Which parameters get weight decay: kernels yes; gains, alphas, norm scales and biases no.

The one weight-decay mask of the package: ``jaxnorm.training`` uses it for every optimizer.

References:
  De & Smith (2020), 'Batch Normalization Biases Residual Blocks Towards the Identity Function in
  Deep Networks', arXiv:2002.10444, and Brock, De & Smith (2021), 'Characterizing signal
  propagation to close the performance gap in unnormalized ResNets', arXiv:2101.08692 (no weight
  decay on gains and biases).
  Liu, Ge, Li & Gui (2021), 'Delving into Variance Transmission and Normalization: Shift of
  Average Gradient Makes the Network Collapse', arXiv:2103.11590 (PWS alpha in its own group with
  weight decay 0).
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

  Example:
    >>> import jax, optax
    >>> from jaxnorm.models import cifar_resnet, decay_mask
    >>> params = jax.eval_shape(cifar_resnet(8).init, jax.random.key(0),
    ...                         jax.numpy.ones((2, 8, 8, 3)))['params']
    >>> mask = decay_mask(params)
    >>> mask['stem_conv']['kernel'], mask['stem_norm']['scale']
    (True, False)
    >>> tx = optax.chain(optax.add_decayed_weights(5e-4, mask=decay_mask), optax.sgd(0.1, 0.9))
  """

  def keep(path, _):
    last = path[-1]
    name = getattr(last, 'key', getattr(last, 'name', str(last)))
    return str(name) not in NO_DECAY

  return jax.tree_util.tree_map_with_path(keep, params)
