"""Tests for jaxnorm.linen.conv: Conv equals flax.linen.Conv; the WS layers equal numpy + lax."""

from __future__ import annotations

import warnings

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnorm.linen.conv import Conv, PWSConv, ScaledWSConv, WSConv


def _x(shape, seed=0, dtype=jnp.float32):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype)


def _loss_and_grads(layer, variables, x):
  loss = lambda v, x: jnp.sum(jnp.tanh(layer.apply(v, x)) ** 2)
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(variables, x)


# ----------------------------------------------------------------------------------------------
# Conv: a drop-in for flax.linen.Conv
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize('kwargs,custom_backward', [
    (dict(kernel_size=(3, 3), strides=2, padding='VALID'), False),
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


def test_conv_int_kernel_size_is_1d_like_flax_and_unbatched_input_works():
  # flax's rule (was: square over every spatial axis): an int k is the 1-D kernel (k,), so a
  # rank-4 input is a (N, H) batch of W-long rows, exactly as flax.linen.Conv reads it.
  x = _x((2, 6, 6, 2))
  variables = Conv(features=3, kernel_size=3).init(jax.random.key(0), x)
  assert variables['params']['kernel'].shape == (3, 2, 3)
  ref = nn.Conv(features=3, kernel_size=3)
  assert jax.tree.map(jnp.shape, variables) == jax.tree.map(
      jnp.shape, ref.init(jax.random.key(0), x))
  np.testing.assert_allclose(Conv(3, 3).apply(variables, x), ref.apply(variables, x),
                             rtol=1e-6, atol=1e-6)
  variables = Conv(features=3, kernel_size=(3, 3)).init(jax.random.key(0), x)
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
    stack = nn.scan(block, variable_axes={'params': 0}, split_rngs={'params': True}, length=2)
    model = stack(custom_backward=cb)
    variables = model.init(jax.random.key(0), x, None)
    assert variables['params']['Conv_0']['kernel'].shape == (2, 3, 3, 4, 4)
    loss = lambda v, x, model=model: jnp.sum(model.apply(v, x, None)[0] ** 2)
    grads.append(jax.jit(jax.grad(loss, argnums=(0, 1)))(variables, x))
  chex.assert_trees_all_close(grads[0], grads[1], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# WSConv, ScaledWSConv, PWSConv: conv(x, standardized W) + b, computed independently
# ----------------------------------------------------------------------------------------------

def _ref_standardize(w, kind, layer):
  """float64 numpy WS / Scaled WS / PWS per output channel (Qiao 2019, Brock 2021, Liu 2021)."""
  w = np.asarray(w, np.float64)
  flat = w.reshape(-1, w.shape[-1])
  n, cout = flat.shape
  c = flat - flat.mean(0)
  if kind == 'ws':
    out = c / np.sqrt(flat.var(0) + layer.eps)
  elif kind == 'ws_std':
    out = c / (flat.std(0, ddof=1) + layer.eps)
  elif kind == 'scaled_ws':
    out = c / np.sqrt(np.maximum(n * flat.var(0), layer.eps))
  else:
    fan = n if layer.mode == 'fan_in' else n // w.shape[-2] * cout
    gamma = layer.gamma * 2 / fan if layer.equiv else layer.gamma
    out = np.sqrt(2 / fan) * c / np.sqrt(flat.var(0) + gamma)
  return out.reshape(w.shape)


def _ref_output(x, params, kind, layer, strides, padding):
  w = _ref_standardize(params['kernel'], kind, layer)
  scale = params.get('gain', params.get('alpha'))
  if scale is not None:
    w = w * np.asarray(scale, np.float64)
  y = jax.lax.conv_general_dilated(
      np.asarray(x, np.float32), w.astype(np.float32), (strides, strides), padding,
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'), precision=jax.lax.Precision.HIGHEST)
  return np.asarray(y) + np.asarray(params['bias'])


LAYERS = [
    ('ws', lambda **kw: WSConv(**kw)),
    ('ws_std', lambda **kw: WSConv(method='ws_std', **kw)),
    ('scaled_ws', lambda **kw: ScaledWSConv(**kw)),
    ('pws', lambda **kw: PWSConv(gamma=1e-3, **kw)),
    ('pws', lambda **kw: PWSConv(mode='fan_out', equiv=True, gamma=0.1, **kw)),
]


def _independent_loss(kind, layer, strides):
  """Autodiff-able jnp version of the layer (direct formulas + lax conv), for gradient checks."""
  def apply(params, x):
    w = params['kernel']
    axes = (0, 1, 2)
    n = np.prod(w.shape[:-1])
    c = w - jnp.mean(w, axes)
    var = jnp.mean(c ** 2, axes)
    if kind == 'ws':
      wh = c / jnp.sqrt(var + layer.eps)
    elif kind == 'ws_std':
      wh = c / (jnp.sqrt(var * n / (n - 1)) + layer.eps)
    elif kind == 'scaled_ws':
      wh = params['gain'] * c / jnp.sqrt(jnp.maximum(n * var, layer.eps))
    else:
      fan = n if layer.mode == 'fan_in' else n // w.shape[-2] * w.shape[-1]
      gamma = layer.gamma * 2 / fan if layer.equiv else layer.gamma
      wh = params['alpha'] * np.sqrt(2 / fan) * c / jnp.sqrt(var + gamma)
    y = jax.lax.conv_general_dilated(x, wh, (strides, strides), 'SAME',
                                     dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    return jnp.sum(jnp.tanh(y + params['bias']) ** 2)
  return apply


@pytest.mark.parametrize('kind,make', LAYERS)
def test_standardized_conv_outputs_and_gradients_equal_independent_reference(kind, make):
  x = _x((3, 7, 6, 4))
  layer = make(features=5, kernel_size=(3, 3), strides=2)
  variables = layer.init(jax.random.key(0), x)
  assert set(variables) == {'params'}  # no running statistics: eval kernel == train kernel
  # Random per-channel scales and bias, so that every parameter matters.
  variables = jax.tree.map(lambda p: p + 0.3 * _x(p.shape, seed=p.size), variables)
  params = variables['params']
  y = layer.apply(variables, x)
  np.testing.assert_allclose(y, _ref_output(x, params, kind, layer, 2, 'SAME'),
                             rtol=1e-4, atol=1e-4)
  # The raw kernel stays in params; the standardized one is not written back.
  assert not np.allclose(np.asarray(params['kernel']).reshape(-1, 5).mean(0), 0.0, atol=1e-3)
  _, state = layer.apply(variables, x, mutable=True)
  chex.assert_trees_all_equal(state, variables)
  # Output of sample i does not depend on the other samples.
  per_sample = np.concatenate([layer.apply(variables, x[i:i + 1]) for i in range(3)])
  np.testing.assert_allclose(y, per_sample, rtol=1e-5, atol=1e-5)
  # Gradients equal autodiff of a direct jnp formula + lax conv.
  _, (got, gx) = _loss_and_grads(layer, variables, x)
  want, wx = jax.jit(jax.grad(_independent_loss(kind, layer, 2), argnums=(0, 1)))(params, x)
  chex.assert_trees_all_close(got['params'], want, rtol=1e-4, atol=1e-4)  # |grad| up to ~10
  np.testing.assert_allclose(gx, wx, rtol=1e-4, atol=1e-4)
  # The average-gradient component of every filter is projected out.
  gk = np.asarray(got['params']['kernel']).reshape(-1, 5)
  np.testing.assert_allclose(gk.sum(0), 0.0, atol=1e-5 * np.abs(gk).sum(0).max())


def test_scaled_ws_and_pws_parameters_and_initializers():
  x = _x((1, 3, 3, 64))
  v = ScaledWSConv(features=256, kernel_size=(3, 3)).init(jax.random.key(0), x)['params']
  assert set(v) == {'kernel', 'bias', 'gain'}
  np.testing.assert_array_equal(v['gain'], np.ones(256))
  np.testing.assert_array_equal(v['bias'], np.zeros(256))
  # variance_scaling(1.0, fan_in, normal): std sqrt(1/576), not truncated (LeCun normal would cut
  # at about 2.3 std).
  np.testing.assert_allclose(np.std(v['kernel']), np.sqrt(1 / 576), rtol=0.02)
  assert np.max(np.abs(v['kernel'])) > 3 * np.sqrt(1 / 576)
  for mode, fan in [('fan_in', 576), ('fan_out', 9 * 256)]:
    p = PWSConv(features=256, kernel_size=(3, 3), mode=mode).init(jax.random.key(1), x)['params']
    assert set(p) == {'kernel', 'bias', 'alpha'}
    np.testing.assert_array_equal(p['alpha'], np.ones(256))
    np.testing.assert_array_equal(p['bias'], np.zeros(256))
    np.testing.assert_allclose(np.std(p['kernel']), np.sqrt(2 / fan), rtol=0.02)  # He normal
  w = WSConv(features=4, kernel_size=(3, 3), use_bias=False).init(jax.random.key(0), x)
  assert set(w['params']) == {'kernel'}


@pytest.mark.parametrize('gamma,mode,equiv', [(1e-3, 'fan_in', False), (0.1, 'fan_out', True)])
def test_pws_init_alpha_gives_preactivation_variance_two(gamma, mode, equiv):
  x = jax.nn.relu(_x((8, 8, 8, 16)))  # post-ReLU inputs (mean > 0), as in the ResNets
  layer = PWSConv(features=32, kernel_size=(3, 3), gamma=gamma, mode=mode, equiv=equiv,
                  init_alpha=True)
  variables = layer.init(jax.random.key(0), x)
  alpha = np.asarray(variables['params']['alpha'])
  np.testing.assert_allclose(alpha, alpha[0])  # one scalar for all channels
  y = np.asarray(layer.apply(variables, x), np.float64)
  np.testing.assert_allclose(y.var(ddof=1), 2.0, rtol=1e-4)  # torch's unbiased var
  # Independent: alpha = sqrt(2 / var(output with alpha = 1)).
  plain = PWSConv(features=32, kernel_size=(3, 3), gamma=gamma, mode=mode, equiv=equiv)
  y1 = np.asarray(plain.apply(plain.init(jax.random.key(0), x), x), np.float64)
  np.testing.assert_allclose(alpha[0], np.sqrt(2 / y1.var(ddof=1)), rtol=1e-4)


def test_standardized_conv_bfloat16():
  x = _x((2, 6, 6, 8), dtype=jnp.bfloat16)
  for layer in [ScaledWSConv(4, (3, 3), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16),
                PWSConv(4, (3, 3), dtype=jnp.bfloat16, init_alpha=True)]:
    variables = layer.init(jax.random.key(0), x)
    y = layer.apply(variables, x)
    assert y.dtype == jnp.bfloat16
    f32 = layer.clone(dtype=jnp.float32).apply(variables, x.astype(jnp.float32))
    np.testing.assert_allclose(y.astype(np.float32), f32, rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize('layer,match', [
    (WSConv(4, (3, 3), method='pws'), 'method'),
    (PWSConv(4, (3, 3), mode='fan_avg'), 'mode'),
])
def test_bad_hyperparameters_raise(layer, match):
  with pytest.raises(ValueError, match=match):
    layer.init(jax.random.key(0), jnp.ones((1, 5, 5, 2)))


# ----------------------------------------------------------------------------------------------
# Degenerate cases: init_alpha on a batch without variance, zero stabilizers, fan_in 1
# ----------------------------------------------------------------------------------------------

@pytest.mark.filterwarnings('ignore:PWSConv. fan_in is 1')  # tested below
@pytest.mark.parametrize('jit', [False, True])
@pytest.mark.parametrize('case', ['zeros_batch', 'fan_in_1'])
def test_pws_init_alpha_without_variance_falls_back_to_one_and_warns(case, jit):
  # Before: alpha = sqrt(2 / 0) = inf and every output nan (all-zeros init batch, or fan_in 1
  # where every standardized filter is 0, hence the output too).
  if case == 'zeros_batch':
    layer, x = PWSConv(4, (3, 3), init_alpha=True), jnp.zeros((2, 5, 5, 3))
  else:
    layer, x = PWSConv(4, (1, 1), init_alpha=True), _x((2, 5, 5, 1))
  init = jax.jit(layer.init) if jit else layer.init
  with pytest.warns(UserWarning, match=r'PWSConv: init_alpha: .*variance 0\.0.*default 1\.0'):
    variables = init(jax.random.key(0), x)
    jax.effects_barrier()  # under jit the warning comes from jax.debug.callback
  np.testing.assert_array_equal(variables['params']['alpha'], np.ones(4))
  y = layer.apply(variables, _x(x.shape, seed=1))
  assert np.all(np.isfinite(y))
  # Same as a layer initialized without the data-dependent init.
  plain = PWSConv(4, layer.kernel_size).init(jax.random.key(0), x)
  chex.assert_trees_all_close(variables, plain, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('layer,arg,value', [
    (PWSConv(4, (3, 3), gamma=float('nan')), 'gamma', 'nan'),
    (PWSConv(4, (3, 3), gamma=float('inf')), 'gamma', 'inf'),
    (PWSConv(4, (3, 3), gamma=-1e-3), 'gamma', '-0.001'),
    (WSConv(4, (3, 3), eps=float('nan')), 'eps', 'nan'),
    (WSConv(4, (3, 3), method='ws_std', eps=float('inf')), 'eps', 'inf'),
    (ScaledWSConv(4, (3, 3), eps=float('nan')), 'eps', 'nan'),
    (ScaledWSConv(4, (3, 3), eps=0.0), 'eps', '0.0'),
])
def test_nan_inf_and_negative_stabilizers_raise_naming_the_layer(layer, arg, value):
  name = type(layer).__name__
  with pytest.raises(ValueError, match=rf'{name}: argument `{arg}` expected a finite '
                     rf'(non-negative|positive) number, got {value}\.'):
    layer.init(jax.random.key(0), jnp.ones((1, 5, 5, 2)))


@pytest.mark.parametrize('layer', [PWSConv(3, (3, 3), gamma=0.0), WSConv(3, (3, 3), eps=0.0),
                                   WSConv(3, (3, 3), method='ws_std', eps=0.0)])
def test_zero_stabilizer_with_constant_kernel_outputs_bias_with_finite_gradients(layer):
  # Before: 0 / 0 = nan. A constant filter standardizes to 0, so the output is the bias.
  x = _x((2, 5, 5, 2))
  variables = layer.init(jax.random.key(0), x)
  params = dict(variables['params'], kernel=jnp.full((3, 3, 2, 3), 0.3),
                bias=jnp.array([0.1, -0.2, 0.3]))
  y = layer.apply({'params': params}, x)
  np.testing.assert_array_equal(y, np.broadcast_to(params['bias'], y.shape))
  _, (g, gx) = _loss_and_grads(layer, {'params': params}, x)
  assert all(np.all(np.isfinite(t)) for t in jax.tree.leaves((g, gx)))


@pytest.mark.parametrize('make', [lambda: WSConv(3, (1, 1)), lambda: WSConv(3, (1, 1), eps=0.0),
                                  lambda: ScaledWSConv(3, (1, 1)), lambda: PWSConv(3, (1, 1))])
def test_fan_in_one_outputs_bias_and_warns_at_init(make):
  # One input channel, 1x1 kernel: each filter has a single entry, standardized to 0.
  layer, x = make(), _x((2, 4, 4, 1))
  with pytest.warns(UserWarning, match=rf'{type(layer).__name__}: fan_in is 1'):
    variables = layer.init(jax.random.key(0), x)
  variables = jax.tree.map(lambda p: p + 0.3 * _x(p.shape, seed=p.size), variables)
  with warnings.catch_warnings():
    warnings.simplefilter('error')  # apply does not warn again
    y = layer.apply(variables, x)
  np.testing.assert_array_equal(y, np.broadcast_to(variables['params']['bias'], y.shape))
  _, (g, gx) = _loss_and_grads(layer, variables, x)
  assert all(np.all(np.isfinite(t)) for t in jax.tree.leaves((g, gx)))


def test_ws_std_fan_in_one_raises_naming_the_layer():
  with pytest.raises(ValueError, match="WSConv: argument `kernel_size` expected a filter of at "
                     "least 2 entries .* 'ws_std'"):
    WSConv(3, (1, 1), method='ws_std').init(jax.random.key(0), jnp.ones((1, 4, 4, 1)))
