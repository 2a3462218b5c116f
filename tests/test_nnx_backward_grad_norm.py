"""Tests of jaxnorm.nnx.BackwardGradNorm: equivalent to the linen layer."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxnorm import linen as jl
from jaxnorm import nnx as jn


@pytest.mark.parametrize('kwargs', [{}, {'mode': 'per_batch', 'target': 'unit'},
                                    {'target': 0.5, 'eps': 1e-2}])
def test_outputs_and_gradients_equal_linen(kwargs):
  x = jax.random.normal(jax.random.key(0), (4, 2, 3))
  g = jax.random.normal(jax.random.key(1), (4, 2, 3)) * jnp.arange(1.0, 5.0)[:, None, None]
  lin = jl.BackwardGradNorm(**kwargs)
  mod = jn.BackwardGradNorm(**kwargs)
  assert nnx.state(mod, nnx.Param) == nnx.State({})
  np.testing.assert_array_equal(mod(x), lin.apply({}, x))
  g_nnx = jax.grad(lambda x: jnp.sum(mod(x) * g))(x)
  g_lin = jax.grad(lambda x: jnp.sum(lin.apply({}, x) * g))(x)
  np.testing.assert_array_equal(g_nnx, g_lin)
  # And the gradient really is normalized (not the identity's g).
  assert not np.allclose(g_nnx, g)


def test_inside_an_nnx_model_under_jit_and_disabled():
  class Mlp(nnx.Module):
    def __init__(self, enabled, rngs):
      self.l1 = nnx.Linear(5, 6, rngs=rngs)
      self.bgn = jn.BackwardGradNorm(enabled=enabled)
      self.l2 = nnx.Linear(6, 2, rngs=rngs)

    def __call__(self, x):
      return self.l2(self.bgn(jnp.tanh(self.l1(x))))

  x = jax.random.normal(jax.random.key(2), (8, 5))
  on, off = Mlp(True, nnx.Rngs(0)), Mlp(False, nnx.Rngs(0))
  loss = lambda m: jnp.sum(m(x) ** 2)
  g_on = nnx.jit(nnx.grad(loss))(on)
  g_off = nnx.jit(nnx.grad(loss))(off)
  np.testing.assert_allclose(g_on.l2.kernel[...], g_off.l2.kernel[...], rtol=1e-6)
  assert not np.allclose(g_on.l1.kernel[...], g_off.l1.kernel[...])


def test_bad_configuration_raises_at_construction():
  with pytest.raises(ValueError, match='^BackwardGradNorm: argument `mode`'):
    jn.BackwardGradNorm(mode='whole')
  with pytest.raises(ValueError, match='^BackwardGradNorm: argument `x` expected an array of rank'):
    jn.BackwardGradNorm()(jnp.ones((3,)))
