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


# ----------------------------------------------------------------------------------------------
# The closed-form derivative (custom_jvp) against autodiff of an independent jnp reference
# ----------------------------------------------------------------------------------------------

METHOD_CASES = [('ws', {}), ('ws', dict(eps=1e-2)), ('ws_std', {}), ('scaled_ws', {}),
                ('scaled_ws', dict(eps=1e-3)), ('pws', dict(gamma=1e-3)),
                ('pws', dict(gamma=1e-2, mode='fan_out', equiv=True))]
METHOD_IDS = ['ws', 'ws-eps', 'ws_std', 'scaled_ws', 'scaled_ws-eps', 'pws', 'pws-fan_out-equiv']


def jnp_reference(w, method, *, eps=None, scale=None, gamma=1e-5, mode='fan_in', equiv=False):
  """The four formulas in plain jnp (no shift, no safe branches), differentiated by autodiff.

  Written from the papers' equations, independently of the module: one column per filter, the
  mean and (biased / unbiased) variance of each column, the method's divisor, the scale.
  """
  shape = w.shape
  cout = shape[-1]
  flat = w.reshape(-1, cout)
  n = flat.shape[0]
  c = flat - jnp.mean(flat, axis=0)
  var = jnp.mean(c * c, axis=0)
  if method == 'ws':
    out = c / jnp.sqrt(var + (1e-5 if eps is None else eps))
  elif method == 'ws_std':
    out = c / (jnp.sqrt(var * n / (n - 1)) + (1e-5 if eps is None else eps))
  elif method == 'scaled_ws':
    out = c / jnp.sqrt(jnp.maximum(n * var, 1e-4 if eps is None else eps))
  else:
    fan = n if mode == 'fan_in' else n // shape[-2] * cout
    g = gamma * 2 / fan if equiv else gamma
    out = jnp.sqrt(2.0 / fan) * c / jnp.sqrt(var + g)
  if scale is not None:
    out = out * scale
  return out.reshape(shape)


def _loss(standardize, target):
  """A loss with a generic (non-constant) cotangent: sum(sin(3 W_hat) * target)."""
  return lambda w, s: jnp.sum(jnp.sin(3.0 * standardize(w, s).astype(target.dtype)) * target)


def _relative_error(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return np.linalg.norm(got - want) / np.linalg.norm(want)


@pytest.mark.parametrize('dtype,tol', [(jnp.float32, 1e-5), (jnp.float64, 1e-12),
                                       (jnp.bfloat16, 3e-2)], ids=['f32', 'f64', 'bf16'])
@pytest.mark.parametrize('with_scale', [False, True], ids=['no_scale', 'scale'])
@pytest.mark.parametrize('method,kwargs', METHOD_CASES, ids=METHOD_IDS)
def test_closed_form_gradient_equals_autodiff_of_float64_reference(method, kwargs, with_scale,
                                                                   dtype, tol):
  # The same kernel values (rounded to `dtype`), the reference differentiated in float64. In
  # bfloat16 the error is the rounding of the bf16 output fed to the loss (the autodiff path's
  # error is the same, to 4 digits); statistics and the closed form run in float32.
  with jax.enable_x64(True):
    w = jnp.asarray(_kernel((3, 3, 4, 6), std=0.3, offset=0.2), dtype)
    s = jnp.asarray(np.linspace(0.5, 2.0, 6), dtype) if with_scale else None
    target = jnp.asarray(_kernel((3, 3, 4, 6), seed=1), jnp.float64)
    ours = _loss(lambda w, s: standardize_kernel(w, method, scale=s, **kwargs), target)
    ref = _loss(lambda w, s: jnp_reference(w, method, scale=s, **kwargs), target)
    argnums = (0, 1) if with_scale else 0
    got = jax.jit(jax.grad(ours, argnums))(w, s)
    w64 = w.astype(jnp.float64)
    s64 = None if s is None else s.astype(jnp.float64)
    want = jax.grad(ref, argnums)(w64, s64)
  for g, ww, x in zip(jax.tree.leaves(got), jax.tree.leaves(want), jax.tree.leaves((w, s)),
                      strict=True):
    assert g.dtype == x.dtype and g.shape == x.shape
    assert _relative_error(g, ww) < tol


@pytest.mark.parametrize('with_scale', [False, True], ids=['no_scale', 'scale'])
@pytest.mark.parametrize('method,kwargs', METHOD_CASES, ids=METHOD_IDS)
def test_second_derivatives_pass_numerical_check_in_both_modes(method, kwargs, with_scale):
  # check_grads(order=2, modes=fwd and rev): jvp of jvp, vjp of vjp and their mixtures, each
  # against finite differences (float64). custom_jvp keeps forward mode available.
  with jax.enable_x64(True):
    w = jnp.asarray(_kernel((2, 2, 3, 4), std=0.5, offset=0.3), jnp.float64)
    s = jnp.asarray([0.5, 1.0, 1.5, 2.0], jnp.float64)
    target = jnp.asarray(_kernel((2, 2, 3, 4), seed=3), jnp.float64)
    if with_scale:
      f = _loss(lambda w, s: standardize_kernel(w, method, scale=s, **kwargs), target)
      args = (w, s)
    else:
      f = lambda w: _loss(lambda w, s: standardize_kernel(w, method, **kwargs), target)(w, None)
      args = (w,)
    # Central differences with step 1e-5: truncation error ~1e-10, far below the tolerance.
    jax.test_util.check_grads(f, args, order=2, modes=('fwd', 'rev'), atol=1e-5, rtol=1e-5,
                              eps=1e-5)


@pytest.mark.parametrize('method,kwargs', METHOD_CASES, ids=METHOD_IDS)
def test_grad_of_grad_and_hessian_equal_the_reference(method, kwargs):
  # Reverse over reverse (grad of a function of the gradient) and forward over reverse
  # (jax.hessian), w.r.t. the kernel and the scale, equal those of the autodiff reference.
  with jax.enable_x64(True):
    w = jnp.asarray(_kernel((3, 1, 3, 4), std=0.4, offset=-0.1), jnp.float64)
    s = jnp.asarray([0.7, 1.0, 1.3, 2.0], jnp.float64)
    target = jnp.asarray(_kernel((3, 1, 3, 4), seed=5), jnp.float64)
    probe = jnp.asarray(_kernel((3, 1, 3, 4), seed=6), jnp.float64)

    def second_derivatives(standardize):
      loss = _loss(lambda w, s: standardize(w, method, scale=s, **kwargs), target)
      # A scalar of the gradient, differentiated again (Hessian-vector products).
      of_grad = lambda w, s: (jnp.sum(jax.grad(loss, 0)(w, s) * probe)
                              + jnp.sum(jax.grad(loss, 1)(w, s) ** 2))
      return jax.grad(of_grad, (0, 1))(w, s), jax.hessian(loss, (0, 1))(w, s)

    got = jax.jit(lambda: second_derivatives(standardize_kernel))()
    want = second_derivatives(jnp_reference)
  for g, ww in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(g, ww, rtol=1e-9, atol=1e-9 * np.abs(ww).max())


@pytest.mark.parametrize('with_scale', [False, True], ids=['no_scale', 'scale'])
@pytest.mark.parametrize('method,kwargs', METHOD_CASES, ids=METHOD_IDS)
def test_closed_form_and_autodiff_paths_agree_in_value_jvp_and_gradient(method, kwargs,
                                                                        with_scale):
  w = _kernel((3, 3, 5, 4), std=0.2, offset=0.1)
  s = np.array([0.5, 1.0, 2.0, -1.0], np.float32) if with_scale else None
  dw = _kernel((3, 3, 5, 4), seed=7)
  target = jnp.asarray(_kernel((3, 3, 5, 4), seed=8))
  out = {}
  for cf in (True, False):
    f = lambda w, cf=cf: standardize_kernel(w, method, scale=s, closed_form_backward=cf, **kwargs)
    value, tangent = jax.jvp(f, (w,), (dw,))  # forward mode works with the closed form
    grad = jax.grad(lambda w, f=f: jnp.sum(jnp.sin(3 * f(w)) * target))(w)
    out[cf] = (value, tangent, grad)
  for a, b in zip(out[True], out[False], strict=True):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5 * np.abs(np.asarray(b)).max())


@pytest.mark.parametrize('with_scale', [False, True], ids=['no_scale', 'scale'])
@pytest.mark.parametrize('method', ['ws', 'ws_std', 'scaled_ws', 'pws'])
def test_average_gradient_is_projected_out_of_every_filter(method, with_scale):
  # Liu et al. 2021's "average gradient": each filter's gradient sums to zero (it is
  # orthogonal to the filter's all-ones direction), the scale's is not constrained. Also at
  # a large common offset, where the float32 statistics rely on the shift.
  for offset in (0.0, 1e4):
    w = _kernel((3, 3, 8, 5), std=0.05, offset=offset)
    s = np.linspace(0.5, 2.0, 5).astype(np.float32) if with_scale else None
    target = jnp.asarray(_kernel((3, 3, 8, 5), seed=2))
    loss = lambda w, s, target: jnp.sum(jnp.sin(3.0 * standardize_kernel(w, method, scale=s))
                                        * target)
    g = jax.jit(jax.grad(loss))(w, s, target)
    g = np.asarray(g, np.float64).reshape(-1, 5)
    assert np.abs(g).max() > 1e-2
    np.testing.assert_allclose(g.sum(0), 0.0, atol=1e-5 * np.abs(g).sum(0).max())


@pytest.mark.parametrize('method', ['ws', 'ws_std', 'scaled_ws', 'pws'])
def test_gradient_at_large_common_offset_equals_float64_reference(method):
  # 1e4 + N(0, 0.05^2): float32 values with ulp 1e-3. The shifted statistics keep the float32
  # gradient at the float64 reference of the same values (no loss to the offset).
  w = _kernel((3, 3, 16, 4), std=0.05, offset=1e4)
  target = _kernel((3, 3, 16, 4), seed=4)
  got = jax.grad(lambda w: jnp.sum(standardize_kernel(w, method) ** 3 * target))(w)
  with jax.enable_x64(True):
    want = jax.grad(lambda w: jnp.sum(jnp_reference(w, method) ** 3 * target))(
        jnp.asarray(w, jnp.float64))
  assert np.all(np.isfinite(got))
  assert _relative_error(got, want) < 1e-3


@pytest.mark.parametrize('closed_form', [True, False], ids=['closed_form', 'autodiff'])
@pytest.mark.parametrize('method,kwargs', [
    ('pws', dict(gamma=0.0)), ('pws', dict(gamma=0.0, equiv=True)), ('ws', dict(eps=0.0)),
    ('ws_std', dict(eps=0.0))])
def test_zero_divisor_filter_has_zero_finite_first_and_second_derivatives(method, kwargs,
                                                                          closed_form):
  # Filter 0 is constant with a zero stabilizer (0 / 0): its value, gradient and Hessian
  # entries are 0, finite; the scale's gradient there is 0 too.
  w = _kernel((2, 2, 2, 3), std=0.5)
  w[..., 0] = 0.7
  s = np.array([1.5, 0.5, 2.0], np.float32)
  target = jnp.asarray(_kernel((2, 2, 2, 3), seed=1))
  f = lambda w, s: jnp.sum(jnp.sin(standardize_kernel(w, method, scale=s,
                                                      closed_form_backward=closed_form,
                                                      **kwargs)) * target)
  gw, gs = jax.jit(jax.grad(f, (0, 1)))(w, s)
  hw = jax.jit(jax.hessian(lambda w: f(w, s)))(w)
  for x in (gw, gs, hw):
    assert np.all(np.isfinite(x))
  np.testing.assert_array_equal(np.asarray(gw)[..., 0], 0.0)
  assert gs[0] == 0.0
  np.testing.assert_array_equal(np.asarray(hw)[..., 0, :, :, :, :], 0.0)


@pytest.mark.parametrize('closed_form', [True, False], ids=['closed_form', 'autodiff'])
@pytest.mark.parametrize('method,kwargs', [
    ('ws', {}), ('ws', dict(eps=0.0)), ('scaled_ws', {}), ('pws', {}), ('pws', dict(gamma=0.0))])
def test_single_entry_filters_have_zero_finite_first_and_second_derivatives(method, kwargs,
                                                                            closed_form):
  w = _kernel((1, 1, 1, 3))
  s = np.array([1.5, 0.5, 2.0], np.float32)
  f = lambda w, s: jnp.sum(jnp.sin(standardize_kernel(w, method, scale=s,
                                                      closed_form_backward=closed_form,
                                                      **kwargs)) + w)
  gw, gs = jax.grad(f, (0, 1))(w, s)
  hw = jax.hessian(lambda w: f(w, s))(w)
  np.testing.assert_array_equal(gw, 1.0)  # only the `+ w` term: the standardized part is 0
  np.testing.assert_array_equal(gs, 0.0)
  np.testing.assert_array_equal(hw, 0.0)


def test_scaled_ws_clamped_filter_gradient_is_the_plain_projection():
  # n var <= eps: the divisor is the constant sqrt(eps), so the standardization is the linear
  # map W -> (W - mean W) / sqrt(eps): its gradient is the projected cotangent, second
  # derivative 0 (the clamped branch does not depend on the filter).
  w = _kernel((3, 3, 2, 3), std=1e-4)  # n var = 18e-8 < eps = 1e-4
  target = _kernel((3, 3, 2, 3), seed=9)
  f = lambda w: jnp.sum(standardize_kernel(w, 'scaled_ws') * target)
  g = np.asarray(jax.grad(f)(w), np.float64).reshape(-1, 3)
  t = target.astype(np.float64).reshape(-1, 3)
  np.testing.assert_allclose(g, (t - t.mean(0)) / np.sqrt(1e-4), rtol=1e-5)
  np.testing.assert_allclose(jax.hessian(f)(w), 0.0, atol=1e-6)
  # The same, in float64, against the reference's jnp.maximum branch.
  with jax.enable_x64(True):
    w64 = jnp.asarray(w, jnp.float64)
    loss = lambda fn: (lambda w: jnp.sum(jnp.sin(fn(w, 'scaled_ws') * 1e2) * target))
    np.testing.assert_allclose(jax.grad(loss(standardize_kernel))(w64),
                               jax.grad(loss(jnp_reference))(w64), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize('method', ['ws', 'scaled_ws', 'pws'])
def test_gradients_under_jit_and_vmap_equal_one_kernel_at_a_time(method):
  # A batch of kernels (e.g. per-example or ensembled filters) under vmap, inside jit.
  ws = np.stack([_kernel((3, 3, 4, 5), seed=i, std=0.1 * (i + 1), offset=i) for i in range(3)])
  scales = np.stack([np.linspace(0.5, 1.5, 5).astype(np.float32) * (i + 1) for i in range(3)])
  target = jnp.asarray(_kernel((3, 3, 4, 5), seed=11))
  loss = lambda w, s: jnp.sum(jnp.sin(3.0 * standardize_kernel(w, method, scale=s)) * target)
  got = jax.jit(jax.vmap(jax.grad(loss, (0, 1))))(ws, scales)
  for i in range(3):
    want = jax.grad(loss, (0, 1))(ws[i], scales[i])
    for a, b in zip(got, want, strict=True):
      np.testing.assert_allclose(a[i], b, rtol=1e-5, atol=1e-6 * np.abs(b).max())
  # Forward mode under vmap too.
  tangents = jax.vmap(lambda w, s: jax.jvp(lambda w: standardize_kernel(w, method, scale=s),
                                           (w,), (jnp.ones_like(w),))[1])(ws, scales)
  np.testing.assert_allclose(tangents, 0.0, atol=1e-4)  # a constant shift changes nothing


@pytest.mark.parametrize('dtype', [jnp.bfloat16, jnp.float16])
def test_low_precision_kernel_gets_float32_statistics_and_gradient_in_its_dtype(dtype):
  # Statistics and the closed form run in float32; value and gradient come back in the kernel's
  # dtype, close to the float64 reference of the same (rounded) values.
  w = jnp.asarray(_kernel((3, 3, 32, 4), std=0.05, offset=0.5), dtype)
  target = _kernel((3, 3, 32, 4), seed=12)
  for method in ('ws', 'scaled_ws', 'pws'):
    g = jax.grad(lambda w, m=method: jnp.sum(standardize_kernel(w, m).astype(jnp.float32)
                                             * target))(w)
    assert g.dtype == dtype
    with jax.enable_x64(True):
      want = jax.grad(lambda w, m=method: jnp.sum(jnp_reference(w, m) * target))(
          jnp.asarray(w, jnp.float64))
    assert _relative_error(g, want) < 2e-2


@pytest.mark.parametrize('method', ['ws', 'ws_std', 'scaled_ws', 'pws'])
def test_scalar_scale_gets_the_summed_per_channel_gradient(method):
  # scale of shape (): broadcast to every filter, its gradient is the sum over the filters.
  w = _kernel((3, 3, 4, 5), std=0.3)
  target = jnp.asarray(_kernel((3, 3, 4, 5), seed=13))
  loss = lambda w, s, fn: jnp.sum(jnp.sin(3.0 * fn(w, method, scale=s)) * target)
  got = jax.grad(loss, (0, 1))(w, jnp.float32(1.5), standardize_kernel)
  want = jax.grad(loss, (0, 1))(w, jnp.float32(1.5), jnp_reference)
  assert got[1].shape == ()
  for a, b in zip(got, want, strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(np.asarray(b)).max())
