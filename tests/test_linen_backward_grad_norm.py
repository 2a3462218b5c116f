"""Tests of jaxnorm.linen.BackwardGradNorm: a parameter-free shell over the functional BGN."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnorm.linen import BackwardGradNorm


def _np_bgn_per_sample(g, s, eps=1e-6):
  g = np.asarray(g, np.float64)
  norm = np.sqrt(np.sum(g * g, axis=tuple(range(1, g.ndim)), keepdims=True))
  return s * g / (norm + eps)


class _Mlp(nn.Module):
  """Dense -> tanh -> BGN -> Dense: the BGN node sits after a hidden layer."""

  bgn: bool = True

  @nn.compact
  def __call__(self, x):
    h = jnp.tanh(nn.Dense(6)(x))
    h = BackwardGradNorm(enabled=self.bgn)(h)
    return nn.Dense(3)(h)


def test_has_no_parameters_and_forward_is_identity():
  x = jax.random.normal(jax.random.key(0), (4, 3, 3, 2)).astype(jnp.bfloat16)
  layer = BackwardGradNorm()
  variables = layer.init(jax.random.key(1), x)
  assert jax.tree.leaves(variables) == []
  y = layer.apply(variables, x)
  assert y.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(y).view(np.uint16), np.asarray(x).view(np.uint16))


@pytest.mark.parametrize('mode, target', [('per_sample', 'sqrt_units'), ('per_batch', 'unit'),
                                          ('per_sample', 3.0)])
def test_gradient_through_the_module_matches_numpy(mode, target):
  x = jax.random.normal(jax.random.key(2), (5, 4))
  g = jax.random.normal(jax.random.key(3), (5, 4)) * jnp.arange(1.0, 6.0)[:, None]
  layer = BackwardGradNorm(mode=mode, target=target, eps=1e-3)
  grad = jax.jit(jax.grad(lambda x: jnp.sum(layer.apply({}, x) * g)))(x)
  gn = np.asarray(g, np.float64)
  if mode == 'per_sample':
    s = {'sqrt_units': 2.0, 3.0: 3.0}[target]
    ref = _np_bgn_per_sample(gn, s, 1e-3)
  else:
    ref = gn / (np.linalg.norm(gn) + 1e-3)
  np.testing.assert_allclose(grad, ref, rtol=1e-6)


def test_hidden_layer_gradient_is_normalized_and_disabling_restores_plain_autodiff():
  x = jax.random.normal(jax.random.key(4), (8, 5))
  with_bgn, without = _Mlp(bgn=True), _Mlp(bgn=False)
  params = with_bgn.init(jax.random.key(5), x)
  loss = lambda m: lambda p: jnp.sum(m.apply(p, x) ** 2)
  np.testing.assert_array_equal(with_bgn.apply(params, x), without.apply(params, x))
  g_bgn = jax.grad(loss(with_bgn))(params)['params']
  g_plain = jax.grad(loss(without))(params)['params']
  # The head (after the node) is unaffected; the first layer sees the normalized cotangent.
  np.testing.assert_allclose(g_bgn['Dense_1']['kernel'], g_plain['Dense_1']['kernel'], rtol=1e-6)
  p = params['params']
  h_pre = x @ p['Dense_0']['kernel'] + p['Dense_0']['bias']
  out = jnp.tanh(h_pre) @ p['Dense_1']['kernel'] + p['Dense_1']['bias']
  cot_h = np.asarray(2 * out @ p['Dense_1']['kernel'].T, np.float64)
  cot_pre = _np_bgn_per_sample(cot_h, np.sqrt(6)) * (1 - np.tanh(np.asarray(h_pre)) ** 2)
  np.testing.assert_allclose(g_bgn['Dense_0']['kernel'], np.asarray(x).T @ cot_pre, rtol=1e-5)
  # Forward-mode AD works through the disabled node and fails through the enabled one.
  jax.jvp(loss(without), (params,), (params,))
  with pytest.raises(TypeError, match='backward-only op'):
    jax.jvp(loss(with_bgn), (params,), (params,))


@pytest.mark.parametrize('kwargs, x, exc, match', [
    ({'mode': 'per_pixel'}, jnp.ones((2, 3)), ValueError, '`mode` expected one of'),
    ({'target': -2.0}, jnp.ones((2, 3)), ValueError, '`target` expected a positive'),
    ({'eps': 0.0}, jnp.ones((2, 3)), ValueError, '`eps` expected a positive'),
    ({}, jnp.ones((3,)), ValueError, '`x` expected an array of rank >= 2'),
    ({}, jnp.ones((2, 3), jnp.int32), TypeError, '`x` expected a floating-point'),
])
def test_bad_configuration_raises_naming_the_layer(kwargs, x, exc, match):
  with pytest.raises(exc, match=f'^BackwardGradNorm: argument {match}'):
    BackwardGradNorm(**kwargs).init(jax.random.key(0), x)
