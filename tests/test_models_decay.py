"""Tests of `decay_mask`: weight decay on kernels only, not on gains, alphas, scales, biases."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxnorm.models import cifar_resnet, decay_mask


@pytest.mark.slow
def test_decay_mask_with_optax_decays_only_kernels():
  model = cifar_resnet(8, width=4, norm='batch_norm', skip_init=0.5, scan=False)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((2, 8, 8, 3)))['params']
  tx = optax.add_decayed_weights(0.1, mask=decay_mask)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  flat = jax.tree_util.tree_flatten_with_path(updates)[0]
  names = set()
  for path, u in flat:
    name = path[-1].key
    names.add(name)
    p = params
    for k in path:
      p = p[k.key]
    if name == 'kernel':
      np.testing.assert_allclose(u, 0.1 * p, rtol=1e-6)
    else:
      assert name in ('bias', 'scale', 'gain')
      np.testing.assert_array_equal(u, 0.0)
  assert {'kernel', 'bias', 'scale', 'gain'} <= names


def test_decay_mask_labels_by_leaf_name():
  params = {'conv': {'kernel': 1.0, 'bias': 1.0, 'alpha': 1.0},
            'ws': {'gain': 1.0}, 'bn': {'scale': 1.0}, 'scanned_blocks': {'k': {'kernel': 1.0}}}
  mask = decay_mask(params)
  assert mask == {'conv': {'kernel': True, 'bias': False, 'alpha': False}, 'ws': {'gain': False},
                  'bn': {'scale': False}, 'scanned_blocks': {'k': {'kernel': True}}}
