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


PWS_PARAMS = {
    'conv': {'kernel': jnp.full((3, 3, 2, 2), 2.0), 'bias': jnp.full((2,), 2.0),
             'alpha': jnp.full((2,), 2.0)},
    'stem_norm': {'scale': jnp.full((2,), 2.0), 'bias': jnp.full((2,), 2.0)},
    'head': {'kernel': jnp.full((2, 3), 2.0), 'bias': jnp.full((3,), 2.0)},
}
# Which leaves each choice decays (True) or leaves alone (False).
DECAYED = {
    'kernels': {'conv': {'kernel': True, 'bias': False, 'alpha': False},
                'stem_norm': {'scale': False, 'bias': False},
                'head': {'kernel': True, 'bias': False}},
    'all': {'conv': {'kernel': True, 'bias': True, 'alpha': True},
            'stem_norm': {'scale': True, 'bias': True}, 'head': {'kernel': True, 'bias': True}},
    'all_but_alpha': {'conv': {'kernel': True, 'bias': True, 'alpha': False},
                      'stem_norm': {'scale': True, 'bias': True},
                      'head': {'kernel': True, 'bias': True}},
}


@pytest.mark.parametrize('name', ['sgd', 'adam'])
@pytest.mark.parametrize('mask', sorted(DECAYED))
def test_each_decay_mask_decays_exactly_its_parameters(name, mask):
  # Zero gradients, lr 0.1, wd 0.5, w = 2: a decayed leaf moves by -0.1 * 0.5 * 2 = -0.1, the
  # others do not move.
  tx = optim.make_optimizer(name, optim.make_schedule(0.1, 10, schedule='constant'),
                            weight_decay=0.5, decay_mask=mask)
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, PWS_PARAMS), tx.init(PWS_PARAMS),
                         PWS_PARAMS)
  for path, u in jax.tree_util.tree_leaves_with_path(updates):
    decayed = DECAYED[mask]
    for p in path:
      decayed = decayed[p.key]
    np.testing.assert_allclose(u, -0.1 if decayed else 0.0, rtol=1e-6, err_msg=str(path))


def test_all_decays_pws_alpha_and_group_norm_parameters_that_kernels_does_not():
  sched = optim.make_schedule(0.1, 10, schedule='constant')
  grads = jax.tree.map(jnp.zeros_like, PWS_PARAMS)
  moved = {}
  for mask in ('kernels', 'all'):
    tx = optim.make_optimizer('sgd', sched, momentum=0.9, weight_decay=5e-4, decay_mask=mask)
    u, _ = tx.update(grads, tx.init(PWS_PARAMS), PWS_PARAMS)
    moved[mask] = optax_apply(PWS_PARAMS, u)
  # Coupled L2: w <- w - lr * wd * w = 2 * (1 - 0.1 * 5e-4) for a decayed leaf.
  for leaf in (('conv', 'alpha'), ('conv', 'bias'), ('stem_norm', 'scale')):
    np.testing.assert_allclose(moved['all'][leaf[0]][leaf[1]], 2.0 * (1 - 5e-5), rtol=1e-7)
    np.testing.assert_array_equal(moved['kernels'][leaf[0]][leaf[1]], 2.0)
  np.testing.assert_allclose(moved['kernels']['conv']['kernel'], 2.0 * (1 - 5e-5), rtol=1e-7)


def optax_apply(params, updates):
  return jax.tree.map(lambda p, u: p + u, params, updates)


def test_every_decay_mask_gives_the_same_optimizer_state_structure():
  # So a checkpoint written under one mask restores under another (and under the default).
  sched = optim.make_schedule(0.1, 10, schedule='constant')
  structs = {mask: jax.tree.structure(optim.make_optimizer(
      'sgd', sched, weight_decay=5e-4, decay_mask=mask).init(PWS_PARAMS))
      for mask in (None, *optim.DECAY_MASKS)}
  assert len(set(structs.values())) == 1, structs


def test_an_unknown_decay_mask_fails_fast():
  with pytest.raises(ValueError, match="`decay_mask` expected one of 'kernels', 'all', "
                                       "'all_but_alpha', got 'bias'"):
    optim.make_optimizer('sgd', optim.make_schedule(0.1, 10), weight_decay=0.1,
                         decay_mask='bias')


def test_optimizer_from_config_reads_the_decay_mask_and_defaults_to_kernels():
  from jaxnorm.training.config import default_config

  c = default_config()
  c.optimizer.update(momentum=0.0, weight_decay=0.5, learning_rate=0.1)
  sched = optim.make_schedule(0.1, 10, schedule='constant')
  grads = jax.tree.map(jnp.zeros_like, PWS_PARAMS)
  for mask in (None, 'all', 'all_but_alpha'):
    if mask is not None:
      c.optimizer.decay_mask = mask
    tx = optim.optimizer_from_config(c.optimizer, sched)
    u, _ = tx.update(grads, tx.init(PWS_PARAMS), PWS_PARAMS)
    decayed = DECAYED[mask or 'kernels']
    np.testing.assert_allclose(u['conv']['alpha'], -0.1 if decayed['conv']['alpha'] else 0.0)
    np.testing.assert_allclose(u['stem_norm']['scale'],
                               -0.1 if decayed['stem_norm']['scale'] else 0.0)


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
