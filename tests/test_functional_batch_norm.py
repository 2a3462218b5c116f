"""Tests of jaxnorm.functional.batch_norm against numpy and autodiff of the direct formula.

The claims: biased batch statistics, stable in float32 under a large offset; the
closed-form backward equals autodiff of the direct formula; the backward's exact identities
(zero mean, orthogonality to x-hat, the variance formula); ghost batches; multi-device statistics.
"""

from __future__ import annotations

import chex
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxnorm.functional._batch_norm import batch_norm, batch_statistics, normalize

# (shape, reduction axes): NHWC, NC and NCHW layouts.
LAYOUTS = {
    'nhwc': ((8, 3, 2, 4), (0, 1, 2)),
    'nc': ((12, 5), (0,)),
    'nchw': ((4, 3, 2, 2), (0, 2, 3)),
}


def _np_stats(x, axes, ghost=None):
  """Reference biased statistics in float64, per ghost group then averaged over groups."""
  x = np.asarray(x, np.float64)
  if ghost is None:
    return x.mean(axes), x.var(axes)
  groups = np.split(x, x.shape[0] // ghost, axis=0)
  return (np.mean([g.mean(axes) for g in groups], 0), np.mean([g.var(axes) for g in groups], 0))


def _np_batch_norm(x, scale, bias, axes, eps, ghost=None):
  x = np.asarray(x, np.float64)
  fshape = [1 if a in axes else d for a, d in enumerate(x.shape)]
  n = x.shape[0] if ghost is None else ghost
  out = []
  for g in np.split(x, x.shape[0] // n, axis=0):
    xhat = (g - g.mean(axes, keepdims=True)) / np.sqrt(g.var(axes, keepdims=True) + eps)
    out.append(xhat * np.reshape(scale, fshape) + np.reshape(bias, fshape))
  return np.concatenate(out, 0)


def _direct_batch_norm(x, scale, bias, axes, eps, ghost=None):
  """The direct formula in jnp (E over the batch, biased), for jax.grad to differentiate."""
  n = x.shape[0] if ghost is None else ghost
  xg = x.reshape((x.shape[0] // n, n) + x.shape[1:])
  gaxes = tuple(a + 1 for a in axes)
  mu = xg.mean(gaxes, keepdims=True)
  var = ((xg - mu) ** 2).mean(gaxes, keepdims=True)
  pshape = [1 if (a in gaxes or a == 0) else d for a, d in enumerate(xg.shape)]
  y = (xg - mu) / jnp.sqrt(var + eps) * scale.reshape(pshape) + bias.reshape(pshape)
  mean_out = jnp.squeeze(mu, gaxes).mean(0)
  var_out = jnp.squeeze(var, gaxes).mean(0)
  return y.reshape(x.shape), mean_out, var_out


def _inputs(shape, axes, dtype=jnp.float32, seed=0):
  ks = jax.random.split(jax.random.key(seed), 4)
  fshape = tuple(d for a, d in enumerate(shape) if a not in axes)
  x = (3.0 * jax.random.normal(ks[0], shape) + 2.0).astype(dtype)
  scale = (1.0 + 0.5 * jax.random.normal(ks[1], fshape)).astype(dtype)
  bias = jax.random.normal(ks[2], fshape).astype(dtype)
  w = jax.random.normal(ks[3], shape).astype(dtype)
  return x, scale, bias, w


def _loss(fn, w):
  """A loss that uses the output non-linearly and the returned statistics too."""

  def loss(x, scale, bias):
    y, mean, var = fn(x, scale, bias)
    return jnp.sum(jnp.sin(y) * w) + jnp.sum(mean**2) + jnp.sum(jnp.sqrt(var))

  return loss


class BatchNormForwardTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(('nhwc', None), ('nc', 3), ('nchw', 2))
  def test_output_and_statistics_match_numpy(self, layout, ghost):
    shape, axes = LAYOUTS[layout]
    x, scale, bias, _ = _inputs(shape, axes)
    fn = self.variant(lambda x, s, b: batch_norm(x, s, b, axes=axes, ghost_batch_size=ghost))
    y, mean, var = fn(x, scale, bias)
    ref_mean, ref_var = _np_stats(x, axes, ghost)
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(var, ref_var, rtol=1e-5)
    np.testing.assert_allclose(y, _np_batch_norm(x, scale, bias, axes, 1e-5, ghost),
                               rtol=1e-5, atol=1e-5)
    self.assertEqual(mean.dtype, jnp.float32)
    stats = self.variant(lambda x: batch_statistics(x, axes=axes, ghost_batch_size=ghost))(x)
    np.testing.assert_allclose(stats[0], mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(stats[1], var, rtol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_eval_normalize_matches_numpy(self):
    shape, axes = LAYOUTS['nhwc']
    x, scale, bias, _ = _inputs(shape, axes)
    mean, var = jnp.array([0.5, -1.0, 2.0, 0.0]), jnp.array([1.0, 4.0, 0.25, 9.0])
    y = self.variant(lambda *a: normalize(*a, epsilon=1e-3))(x, mean, var, scale, bias)
    ref = (np.asarray(x, np.float64) - mean) / np.sqrt(np.asarray(var) + 1e-3) * scale + bias
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  def test_large_common_offset_keeps_exact_statistics(self):
    # float32 inputs 1e4 + N(0, 1): the centred two-pass variance stays exact, E[x^2]-E[x]^2 not.
    x = 1e4 + jax.random.normal(jax.random.key(1), (64, 4, 4, 3))
    y, mean, var = self.variant(batch_norm)(x)
    ref_mean, ref_var = _np_stats(x, (0, 1, 2))
    np.testing.assert_allclose(mean, ref_mean, rtol=3e-7)  # ~2 float32 ulps at 1e4
    np.testing.assert_allclose(var, ref_var, rtol=1e-4)
    self.assertTrue(bool(jnp.all(jnp.isfinite(y))))
    np.testing.assert_allclose(np.var(np.asarray(y, np.float64), (0, 1, 2)),
                               ref_var / (ref_var + 1e-5), rtol=1e-4)
    # Contrast: the one-pass formula in float32 is off by far more than the tolerance above.
    naive = jnp.mean(x * x, (0, 1, 2)) - jnp.mean(x, (0, 1, 2)) ** 2
    self.assertGreater(float(jnp.max(jnp.abs(naive - ref_var) / ref_var)), 1e-2)

  def test_bf16_in_bf16_out_with_float32_statistics(self):
    shape, axes = LAYOUTS['nhwc']
    x, scale, bias, _ = _inputs(shape, axes, dtype=jnp.bfloat16)
    y, mean, var = jax.jit(batch_norm)(x, scale, bias)
    self.assertEqual(y.dtype, jnp.bfloat16)
    self.assertEqual((mean.dtype, var.dtype), (jnp.float32, jnp.float32))
    ref_mean, ref_var = _np_stats(np.asarray(x, np.float32), axes)
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(var, ref_var, rtol=1e-5)
    ref = _np_batch_norm(np.asarray(x, np.float32), np.asarray(scale, np.float32),
                         np.asarray(bias, np.float32), axes, 1e-5)
    np.testing.assert_allclose(np.asarray(y, np.float32), ref, rtol=2e-2, atol=2e-2)

  def test_mask_statistics_equal_statistics_of_selected_examples(self):
    shape, axes = LAYOUTS['nc']
    x, scale, bias, _ = _inputs(shape, axes)
    keep = np.arange(shape[0]) % 3 != 0
    y, mean, var = batch_norm(x, scale, bias, mask=keep[:, None])
    ref_mean, ref_var = _np_stats(x[keep], axes)
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(var, ref_var, rtol=1e-5)
    ref = (np.asarray(x, np.float64) - ref_mean) / np.sqrt(ref_var + 1e-5) * scale + bias
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


class ClosedFormBackwardTest(parameterized.TestCase):
  """dL/dx = gamma/sqrt(var+eps) (g - mean_B g - x_hat mean_B(g x_hat)) equals autodiff."""

  @parameterized.named_parameters(('float32', False), ('float64', True))
  def test_closed_form_equals_autodiff_of_direct_formula(self, x64):
    # NHWC, NC and NCHW reduction axes, with and without ghost batches; one compilation each for
    # the closed form and for the reference (all configurations in one jitted function).
    configs = [(layout, ghost) for layout in LAYOUTS for ghost in (None, 2)]
    with jax.enable_x64(x64):
      dtype = jnp.float64 if x64 else jnp.float32
      args = [_inputs(LAYOUTS[layout][0], LAYOUTS[layout][1], dtype) for layout, _ in configs]

      def grads(fn):
        def all_grads(args):
          out = []
          for (layout, ghost), (x, scale, bias, w) in zip(configs, args, strict=True):
            axes = LAYOUTS[layout][1]
            loss = _loss(lambda *a, axes=axes, ghost=ghost: fn(*a, axes, ghost), w)
            out.append(jax.grad(loss, (0, 1, 2))(x, scale, bias))
          return out
        return jax.jit(all_grads)(args)

      g_ours = grads(lambda x, s, b, axes, ghost: batch_norm(
          x, s, b, axes=axes, ghost_batch_size=ghost))
      g_ref = grads(lambda x, s, b, axes, ghost: _direct_batch_norm(x, s, b, axes, 1e-5, ghost))
    tol = 1e-11 if x64 else 2e-5
    for config, ours, ref in zip(configs, g_ours, g_ref, strict=True):
      for a, b in zip(ours, ref, strict=True):
        self.assertEqual(a.dtype, dtype)
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol, err_msg=str(config))

  def test_autodiff_path_equals_closed_form(self):
    shape, axes = LAYOUTS['nhwc']
    x, scale, bias, w = _inputs(shape, axes)
    g = [jax.jit(jax.grad(_loss(lambda *a, c=c: batch_norm(*a, closed_form_backward=c), w),
                          (0, 1, 2)))(x, scale, bias) for c in (True, False)]
    for a, b in zip(*g, strict=True):
      np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5)

  def test_closed_form_backward_with_bf16_input_returns_bf16_gradient(self):
    shape, axes = LAYOUTS['nhwc']
    x, scale, bias, w = _inputs(shape, axes, jnp.bfloat16)
    gx = jax.grad(lambda x: jnp.sum(batch_norm(x, scale, bias)[0].astype(jnp.float32) * w))(x)
    self.assertEqual(gx.dtype, jnp.bfloat16)
    ref = jax.grad(lambda x: jnp.sum(_direct_batch_norm(
        x, scale.astype(jnp.float32), bias.astype(jnp.float32), axes, 1e-5)[0] * w))(
            x.astype(jnp.float32))
    np.testing.assert_allclose(np.asarray(gx, np.float32), ref, rtol=5e-2, atol=5e-2)


class BackwardIdentitiesTest(parameterized.TestCase):
  """Exact consequences of the closed form, checked in float64 against numpy."""

  def _grad(self, eps, layout, ghost=None):
    shape, axes = LAYOUTS[layout]
    with jax.enable_x64(True):
      x, scale, bias, g = _inputs(shape, axes, jnp.float64, seed=3)
      fn = lambda x: batch_norm(x, scale, bias, axes=axes, epsilon=eps, ghost_batch_size=ghost)
      zeros = jnp.zeros(scale.shape)
      dx = jax.jit(lambda x, g: jax.vjp(fn, x)[1]((g, zeros, zeros))[0])(x, g)
    x, g, dx, scale = (np.asarray(a, np.float64) for a in (x, g, dx, scale))
    return x, g, dx, scale, axes

  @parameterized.parameters('nhwc', 'nc')
  def test_gradient_has_zero_batch_mean(self, layout):
    x, _, dx, _, axes = self._grad(1e-5, layout)
    np.testing.assert_allclose(dx.mean(axes), 0.0, atol=1e-12)

  @parameterized.parameters('nhwc', 'nc')
  def test_gradient_orthogonal_to_xhat_when_eps_is_zero(self, layout):
    x, _, dx, _, axes = self._grad(0.0, layout)
    xhat = (x - x.mean(axes, keepdims=True)) / x.std(axes, keepdims=True)
    np.testing.assert_allclose((xhat * dx).mean(axes), 0.0, atol=1e-12)

  @parameterized.product(layout=('nhwc', 'nc'), eps=(0.0, 1e-5, 2.0))
  def test_gradient_variance_formula(self, layout, eps):
    # Var_B(dx) = gamma^2/(var+eps) [Var_B(g) - Cov_B(g, xhat)^2 c], c = 2 - var/(var+eps).
    x, g, dx, scale, axes = self._grad(eps, layout)
    var = x.var(axes, keepdims=True)
    xhat = (x - x.mean(axes, keepdims=True)) / np.sqrt(var + eps)
    cov = ((g - g.mean(axes, keepdims=True)) * (xhat - xhat.mean(axes, keepdims=True))).mean(axes)
    var, c = var.reshape(cov.shape), 2.0 - var.reshape(cov.shape) / (var.reshape(cov.shape) + eps)
    expected = scale**2 / (var + eps) * (g.var(axes) - cov**2 * c)
    np.testing.assert_allclose(dx.var(axes), expected, rtol=1e-10)

  def test_ghost_gradient_has_zero_mean_per_group(self):
    x, _, dx, _, axes = self._grad(1e-5, 'nc', ghost=3)
    for group in np.split(dx, 4, axis=0):
      np.testing.assert_allclose(group.mean(axes), 0.0, atol=1e-12)


class AutodiffModesTest(parameterized.TestCase):

  def test_forward_mode_fails_with_closed_form_and_works_without(self):
    shape, axes = LAYOUTS['nc']
    x, scale, bias, w = _inputs(shape, axes)
    t = jax.random.normal(jax.random.key(7), shape)
    f = lambda c: (lambda x: batch_norm(x, scale, bias, closed_form_backward=c)[0])
    with pytest.raises(TypeError, match='custom_vjp'):
      jax.jvp(f(True), (x,), (t,))
    # <w, J t> from forward mode (autodiff path) equals <J^T w, t> from the closed form.
    jt = jax.jit(lambda x, t: jax.jvp(f(False), (x,), (t,))[1])(x, t)
    jtw = jax.jit(lambda x, w: jax.vjp(f(True), x)[1](w)[0])(x, w)
    np.testing.assert_allclose(jnp.vdot(w, jt), jnp.vdot(jtw, t), rtol=1e-4)

  def test_hessian_through_closed_form_equals_autodiff(self):
    shape, axes = LAYOUTS['nc']
    x, scale, bias, w = _inputs(shape, axes)
    h = [jax.jit(jax.hessian(lambda s, c=c: jnp.sum(jnp.sin(batch_norm(
        x, s, bias, closed_form_backward=c)[0]) * w)))(scale)
         for c in (True, False)]
    np.testing.assert_allclose(h[0], h[1], rtol=1e-4, atol=1e-4)


class MultiDeviceTest(parameterized.TestCase):

  @parameterized.parameters(None, 2)
  def test_shard_map_with_axis_name_equals_full_batch(self, ghost):
    mesh = jax.make_mesh((8,), ('batch',))
    shape, axes = (32, 2, 2, 3), (0, 1, 2)
    x, scale, bias, w = _inputs(shape, axes)
    fn = lambda x, s, b: batch_norm(x, s, b, axis_name='batch', ghost_batch_size=ghost)
    sharded = jax.shard_map(fn, mesh=mesh, in_specs=(P('batch'), P(), P()),
                            out_specs=(P('batch'), P(), P()))
    xs = jax.device_put(x, NamedSharding(mesh, P('batch')))
    ss, bs = (jax.device_put(a, NamedSharding(mesh, P())) for a in (scale, bias))
    ws = jax.device_put(w, NamedSharding(mesh, P('batch')))
    full = lambda x, s, b: batch_norm(x, s, b, ghost_batch_size=ghost)
    for a, b in zip(jax.jit(sharded)(xs, ss, bs), jax.jit(full)(x, scale, bias), strict=True):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    g_sh = jax.jit(jax.grad(_loss(sharded, ws), (0, 1, 2)))(xs, ss, bs)
    g_full = jax.jit(jax.grad(_loss(full, w), (0, 1, 2)))(x, scale, bias)
    for a, b in zip(g_sh, g_full, strict=True):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)

  def test_one_example_per_device_is_enough_when_statistics_are_global(self):
    # 8 examples on 8 devices: 1 value per channel per device, 8 per channel globally.
    mesh = jax.make_mesh((8,), ('batch',))
    x, scale, bias, _ = _inputs((8, 3), (0,))
    fn = jax.shard_map(lambda x: batch_norm(x, scale, bias, axis_name='batch')[0], mesh=mesh,
                       in_specs=P('batch'), out_specs=P('batch'))
    y = jax.jit(fn)(jax.device_put(x, NamedSharding(mesh, P('batch'))))
    np.testing.assert_allclose(y, _np_batch_norm(x, scale, bias, (0,), 1e-5), rtol=1e-5,
                               atol=1e-5)

  def test_pmap_axis_index_groups_normalize_each_group_separately(self):
    shape, axes = (16, 3), (0,)
    x, scale, bias, _ = _inputs(shape, axes)
    groups = [[0, 1, 2, 3], [4, 5, 6, 7]]
    fn = jax.pmap(lambda x: batch_norm(x, scale, bias, axis_name='d',
                                       axis_index_groups=groups)[0], axis_name='d')
    y = fn(x.reshape(8, 2, 3)).reshape(shape)
    for half in (slice(0, 8), slice(8, 16)):
      np.testing.assert_allclose(y[half], _np_batch_norm(x[half], scale, bias, axes, 1e-5),
                                 rtol=1e-5, atol=1e-5)

  def test_jit_with_sharded_batch_needs_no_axis_name(self):
    mesh = jax.make_mesh((8,), ('batch',))
    shape, axes = (16, 2, 2, 3), (0, 1, 2)
    x, scale, bias, w = _inputs(shape, axes)
    xs = jax.device_put(x, NamedSharding(mesh, P('batch')))
    ws = jax.device_put(w, NamedSharding(mesh, P('batch')))
    g_sh = jax.jit(jax.grad(_loss(batch_norm, ws), (0, 1, 2)))(xs, scale, bias)
    g_full = jax.jit(jax.grad(_loss(batch_norm, w), (0, 1, 2)))(x, scale, bias)
    for a, b in zip(g_sh, g_full, strict=True):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


class BadInputTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ('rank_1', dict(x=np.ones(4, np.float32)), ValueError, 'rank >= 2'),
      ('integer_dtype', dict(x=np.ones((4, 3), np.int32)), TypeError, 'floating-point'),
      ('ghost_not_dividing', dict(x=np.ones((12, 3), np.float32), ghost_batch_size=5),
       ValueError, 'divisor of the batch size 12'),
      ('ghost_not_int', dict(x=np.ones((12, 3), np.float32), ghost_batch_size=2.0),
       TypeError, 'ghost_batch_size'),
      ('single_value_per_channel', dict(x=np.ones((1, 3), np.float32)), ValueError,
       'at least 2 values per channel'),
      ('ghost_of_one', dict(x=np.ones((4, 3), np.float32), ghost_batch_size=1), ValueError,
       'at least 2 values per channel'),
      ('axis_out_of_range', dict(x=np.ones((4, 3), np.float32), axes=(0, 2)), ValueError,
       '`axes`'),
      ('repeated_axes', dict(x=np.ones((4, 3), np.float32), axes=(0, -2)), ValueError,
       'distinct axes'),
      ('no_axes', dict(x=np.ones((4, 3), np.float32), axes=()), ValueError,
       'at least one reduction axis'),
      ('scale_shape', dict(x=np.ones((4, 3), np.float32), scale=np.ones(4, np.float32)),
       ValueError, r'`scale` expected shape \(3,\)'),
      ('mask_shape', dict(x=np.ones((4, 3), np.float32), mask=np.ones((5, 1), bool)),
       ValueError, '`mask`'),
      ('negative_epsilon', dict(x=np.ones((4, 3), np.float32), epsilon=-1.0), ValueError,
       '`epsilon`'),
      ('groups_without_axis_name', dict(x=np.ones((4, 3), np.float32),
                                         axis_index_groups=[[0]]), ValueError,
       '`axis_index_groups`'),
  )
  def test_bad_input_raises_naming_the_argument(self, kwargs, exc, match):
    with pytest.raises(exc, match=match) as info:
      batch_norm(**kwargs)
    assert str(info.value).startswith('batch_norm: argument `')

  def test_single_value_check_can_be_disabled_for_initialization(self):
    y, _, var = batch_norm(np.ones((1, 3), np.float32), check_count=False)
    np.testing.assert_array_equal(var, 0.0)
    self.assertTrue(bool(jnp.all(jnp.isfinite(y))))


_jit_batch_norm = jax.jit(batch_norm, static_argnames='ghost_batch_size')


@hypothesis.settings(max_examples=10, deadline=None)
@hypothesis.given(
    shape=st.sampled_from([(12, 3), (12, 2, 1), (6, 2, 3, 2)]), ghost=st.sampled_from([None, 3]),
    dtype=st.sampled_from(['float32', 'bfloat16']), seed=st.integers(0, 2**16))
def test_property_each_group_is_standardized(shape, ghost, dtype, seed):
  """Per channel (and ghost group), y has mean 0 and variance var/(var+eps) (numpy reference).

  Shapes come from a small pool so that examples share compilations; the values vary.
  """
  n = shape[0]
  axes = tuple(range(len(shape) - 1))
  x = (2.0 * jax.random.normal(jax.random.key(seed), shape) - 1.0).astype(dtype)
  y, mean, var = _jit_batch_norm(x, ghost_batch_size=ghost)
  assert y.dtype == jnp.dtype(dtype) and mean.dtype == jnp.float32 and var.dtype == jnp.float32
  ref_mean, ref_var = _np_stats(np.asarray(x, np.float32), axes, ghost)
  np.testing.assert_allclose(mean, ref_mean, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(var, ref_var, rtol=1e-5)
  tol = 1e-5 if dtype == 'float32' else 2e-2
  size = ghost or n
  xs = np.split(np.asarray(x, np.float64), n // size, axis=0)
  for yg, xg in zip(np.split(np.asarray(y, np.float64), n // size, axis=0), xs, strict=True):
    np.testing.assert_allclose(yg.mean(axes), 0.0, atol=4 * tol)
    v = xg.var(axes)
    np.testing.assert_allclose(yg.var(axes), v / (v + 1e-5), rtol=4 * tol, atol=4 * tol)


def _assert_rel(actual, reference, rtol, what=''):
  """max |actual - reference| <= rtol * max |reference|, leaf by leaf (a relative error that
  is not fooled by entries that are 0 in exact arithmetic)."""
  for a, r in zip(jax.tree_util.tree_leaves(actual), jax.tree_util.tree_leaves(reference),
                  strict=True):
    a, r = np.asarray(a, np.float64), np.asarray(r, np.float64)
    assert a.shape == r.shape, (what, a.shape, r.shape)
    err, scale = np.max(np.abs(a - r)), np.max(np.abs(r))
    assert err <= rtol * scale, f'{what}: max error {err:.3g} on a scale of {scale:.3g}'


def _second_derivatives(fn, x, scale, bias, w, xin, kernel):
  """Second derivatives of losses through ``fn(x, scale, bias) -> (y, mean, var)``.

  Forward over reverse (``jax.hessian``), reverse over reverse (``jax.grad`` of a function of
  ``jax.grad``) and ``jax.jacrev(jax.grad)``, with respect to the input, the layer's scale and
  bias, and the kernel of a Dense layer before the normalization (Dense -> BN -> tanh).
  """
  loss = _loss(fn, w)  # uses y non-linearly and the returned mean and var
  dense = lambda k: jnp.sum(jnp.tanh(fn(xin @ k, scale, bias)[0]) * w)

  def grad_norm(x, scale, bias):  # a function of the gradient, differentiated in reverse mode
    gx, gs, gb = jax.grad(loss, (0, 1, 2))(x, scale, bias)
    return jnp.sum(jnp.cos(gx)) + jnp.sum(gs**2) + jnp.sum(gs * gb)

  return {
      'hessian_x': jax.hessian(loss)(x, scale, bias),
      'jacrev_grad_x': jax.jacrev(jax.grad(loss))(x, scale, bias),
      'hessian_params': jax.hessian(loss, (1, 2))(x, scale, bias),
      'grad_of_grad': jax.grad(grad_norm, (0, 1, 2))(x, scale, bias),
      'hessian_dense_kernel': jax.hessian(dense)(kernel),
  }


class SecondOrderTest(parameterized.TestCase):
  """Derivatives of the closed-form backward equal those of the autodiff path (float64)."""

  @parameterized.named_parameters(('nc', (6, 3), None), ('nc_ghost', (6, 3), 3),
                                  ('nhwc', (4, 2, 1, 3), None))
  def test_second_derivatives_equal_autodiff_path(self, shape, ghost):
    axes = tuple(range(len(shape) - 1))
    with jax.enable_x64(True):
      x, scale, bias, w = _inputs(shape, axes, jnp.float64, seed=5)
      xin = jax.random.normal(jax.random.key(6), shape[:-1] + (4,), jnp.float64)
      kernel = jax.random.normal(jax.random.key(7), (4, shape[-1]), jnp.float64)
      out = [jax.jit(lambda *a, c=c: _second_derivatives(
          lambda x, s, b: batch_norm(x, s, b, ghost_batch_size=ghost, closed_form_backward=c),
          *a))(x, scale, bias, w, xin, kernel) for c in (True, False)]
    for key in out[1]:
      _assert_rel(out[0][key], out[1][key], 1e-8, key)

  def test_second_derivatives_under_shard_map_equal_single_device_autodiff(self):
    mesh = jax.make_mesh((4,), ('batch',), devices=jax.devices()[:4])
    put = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))
    with jax.enable_x64(True):
      x, scale, bias, w = _inputs((8, 3), (0,), jnp.float64, seed=8)
      for ghost in (None, 2):
        sharded = jax.shard_map(
            lambda x, s, b, ghost=ghost: batch_norm(x, s, b, axis_name='batch',
                                                    ghost_batch_size=ghost),
            mesh=mesh, in_specs=(P('batch'), P(), P()), out_specs=(P('batch'), P(), P()))
        full = lambda x, s, b, ghost=ghost: batch_norm(x, s, b, ghost_batch_size=ghost,
                                                      closed_form_backward=False)

        def derivatives(fn, x, scale, bias, w):
          loss = _loss(fn, w)
          grad_norm = lambda *a: jnp.sum(jax.grad(loss, (0, 1))(*a)[0] ** 2)
          return (jax.hessian(loss, (0, 1))(x, scale, bias),
                  jax.grad(grad_norm, (0, 1, 2))(x, scale, bias))

        ours = jax.jit(lambda *a, f=sharded: derivatives(f, *a))(
            put(x, P('batch')), scale, bias, put(w, P('batch')))
        ref = jax.jit(lambda *a, f=full: derivatives(f, *a))(x, scale, bias, w)
        _assert_rel(ours, ref, 1e-8, f'ghost={ghost}')


class VmapAxisNameTest(parameterized.TestCase):
  """``jax.vmap(..., axis_name=...)``: one example per call, statistics over the vmap axis."""

  @parameterized.named_parameters(('vector', (8, 3)), ('image', (4, 2, 2, 3)))
  def test_grad_of_vmap_and_vmap_of_grad_equal_autodiff_and_full_batch(self, shape):
    axes = tuple(range(len(shape) - 1))
    x, scale, bias, w = _inputs(shape, axes, seed=11)
    ex_axes = tuple(a - 1 for a in axes[1:])  # the per-example reduction axes

    def per_example(c):
      def loss(p, xi, wi):
        y, mean, var = batch_norm(xi, p[0], p[1], axes=ex_axes, axis_name='b',
                                  closed_form_backward=c)
        return jnp.sum(jnp.sin(y) * wi) + jnp.sum(mean**2) + jnp.sum(jnp.sqrt(var))
      return loss

    def run(c):
      f = per_example(c)
      batched = jax.vmap(f, in_axes=(None, 0, 0), axis_name='b')
      g_of_vmap = jax.grad(lambda p, x: jnp.sum(batched(p, x, w)), (0, 1))((scale, bias), x)
      vmap_of_g = jax.vmap(jax.grad(f, (0, 1)), in_axes=(None, 0, 0), axis_name='b')(
          (scale, bias), x, w)
      return g_of_vmap, vmap_of_g

    ours, autodiff = (jax.jit(lambda c=c: run(c))() for c in (True, False))
    _assert_rel(ours, autodiff, 1e-5, 'closed form vs autodiff')
    # grad of vmap is the gradient of the full-batch layer (independent: the direct formula);
    # the per-example mean/var losses are counted once per example, hence the factor.
    n = shape[0]

    def full_loss(p, x):
      y, mean, var = _direct_batch_norm(x, p[0], p[1], axes, 1e-5)
      return jnp.sum(jnp.sin(y) * w) + n * (jnp.sum(mean**2) + jnp.sum(jnp.sqrt(var)))

    ref = jax.jit(jax.grad(full_loss, (0, 1)))((scale, bias), x)
    _assert_rel(ours[0], ref, 1e-5, 'grad of vmap vs full batch')

  def test_rank_1_without_named_axis_still_raises(self):
    with pytest.raises(ValueError, match='rank >= 2'):
      batch_norm(jnp.ones(3))


class MaskCountTest(parameterized.TestCase):
  """A mask selecting fewer than 2 values of a channel: the rule of the unmasked path."""

  def _data(self):
    x, scale, bias, _ = _inputs((6, 3), (0,), seed=12)
    mask = np.ones((6, 3), bool)
    mask[:, 1] = False
    mask[4, 1] = True  # channel 1: one selected value (variance 0)
    return x, scale, bias, mask

  def test_concrete_mask_raises_like_unmasked_path(self):
    x, scale, bias, mask = self._data()
    for fn in (batch_norm, jax.jit(lambda x, s, b: batch_norm(x, s, b, mask=mask))):
      kwargs = dict(mask=mask) if fn is batch_norm else {}
      with pytest.raises(ValueError, match='at least 2 values per channel') as info:
        fn(x, scale, bias, **kwargs)
      assert str(info.value).startswith('batch_norm: argument `mask`')
    ghost_mask = np.ones((6, 3), bool)
    ghost_mask[3:5] = False  # ghost group 1 (rows 3-5) keeps one row
    with pytest.raises(ValueError, match='ghost group'):
      batch_statistics(x, mask=ghost_mask, ghost_batch_size=3)
    with pytest.raises(ValueError, match='at least 2 values per channel'):
      batch_norm(x, mask=np.zeros((6, 1), bool))

  def test_traced_mask_gives_nan_in_that_channel_only(self):
    x, scale, bias, mask = self._data()
    y, mean, var = jax.jit(lambda x, m: batch_norm(x, scale, bias, mask=m))(x, mask)
    self.assertTrue(bool(jnp.all(jnp.isnan(y[:, 1]))))
    self.assertTrue(bool(jnp.isnan(mean[1]) & jnp.isnan(var[1])))
    ok = np.array([0, 2])
    np.testing.assert_allclose(y[:, ok], _np_batch_norm(x[:, ok], scale[ok], bias[ok], (0,),
                                                        1e-5), rtol=1e-5, atol=1e-5)
    # check_count=False (Flax modules while initializing) keeps variance 0, finite.
    _, _, var0 = jax.jit(lambda x, m: batch_norm(x, mask=m, check_count=False))(x, mask)
    self.assertEqual(float(var0[1]), 0.0)
