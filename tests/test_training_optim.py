"""Optimizers, decay masks and schedules against closed forms."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnorm.models import decay_mask
from jaxnorm.training import optim

PARAMS = {
    'Conv_0': {'kernel': jnp.ones((3, 3, 1, 2))},
    'BatchNorm_0': {'scale': jnp.ones((2,)), 'bias': jnp.ones((2,))},
    'SkipInit_0': {'alpha': jnp.ones(())},
    'Dense_0': {'kernel': jnp.ones((2, 3)), 'bias': jnp.ones((3,))},
}


def test_the_optimizers_mask_is_the_models_decay_mask():
  # One mask for the package: jaxnorm.models.decay_mask, no fallback copy in training.
  assert not hasattr(optim, 'default_decay_mask') and not hasattr(optim, 'decay_mask_fn')
  assert decay_mask(PARAMS) == {
    'Conv_0': {'kernel': True}, 'BatchNorm_0': {'scale': False, 'bias': False},
    'SkipInit_0': {'alpha': False}, 'Dense_0': {'kernel': True, 'bias': False}}


@pytest.mark.parametrize('name', ['sgd', 'adam'])
def test_weight_decay_skips_gains_alphas_and_norm_parameters(name):
  # With zero gradients, only decayed parameters move; the default mask is models.decay_mask.
  tx = optim.make_optimizer(name, optim.make_schedule(0.1, 10, schedule='constant'),
                            weight_decay=0.5)
  grads = jax.tree.map(jnp.zeros_like, PARAMS)
  updates, _ = tx.update(grads, tx.init(PARAMS), PARAMS)
  mask = decay_mask(PARAMS)
  for u, m in zip(jax.tree.leaves(updates), jax.tree.leaves(mask), strict=True):
    if m:
      # SGD: -lr * wd * w; AdamW: -lr * (0 + wd * w) (Adam's update of a zero gradient is 0).
      np.testing.assert_allclose(u, -0.1 * 0.5, rtol=1e-6)
    else:
      np.testing.assert_allclose(u, 0.0)


def test_a_given_decay_mask_replaces_the_default():
  tx = optim.make_optimizer('sgd', optim.make_schedule(0.1, 10, schedule='constant'),
                            momentum=0.0, weight_decay=0.5,
                            decay_mask=lambda p: jax.tree.map(lambda _: False, p))
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, PARAMS), tx.init(PARAMS), PARAMS)
  for u in jax.tree.leaves(updates):
    np.testing.assert_array_equal(u, 0.0)


def test_nesterov_sgd_matches_closed_form():
  tx = optim.make_optimizer('sgd', optim.make_schedule(0.1, 10, schedule='constant'),
                            momentum=0.9, nesterov=True)
  p = {'w': jnp.array([1.0])}
  g = {'w': jnp.array([2.0])}
  state = tx.init(p)
  u1, state = tx.update(g, state, p)
  u2, state = tx.update(g, state, p)
  # Nesterov: v_t = mu v + g; update = -lr (g + mu v_t).
  v1 = 2.0
  v2 = 0.9 * v1 + 2.0
  np.testing.assert_allclose(u1['w'], -0.1 * (2.0 + 0.9 * v1), rtol=1e-6)
  np.testing.assert_allclose(u2['w'], -0.1 * (2.0 + 0.9 * v2), rtol=1e-6)


def test_adaptive_gradient_clipping_bounds_the_unitwise_ratio():
  tx = optim.make_optimizer('sgd', optim.make_schedule(1.0, 10, schedule='constant'),
                            momentum=0.0, agc_clip=0.01)
  p = {'w': jnp.ones((4, 3))}
  g = {'w': 100.0 * jnp.ones((4, 3))}
  u, _ = tx.update(g, tx.init(p), p)
  # Unit-wise (per output column) ||u|| / ||w|| <= clip after clipping.
  ratio = np.linalg.norm(u['w'], axis=0) / np.linalg.norm(p['w'], axis=0)
  np.testing.assert_allclose(ratio, 0.01, rtol=1e-4)


def test_warmup_cosine_schedule_matches_closed_form():
  sched = optim.make_schedule(0.4, 100, schedule='cosine', warmup_steps=10)
  for t in [0, 5, 10]:
    np.testing.assert_allclose(sched(t), 0.4 * t / 10, rtol=1e-6, atol=1e-7)
  for t in [10, 40, 77, 100]:
    want = 0.4 * 0.5 * (1 + math.cos(math.pi * (t - 10) / 90))
    np.testing.assert_allclose(sched(t), want, rtol=1e-5, atol=1e-7)


def test_step_schedule_decays_at_the_boundaries():
  sched = optim.make_schedule(1.0, 100, schedule='step', step_boundaries=(0.5, 0.75),
                              step_decay=0.1)
  got = [float(sched(t)) for t in (0, 49, 50, 74, 75, 99)]
  np.testing.assert_allclose(got, [1, 1, 0.1, 0.1, 0.01, 0.01], rtol=1e-6)


def test_unknown_optimizer_fails_fast():
  with pytest.raises(ValueError, match='`name` expected one of'):
    optim.make_optimizer('lion', optim.make_schedule(0.1, 10))
