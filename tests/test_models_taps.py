"""Tests of `block_taps` / `stem_tap`: one array per block, in network order, scanned or not."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnorm.models import (
  MLP,
  ResidualMLP,
  block_tap_groups,
  block_taps,
  cifar_resnet,
  stem_tap,
  unstack_blocks,
  zero_perturbations,
)


def test_natural_numeric_order_and_scanned_leaves_unstacked():
  # block_10 after block_2; scanned_blocks (= blocks 1..n-1) after block_0; stages in order.
  tree = {'stage_1': {'block_0': {'skip': (jnp.full(1, 30.0),)},
                      'scanned_blocks': {'skip': (jnp.array([[31.0], [32.0]]),)}},
          'stage_0': {f'block_{i}': {'skip': (jnp.full(1, float(i)),)} for i in (10, 2, 0, 1)},
          'stem': (jnp.full(1, -1.0),)}
  got = [float(a[0]) for a in block_taps(tree, 'skip')]
  assert got == [0, 1, 2, 10, 30, 31, 32]
  assert float(stem_tap(tree)[0]) == -1.0
  # Gradient trees hold arrays, not sow tuples.
  grads = {'block_0': {'skip': jnp.ones(2)}, 'scanned_blocks': {'skip': jnp.zeros((3, 2))}}
  assert [float(a[0]) for a in block_taps(grads, 'skip')] == [1, 0, 0, 0]
  # Groups keep the scanned blocks stacked: one leading block axis per group, same order.
  groups = block_tap_groups(tree, 'skip')
  assert [g.shape for g in groups] == [(1, 1)] * 5 + [(2, 1)]
  assert [float(v) for v in jnp.concatenate(groups)[:, 0]] == got


@pytest.mark.parametrize('scan', [False, True])
def test_residual_mlp_taps_are_in_network_order(scan):
  # Without a gain, skip_l = skip_{l-1} + branch_l: only the true order satisfies it.
  depth = 12
  model = ResidualMLP(depth=depth, width=8, norm='none', scan=scan)
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 5))
  variables = jax.jit(model.init)(jax.random.PRNGKey(1), x)
  _, state = model.apply(variables, x, mutable=['intermediates'])
  tree = state['intermediates']
  skips, branches = block_taps(tree, 'skip'), block_taps(tree, 'branch')
  assert len(skips) == len(branches) == depth
  prev = stem_tap(tree)
  for s, b in zip(skips, branches, strict=True):
    np.testing.assert_allclose(s, prev + b, rtol=1e-6, atol=1e-6)
    prev = s


@pytest.mark.parametrize('scan', [False, True])
def test_perturbation_gradients_are_the_skip_path_gradients(scan):
  # loss = sum(skip_L) with skip_L = skip_{L-1} + relu(skip_{L-1}) W + b, so
  # d loss / d skip_{L-1} = 1 + (1 W^T) * [skip_{L-1} > 0] and d loss / d skip_L = 1.
  depth = 11
  model = ResidualMLP(depth=depth, width=6, norm='none', num_classes=6, scan=scan)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 6))
  variables = jax.jit(model.init)(jax.random.PRNGKey(1), x)

  def forward(perturbations):
    _, state = model.apply({'params': variables['params'], 'perturbations': perturbations}, x,
                           mutable=['intermediates'])
    return state['intermediates']

  def last_skip_sum(perturbations):
    return jnp.sum(block_taps(forward(perturbations), 'skip')[-1])

  perturbations = zero_perturbations(model, variables, x)
  grads = jax.jit(jax.grad(last_skip_sum))(perturbations)
  taps = block_taps(grads, 'skip')
  assert len(taps) == depth
  np.testing.assert_array_equal(taps[-1], np.ones((2, 6)))
  skip_prev = np.asarray(block_taps(forward(perturbations), 'skip')[-2])
  w = unstack_blocks(variables['params'])[f'block_{depth - 1}']['dense']['kernel']
  expected = 1.0 + np.ones((2, 6)) @ np.asarray(w).T * (skip_prev > 0)
  np.testing.assert_allclose(taps[-2], expected, rtol=1e-5, atol=1e-6)
  assert stem_tap(grads).shape == (2, 6)


@pytest.mark.slow
@pytest.mark.parametrize('scan', [False, True])
def test_resnet_taps_one_per_block_and_instrumentation_leaves_outputs_unchanged(scan):
  model = cifar_resnet(20, width=4, norm='batch_norm', scan=scan)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 3))
  variables = jax.jit(model.init)(jax.random.PRNGKey(1), x)
  plain = {'params': variables['params'], 'batch_stats': variables['batch_stats']}
  y0 = model.apply(plain, x)
  y1, state = model.apply(variables, x, mutable=['intermediates'])
  np.testing.assert_array_equal(y0, y1)
  tree = state['intermediates']
  skips = block_taps(tree, 'skip')
  assert [s.shape for s in skips] == [(2, 8, 8, 4)] * 3 + [(2, 4, 4, 8)] * 3 + [(2, 2, 2, 16)] * 3
  assert len(block_taps(tree, 'branch')) == 9
  assert stem_tap(tree).shape == (2, 8, 8, 4)


# (model, input shape after the batch axis, state collections, train mode works at batch 1).
_BATCH_MODELS = {
  'resnet_unrolled': (lambda: cifar_resnet(8, width=4, scan=False), (8, 8, 3), {'batch_stats'},
                      True),
  'resnet_scan_remat': (lambda: cifar_resnet(14, width=4, scan=True, remat=True), (8, 8, 3),
                        {'batch_stats'}, True),
  'residual_mlp_bn': (lambda: ResidualMLP(depth=3, width=8, scan=False), (5,), {'batch_stats'},
                      False),  # BatchNorm over (N, C) needs >= 2 examples in training mode
  'residual_mlp_scan_remat': (lambda: ResidualMLP(depth=3, width=8, norm='none', scan=True,
                                                  remat=True), (5,), set(), True),
  'mlp': (lambda: MLP(depth=2, width=8), (5,), set(), True),
}


@pytest.mark.parametrize('name', [pytest.param(n, marks=pytest.mark.slow) if n == 'resnet_unrolled'
                                  else n for n in _BATCH_MODELS])
def test_init_variables_hold_no_taps_and_work_for_any_batch_size(name):
  make, shape, state, train_at_one = _BATCH_MODELS[name]
  model = make()
  x6 = jax.random.normal(jax.random.PRNGKey(0), (6, *shape))
  variables = jax.jit(model.init)(jax.random.PRNGKey(1), x6)
  # Only what a user keeps: no 'perturbations' (gradient taps) and no 'intermediates'.
  assert set(variables) == {'params', *state}
  x3 = x6[:3]
  eval_fn = jax.jit(lambda v, x: model.apply(v, x))
  y3 = eval_fn(variables, x3)
  y1 = eval_fn(variables, x3[:1])
  assert y3.shape == (3, 10) and y1.shape == (1, 10)
  # Eval mode treats examples independently: the batch of 1 is the first row of the batch of 3.
  np.testing.assert_allclose(y1, y3[:1], rtol=1e-5, atol=1e-6)
  train_fn = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=list(state)))
  for batch in (1, 3):
    if batch == 1 and not train_at_one:
      continue
    y, updates = train_fn(variables, x6[:batch])
    assert y.shape == (batch, 10)
    assert set(updates) == state
  # Taps are per call: built for this batch, they give gradients shaped like it.
  perts = zero_perturbations(model, variables, x3, train=True)
  tap = 'layer' if name == 'mlp' else 'skip'

  def loss(p):
    y, _ = model.apply({**variables, 'perturbations': p}, x3, train=True, mutable=list(state))
    return jnp.sum(y)

  taps = block_taps(jax.jit(jax.grad(loss))(perts), tap)
  assert taps and all(t.shape[0] == 3 for t in taps)
  assert any(float(jnp.abs(t).max()) > 0 for t in taps)
