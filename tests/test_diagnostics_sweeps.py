"""Bjorck et al.'s relative-loss sweep, channel statistics by depth and logit-gradient map."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnorm.diagnostics import sweeps


def test_relative_loss_of_a_quadratic_matches_closed_form():
  """L(w) = 0.5 a w^2: one step of size eta gives L(w - eta a w)/L(w) = (1 - eta a)^2."""
  a = 3.0
  loss_fn = lambda p, batch: 0.5 * a * jnp.sum(p['w'] ** 2) * batch
  etas = np.array([0.01, 0.1, 1 / 3, 0.5, 1.0])
  got_etas, ratios = sweeps.relative_loss_sweep(loss_fn, {'w': jnp.array([2.0, -1.0])},
                                                [1.0, 2.0], etas)
  np.testing.assert_allclose(got_etas, etas)
  # Batch b scales the loss and the gradient: ratio (1 - eta a b)^2.
  np.testing.assert_allclose(ratios[0], (1 - etas * a) ** 2, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(ratios[1], (1 - etas * a * 2) ** 2, rtol=1e-5, atol=1e-7)
  assert sweeps.divergence_step_size(etas, ratios, threshold=10.0) == pytest.approx(1.0)
  assert sweeps.divergence_step_size(etas, ratios[:, :2], threshold=10.0) == np.inf


def test_default_grid_is_bjorcks_log_grid():
  etas, ratios = sweeps.relative_loss_sweep(lambda p, b: jnp.sum(p ** 2) + b, jnp.ones(2), [1.0])
  assert etas[0] == pytest.approx(1e-5) and etas[-1] == pytest.approx(1e-1) and ratios.shape == (
    1, 17)
  assert np.all(np.diff(np.log10(etas)) == pytest.approx(0.25))


class _Stack(nn.Module):
  """A plain 'layer'-tapped MLP with a stem tap: h_{k+1} = gain * h_k."""

  gain: float

  @nn.compact
  def __call__(self, x, train: bool = True):
    x = self.perturb('stem', x)
    self.sow('intermediates', 'stem', x)
    for i in range(3):
      x = nn.Dense(x.shape[-1], use_bias=False,
                   kernel_init=lambda k, s, d: self.gain * jnp.eye(s[0], dtype=d),
                   name=f'dense_{i}')(x)
      x = self.perturb('layer', x)
      self.sow('intermediates', 'layer', x)
    return x


def test_channel_stats_by_depth_match_numpy():
  x = jax.random.normal(jax.random.key(0), (64, 5)) + 1.0
  model = _Stack(2.0)
  variables = model.init(jax.random.key(1), x)
  stats = sweeps.channel_stats_by_depth(model, variables, x, tap='layer')
  assert len(stats.means) == 4
  for k in range(4):
    np.testing.assert_allclose(stats.means[k], np.asarray(x).mean(0) * 2.0 ** k, rtol=1e-5)
    np.testing.assert_allclose(stats.stds[k], np.asarray(x).std(0) * 2.0 ** k, rtol=1e-5)
  summ = stats.log10_summary()
  np.testing.assert_allclose(np.diff(summ['log10_std']), np.log10(2.0), rtol=1e-5)


def test_logit_gradient_map_is_softmax_minus_onehot_and_detects_one_dominant_class():
  x = jnp.zeros((8, 4)).at[:, 2].set(10.0)  # every example predicts class 2
  model = _Stack(1.0)
  variables = model.init(jax.random.key(0), x)
  labels = jnp.arange(8) % 4
  out = sweeps.logit_gradient_map(model, variables, x, labels)
  p = np.asarray(jax.nn.softmax(x))
  expected = (p - np.eye(4)[np.asarray(labels)]) / 8
  np.testing.assert_allclose(out['grad'], expected, rtol=1e-5, atol=1e-7)
  assert out['dominant_column'] == 2 and out['majority_prediction_fraction'] == 1.0
  assert out['dominant_column_fraction'] > 0.4  # 1/4 if spread evenly over 4 classes
