"""Scan vs unrolled: the same function for the same parameters; layout conversion round trip."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnorm.models import ResidualMLP, cifar_resnet, stack_blocks, unstack_blocks


def _tree_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)


def test_stack_then_unstack_is_the_identity():
  tree = {'stage_0': {'block_0': {'w': jnp.zeros(2)},
                      **{f'block_{i}': {'w': jnp.full(2, float(i))} for i in range(1, 12)}},
          'head': {'w': jnp.ones(3)}}
  stacked = stack_blocks(tree)
  assert set(stacked['stage_0']) == {'block_0', 'scanned_blocks'}
  np.testing.assert_array_equal(stacked['stage_0']['scanned_blocks']['w'][:, 0], np.arange(1, 12))
  _tree_equal(unstack_blocks(stacked), tree)


def _both_paths(make, x, train, mutable):
  unrolled, scanned = make(False), make(True)
  variables = jax.jit(unrolled.init)(jax.random.PRNGKey(0), x)
  f = jax.jit(lambda v: unrolled.apply(v, x, train=train, mutable=mutable))
  g = jax.jit(lambda v: scanned.apply(v, x, train=train, mutable=mutable))
  return variables, f(variables), g(stack_blocks(variables))


@pytest.mark.slow
@pytest.mark.parametrize('norm', ['none', 'scaled_ws'])
def test_scanned_resnet_equals_unrolled_to_float32_rounding(norm):
  # The same operations per block; XLA compiles the loop body separately, so fusion / kernel
  # choices can differ in the last bit (see jaxnorm.models.stacking).
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, 3))
  style = 'v2' if norm == 'scaled_ws' else 'v1'
  variables, (y_u, _), (y_s, _) = _both_paths(
    lambda scan: cifar_resnet(20, width=4, norm=norm, style=style, scan=scan), x, True, [])
  np.testing.assert_allclose(y_u, y_s, rtol=2e-6, atol=2e-6)
  # And the init layouts agree with the converters.
  scanned = cifar_resnet(20, width=4, norm=norm, style=style, scan=True)
  shapes = jax.eval_shape(scanned.init, jax.random.PRNGKey(0), x)
  assert jax.tree.structure(shapes) == jax.tree.structure(stack_blocks(variables))


@pytest.mark.slow
@pytest.mark.parametrize('norm', ['batch_norm', 'group_norm'])
def test_scanned_resnet_with_activation_norms_matches_unrolled(norm):
  x = jax.random.normal(jax.random.PRNGKey(1), (4, 8, 8, 3))
  _, (y_u, st_u), (y_s, st_s) = _both_paths(
    lambda scan: cifar_resnet(20, width=4, norm=norm, scan=scan), x, True, ['batch_stats'])
  np.testing.assert_allclose(y_u, y_s, rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree.leaves(stack_blocks(st_u)), jax.tree.leaves(st_s), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_scanned_residual_mlp_with_remat_equals_unrolled_and_gradients_agree():
  x = jax.random.normal(jax.random.PRNGKey(1), (4, 6))
  unrolled = ResidualMLP(depth=5, width=8, norm='none', skip_init=0.3, scan=False)
  scanned = ResidualMLP(depth=5, width=8, norm='none', skip_init=0.3, scan=True, remat=True)
  v = jax.jit(unrolled.init)(jax.random.PRNGKey(0), x)

  def loss(model, params):
    return jnp.sum(model.apply({'params': params}, x, train=True) ** 2)

  lu, gu = jax.jit(jax.value_and_grad(lambda p: loss(unrolled, p)))(v['params'])
  ls, gs = jax.jit(jax.value_and_grad(lambda p: loss(scanned, p)))(stack_blocks(v)['params'])
  np.testing.assert_allclose(lu, ls, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(stack_blocks(gu)), jax.tree.leaves(gs), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
