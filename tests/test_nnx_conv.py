"""Tests of jaxnorm.nnx conv layers: same parameters, same outputs and gradients as linen."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxnorm import linen as jl
from jaxnorm import nnx as jn


def _x(shape, seed=0, dtype=jnp.float32):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype)


PAIRS = [
    ('Conv', dict(strides=2), dict(strides=2)),
    ('Conv', dict(padding='VALID', use_bias=False), dict(padding='VALID', use_bias=False)),
    ('WSConv', dict(method='ws_std'), dict(method='ws_std')),
    ('ScaledWSConv', dict(strides=2), dict(strides=2)),
    ('PWSConv', dict(gamma=1e-3, mode='fan_out'), dict(gamma=1e-3, mode='fan_out')),
]


def _param_dict(module):
  return {k: v[...] for k, v in nnx.state(module, nnx.Param).items()}


@pytest.mark.parametrize('name,nnx_kwargs,linen_kwargs', PAIRS)
def test_same_params_give_same_outputs_and_gradients_as_linen(name, nnx_kwargs, linen_kwargs):
  x = _x((2, 7, 6, 3))
  mod = getattr(jn, name)(3, 4, (3, 3), rngs=nnx.Rngs(0), **nnx_kwargs)
  lin = getattr(jl, name)(features=4, kernel_size=(3, 3), **linen_kwargs)
  lin_params = lin.init(jax.random.key(0), x)['params']
  # Same parameter names and shapes as linen.
  assert jax.tree.map(jnp.shape, _param_dict(mod)) == jax.tree.map(jnp.shape, lin_params)
  # Random values everywhere (bias and per-channel scales too), copied into both.
  params = {k: v + 0.3 * _x(v.shape, seed=v.size) for k, v in _param_dict(mod).items()}
  for k, v in params.items():
    getattr(mod, k)[...] = v
  variables = {'params': params}
  raw_kernel = np.asarray(mod.kernel[...])

  y_nnx = nnx.jit(lambda m, x: m(x))(mod, x)
  np.testing.assert_allclose(y_nnx, lin.apply(variables, x), rtol=1e-6, atol=1e-6)

  loss_nnx = lambda m, x: jnp.sum(jnp.tanh(m(x)) ** 2)
  loss_lin = lambda v, x: jnp.sum(jnp.tanh(lin.apply(v, x)) ** 2)
  gm, gx_nnx = nnx.jit(nnx.grad(loss_nnx, argnums=(0, 1)))(mod, x)
  gv, gx_lin = jax.jit(jax.grad(loss_lin, argnums=(0, 1)))(variables, x)
  chex.assert_trees_all_close(_param_dict(gm), gv['params'], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(gx_nnx, gx_lin, rtol=1e-5, atol=1e-6)
  # The standardized kernel is never written back into the parameter (flax#5576).
  np.testing.assert_array_equal(mod.kernel[...], raw_kernel)


@pytest.mark.parametrize('name,param_names', [
    ('Conv', {'kernel', 'bias'}), ('WSConv', {'kernel', 'bias'}),
    ('ScaledWSConv', {'kernel', 'bias', 'gain'}), ('PWSConv', {'kernel', 'bias', 'alpha'})])
def test_parameters_and_initial_values_match_linen_layout(name, param_names):
  mod = getattr(jn, name)(64, 32, (3, 3), rngs=nnx.Rngs(0))
  p = _param_dict(mod)
  assert set(p) == param_names
  assert p['kernel'].shape == (3, 3, 64, 32)
  # An int kernel_size is flax.nnx.Conv's 1-D (k,) (it was (k, k) before).
  assert getattr(jn, name)(4, 2, 3, rngs=nnx.Rngs(0)).kernel.shape == (3, 4, 2)
  np.testing.assert_array_equal(p['bias'], np.zeros(32))
  for k in ('gain', 'alpha'):
    if k in p:
      np.testing.assert_array_equal(p[k], np.ones(32))
  # LeCun normal (truncated at 2 std, rescaled) / variance scaling 1.0 normal / He normal.
  std = np.sqrt((2 if name == 'PWSConv' else 1) / 576)
  np.testing.assert_allclose(np.std(p['kernel']), std, rtol=0.03)
  truncated = name in ('Conv', 'WSConv')
  assert (np.max(np.abs(p['kernel'])) < 2.3 * std) == truncated


def test_pws_initialize_alpha_equals_linen_init_alpha():
  x = jax.nn.relu(_x((4, 6, 6, 8)))
  mod = jn.PWSConv(8, 16, (3, 3), gamma=1e-3, rngs=nnx.Rngs(0))
  lin = jl.PWSConv(features=16, kernel_size=(3, 3), gamma=1e-3, init_alpha=True)
  lin_params = lin.init(jax.random.key(0), x)['params']
  mod.kernel[...] = lin_params['kernel']
  alpha = mod.initialize_alpha(x)
  np.testing.assert_allclose(alpha, lin_params['alpha'], rtol=1e-6)
  np.testing.assert_allclose(mod.alpha[...], lin_params['alpha'], rtol=1e-6)
  np.testing.assert_allclose(np.var(np.asarray(mod(x), np.float64), ddof=1), 2.0, rtol=1e-4)


def test_bfloat16_and_forward_mode_fallback():
  x = _x((2, 5, 5, 3), dtype=jnp.bfloat16)
  mod = jn.PWSConv(3, 4, (3, 3), dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  assert mod(x).dtype == jnp.bfloat16
  plain = jn.Conv(3, 4, (3, 3), custom_backward=False, rngs=nnx.Rngs(0))
  xf = x.astype(jnp.float32)
  _, tangent = jax.jvp(plain, (xf,), (xf,))
  np.testing.assert_allclose(tangent, plain(xf) - plain.bias[...], rtol=1e-5, atol=1e-5)


def test_bad_arguments_raise():
  with pytest.raises(ValueError, match='method'):
    jn.WSConv(2, 2, 3, method='pws', rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='mode'):
    jn.PWSConv(2, 2, 3, mode='fan_avg', rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='rank'):
    jn.Conv(2, 2, (3, 3), rngs=nnx.Rngs(0))(jnp.ones((4, 2)))
  with pytest.raises(ValueError, match=r'Conv: argument `inputs` expected 2 channels'):
    jn.Conv(2, 2, (3, 3), rngs=nnx.Rngs(0))(jnp.ones((1, 4, 4, 3)))
  with pytest.raises(ValueError, match=r'PWSConv: argument `feature_group_count` expected a '
                     r'divisor of in_features 6, got 4\.'):
    jn.PWSConv(6, 8, (3, 3), feature_group_count=4, rngs=nnx.Rngs(0))
  # use_bias (rejected by ScaledWSConv / PWSConv before) is accepted and removes the bias.
  for name in ('WSConv', 'ScaledWSConv', 'PWSConv'):
    mod = getattr(jn, name)(2, 2, (3, 3), use_bias=False, rngs=nnx.Rngs(0))
    assert mod.bias is None and 'bias' not in _param_dict(mod)


# ----------------------------------------------------------------------------------------------
# Degenerate cases: initialize_alpha on a batch without variance, bad stabilizers, fan_in 1
# ----------------------------------------------------------------------------------------------

@pytest.mark.filterwarnings('ignore:PWSConv. fan_in is 1')  # tested below
@pytest.mark.parametrize('jit', [False, True])
@pytest.mark.parametrize('case', ['zeros_batch', 'fan_in_1'])
def test_pws_initialize_alpha_without_variance_falls_back_to_one_and_warns(case, jit):
  # Before: alpha = inf, every output nan. Now: alpha = 1 (the default) and a warning.
  if case == 'zeros_batch':
    mod, x = jn.PWSConv(3, 4, (3, 3), rngs=nnx.Rngs(0)), jnp.zeros((2, 5, 5, 3))
  else:
    mod, x = jn.PWSConv(1, 4, (1, 1), rngs=nnx.Rngs(0)), _x((2, 5, 5, 1))
  init = lambda m, x: m.initialize_alpha(x)
  init = nnx.jit(init) if jit else init
  with pytest.warns(UserWarning, match=r'PWSConv: initialize_alpha \(init_alpha\): .*variance '
                    r'0\.0.*default 1\.0'):
    alpha = init(mod, x)
    jax.effects_barrier()  # under jit the warning comes from jax.debug.callback
  np.testing.assert_array_equal(alpha, np.ones(4))
  np.testing.assert_array_equal(mod.alpha[...], np.ones(4))
  assert np.all(np.isfinite(mod(_x(x.shape, seed=1))))


@pytest.mark.parametrize('name,kwargs,arg,value', [
    ('PWSConv', dict(gamma=float('nan')), 'gamma', 'nan'),
    ('PWSConv', dict(gamma=float('inf')), 'gamma', 'inf'),
    ('PWSConv', dict(gamma=-1.0), 'gamma', '-1.0'),
    ('WSConv', dict(eps=float('nan')), 'eps', 'nan'),
    ('ScaledWSConv', dict(eps=float('inf')), 'eps', 'inf'),
    ('ScaledWSConv', dict(eps=0.0), 'eps', '0.0'),
])
def test_nan_inf_and_negative_stabilizers_raise_at_construction(name, kwargs, arg, value):
  with pytest.raises(ValueError, match=rf'{name}: argument `{arg}` expected a finite '
                     rf'(non-negative|positive) number, got {value}\.'):
    getattr(jn, name)(2, 2, 3, rngs=nnx.Rngs(0), **kwargs)


def test_zero_gamma_with_constant_kernel_outputs_bias_like_linen():
  # Before: 0 / 0 = nan. A constant filter standardizes to 0: the output is the bias.
  x = _x((2, 5, 5, 2))
  mod = jn.PWSConv(2, 3, (3, 3), gamma=0.0, rngs=nnx.Rngs(0))
  mod.kernel[...] = jnp.full((3, 3, 2, 3), 0.3)
  mod.bias[...] = jnp.array([0.1, -0.2, 0.3])
  np.testing.assert_array_equal(mod(x), np.broadcast_to(mod.bias[...], (2, 5, 5, 3)))
  g = nnx.grad(lambda m: jnp.sum(jnp.tanh(m(x)) ** 2))(mod)
  assert all(np.all(np.isfinite(t)) for t in jax.tree.leaves(nnx.state(g)))


@pytest.mark.parametrize('name', ['WSConv', 'ScaledWSConv', 'PWSConv'])
def test_fan_in_one_warns_at_construction_and_outputs_bias(name):
  # One input channel, 1x1 kernel: each filter has a single entry, standardized to 0.
  with pytest.warns(UserWarning, match=rf'{name}: fan_in is 1'):
    mod = getattr(jn, name)(1, 3, 1, rngs=nnx.Rngs(0))
  mod.bias[...] = jnp.array([0.1, -0.2, 0.3])
  y = mod(_x((2, 4, 4, 1)))
  np.testing.assert_array_equal(y, np.broadcast_to(mod.bias[...], y.shape))


def test_ws_std_fan_in_one_raises_at_construction():
  with pytest.raises(ValueError, match="WSConv: argument `kernel_size` .* 'ws_std'"):
    jn.WSConv(1, 3, 1, method='ws_std', rngs=nnx.Rngs(0))
