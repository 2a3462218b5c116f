"""Tests of ResidualMLP (De & Smith's toy model) and the plain MLP (BGN paper)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnorm.models import MLP, ResidualMLP, block_taps, stem_tap, zero_perturbations


def _skip_variances(norm, depth=16, skip_init=None):
  model = ResidualMLP(depth=depth, width=256, norm=norm, skip_init=skip_init, scan=True)
  x = jax.random.normal(jax.random.PRNGKey(0), (128, 64))
  variables = jax.jit(model.init)(jax.random.PRNGKey(1), x)
  _, state = jax.jit(lambda v: model.apply(v, x, train=True, mutable=['intermediates',
                                                                       'batch_stats']))(variables)
  tree = state['intermediates']
  return [float(jnp.var(stem_tap(tree)))] + [float(jnp.var(s)) for s in block_taps(tree, 'skip')]


@pytest.mark.slow
def test_batch_norm_skip_variance_grows_linearly_at_init():
  # De & Smith (2020): BN makes Var(branch) ~ 1 (He-normal Dense after relu of a unit
  # variance input: 2 * E[relu(z)^2] = 1), so Var(x_l) ~ Var(x_0) + l: linear, slope ~ 1.
  var = np.array(_skip_variances('batch_norm'))
  slope, intercept = np.polyfit(np.arange(len(var)), var, 1)
  assert 0.8 < slope < 1.2
  assert abs(intercept - 1.0) < 0.3
  residuals = var - (slope * np.arange(len(var)) + intercept)
  assert np.max(np.abs(residuals)) < 0.1 * var[-1]


@pytest.mark.slow
def test_unnormalized_skip_variance_doubles_per_block_and_skip_init_zero_keeps_it_flat():
  var = np.array(_skip_variances('none', depth=8))
  ratios = var[1:] / var[:-1]
  np.testing.assert_allclose(ratios, 2.0, rtol=0.15)
  flat = _skip_variances('none', depth=8, skip_init=0.0)
  assert flat[1:] == [flat[0]] * 8


@pytest.mark.parametrize('activation', ['tanh', 'relu'])
def test_plain_mlp_taps_every_layer_and_bgn_leaves_the_forward_pass_unchanged(activation):
  depth, width = 6, 16
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 10))
  plain = MLP(depth=depth, width=width, activation=activation)
  bgn = MLP(depth=depth, width=width, activation=activation, bgn='layer')
  variables = jax.jit(plain.init)(jax.random.PRNGKey(1), x)
  y0, state = plain.apply(variables, x, mutable=['intermediates'])
  y1 = bgn.apply(variables, x)
  np.testing.assert_array_equal(y0, y1)
  assert len(block_taps(state['intermediates'], 'layer')) == depth

  def head_sum(model, perturbations):
    return jnp.sum(model.apply({'params': variables['params'], 'perturbations': perturbations}, x))

  perts = zero_perturbations(bgn, variables, x)
  g = block_taps(jax.grad(lambda p: head_sum(bgn, p))(perts), 'layer')
  # The tap sits before the BGN node, so its gradient is BGN's output: per-sample L2 norm
  # sqrt(units) * |g| / (|g| + eps) (Cabana & Lago-Fernandez 2021, default target 'sqrt_units').
  for tap in g[:-1]:
    np.testing.assert_allclose(jnp.linalg.norm(tap, axis=1), np.sqrt(width), rtol=1e-4)


def test_mlp_rejects_unknown_activation_and_bgn():
  x = jnp.zeros((1, 3))
  with pytest.raises(ValueError, match='`activation`'):
    MLP(depth=2, width=4, activation='swish2').init(jax.random.PRNGKey(0), x)
  with pytest.raises(ValueError, match='`bgn`'):
    MLP(depth=2, width=4, bgn='block').init(jax.random.PRNGKey(0), x)
  with pytest.raises(ValueError, match='`norm`'):
    ResidualMLP(depth=2, width=4, norm='pws').init(jax.random.PRNGKey(0), x)


@pytest.mark.parametrize('make, exc, message', [
  (lambda: ResidualMLP(depth=2, width=0), ValueError,
   r'ResidualMLP: argument `width` expected an int >= 1, got 0'),
  (lambda: ResidualMLP(depth=2, width=4, num_classes=0), ValueError,
   r'ResidualMLP: argument `num_classes` expected an int >= 1, got 0'),
  (lambda: ResidualMLP(depth='2', width=4), TypeError, r'ResidualMLP: argument `depth`.*str'),
  (lambda: MLP(depth=2, width=-1), ValueError,
   r'MLP: argument `width` expected an int >= 1, got -1'),
  (lambda: MLP(depth=2, width=4, num_classes=0), ValueError, r'MLP: argument `num_classes`'),
  (lambda: MLP(depth=0, width=4), ValueError, r'MLP: argument `depth`.*got 0'),
])
def test_mlp_counts_fail_fast_naming_the_argument(make, exc, message):
  # Before: ZeroDivisionError (width 0) or a broadcasting error on shape (., -1) (width -1).
  with pytest.raises(exc, match=message):
    make().init(jax.random.PRNGKey(0), jnp.zeros((2, 3)))


def _bgn_nodes(model, x):
  """The (path, mode, target) of every BackwardGradNorm node ``model`` calls, in call order."""
  import flax.linen as nn

  from jaxnorm.linen import BackwardGradNorm

  calls = []

  def record(f, args, kwargs, context):
    m = context.module
    if isinstance(m, BackwardGradNorm) and context.method_name == '__call__':
      calls.append(('/'.join(m.scope.path), m.mode, m.target))
    return f(*args, **kwargs)

  with nn.intercept_methods(record):
    model.init(jax.random.PRNGKey(0), x)
  return calls


@pytest.mark.parametrize('every, expected', [(1, [0, 1, 2, 3, 4, 5, 6]), (3, [2, 5]),
                                             (7, [6]), (8, [])])
def test_bgn_every_k_layers_places_a_node_after_layers_k_minus_1_2k_minus_1(every, expected):
  x = jnp.zeros((2, 5))
  model = MLP(depth=7, width=4, bgn='layer', bgn_every=every, bgn_mode='per_batch',
              bgn_target='unit')
  assert _bgn_nodes(model, x) == [(f'layer_{i}/bgn', 'per_batch', 'unit') for i in expected]
  assert _bgn_nodes(MLP(depth=7, width=4, bgn_every=every), x) == []  # bgn='none': no node


def test_bgn_defaults_are_unchanged_and_pre_position_keeps_the_forward_pass():
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 5))
  default = MLP(depth=3, width=4, bgn='layer')
  assert _bgn_nodes(default, x) == [(f'layer_{i}/bgn', 'per_sample', 'sqrt_units')
                                    for i in range(3)]
  variables = default.init(jax.random.PRNGKey(1), x)
  pre = MLP(depth=3, width=4, bgn='layer', bgn_position='pre', bgn_every=2, bgn_target=2.5)
  assert _bgn_nodes(pre, x) == [('layer_1/bgn', 'per_sample', 2.5)]
  np.testing.assert_array_equal(pre.apply(variables, x), default.apply(variables, x))


def _dense(p, h):
  return h @ p['kernel'] + p['bias']


def _normalized(g, mode, target, eps=1e-6):
  """Cabana & Lago-Fernandez (2021): s * g / (||g|| + eps), in numpy (float64)."""
  g = np.asarray(g, np.float64)
  if mode == 'per_sample':
    norm = np.linalg.norm(g.reshape(g.shape[0], -1), axis=1).reshape(-1, *[1] * (g.ndim - 1))
    units = g[0].size
  else:
    norm, units = np.linalg.norm(g), g.size
  s = {'sqrt_units': np.sqrt(units), 'unit': 1.0}.get(target, target)
  return s * g / (norm + eps)


@pytest.mark.parametrize('mode, target, position', [
  ('per_sample', 'sqrt_units', 'post'), ('per_batch', 'sqrt_units', 'post'),
  ('per_sample', 'unit', 'post'), ('per_batch', 3.0, 'pre'), ('per_sample', 'sqrt_units', 'pre'),
])
def test_bgn_gradients_match_jax_grad_with_a_numpy_normalized_cotangent(mode, target, position):
  # One node, in the last hidden layer (bgn_every=depth). Below it, the BGN network's parameter
  # gradient is the plain network's VJP of the node's input, fed the node's input gradient
  # normalized in numpy; above it (the head) nothing changes.
  depth, width, act = 3, 6, 'tanh'
  x = jax.random.normal(jax.random.PRNGKey(0), (5, 4))
  labels = jnp.array([0, 3, 1, 9, 2])
  plain = MLP(depth=depth, width=width, activation=act)
  bgn = MLP(depth=depth, width=width, activation=act, bgn='layer', bgn_every=depth,
            bgn_mode=mode, bgn_target=target, bgn_position=position)
  params = plain.init(jax.random.PRNGKey(1), x)['params']

  def loss(model, p):
    logits = model.apply({'params': p}, x)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))

  got = jax.grad(lambda p: loss(bgn, p))(params)
  want = jax.grad(lambda p: loss(plain, p))(params)
  last = f'layer_{depth - 1}'

  def hidden(p, i):  # the output of hidden layer i (after its activation) of the plain net
    return plain.apply({'params': p}, x, mutable=['intermediates'])[1]['intermediates'][
        f'layer_{i}']['layer'][0]

  def loss_from_hidden(h):
    logits = _dense(params['head'], h)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))

  g_last = jax.grad(loss_from_hidden)(hidden(params, depth - 1))
  if position == 'post':
    c = _normalized(g_last, mode, target)
    _, vjp = jax.vjp(lambda p: hidden(p, depth - 1), params)
    below = vjp(jnp.asarray(c, jnp.float32))[0]
    layers = range(depth)
  else:  # the node sits on layer depth-1's pre-activation z = h @ W + b
    h_prev = hidden(params, depth - 2)
    z = _dense(params[last]['dense'], h_prev)
    c = _normalized(np.asarray(g_last) * (1 - np.tanh(np.asarray(z, np.float64)) ** 2), mode,
                    target)
    np.testing.assert_allclose(got[last]['dense']['kernel'], np.asarray(h_prev).T @ c,
                               rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got[last]['dense']['bias'], c.sum(0), rtol=1e-4, atol=1e-6)
    c_prev = c @ np.asarray(params[last]['dense']['kernel'], np.float64).T
    _, vjp = jax.vjp(lambda p: hidden(p, depth - 2), params)
    below = vjp(jnp.asarray(c_prev, jnp.float32))[0]
    layers = range(depth - 1)
  for i in layers:
    for leaf in ('kernel', 'bias'):
      np.testing.assert_allclose(got[f'layer_{i}']['dense'][leaf],
                                 below[f'layer_{i}']['dense'][leaf], rtol=1e-4, atol=1e-6)
  for leaf in ('kernel', 'bias'):
    np.testing.assert_allclose(got['head'][leaf], want['head'][leaf], rtol=1e-6)
  # And the normalization really happened: the plain gradient differs.
  assert not np.allclose(got['layer_0']['dense']['kernel'], want['layer_0']['dense']['kernel'])


@pytest.mark.parametrize('kwargs, exc, message', [
  ({'bgn_mode': 'per_channel'}, ValueError, r'MLP: argument `bgn_mode`'),
  ({'bgn_target': -1.0}, ValueError, r'MLP: argument `bgn_target` expected a finite positive'),
  ({'bgn_target': 'half'}, ValueError, r'MLP: argument `bgn_target`'),
  ({'bgn_target': True}, TypeError, r'MLP: argument `bgn_target`'),
  ({'bgn_every': 0}, ValueError, r'MLP: argument `bgn_every`'),
  ({'bgn_position': 'both'}, ValueError, r'MLP: argument `bgn_position`'),
])
def test_bgn_options_fail_fast_naming_the_argument(kwargs, exc, message):
  with pytest.raises(exc, match=message):
    MLP(depth=2, width=4, bgn='layer', **kwargs).init(jax.random.PRNGKey(0), jnp.zeros((2, 3)))


def test_a_float_bgn_target_is_settable_through_the_training_config():
  # `bgn_target: str | float`: the config field takes either type (it was locked to str).
  from jaxnorm.training.config import model_config
  from jaxnorm.training.loop import build_model

  c = model_config('MLP', depth=2, width=4, bgn='layer')
  assert c.bgn_target == 'sqrt_units'
  c.bgn_target = 2.5
  model = build_model(c, 10)
  assert model.bgn_target == 2.5
  c.bgn_target = 'unit'
  unit = build_model(c, 10)
  assert unit.bgn_target == 'unit'
  # The last node before layer_0's kernel sets each example's gradient norm to the target, so
  # that kernel's gradient with target 2.5 is 2.5 times the one with target 1.
  x = jax.random.normal(jax.random.PRNGKey(1), (3, 5))
  params = model.init(jax.random.PRNGKey(0), x)['params']

  def grad0(m):
    g = jax.grad(lambda p: jnp.sum(jnp.sin(m.apply({'params': p}, x))))(params)
    return np.asarray(g['layer_0']['dense']['kernel'])

  np.testing.assert_allclose(grad0(model), 2.5 * grad0(unit), rtol=1e-5, atol=1e-7)
