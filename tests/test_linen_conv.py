"""Tests for jaxnorm.linen.conv: Conv equals flax.linen.Conv; the WS layers equal numpy + lax."""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnorm.linen.conv import Conv


def _x(shape, seed=0, dtype=jnp.float32):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype)


def _loss_and_grads(layer, variables, x):
  loss = lambda v, x: jnp.sum(jnp.tanh(layer.apply(v, x)) ** 2)
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(variables, x)


# ----------------------------------------------------------------------------------------------
# Conv: a drop-in for flax.linen.Conv
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize('kwargs,custom_backward', [
    (dict(kernel_size=(3, 3)), True),
    (dict(kernel_size=(3, 3)), False),
    (dict(kernel_size=(3, 3), strides=2, padding='VALID'), True),
    (dict(kernel_size=(1, 1), strides=2, use_bias=False), True),
    (dict(kernel_size=(7, 7), strides=2, padding=((3, 2), (1, 3))), True),
    (dict(kernel_size=(3, 3), kernel_dilation=2, padding='CIRCULAR'), True),
])
def test_conv_equals_flax_conv_outputs_params_and_grads(kwargs, custom_backward):
  x = _x((2, 9, 8, 3))
  ours = Conv(features=5, custom_backward=custom_backward, **kwargs)
  ref = nn.Conv(features=5, **kwargs)
  variables = ours.init(jax.random.key(1), x)
  # Same parameter names, shapes and (same initializers, same key) values as flax.
  chex.assert_trees_all_close(variables, ref.init(jax.random.key(1), x))
  variables = jax.tree.map(lambda p: p + 0.1 * _x(p.shape, seed=p.size), variables)  # bias != 0
  np.testing.assert_allclose(ours.apply(variables, x), ref.apply(variables, x),
                             rtol=1e-5, atol=1e-5)
  chex.assert_trees_all_close(_loss_and_grads(ours, variables, x),
                              _loss_and_grads(ref, variables, x), rtol=1e-5, atol=1e-5)


def test_conv_int_kernel_size_is_square_and_unbatched_input_works():
  x = _x((2, 6, 6, 2))
  variables = Conv(features=3, kernel_size=3).init(jax.random.key(0), x)
  assert variables['params']['kernel'].shape == (3, 3, 2, 3)
  layer = Conv(features=3, kernel_size=(3, 3))
  np.testing.assert_allclose(layer.apply(variables, x[0]), layer.apply(variables, x)[0],
                             rtol=1e-6)


def test_conv_bfloat16_dtype_and_param_dtype():
  x = _x((2, 6, 6, 3), dtype=jnp.bfloat16)
  layer = Conv(features=4, kernel_size=(3, 3), dtype=jnp.bfloat16)
  ref = nn.Conv(features=4, kernel_size=(3, 3), dtype=jnp.bfloat16)
  variables = layer.init(jax.random.key(0), x)
  assert variables['params']['kernel'].dtype == jnp.float32
  y = layer.apply(variables, x)
  assert y.dtype == jnp.bfloat16
  np.testing.assert_allclose(y.astype(np.float32), ref.apply(variables, x).astype(np.float32),
                             rtol=2e-2, atol=2e-2)
  _, (g, _) = _loss_and_grads(layer, variables, x)
  assert g['params']['kernel'].dtype == jnp.float32
  bf = Conv(features=4, kernel_size=(3, 3), param_dtype=jnp.bfloat16)
  assert bf.init(jax.random.key(0), x)['params']['kernel'].dtype == jnp.bfloat16


class _Block(nn.Module):
  custom_backward: bool

  @nn.compact
  def __call__(self, h, _):
    return nn.relu(Conv(4, (3, 3), custom_backward=self.custom_backward)(h)), None


def test_conv_under_nn_scan_and_remat_equals_autodiff():
  x = _x((2, 6, 6, 4))
  grads = []
  for cb, remat in [(True, True), (False, False)]:
    block = nn.remat(_Block) if remat else _Block
    stack = nn.scan(block, variable_axes={'params': 0}, split_rngs={'params': True}, length=3)
    model = stack(custom_backward=cb)
    variables = model.init(jax.random.key(0), x, None)
    assert variables['params']['Conv_0']['kernel'].shape == (3, 3, 3, 4, 4)
    loss = lambda v, x, model=model: jnp.sum(model.apply(v, x, None)[0] ** 2)
    grads.append(jax.jit(jax.grad(loss, argnums=(0, 1)))(variables, x))
  chex.assert_trees_all_close(grads[0], grads[1], rtol=1e-5, atol=1e-5)
