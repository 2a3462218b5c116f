"""The PWS "shift" statistic Var_o(n mean(W_o)) against numpy and on standardized kernels."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnorm.diagnostics.weights import shift_statistic


def test_shift_statistic_matches_numpy_definition():
  k = np.random.default_rng(0).standard_normal((3, 3, 4, 6)).astype(np.float32) + 0.1
  n = 3 * 3 * 4
  expected = np.var(n * k.reshape(n, 6).mean(0))
  assert float(shift_statistic(jnp.asarray(k))) == pytest.approx(expected, rel=1e-5)


def test_shift_statistic_of_a_filter_offset_is_n_squared_times_its_variance():
  """Adding offsets c_o to every entry of filter o shifts n*mean by n*c_o."""
  offsets = jnp.array([0.0, 1.0, -1.0, 2.0])
  k = jnp.zeros((2, 2, 3, 4)) + offsets
  assert float(shift_statistic(k)) == pytest.approx(float(jnp.var(12 * offsets)), rel=1e-6)


@pytest.mark.parametrize('method', ['pws', 'ws', 'scaled_ws'])
def test_shift_statistic_of_a_standardized_kernel_is_zero(method):
  ks = pytest.importorskip('jaxnorm.functional._kernel_standardization')
  raw = jax.random.normal(jax.random.key(0), (3, 3, 16, 8)) * 0.05 + jnp.linspace(-0.3, 0.3, 8)
  assert float(shift_statistic(raw)) > 1.0
  std = ks.standardize_kernel(raw, method)
  # Zero up to float32 rounding: the equivalent per-entry filter offset sqrt(shift)/n is below
  # 1e-6 of the kernel's rms entry (it is ~0.1 of it for the raw kernel).
  n = 3 * 3 * 16
  offset = np.sqrt(float(shift_statistic(std))) / n
  assert offset < 1e-6 * float(jnp.sqrt(jnp.mean(std ** 2)))


def test_shift_statistic_rejects_bad_kernels():
  with pytest.raises(ValueError, match='kernel'):
    shift_statistic(jnp.ones((5,)))
  with pytest.raises(TypeError, match='kernel'):
    shift_statistic(jnp.ones((2, 2), jnp.int32))
