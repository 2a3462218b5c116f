"""Tests for jaxnorm.functional.kernel_standardization against numpy and the papers' identities."""

from __future__ import annotations

import re
import warnings

import chex
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnorm.functional._kernel_standardization import (
    check_fan_in,
    check_stabilizer,
    pws_fan,
    pws_init_alpha,
    standardize_kernel,
)


def numpy_standardize(w, method, *, eps=None, scale=None, gamma=1e-5, mode='fan_in', equiv=False):
  """Independent float64 numpy version of the four formulas (WS, Scaled WS, PWS)."""
  w = np.asarray(w, np.float64)
  cout = w.shape[-1]
  flat = w.reshape(-1, cout)  # (n, Cout): one column per filter
  n = flat.shape[0]
  mu = flat.mean(0)
  c = flat - mu
  if method == 'ws':
    out = c / np.sqrt(flat.var(0) + (1e-5 if eps is None else eps))
  elif method == 'ws_std':
    out = c / (flat.std(0, ddof=1) + (1e-5 if eps is None else eps))
  elif method == 'scaled_ws':
    out = c / np.sqrt(np.maximum(n * flat.var(0), 1e-4 if eps is None else eps))
  else:
    fan = n if mode == 'fan_in' else n // w.shape[-2] * cout
    g = gamma * 2 / fan if equiv else gamma
    out = np.sqrt(2 / fan) * c / np.sqrt(flat.var(0) + g)
  if scale is not None:
    out = out * np.asarray(scale, np.float64)
  return out.reshape(w.shape)


def _kernel(shape, seed=0, std=1.0, offset=0.0):
  return np.random.default_rng(seed).normal(offset, std, size=shape).astype(np.float32)


@pytest.mark.parametrize('method,kwargs', [
    ('ws', {}), ('ws', dict(eps=1e-3)), ('ws_std', {}), ('scaled_ws', {}),
    ('pws', {}), ('pws', dict(gamma=1e-3, mode='fan_out')), ('pws', dict(gamma=0.1, equiv=True)),
])
def test_matches_numpy_reference(method, kwargs):
  w = _kernel((3, 3, 8, 5), std=0.1)
  scale = np.linspace(0.5, 2.0, 5).astype(np.float32)
  for s in (None, scale):
    got = jax.jit(lambda w, s=s: standardize_kernel(w, method, scale=s, **kwargs))(w)
    np.testing.assert_allclose(got, numpy_standardize(w, method, scale=s, **kwargs),
                               rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize('method', ['ws', 'ws_std', 'scaled_ws', 'pws'])
def test_filter_mean_is_zero_even_with_large_offset(method):
  # A common offset of 1e4 keeps exact statistics (centred two-pass variance).
  w = _kernel((3, 3, 16, 4), std=0.05, offset=1e4)
  got = np.asarray(standardize_kernel(w, method), np.float64)
  want = numpy_standardize(w, method)
  np.testing.assert_allclose(got.reshape(-1, 4).mean(0), 0.0, atol=1e-6)
  np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)
  assert np.all(np.isfinite(got))


@pytest.mark.parametrize('fan_in,gamma,expected', [
    (147, 1e-3, 0.93), (576, 1e-3, 0.78), (4608, 1e-3, 0.30), (4608, 1e-4, 0.81),
    (4608, 1e-5, 0.98), (576, 1e-4, 0.97)])
def test_pws_sum_of_squares_reproduces_papers_table(fan_in, gamma, expected):
  # He-initialized kernel: sigma^2 = 2 / fan_in. Per-filter sum of squares of PWS is
  # 2 alpha^2 sigma^2 / (sigma^2 + gamma) (He value: 2); the PWS paper lists its ratio to 2.
  cin = fan_in // 9 if fan_in % 9 == 0 else fan_in // 49 if fan_in % 49 == 0 else fan_in
  k = int(round(np.sqrt(fan_in // cin)))
  w = _kernel((k, k, cin, 8), seed=fan_in, std=np.sqrt(2 / fan_in))
  alpha = np.full(8, 1.5, np.float32)
  out = np.asarray(standardize_kernel(w, 'pws', gamma=gamma, scale=alpha), np.float64)
  ss = np.sum(out.reshape(-1, 8) ** 2, axis=0)
  sigma2 = w.astype(np.float64).reshape(-1, 8).var(0)
  np.testing.assert_allclose(ss, 2 * alpha ** 2 * sigma2 / (sigma2 + gamma), rtol=1e-4)
  ratio = ss / (2 * alpha ** 2)
  np.testing.assert_allclose(ratio.mean(), expected, atol=0.015)


def test_pws_equiv_gives_depth_independent_gain():
  # equiv: gamma -> gamma * 2 / fan; with gamma = 0.1 and He init the ratio is 1 / 1.1 = 0.909.
  for shape in [(7, 7, 3, 32), (3, 3, 64, 32), (3, 3, 512, 32)]:
    fan = np.prod(shape[:-1])
    w = _kernel(shape, std=np.sqrt(2 / fan))
    out = np.asarray(standardize_kernel(w, 'pws', gamma=0.1, equiv=True), np.float64)
    ratio = np.sum(out.reshape(-1, 32) ** 2, 0) / 2
    sigma2 = w.astype(np.float64).reshape(-1, 32).var(0)
    np.testing.assert_allclose(ratio, sigma2 / (sigma2 + 0.2 / fan), rtol=1e-4)
    np.testing.assert_allclose(ratio.mean(), 1 / 1.1, atol=0.01)


def test_pws_fan_modes():
  assert pws_fan((3, 3, 16, 32), 'fan_in') == 144
  assert pws_fan((3, 3, 16, 32), 'fan_out') == 288


def test_scaled_ws_sum_of_squares_is_gain_squared():
  w = _kernel((3, 3, 32, 6), std=0.2)
  gain = np.array([0.5, 1.0, 1.5, 2.0, 0.1, 3.0], np.float32)
  out = np.asarray(standardize_kernel(w, 'scaled_ws', scale=gain), np.float64)
  np.testing.assert_allclose(np.sum(out.reshape(-1, 6) ** 2, 0), gain ** 2, rtol=1e-5)


def test_ws_std_differs_from_ws_by_bessel_factor():
  # ws: (W-mu)/sqrt(var_b + eps); ws_std: (W-mu)/(std_u + eps) with std_u = sqrt(n/(n-1) var_b).
  w = _kernel((1, 1, 4, 3))  # n = 4: Bessel factor sqrt(4/3) is large
  ws = np.asarray(standardize_kernel(w, 'ws', eps=0.0), np.float64)
  ws_std = np.asarray(standardize_kernel(w, 'ws_std', eps=0.0), np.float64)
  np.testing.assert_allclose(ws / ws_std, np.sqrt(4 / 3), rtol=1e-5)
  # With eps: inside the sqrt of the variance vs added to the std.
  small = _kernel((1, 1, 4, 3), std=1e-3)
  a = np.asarray(standardize_kernel(small, 'ws'), np.float64)
  b = np.asarray(standardize_kernel(small, 'ws_std'), np.float64)
  np.testing.assert_allclose(a, numpy_standardize(small, 'ws'), rtol=1e-4)
  np.testing.assert_allclose(b, numpy_standardize(small, 'ws_std'), rtol=1e-4)
  assert not np.allclose(a, b, rtol=0.05)


@pytest.mark.parametrize('method', ['ws', 'ws_std', 'scaled_ws', 'pws'])
def test_kernel_gradient_orthogonal_to_ones_per_filter(method):
  # The average-gradient component of each filter is projected out (Liu et al. 2021).
  w = _kernel((3, 3, 4, 5), std=0.3)
  target = _kernel((3, 3, 4, 5), seed=1)
  loss = lambda w: jnp.sum(jnp.sin(standardize_kernel(w, method) * 3.0) * target)
  g = np.asarray(jax.jit(jax.grad(loss))(w), np.float64).reshape(-1, 5)
  np.testing.assert_allclose(g.sum(0), 0.0, atol=1e-5 * np.abs(g).sum(0).max())
  assert np.abs(g).max() > 1e-2


def test_constant_filter_has_finite_output_and_gradient():
  w = jnp.zeros((3, 3, 2, 2))
  for method in ('ws', 'ws_std', 'scaled_ws', 'pws'):
    out, g = jax.value_and_grad(lambda w, m=method: jnp.sum(standardize_kernel(w, m) ** 2))(w)
    assert np.isfinite(out) and np.all(np.isfinite(g)), method


class StandardizeVariantsTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_bfloat16_kernel_uses_float32_statistics(self):
    w = _kernel((3, 3, 64, 4), std=0.05, offset=0.5)
    w16 = jnp.asarray(w, jnp.bfloat16)
    for method in ('ws', 'scaled_ws', 'pws'):
      got = self.variant(lambda w, m=method: standardize_kernel(w, m))(w16)
      assert got.dtype == jnp.bfloat16
      # Reference: the same bf16 values, standardized in float64, then rounded to bf16.
      want = numpy_standardize(np.asarray(w16, np.float64), method)
      np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-2, atol=1e-2)


@hypothesis.settings(max_examples=15, deadline=None)
@hypothesis.given(
    shape=st.sampled_from([(1, 1, 3, 2), (3, 3, 2, 4), (2, 5, 3, 1), (3, 3, 3, 3, 2), (6, 3)]),
    method=st.sampled_from(['ws', 'ws_std', 'scaled_ws', 'pws']),
    seed=st.integers(0, 1000))
def test_property_matches_numpy_over_shapes(shape, method, seed):
  w = _kernel(shape, seed=seed, std=0.5)
  np.testing.assert_allclose(standardize_kernel(w, method), numpy_standardize(w, method),
                             rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('args,kwargs,exc,match', [
    (('bn',), {}, ValueError, 'method'),
    (('pws',), dict(mode='fan_avg'), ValueError, 'mode'),
    (('pws',), dict(eps=1e-5), ValueError, 'gamma'),
    (('ws',), dict(eps=-1.0), ValueError, 'eps'),
    (('pws',), dict(scale=jnp.ones(3)), ValueError, 'scale'),
])
def test_bad_arguments_raise(args, kwargs, exc, match):
  with pytest.raises(exc, match=match):
    standardize_kernel(jnp.ones((3, 3, 2, 4)), *args, **kwargs)


def test_bad_kernels_raise():
  with pytest.raises(TypeError, match='floating'):
    standardize_kernel(jnp.ones((3, 3, 2, 4), jnp.int32), 'ws')
  with pytest.raises(ValueError, match='rank'):
    standardize_kernel(jnp.ones((4,)), 'ws')
  with pytest.raises(ValueError, match='2 entries'):
    standardize_kernel(jnp.ones((1, 1, 1, 4)), 'ws_std')


# ----------------------------------------------------------------------------------------------
# Degenerate filters, stabilizer checks, the data-dependent PWS alpha init
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize('method,kwargs', [
    ('pws', dict(gamma=0.0)), ('pws', dict(gamma=0.0, equiv=True)), ('ws', dict(eps=0.0)),
    ('ws_std', dict(eps=0.0))])
def test_zero_stabilizer_constant_filter_is_zero_with_finite_gradient(method, kwargs):
  # Filter 0 is constant (0 / 0 without a stabilizer): defined as zeros, gradient finite.
  # The other filters still match the numpy reference exactly.
  w = _kernel((3, 3, 2, 4), std=0.5)
  w[..., 0] = 0.7
  out, g = jax.jit(jax.value_and_grad(
      lambda w: jnp.sum(jnp.sin(standardize_kernel(w, method, **kwargs)))))(w)
  got = np.asarray(standardize_kernel(w, method, **kwargs))
  np.testing.assert_array_equal(got[..., 0], 0.0)
  np.testing.assert_allclose(got[..., 1:], numpy_standardize(w[..., 1:], method, **kwargs),
                             rtol=2e-5, atol=2e-6)
  assert np.isfinite(out) and np.all(np.isfinite(g))
  np.testing.assert_array_equal(np.asarray(g)[..., 0], 0.0)


@pytest.mark.parametrize('method,kwargs', [
    ('ws', {}), ('ws', dict(eps=0.0)), ('scaled_ws', {}), ('pws', {}), ('pws', dict(gamma=0.0)),
    ('pws', dict(mode='fan_out'))])
def test_single_entry_filters_are_zero_with_finite_gradient(method, kwargs):
  # fan_in 1: each filter is its own mean, so its standardized value is 0 for every stabilizer.
  w = _kernel((1, 1, 1, 3))
  out, g = jax.value_and_grad(lambda w: jnp.sum(standardize_kernel(w, method, **kwargs)))(w)
  np.testing.assert_array_equal(standardize_kernel(w, method, **kwargs), 0.0)
  assert out == 0.0
  np.testing.assert_array_equal(g, 0.0)


@pytest.mark.parametrize('method,arg,value,expected', [
    ('pws', 'gamma', float('nan'), 'a finite non-negative number'),
    ('pws', 'gamma', float('inf'), 'a finite non-negative number'),
    ('pws', 'gamma', -1e-5, 'a finite non-negative number'),
    ('ws', 'eps', float('nan'), 'a finite non-negative number'),
    ('ws_std', 'eps', float('inf'), 'a finite non-negative number'),
    ('scaled_ws', 'eps', float('nan'), 'a finite positive number'),
    ('scaled_ws', 'eps', 0.0, 'a finite positive number'),
])
def test_nan_inf_and_negative_stabilizers_raise(method, arg, value, expected):
  with pytest.raises(ValueError, match=re.escape(
      f'standardize_kernel: argument `{arg}` expected {expected}, got {value!r}.')):
    standardize_kernel(jnp.ones((3, 3, 2, 4)), method, **{arg: value})


def test_stabilizer_check_rejects_non_numbers():
  with pytest.raises(TypeError, match='`gamma` expected a finite'):
    check_stabilizer('PWSConv', 'gamma', 'small', allow_zero=True)
  check_stabilizer('PWSConv', 'gamma', np.float32(1e-3), allow_zero=True)  # concrete scalars ok


def test_check_fan_in_warns_for_single_entry_filters_and_ws_std_raises():
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    check_fan_in('WSConv', (1, 1, 2, 4), 'ws')  # fan_in 2: silent
  for method in ('ws', 'scaled_ws', 'pws'):
    with pytest.warns(UserWarning, match=r'MyConv: fan_in is 1 .*outputs only its bias'):
      check_fan_in('MyConv', (1, 1, 1, 4), method)
  with pytest.raises(ValueError, match="WSConv: argument `kernel_size` .* 'ws_std'"):
    check_fan_in('WSConv', (1, 1, 1, 4), 'ws_std')


def test_pws_init_alpha_matches_unbiased_variance_reference_without_warning():
  out = _kernel((4, 5, 5, 3), std=0.3)
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    alpha = pws_init_alpha(out, 6)
  np.testing.assert_allclose(alpha, np.full(6, np.sqrt(2 / out.astype(np.float64).var(ddof=1))),
                             rtol=1e-5)


@pytest.mark.parametrize('jit', [False, True])
@pytest.mark.parametrize('out,dtype,var', [
    (np.zeros((2, 4, 4, 3), np.float32), jnp.float32, '0.0'),           # all-zeros batch
    (np.full((2, 4, 4, 3), 5.0, np.float32), jnp.bfloat16, '0.0'),      # constant output
    (np.array([0.0, 1e-6, 0.0, 1e-6], np.float32), jnp.float16, '3.3'),  # alpha overflows fp16
    (np.array([0.0, np.nan], np.float32), jnp.float32, 'nan'),
])
def test_pws_init_alpha_falls_back_to_one_and_warns_eager_and_jitted(out, dtype, var, jit):
  init = jax.jit(pws_init_alpha, static_argnums=(1, 2)) if jit else pws_init_alpha
  with pytest.warns(UserWarning, match=rf'PWSConv: init_alpha: .* variance {var}.*falls back '
                    r'to its default 1\.0'):
    alpha = init(out, 5, dtype)
    jax.effects_barrier()  # the jitted warning comes from jax.debug.callback
  assert alpha.dtype == dtype and alpha.shape == (5,)
  np.testing.assert_array_equal(np.asarray(alpha, np.float32), 1.0)


def test_pws_init_alpha_needs_two_entries():
  with pytest.raises(ValueError, match='PWSConv: argument `inputs` .* >= 2 entries for init_alpha'):
    pws_init_alpha(jnp.ones((1, 1, 1, 1)), 1)
