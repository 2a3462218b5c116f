"""The PWS "shift" statistic, the all-ones component, effective kernels: against numpy."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxnorm.linen as jnl
from jaxnorm.diagnostics.weights import (
  all_ones_component,
  all_ones_fraction,
  effective_kernels,
  filter_mean_statistics,
  shift_statistic,
)


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


# -- The all-ones component and its share of the filter -------------------------------------------

def test_all_ones_component_and_fraction_match_numpy():
  k = np.random.default_rng(1).standard_normal((3, 3, 5, 7)).astype(np.float32) + 0.2
  w = k.reshape(-1, 7).astype(np.float64)
  n = w.shape[0]
  comp = w.sum(0) / np.sqrt(n)
  np.testing.assert_allclose(all_ones_component(jnp.asarray(k)), comp, rtol=1e-5)
  np.testing.assert_allclose(all_ones_fraction(jnp.asarray(k)),
                             np.abs(comp) / np.linalg.norm(w, axis=0), rtol=1e-5)
  # The shift is n times the variance of the component over filters.
  assert float(shift_statistic(jnp.asarray(k))) == pytest.approx(n * np.var(comp), rel=1e-5)


def test_all_ones_fraction_is_one_for_constant_and_zero_for_centred_or_zero_filters():
  k = np.zeros((2, 2, 3, 3), np.float32)
  k[..., 0] = 0.7                                               # constant filter
  k[..., 1] = np.arange(12, dtype=np.float32).reshape(2, 2, 3) - 5.5  # mean 0
  frac = np.asarray(all_ones_fraction(jnp.asarray(k)))          # filter 2 is all zeros
  np.testing.assert_allclose(frac, [1.0, 0.0, 0.0], atol=1e-6)


def test_all_ones_helpers_reject_bad_kernels():
  for fn in (all_ones_component, all_ones_fraction):
    with pytest.raises(ValueError, match=f'{fn.__name__}: argument `kernel`'):
      fn(jnp.ones((4,)))
    with pytest.raises(TypeError, match='kernel'):
      fn(jnp.ones((2, 2), jnp.int32))


# -- Effective kernels of a model ------------------------------------------------------------------

class _TwoConvs(nn.Module):
  """A PWS conv and a plain conv, then a classifier: the layers of a PWS / plain network."""

  @nn.compact
  def __call__(self, x, train: bool = True):
    del train
    x = jnl.PWSConv(6, (3, 3), gamma=1e-3, name='pws')(x)
    x = jnl.Conv(5, (3, 3), name='plain')(jax.nn.relu(x))
    return nn.Dense(4, name='head')(jax.nn.relu(x).mean((1, 2)))


def _numpy_pws(kernel, alpha, gamma):
  w = np.asarray(kernel, np.float64).reshape(-1, kernel.shape[-1])
  n = w.shape[0]
  mu, var = w.mean(0), w.var(0)
  out = np.sqrt(2.0 / n) * np.asarray(alpha, np.float64) * (w - mu) / np.sqrt(var + gamma)
  return out.reshape(kernel.shape)


def _init(model, x):
  variables = model.init(jax.random.key(0), x)
  # Move the PWS alpha off its init and the kernels' means off zero, so nothing is trivial.
  params = jax.tree.map(lambda a: a, dict(variables['params']))
  params['pws'] = dict(params['pws'], alpha=jnp.linspace(0.5, 1.5, 6),
                       kernel=params['pws']['kernel'] + 0.05 * jnp.arange(6.0))
  params['plain'] = dict(params['plain'], kernel=params['plain']['kernel'] + 0.1)
  return {'params': params}


def test_effective_kernels_are_the_standardized_kernel_for_pws_and_the_raw_one_for_a_plain_conv():
  x = jax.random.normal(jax.random.key(1), (4, 6, 6, 3))
  model = _TwoConvs()
  variables = _init(model, x)
  kernels = effective_kernels(model, variables, x)
  assert set(kernels) == {'pws', 'plain'}  # the Dense head is not a conv layer
  p = variables['params']
  np.testing.assert_allclose(kernels['pws'], _numpy_pws(p['pws']['kernel'], p['pws']['alpha'],
                                                        1e-3), rtol=1e-5, atol=1e-7)
  np.testing.assert_array_equal(kernels['plain'], p['plain']['kernel'])


def test_effective_kernels_split_scanned_blocks_into_one_entry_per_layer():
  from jaxnorm.models.pws_nets import pws_net

  x = jax.random.normal(jax.random.key(2), (2, 8, 8, 1))
  model = pws_net((3,), 4, scan=True)  # block_0, then 2 scanned blocks
  variables = model.init(jax.random.key(0), x)
  kernels = effective_kernels(model, variables, x, train=False)
  scanned = variables['params']['stage_0']['scanned_blocks']['conv_0']
  assert scanned['kernel'].shape == (2, 3, 3, 4, 4)
  for i in range(2):
    np.testing.assert_allclose(
        kernels[f'stage_0/scanned_blocks/conv_0[{i}]'],
        _numpy_pws(scanned['kernel'][i], scanned['alpha'][i], 1e-3), rtol=1e-5, atol=1e-7)
  assert len(kernels) == 1 + 3 * 2  # the stem and two convs per block


def test_effective_kernels_need_a_model_with_jaxnorm_convs():
  model = nn.Dense(3)
  x = jnp.ones((2, 4))
  with pytest.raises(ValueError, match='effective_kernels: argument `model`'):
    effective_kernels(model, model.init(jax.random.key(0), x), x)


# -- Shift and average gradient per layer ----------------------------------------------------------

def test_filter_mean_statistics_match_numpy_on_the_kernels_and_the_gradient():
  x = jax.nn.relu(jax.random.normal(jax.random.key(3), (8, 6, 6, 3))) + 0.5
  labels = jnp.arange(8) % 4
  model = _TwoConvs()
  variables = _init(model, x)
  stats = filter_mean_statistics(model, variables, x, labels)
  assert set(stats) == {'pws', 'plain'}

  def loss(params):
    logits = model.apply({'params': params}, x)
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(logp[jnp.arange(8), labels])

  grads = jax.grad(loss)(variables['params'])
  p = variables['params']

  def np_shift(k):
    w = np.asarray(k, np.float64).reshape(-1, k.shape[-1])
    return np.var(w.shape[0] * w.mean(0))

  def np_fraction_rms(g):
    w = np.asarray(g, np.float64).reshape(-1, g.shape[-1])
    f = np.abs(w.sum(0)) / (np.sqrt(w.shape[0]) * np.linalg.norm(w, axis=0))
    return np.sqrt(np.mean(f ** 2))

  eff = _numpy_pws(p['pws']['kernel'], p['pws']['alpha'], 1e-3)
  assert stats['pws']['fan_in'] == 27 and stats['plain']['fan_in'] == 54
  assert stats['pws']['raw_shift'] == pytest.approx(np_shift(p['pws']['kernel']), rel=1e-4)
  assert stats['plain']['shift'] == pytest.approx(np_shift(p['plain']['kernel']), rel=1e-4)
  assert stats['plain']['shift'] == stats['plain']['raw_shift']
  assert stats['plain']['grad_all_ones'] == pytest.approx(np_fraction_rms(grads['plain']['kernel']),
                                                          rel=1e-4)
  assert stats['plain']['grad_shift'] == pytest.approx(np_shift(grads['plain']['kernel']),
                                                       rel=1e-4)
  # PWS: the kernel it applies is centred (numpy: exactly) and its raw gradient has no
  # all-ones component, both to float32 rounding, while the plain conv's are large.
  assert np_shift(eff) < 1e-20
  assert stats['pws']['shift'] < 1e-10 * stats['plain']['shift']
  assert stats['pws']['grad_all_ones'] < 1e-5 < 0.1 < stats['plain']['grad_all_ones']
