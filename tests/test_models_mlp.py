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
