"""Tests of jaxnorm.nnx.SkipInit: equivalent to the linen layer."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxnorm import linen as jl
from jaxnorm import nnx as jn


@pytest.mark.parametrize('init_value', [0.0, 1 / math.sqrt(50)])
def test_init_equals_linen(init_value):
  x = jnp.ones((2, 4))
  mod = jn.SkipInit(init_value)
  lin_params = jl.SkipInit(init_value).init(jax.random.key(0), x)['params']
  assert mod.gain[...].shape == () and mod.gain[...].dtype == jnp.float32
  np.testing.assert_array_equal(mod.gain[...], lin_params['gain'])


@pytest.mark.parametrize('dtype, param_dtype', [(None, jnp.float32), (jnp.float32, jnp.float32),
                                                (None, jnp.bfloat16)])
def test_same_params_give_same_outputs_and_gradients_as_linen(dtype, param_dtype):
  x = jax.random.normal(jax.random.key(1), (3, 2, 2, 4)).astype(jnp.bfloat16)
  g = jax.random.normal(jax.random.key(2), (3, 2, 2, 4))
  lin = jl.SkipInit(0.0, dtype=dtype, param_dtype=param_dtype)
  mod = jn.SkipInit(0.0, dtype=dtype, param_dtype=param_dtype)
  gain = jnp.asarray(-0.37, param_dtype)
  mod.gain[...] = gain
  params = {'params': {'gain': gain}}
  y_nnx, y_lin = mod(x), lin.apply(params, x)
  assert y_nnx.dtype == y_lin.dtype == (dtype or jnp.bfloat16)
  np.testing.assert_array_equal(np.asarray(y_nnx, np.float32), np.asarray(y_lin, np.float32))

  loss_nnx = lambda m, x: jnp.sum(m(x).astype(jnp.float32) * g)
  loss_lin = lambda p, x: jnp.sum(lin.apply(p, x).astype(jnp.float32) * g)
  gm, gx_nnx = nnx.grad(loss_nnx, argnums=(0, 1))(mod, x)
  gp, gx_lin = jax.grad(loss_lin, argnums=(0, 1))(params, x)
  np.testing.assert_array_equal(np.asarray(gm.gain[...], np.float32),
                                np.asarray(gp['params']['gain'], np.float32))
  np.testing.assert_array_equal(np.asarray(gx_nnx, np.float32), np.asarray(gx_lin, np.float32))


def test_gain_is_trained_by_an_nnx_optimizer_step():
  import optax

  x = jax.random.normal(jax.random.key(3), (4, 3))
  mod = jn.SkipInit(0.0)
  opt = nnx.Optimizer(mod, optax.sgd(0.1), wrt=nnx.Param)
  grads = nnx.grad(lambda m: jnp.sum((m(x) - x) ** 2))(mod)
  opt.update(mod, grads)
  # d/d alpha sum((alpha x - x)^2) at alpha = 0 is -2 sum(x^2); one SGD step moves alpha up.
  np.testing.assert_allclose(mod.gain[...], 0.2 * float(jnp.sum(x ** 2)), rtol=1e-5)


def test_bad_init_value_raises_at_construction():
  with pytest.raises(TypeError, match='^SkipInit: argument `init_value`'):
    jn.SkipInit('zero')
