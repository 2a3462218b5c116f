"""Tests of jaxnorm.invariants: each check passes on valid input and raises on invalid input,
both eagerly and inside jit through chex.chexify."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnorm import invariants as inv
from jaxnorm.functional._backward_grad_norm import backward_grad_norm


def _under_chexify_jit(check):
  """Runs ``check(x)`` inside a jitted function wrapped with chex.chexify (synchronous)."""
  def f(x):
    check(x)
    return x
  return chex.chexify(jax.jit(f), async_check=False)


def _expect(check, good, bad, match):
  """``check`` passes on ``good`` and raises (matching ``match``) on ``bad``: eager and jitted."""
  check(good)
  with pytest.raises(AssertionError, match=match):
    check(bad)
  jitted = _under_chexify_jit(check)
  jitted(good)
  with pytest.raises(AssertionError, match=match):
    jitted(bad)


def _batch_normalized(shape, seed=0):
  x = np.random.default_rng(seed).normal(size=shape) * 3.0 + 5.0
  axes = tuple(range(len(shape) - 1))
  x = (x - x.mean(axes)) / x.std(axes)
  return jnp.asarray(x, jnp.float32)


def test_assert_normalized_on_batch_normalized_activations():
  good = _batch_normalized((8, 3, 3, 4))
  bad_var = good * 1.1
  bad_mean = good.at[..., 2].add(0.01)
  _expect(inv.assert_normalized, good, bad_var, r'per-channel variance over axes \(0, 1, 2\)')
  _expect(inv.assert_normalized, good, bad_mean, r'per-channel mean over axes \(0, 1, 2\)')
  # Explicit axes and expected values: NC input normalized to mean 2, variance 4.
  nc = 2.0 * _batch_normalized((32, 5)) + 2.0
  _expect(lambda x: inv.assert_normalized(x, axes=0, mean=2.0, var=4.0, atol=1e-4), nc, nc * 1.01,
          'per-channel')


def test_assert_normalized_works_in_bfloat16_with_float32_statistics():
  good = _batch_normalized((64, 8)).astype(jnp.bfloat16)
  inv.assert_normalized(good, atol=2e-2)
  with pytest.raises(AssertionError):
    inv.assert_normalized(good * 1.5, atol=2e-2)


def test_assert_zero_mean_filters_on_standardized_hwio_kernels():
  w = np.random.default_rng(1).normal(size=(3, 3, 4, 6)) + 0.3
  good = jnp.asarray(w - w.mean((0, 1, 2)), jnp.float32)
  bad = good.at[0, 0, 0, 5].add(0.1)  # one filter's mean moves by 0.1 / 36
  _expect(inv.assert_zero_mean_filters, good, bad, 'filter mean')
  # Dense kernels (IO) standardize over I.
  dense = jnp.asarray(w[0, 0] - w[0, 0].mean(0), jnp.float32)
  _expect(lambda k: inv.assert_zero_mean_filters(k, atol=1e-6), dense, dense + 1e-3,
          'filter mean')


def test_assert_per_sample_grad_norm_holds_after_bgn():
  x = jax.random.normal(jax.random.key(2), (6, 2, 5))
  g = jax.random.normal(jax.random.key(3), (6, 2, 5)) * jnp.logspace(-1, 3, 6)[:, None, None]
  _, vjp = jax.vjp(backward_grad_norm, x)
  good = vjp(g)[0]
  _expect(inv.assert_per_sample_grad_norm, good, g, 'per_sample gradient norm is not the target')
  _expect(lambda g: inv.assert_per_sample_grad_norm(g, 'unit', mode='per_batch'),
          g / jnp.linalg.norm(g), g, 'per_batch gradient norm')
  with_zero = good.at[1].set(0.0)
  inv.assert_per_sample_grad_norm(with_zero, allow_zero=True)
  with pytest.raises(AssertionError):
    inv.assert_per_sample_grad_norm(with_zero)


def test_assert_finite_on_trees():
  good = {'w': jnp.ones((2, 3)), 'b': [jnp.zeros(3), jnp.arange(4.0)]}
  bad = {'w': jnp.ones((2, 3)).at[1, 1].set(jnp.nan), 'b': [jnp.zeros(3), jnp.arange(4.0)]}
  _expect(inv.assert_finite, good, bad, 'NaN or inf')
  with pytest.raises(AssertionError):
    inv.assert_finite(jnp.array([1.0, jnp.inf]))


def test_shape_checks_raise_at_trace_time():
  x, k = jnp.ones((2, 4, 4, 3)), jnp.ones((3, 3, 3, 8))
  inv.assert_nhwc(x, channels=3)
  inv.assert_hwio(k, in_features=3, out_features=8)
  jax.jit(lambda x, k: (inv.assert_nhwc(x, channels=3), inv.assert_hwio(k, in_features=3))[0])(
      x, k)
  with pytest.raises(AssertionError, match='assert_nhwc'):
    jax.jit(lambda x: inv.assert_nhwc(x))(jnp.ones((2, 3)))
  with pytest.raises(AssertionError, match='channel count'):
    inv.assert_nhwc(x, channels=4)
  with pytest.raises(AssertionError, match='output features'):
    inv.assert_hwio(k, out_features=4)
  with pytest.raises(AssertionError, match='input features'):
    jax.jit(lambda k: inv.assert_hwio(k, in_features=5))(k)


def test_value_checks_under_plain_jit_ask_for_chexify():
  with pytest.raises(RuntimeError, match='chexify'):
    jax.jit(lambda x: inv.assert_finite(x))(jnp.ones(3))


@pytest.mark.parametrize('call, exc, match', [
    (lambda: inv.assert_normalized(jnp.ones((4, 3), jnp.int32)), TypeError, 'floating-point'),
    (lambda: inv.assert_normalized(jnp.ones((4, 3)), axes=2), ValueError, '`axes`'),
    (lambda: inv.assert_zero_mean_filters(jnp.ones(3)), ValueError, 'rank >= 2'),
    (lambda: inv.assert_per_sample_grad_norm(jnp.ones((2, 3)), 'rms'), ValueError, '`target`'),
    (lambda: inv.assert_per_sample_grad_norm(jnp.ones(3)), ValueError, 'rank >= 2'),
])
def test_bad_arguments_raise_clear_errors(call, exc, match):
  with pytest.raises(exc, match=f'^jaxnorm.invariants.assert_.*{match}'):
    call()
