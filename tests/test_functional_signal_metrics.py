"""Tests of jaxnorm.functional.signal_metrics against numpy."""

from __future__ import annotations

import chex
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from jaxnorm.functional._signal_metrics import SignalMetrics, signal_metrics


def _np_metrics(x):
  x = np.asarray(x, np.float64)
  axes = tuple(range(x.ndim - 1))
  return np.mean(np.mean(x, axis=axes) ** 2), np.mean(np.var(x, axis=axes))


class SignalMetricsTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(((8, 5),), ((4, 3, 3, 6),), ((2, 3, 4, 5, 2),))
  def test_matches_numpy_per_channel_statistics(self, shape):
    rng = np.random.default_rng(0)
    # Channel c has mean c and std (c + 1) / 2: both metrics are far from any default value.
    c = np.arange(shape[-1])
    x = rng.normal(size=shape) * (c + 1) / 2 + c
    got = self.variant(signal_metrics)(jnp.asarray(x, jnp.float32))
    assert isinstance(got, SignalMetrics)
    assert got.avg_sq_mean.dtype == jnp.float32 and got.avg_var.dtype == jnp.float32
    ref_sq_mean, ref_var = _np_metrics(x)
    np.testing.assert_allclose(got.avg_sq_mean, ref_sq_mean, rtol=1e-5)
    np.testing.assert_allclose(got.avg_var, ref_var, rtol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  def test_bfloat16_input_gives_float32_metrics(self):
    x = jnp.asarray(np.random.default_rng(1).normal(size=(16, 4, 4, 8)) + 3.0, jnp.bfloat16)
    got = self.variant(signal_metrics)(x)
    assert got.avg_var.dtype == jnp.float32
    ref_sq_mean, ref_var = _np_metrics(np.asarray(x, np.float32))
    np.testing.assert_allclose(got.avg_sq_mean, ref_sq_mean, rtol=1e-5)
    np.testing.assert_allclose(got.avg_var, ref_var, rtol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  def test_large_common_offset_keeps_the_variance_exact(self):
    # A centred two-pass variance survives an offset of 1e4 (E[x^2] - E[x]^2 would not).
    base = np.random.default_rng(2).normal(size=(64, 4))
    got = self.variant(signal_metrics)(jnp.asarray(base + 1e4, jnp.float32))
    _, ref_var = _np_metrics(np.asarray(np.float32(base + 1e4), np.float64))
    np.testing.assert_allclose(got.avg_var, ref_var, rtol=1e-3)


@pytest.mark.parametrize('x, exc, match', [
    (jnp.ones((4, 3), jnp.int32), TypeError, 'floating-point'),
    (jnp.ones((4,)), ValueError, 'rank >= 2'),
    (jnp.ones(()), ValueError, 'rank >= 2'),
])
def test_bad_input_raises_a_clear_error(x, exc, match):
  with pytest.raises(exc, match=f'signal_metrics: argument `x` expected .*{match}'):
    signal_metrics(x)
