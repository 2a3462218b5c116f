"""Theory curves of jaxnorm.diagnostics.theory against numpy simulations and the papers' numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from jaxnorm.diagnostics import theory


def _simulate_preact_mlp(num_blocks, norm, alpha, width=384, batch=384, seed=0):
  """Independent numpy simulation of x_{l+1} = x_l + alpha W relu(N(x_l)), He-normal W."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((batch, width))
  avg_var, avg_sq_mean = [x.var(0).mean()], [(x.mean(0) ** 2).mean()]
  for _ in range(num_blocks):
    h = x
    if norm == 'batch_norm':
      h = (h - h.mean(0)) / np.sqrt(h.var(0) + 1e-5)
    w = rng.standard_normal((width, width)) * math.sqrt(2.0 / width)
    x = x + alpha * np.maximum(h, 0.0) @ w
    avg_var.append(x.var(0).mean())
    avg_sq_mean.append((x.mean(0) ** 2).mean())
  return np.array(avg_var), np.array(avg_sq_mean)


def test_relu_moments_match_monte_carlo():
  rng = np.random.default_rng(0)
  for mu, var in [(0.0, 1.0), (0.7, 2.0), (-1.5, 0.3)]:
    z = np.maximum(mu + math.sqrt(var) * rng.standard_normal(1_000_000), 0.0)
    m1, m2 = theory.relu_moments(mu, var)
    np.testing.assert_allclose([m1, m2], [z.mean(), (z ** 2).mean()], rtol=1e-2, atol=1e-4)


def test_bn_preactivation_skip_variance_grows_linearly_with_slope_one_minus_inv_pi():
  pred = theory.residual_skip_moments(30, norm='batch_norm')
  slopes = theory.bn_preactivation_slopes()
  np.testing.assert_allclose(np.diff(pred['avg_var']), 1 - 1 / math.pi, rtol=1e-12)
  np.testing.assert_allclose(np.diff(pred['avg_sq_mean']), 1 / math.pi, rtol=1e-12)
  assert slopes['avg_var'] == pytest.approx(0.6817, abs=1e-4)
  assert slopes['avg_sq_mean'] == pytest.approx(0.3183, abs=1e-4)
  np.testing.assert_allclose(pred['res_avg_var'], 1 - 1 / math.pi)


@pytest.mark.parametrize('norm,alpha', [('batch_norm', 1.0), ('none', 1.0), ('none', 0.3)])
def test_skip_moments_match_a_numpy_simulation(norm, alpha):
  num_blocks = 12
  pred = theory.residual_skip_moments(num_blocks, norm=norm, alpha=alpha)
  sims = [_simulate_preact_mlp(num_blocks, norm, alpha, seed=s) for s in range(3)]
  var = np.array([s[0] for s in sims])
  sq = np.array([s[1] for s in sims])
  total, pred_total = var + sq, pred['avg_var'] + pred['avg_sq_mean']
  # Growth per block of the total second moment (geometric mean over seeds and blocks): finite-width
  # fluctuations compound multiplicatively, so compare in log space.
  growth = np.exp(np.mean(np.log(total[:, -1] / total[:, 0])) / num_blocks)
  assert growth == pytest.approx((pred_total[-1] / pred_total[0]) ** (1 / num_blocks), rel=0.03)
  # The split between channel variance and squared channel mean.
  np.testing.assert_allclose((var / total).mean(0)[1:], (pred['avg_var'] / pred_total)[1:],
                             atol=0.06)


def test_unnormalized_second_moment_doubles_and_skipinit_bounds_it():
  for alpha, factor in [(1.0, 2.0), (0.5, 1.25), (0.0, 1.0)]:
    pred = theory.residual_skip_moments(10, norm='none', alpha=alpha)
    total = pred['avg_var'] + pred['avg_sq_mean']
    np.testing.assert_allclose(total[1:] / total[:-1], factor, rtol=1e-6)
    assert theory.unnormalized_growth_factor(alpha) == factor
  for depth in (4, 50, 1000):
    pred = theory.residual_skip_moments(depth, norm='none', alpha=1 / math.sqrt(depth))
    total = pred['avg_var'] + pred['avg_sq_mean']
    assert total[-1] == pytest.approx((1 + 1 / depth) ** depth, rel=1e-6)
    assert total[-1] < math.e


def test_skipinit_zero_keeps_skip_moments_exactly_constant():
  pred = theory.residual_skip_moments(20, norm='none', alpha=0.0, var0=1.3, sq_mean0=0.2)
  assert np.all(pred['avg_var'] == 1.3) and np.all(pred['avg_sq_mean'] == 0.2)


def test_nf_expected_variance():
  np.testing.assert_allclose(theory.nf_expected_variance(4, 0.2), [1.04, 1.08, 1.12, 1.16])


def test_gradient_variance_ratio_polynomial_for_bn_exponential_without():
  p = theory.bn_gradient_growth_exponent()
  assert p == pytest.approx(math.pi / (math.pi - 1))
  ratios = {}
  for depth in (200, 2000):
    fwd = theory.residual_skip_moments(depth, norm='batch_norm')
    g = theory.gradient_variance_recurrence(fwd['avg_var'], norm='batch_norm')
    ratios[depth] = g['grad_var'][0] / g['grad_var'][-1]
  # ratio ~ L^p: the log-log slope between depths 200 and 2000 approaches p.
  slope = math.log(ratios[2000] / ratios[200]) / math.log(10)
  assert slope == pytest.approx(p, rel=0.05)
  fwd = theory.residual_skip_moments(20, norm='none')
  g = theory.gradient_variance_recurrence(fwd['avg_var'], norm='none')
  assert g['grad_var'][0] / g['grad_var'][-1] == pytest.approx(2.0 ** 20)
  g0 = theory.gradient_variance_recurrence(fwd['avg_var'], norm='none', alpha=0.0)
  np.testing.assert_array_equal(g0['grad_var'], 1.0)


def test_gradient_recurrence_matches_numpy_backprop_through_bn_resnet():
  """Backprop a N(0,1) cotangent through a numpy BN pre-activation residual MLP."""
  avg_var, grad_var, _ = _numpy_bn_resnet_backprop(1, 0.0, 1.0, depth=16)
  pred = theory.gradient_variance_recurrence(avg_var, norm='batch_norm',
                                             grad_var_out=grad_var[-1])
  np.testing.assert_allclose(grad_var, pred['grad_var'], rtol=0.1)


def _numpy_bn_resnet_backprop(seed, grad_sq_mean_out, grad_var_out, batch=256, width=256,
                              depth=6, eps=1e-5):
  """Forward + explicit backward of x_{l+1} = x_l + W relu(BN(x_l)) in numpy, Gaussian W.

  The output cotangent has per-channel means ~ N(0, grad_sq_mean_out) plus N(0, grad_var_out)
  noise. Returns the forward avg_var and the backward grad_var / grad_sq_mean per block.
  """
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((batch, width))
  cache, avg_var = [], [x.var(0).mean()]
  for _ in range(depth):
    mu, var = x.mean(0), x.var(0)
    xh = (x - mu) / np.sqrt(var + eps)
    w = rng.standard_normal((width, width)) * math.sqrt(2 / width)
    cache.append((xh, var, w))
    x = x + np.maximum(xh, 0) @ w
    avg_var.append(x.var(0).mean())
  # The channel means are drawn only when asked for (a zero-mean cotangent draws the noise alone).
  mean = math.sqrt(grad_sq_mean_out) * rng.standard_normal(width) if grad_sq_mean_out else 0.0
  g = mean + math.sqrt(grad_var_out) * rng.standard_normal((batch, width))
  grad_var, grad_sq_mean = [g.var(0).mean()], [(g.mean(0) ** 2).mean()]
  for xh, var, w in reversed(cache):
    gr = (g @ w.T) * (xh > 0)
    gx = (gr - gr.mean(0) - xh * (gr * xh).mean(0)) / np.sqrt(var + eps)  # BN backward
    g = g + gx
    grad_var.append(g.var(0).mean())
    grad_sq_mean.append((g.mean(0) ** 2).mean())
  return np.array(avg_var), np.array(grad_var[::-1]), np.array(grad_sq_mean[::-1])


@pytest.mark.parametrize('seed', [0, 1])
def test_gradient_recurrence_weights_the_gradient_mean_by_half_minus_inv_pi(seed):
  # A cotangent with a large channel mean (grad_sq_mean 4 x grad_var): its share of each block's
  # gradient-variance increment is what the coefficient sets. Measured here: the recurrence with
  # 1/2 - 1/pi is within 6 % of the simulation at every block, with weight 1 it is 2.7x too large
  # at the input, with 1/2 (BN's projection on x_hat ignored) 1.7x.
  avg_var, grad_var, grad_sq_mean = _numpy_bn_resnet_backprop(seed, 4.0, 1.0)
  assert theory.BN_GRAD_MEAN_WEIGHT == pytest.approx(0.5 - 1 / math.pi)
  pred = theory.gradient_variance_recurrence(avg_var, norm='batch_norm',
                                             grad_var_out=grad_var[-1],
                                             grad_sq_mean_out=grad_sq_mean[-1])
  np.testing.assert_allclose(pred['grad_var'], grad_var, rtol=0.1)
  # The BN branch's gradient has zero batch mean: the squared mean passes through unchanged.
  np.testing.assert_allclose(pred['grad_sq_mean'], grad_sq_mean, rtol=1e-6)
  # The coefficient alone, from the last block's increment: (dv * avg_var - v) / m.
  v, m, dv = grad_var[-1], grad_sq_mean[-1], grad_var[-2] - grad_var[-1]
  assert (dv * avg_var[-2] - v) / m == pytest.approx(0.5 - 1 / math.pi, abs=0.06)


def test_plain_bn_gradient_growth():
  assert theory.plain_bn_gradient_growth() == pytest.approx(1.4669, abs=1e-4)


def test_gaussian_product_max_singular_value_closed_form_and_simulation():
  assert theory.gaussian_product_max_singular_value(1) == pytest.approx(2.0)
  assert theory.gaussian_product_max_singular_value(3) == pytest.approx(math.sqrt(256 / 27))
  rng = np.random.default_rng(0)
  n = 400
  for m in (1, 3):
    prod = np.eye(n)
    for _ in range(m):
      prod = prod @ (rng.standard_normal((n, n)) / math.sqrt(n))
    smax = np.linalg.svd(prod, compute_uv=False)[0]
    assert smax == pytest.approx(theory.gaussian_product_max_singular_value(m), rel=0.05)


def test_pws_gain_matches_numpy_kernel_and_paper_table():
  rng = np.random.default_rng(0)
  fan, cout, gamma = 576, 32, 1e-3
  w = rng.standard_normal((fan, cout)) * math.sqrt(2 / fan)
  mu, var = w.mean(0), w.var(0)
  w_hat = math.sqrt(2 / fan) * (w - mu) / np.sqrt(var + gamma)
  np.testing.assert_allclose((w_hat ** 2).sum(0), theory.pws_filter_sum_of_squares(var, gamma),
                             rtol=1e-10)
  # PWS (Liu et al. 2021) gain table: gain^2 relative to He (= value / 2), gamma = 1e-3 and equiv.
  rel = theory.pws_gain_per_layer([147, 256, 576, 4608], 1e-3) / 2
  np.testing.assert_allclose(rel, [0.93, 0.88, 0.78, 0.30], atol=0.01)
  np.testing.assert_allclose(theory.pws_gain_per_layer([147, 4608], 0.1, equiv=True) / 2, 1 / 1.1)


def test_bad_arguments_fail_fast():
  with pytest.raises(ValueError, match='num_blocks'):
    theory.residual_skip_moments(-1)
  with pytest.raises(ValueError, match='norm'):
    theory.residual_skip_moments(3, norm='layer_norm')
  with pytest.raises(ValueError, match='num_matrices'):
    theory.gaussian_product_max_singular_value(0)


def test_predicted_block_curves_follow_the_model_keywords():
  from jaxnorm.diagnostics.theory import predicted_block_curves, residual_skip_moments

  rng = np.random.default_rng(0)
  n = 12
  var, sq = 1.0 + rng.random(n + 1), 0.1 * rng.random(n + 1)
  gvar, gsq = 1e-3 * (1 + rng.random(n + 1)), 1e-4 * rng.random(n + 1)
  ref = residual_skip_moments(n, norm='none', alpha=1 / math.sqrt(n), var0=var[0],
                              sq_mean0=sq[0])['avg_var']
  got = predicted_block_curves(var, sq, gvar, gsq, (n,), norm='none', skip_init='inv_sqrt_depth')
  np.testing.assert_allclose(got['avg_var'], ref, rtol=1e-12)
  assert got['grad_var'] is not None and got['grad_var'][-1] == pytest.approx(gvar[-1])
  flat = predicted_block_curves(var, sq, gvar, gsq, (n,), norm='none', skip_init=0.0)
  np.testing.assert_allclose(flat['avg_var'], var[0])  # SkipInit(0): every block is the identity
  bgn = predicted_block_curves(var, sq, gvar, gsq, (n,), norm='none', bgn='block')
  np.testing.assert_allclose(bgn['avg_var'], residual_skip_moments(
      n, norm='none', var0=var[0], sq_mean0=sq[0])['avg_var'], rtol=1e-12)
  assert bgn['grad_var'] is None  # BGN rescales the gradient by design.
  assert predicted_block_curves(var, sq, gvar, gsq, (n,), norm='pws')['avg_var'] is None
  # Two stages: the second runs from the measured first block of the stage.
  two = predicted_block_curves(var, sq, gvar, gsq, (6, 6), norm='batch_norm')
  second = residual_skip_moments(5, norm='batch_norm', var0=var[7], sq_mean0=sq[7])['avg_var']
  np.testing.assert_allclose(two['avg_var'][7:], second, rtol=1e-12)
  with pytest.raises(ValueError, match='avg_var'):
    predicted_block_curves(var[:-1], sq, gvar, gsq, (n,), norm='none')
