"""Tests of jaxnorm.linen.SkipInit: one learnable scalar multiplying the residual branch."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnorm.linen import SkipInit


class _ResidualStack(nn.Module):
  """``x_{l+1} = x_l + alpha_l * f_l(x_l)`` with ``f = Dense(relu(x))`` (De & Smith's block)."""

  depth: int
  init_value: float

  @nn.compact
  def __call__(self, x):
    for _ in range(self.depth):
      branch = nn.Dense(x.shape[-1])(nn.relu(x))
      x = x + SkipInit(self.init_value)(branch)
    return x


def test_single_scalar_gain_param_initialized_at_init_value():
  x = jnp.ones((2, 3, 3, 4))
  for value in (0.0, 1 / math.sqrt(16), -0.5):
    variables = SkipInit(value).init(jax.random.key(0), x)
    assert jax.tree.structure(variables['params']) == jax.tree.structure({'gain': 0})
    gain = variables['params']['gain']
    assert gain.shape == () and gain.dtype == jnp.float32
    assert float(gain) == np.float32(value)


def test_output_and_gradients_match_the_closed_form():
  x = jax.random.normal(jax.random.key(1), (3, 5))
  g = jax.random.normal(jax.random.key(2), (3, 5))
  layer = SkipInit(0.3)
  params = layer.init(jax.random.key(0), x)
  np.testing.assert_allclose(layer.apply(params, x), np.float32(0.3) * np.asarray(x), rtol=1e-7)
  d_params, d_x = jax.grad(lambda p, x: jnp.sum(layer.apply(p, x) * g), argnums=(0, 1))(params, x)
  # d(alpha * x . g)/d alpha = sum(x * g); d/dx = alpha * g.
  np.testing.assert_allclose(d_params['params']['gain'],
                             np.sum(np.asarray(x, np.float64) * np.asarray(g)), rtol=1e-5)
  np.testing.assert_allclose(d_x, np.float32(0.3) * np.asarray(g), rtol=1e-7)


def test_alpha_zero_makes_every_block_the_identity_yet_gains_get_gradients():
  """De & Smith: with alpha = 0 the deep residual network is the identity at initialization."""
  x = jax.random.normal(jax.random.key(3), (4, 8))
  model = _ResidualStack(depth=12, init_value=0.0)
  params = jax.jit(model.init)(jax.random.key(4), x)
  np.testing.assert_array_equal(jax.jit(model.apply)(params, x), x)
  grads = jax.jit(jax.grad(lambda p: jnp.sum(model.apply(p, x) ** 2)))(params)['params']
  gain_grads = np.array([float(grads[f'SkipInit_{i}']['gain']) for i in range(12)])
  assert np.all(np.abs(gain_grads) > 0)


def test_inverse_sqrt_depth_init_bounds_the_forward_variance_growth():
  """With alpha = 1/sqrt(d) the skip-path variance stays O(1); with alpha = 1 it grows ~1.5^d."""
  d = 16
  x = jax.random.normal(jax.random.key(5), (256, 64))
  model = _ResidualStack(depth=d, init_value=1.0)
  params = jax.jit(model.init)(jax.random.key(6), x)
  apply = jax.jit(model.apply)
  # Same branch weights, every gain set to 1/sqrt(d) (what SkipInit(1/sqrt(d)) initializes).
  scaled = jax.tree_util.tree_map_with_path(
      lambda path, p: jnp.full_like(p, 1 / math.sqrt(d)) if path[-1].key == 'gain' else p, params)
  assert float(SkipInit(1 / math.sqrt(d)).init(jax.random.key(0), x)['params']['gain']) == \
      np.float32(1 / math.sqrt(d))
  # Dense's LeCun-normal init after relu halves the variance, Var(f) ~ Var(x) / 2, so
  # Var(x_{l+1}) ~ (1 + alpha^2 / 2) Var(x_l).
  grow_1 = float(jnp.var(apply(params, x)) / jnp.var(x))
  grow_sqrt = float(jnp.var(apply(scaled, x)) / jnp.var(x))
  assert grow_1 > 1e2  # (1 + 1/2)^16 ~ 660
  assert grow_sqrt < math.e  # (1 + 1/(2d))^d <= e^(1/2)


def test_bfloat16_input_gives_bfloat16_output_with_float32_gain():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 4)), jnp.bfloat16)
  layer = SkipInit(0.1)
  params = layer.init(jax.random.key(0), x)
  assert params['params']['gain'].dtype == jnp.float32
  y = layer.apply(params, x)
  assert y.dtype == jnp.bfloat16
  ref = np.asarray(x, np.float32) * np.float32(0.1)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(jnp.asarray(ref, jnp.bfloat16)))
  assert SkipInit(0.1, dtype=jnp.float32).apply(params, x).dtype == jnp.float32
  p16 = SkipInit(0.1, param_dtype=jnp.bfloat16).init(jax.random.key(0), x)
  assert p16['params']['gain'].dtype == jnp.bfloat16


@pytest.mark.parametrize('init_value, x, exc, match', [
    ('zero', jnp.ones((2, 3)), TypeError, '`init_value` expected a finite Python float'),
    (float('inf'), jnp.ones((2, 3)), ValueError, '`init_value` expected a finite'),
    (0.0, jnp.ones((2, 3), jnp.int32), TypeError, '`x` expected a floating-point'),
])
def test_bad_input_raises_naming_the_layer(init_value, x, exc, match):
  with pytest.raises(exc, match=f'^SkipInit: argument {match}'):
    SkipInit(init_value).init(jax.random.key(0), x)
