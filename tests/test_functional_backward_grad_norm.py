"""Tests of jaxnorm.functional.backward_grad_norm against numpy and the paper's claims."""

from __future__ import annotations

import functools
import math

import chex
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from jaxnorm.functional._backward_grad_norm import backward_grad_norm, target_scale


def _np_bgn(g, mode, target, eps):
  """Independent numpy reference of the BGN backward map (float64)."""
  g = np.asarray(g, np.float64)
  axes = tuple(range(1, g.ndim)) if mode == 'per_sample' else tuple(range(g.ndim))
  units = int(np.prod([g.shape[a] for a in axes]))
  s = {'sqrt_units': np.sqrt(units), 'unit': 1.0}.get(target, target)
  norm = np.sqrt(np.sum(g * g, axis=axes, keepdims=True))
  return s * g / (norm + eps), s


def _bgn_grad(x, g, **kw):
  _, vjp = jax.vjp(lambda v: backward_grad_norm(v, **kw), x)
  return vjp(g)[0]


class BackwardGradNormTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(jnp.float32, jnp.bfloat16, jnp.float16)
  def test_forward_is_bit_identical(self, dtype):
    x = jax.random.normal(jax.random.key(0), (4, 3, 3, 5)).astype(dtype) * 1e3
    y = self.variant(backward_grad_norm)(x)
    assert y.dtype == x.dtype and y.shape == x.shape
    bits = np.uint32 if dtype == jnp.float32 else np.uint16
    np.testing.assert_array_equal(np.asarray(y).view(bits), np.asarray(x).view(bits))

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.product(mode=['per_sample', 'per_batch'], target=['sqrt_units', 'unit', 2.5],
                         shape=[(4, 8), (3, 5, 5, 2)])
  def test_backward_matches_numpy_and_each_norm_equals_target(self, mode, target, shape):
    kx, kg = jax.random.split(jax.random.key(1))
    x = jax.random.normal(kx, shape)
    # Per-sample scales over 8 orders of magnitude: the normalized norms must not depend on them.
    scale = jnp.logspace(-4, 4, shape[0]).reshape((-1,) + (1,) * (len(shape) - 1))
    g = jax.random.normal(kg, shape) * scale
    eps = 1e-6
    out = self.variant(lambda x, g: _bgn_grad(x, g, mode=mode, target=target, eps=eps))(x, g)
    ref, s = _np_bgn(g, mode, target, eps)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=2e-6, atol=1e-30)
    axes = tuple(range(1, len(shape))) if mode == 'per_sample' else None
    gn = np.sqrt(np.sum(np.asarray(g, np.float64) ** 2, axis=axes))
    got_norm = np.sqrt(np.sum(np.asarray(out, np.float64) ** 2, axis=axes))
    np.testing.assert_allclose(got_norm, s * gn / (gn + eps), rtol=2e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_zero_gradient_maps_to_zero_without_nan(self):
    x = jnp.ones((3, 4))
    g = jnp.zeros((3, 4)).at[1].set(jnp.arange(4.0))
    out = self.variant(lambda x, g: _bgn_grad(x, g))(x, g)
    assert np.all(np.isfinite(out))
    np.testing.assert_array_equal(np.asarray(out[0]), 0.0)
    np.testing.assert_array_equal(np.asarray(out[2]), 0.0)
    np.testing.assert_allclose(np.linalg.norm(out[1]), 2.0 * 14**0.5 / (14**0.5 + 1e-6),
                               rtol=1e-6)
    # Reverse-over-reverse through the norm at g = 0 is finite as well.
    h = jax.grad(lambda g: jnp.sum(_bgn_grad(x, g) * jnp.arange(4.0)))(jnp.zeros((3, 4)))
    assert np.all(np.isfinite(h))

  @chex.variants(with_jit=True, without_jit=True)
  def test_bfloat16_gradient_keeps_dtype_and_matches_numpy(self):
    x = jnp.ones((4, 16), jnp.bfloat16)
    g = (jax.random.normal(jax.random.key(2), (4, 16)) * 1e-3).astype(jnp.bfloat16)
    out = self.variant(lambda x, g: _bgn_grad(x, g))(x, g)
    assert out.dtype == jnp.bfloat16
    ref, _ = _np_bgn(np.asarray(g, np.float32), 'per_sample', 'sqrt_units', 1e-6)
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, rtol=1e-2, atol=1e-2)


def test_vmap_per_batch_inside_equals_per_sample_outside():
  """Under vmap the backward rule is vmapped: its norm is per mapped example."""
  kx, kg = jax.random.split(jax.random.key(3))
  x = jax.random.normal(kx, (5, 3, 4))
  g = jax.random.normal(kg, (5, 3, 4)) * jnp.arange(1.0, 6.0)[:, None, None]
  outside = _bgn_grad(x, g, mode='per_sample')
  inside = jax.vmap(lambda xi, gi: _bgn_grad(xi, gi, mode='per_batch'))(x, g)
  np.testing.assert_allclose(inside, outside, rtol=1e-6)
  # grad of a vmapped function (vmap inside, grad outside) gives the same per-example rule.
  loss = lambda x: jnp.sum(jax.vmap(lambda v: backward_grad_norm(v, mode='per_batch'))(x) * g)
  np.testing.assert_allclose(jax.grad(loss)(x), outside, rtol=1e-6)
  # per_sample inside vmap treats the example's own axis 0 as its batch axis.
  inner = jax.vmap(lambda xi, gi: _bgn_grad(xi, gi, mode='per_sample'))(x, g)
  ref, _ = _np_bgn(np.asarray(g).reshape(15, 4), 'per_sample', 'sqrt_units', 1e-6)
  np.testing.assert_allclose(inner, ref.reshape(5, 3, 4), rtol=1e-6)
  with pytest.raises(ValueError, match="rank >= 2.*per_batch"):
    jax.vmap(lambda v: backward_grad_norm(v, mode='per_sample'))(x[:, 0])


def _deep_net(ws, x, bgn):
  h = x
  for w in ws:
    h = jnp.tanh(h @ w)
    if bgn:
      h = backward_grad_norm(h)
  return jnp.sum(h ** 2)


def test_scan_and_checkpoint_give_the_unrolled_gradients():
  ws = jax.random.normal(jax.random.key(4), (6, 8, 8)) / np.sqrt(8)
  x = jax.random.normal(jax.random.key(5), (3, 8))

  def scanned(ws, x, remat):
    def step(h, w):
      h = backward_grad_norm(jnp.tanh(h @ w))
      return h, None
    step = jax.checkpoint(step) if remat else step
    h, _ = jax.lax.scan(step, x, ws)
    return jnp.sum(h ** 2)

  unrolled = jax.jit(jax.grad(_deep_net, argnums=(0, 1)), static_argnums=2)(list(ws), x, True)
  unrolled = (jnp.stack(unrolled[0]), unrolled[1])
  for remat in (False, True):
    got = jax.jit(jax.grad(scanned, argnums=(0, 1)), static_argnums=2)(ws, x, remat)
    chex.assert_trees_all_close(got, unrolled, rtol=1e-5, atol=1e-6)
  got = jax.jit(jax.grad(jax.checkpoint(lambda ws, x: _deep_net(list(ws), x, True))))(ws, x)
  chex.assert_trees_all_close(got, unrolled[0], rtol=1e-5, atol=1e-6)


def test_forward_mode_fails_with_an_explanation():
  x = jnp.ones((2, 3))
  f = lambda x: jnp.sum(jnp.sin(backward_grad_norm(x)))
  for fwd_mode in (lambda: jax.jvp(f, (x,), (x,)), lambda: jax.jacfwd(f)(x),
                   lambda: jax.jit(jax.jacfwd(f))(x)):
    with pytest.raises(TypeError, match=r'(?s)backward-only op.*reverse mode.*disable the BGN'):
      fwd_mode()
  # Under jit the failure happens at lowering, outside jaxnorm: JAX's own message.
  with pytest.raises(TypeError, match='forward-mode autodiff'):
    jax.jit(lambda x: jax.jvp(f, (x,), (x,)))(x)


def test_forward_over_reverse_differentiates_the_normalized_gradient_field():
  """jax.hessian works: it is the Jacobian of x -> s * x / (||x|| + eps) for L = ||bgn(x)||^2/2."""
  x = jax.random.normal(jax.random.key(6), (2, 3))
  eps = 1e-6
  f = lambda x: 0.5 * jnp.sum(backward_grad_norm(x, eps=eps) ** 2)
  hess = np.asarray(jax.hessian(f)(x))
  rev = np.asarray(jax.jacrev(jax.grad(f))(x))
  s = np.sqrt(3)
  ref = np.zeros((2, 3, 2, 3))
  for b in range(2):
    v = np.asarray(x[b], np.float64)
    n = np.linalg.norm(v)
    ref[b, :, b, :] = s * (np.eye(3) / (n + eps) - np.outer(v, v) / (n * (n + eps) ** 2))
  np.testing.assert_allclose(hess, ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(rev, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('kwargs, x, exc, match', [
    ({}, jnp.ones((2, 3), jnp.int32), TypeError, 'floating-point'),
    ({}, jnp.ones(()), ValueError, 'rank >= 2'),
    ({}, jnp.ones((3,)), ValueError, 'rank >= 2'),
    ({'mode': 'per_batch'}, jnp.ones(()), ValueError, 'rank >= 1'),
    ({'mode': 'per_channel'}, jnp.ones((2, 3)), ValueError, '`mode` expected one of'),
    ({'target': 'rms'}, jnp.ones((2, 3)), ValueError, '`target` expected one of'),
    ({'target': 0.0}, jnp.ones((2, 3)), ValueError, '`target` expected a positive'),
    ({'target': -1}, jnp.ones((2, 3)), ValueError, '`target` expected a positive'),
    ({'target': float('nan')}, jnp.ones((2, 3)), ValueError, '`target` expected a finite'),
    ({'target': jnp.array(2.0)}, jnp.ones((2, 3)), TypeError, '`target` expected'),
    ({'target': True}, jnp.ones((2, 3)), TypeError, '`target` expected'),
    ({'eps': 0.0}, jnp.ones((2, 3)), ValueError, '`eps` expected a positive'),
    ({'eps': -1e-6}, jnp.ones((2, 3)), ValueError, '`eps` expected a positive'),
    ({'eps': '1e-6'}, jnp.ones((2, 3)), TypeError, '`eps` expected'),
])
def test_bad_input_raises_a_clear_error(kwargs, x, exc, match):
  with pytest.raises(exc, match=match) as info:
    backward_grad_norm(x, **kwargs)
  assert str(info.value).startswith('backward_grad_norm: argument')


def _layer_grad_norms(depth, width, act, bgn, seed):
  """Weight-gradient norms of the hidden layers of a plain-jax deep MLP at init.

  Init: LeCun-normal weights and N(0, 1) biases, so that the saturating units sit in the ordered
  phase where backpropagated gradients shrink geometrically while activations stay O(1).
  """
  rng = np.random.default_rng(seed)
  ws = jnp.asarray(rng.normal(size=(depth - 1, width, width)) / np.sqrt(width), jnp.float32)
  bs = jnp.asarray(rng.normal(size=(depth - 1, width)), jnp.float32)
  w_out = jnp.asarray(rng.normal(size=(width, width)) / np.sqrt(width), jnp.float32)
  x = jnp.asarray(rng.normal(size=(16, width)), jnp.float32)
  y = jnp.asarray(rng.normal(size=(16, width)), jnp.float32)

  def loss(ws):
    def layer(h, wb):
      h = act(h @ wb[0] + wb[1])
      return (backward_grad_norm(h) if bgn else h), None
    h, _ = jax.lax.scan(layer, x, (ws, bs))
    return 0.5 * jnp.mean(jnp.sum((h @ w_out - y) ** 2, axis=1))

  grads = jax.jit(jax.grad(loss))(ws)
  return np.linalg.norm(np.asarray(grads, np.float64).reshape(depth - 1, -1), axis=1)


@pytest.mark.parametrize('act', [jax.nn.sigmoid, jnp.tanh], ids=['sigmoid', 'tanh'])
def test_bgn_keeps_first_layer_gradients_alive_in_a_deep_saturating_mlp(act):
  """Paper claim (Cabana & Lago-Fernandez 2021, arXiv 2106.09475): without BGN the first/last
  hidden weight-gradient ratio vanishes by orders of magnitude at init; with BGN after each hidden
  layer it is O(1)."""
  depth = 41
  plain = _layer_grad_norms(depth, 32, act, False, 7)
  with_bgn = _layer_grad_norms(depth, 32, act, True, 7)
  ratio_plain = plain[0] / plain[-1]
  ratio_bgn = with_bgn[0] / with_bgn[-1]
  print(f'{act.__name__}: first/last ratio without BGN {ratio_plain:.3e}, with BGN '
        f'{ratio_bgn:.3e}; spread with BGN {with_bgn.min():.3e}..{with_bgn.max():.3e}')
  assert ratio_plain < 1e-6
  assert 0.1 < ratio_bgn < 10.0
  # Every hidden layer, not just the first, receives an O(1)-sized gradient with BGN.
  assert with_bgn.max() / with_bgn.min() < 100.0


@hypothesis.settings(max_examples=10, deadline=None)
@hypothesis.given(
    batch=st.integers(1, 6),
    feature_shape=st.lists(st.integers(1, 5), min_size=1, max_size=3),
    dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
    mode=st.sampled_from(['per_sample', 'per_batch']),
    seed=st.integers(0, 2**16),
)
def test_property_norm_equals_target_for_any_shape(batch, feature_shape, dtype, mode, seed):
  shape = (batch, *feature_shape)
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=shape), dtype)
  g = jnp.asarray(rng.normal(size=shape), dtype)
  y = backward_grad_norm(x, mode=mode)
  assert y.dtype == dtype
  np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(x, np.float32))
  out = _bgn_grad(x, g, mode=mode)
  assert out.dtype == dtype and np.all(np.isfinite(np.asarray(out, np.float32)))
  ref, s = _np_bgn(np.asarray(g, np.float32), mode, 'sqrt_units', 1e-6)
  tol = 1e-5 if dtype == jnp.float32 else 1e-2
  np.testing.assert_allclose(np.asarray(out, np.float32), ref, rtol=tol, atol=tol * s)
  axes = tuple(range(1, len(shape))) if mode == 'per_sample' else None
  norms = np.sqrt(np.sum(np.asarray(out, np.float64) ** 2, axis=axes))
  gn = np.sqrt(np.sum(np.asarray(g, np.float64) ** 2, axis=axes))
  np.testing.assert_allclose(norms, s * gn / (gn + 1e-6), rtol=tol)
  assert math.isfinite(float(np.max(norms)))


# --- Extreme scales, precision and dtypes of the backward map ------------------------------------
# float32 sum(g^2) overflows once ||g|| > 1.8e19 (a gradient of scale 1e18 over 4096 units) and
# underflows to 0 below ~1e-19 (then a tiny eps, not the norm, sets the scale). The backward must
# still return target * g / (||g|| + eps): the same direction as g and that norm.


def _slices(a, mode):
  """``a`` as float64 rows, one per normalized slice (per sample, or the whole tensor)."""
  a = np.asarray(np.asarray(a, np.float32) if a.dtype == jnp.bfloat16 else a, np.float64)
  return a.reshape(a.shape[0], -1) if mode == 'per_sample' else a.reshape(1, -1)


def _np_norms(rows):
  """Row 2-norms in float64 without over/underflow (scaled by the row's largest magnitude)."""
  m = np.max(np.abs(rows), axis=1, keepdims=True)
  safe = np.where(m > 0, m, 1.0)
  return (m * np.sqrt(np.sum((rows / safe) ** 2, axis=1, keepdims=True)))[:, 0]


@functools.cache
def _xla_flushes_subnormals() -> bool:
  """XLA:CPU computes with denormals flushed to zero: a subnormal float32 operand reads as 0."""
  return float(jax.jit(lambda v: v * 2.0)(jnp.float32(np.finfo(np.float32).tiny / 4))) == 0.0


def _as_seen(g):
  """``g`` as XLA's float32/float64 arithmetic reads it: subnormal entries 0 where it flushes them
  (float16 subnormals are normal float32 numbers once converted, so they are kept)."""
  g = np.asarray(g)
  if g.dtype in (np.float32, np.float64) and _xla_flushes_subnormals():
    g = np.where(np.abs(g) < np.finfo(g.dtype).tiny, np.zeros((), g.dtype), g)
  return g


def _check_direction_and_norm(out, g, mode, eps, rtol, target='sqrt_units'):
  """Each slice of ``out`` equals ``s * g / (||g|| + eps)`` normwise, in float64: its norm is
  ``s * ||g|| / (||g|| + eps)`` and ``||out - s * g / (||g|| + eps)|| <= rtol * ||out||``.
  Returns the largest relative (norm, direction) errors seen."""
  o, r = _slices(out, mode), _slices(_as_seen(g), mode)
  assert np.all(np.isfinite(o))
  s = target_scale(np.shape(g), mode, target)
  gn = _np_norms(r)
  want = s * gn / (gn + eps)
  zero = gn == 0
  np.testing.assert_array_equal(o[zero], 0.0)
  on = _np_norms(o)
  norm_err = np.abs(on - want)[~zero] / want[~zero]
  ref = (r / np.where(zero, 1.0, gn)[:, None]) * want[:, None]  # s g / (||g|| + eps), no overflow
  dir_err = _np_norms(o - ref)[~zero] / want[~zero]
  assert np.all(norm_err <= rtol), (norm_err, on, want)
  assert np.all(dir_err <= rtol), dir_err
  return float(np.max(norm_err, initial=0.0)), float(np.max(dir_err, initial=0.0))


class ExtremeScaleTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters('per_sample', 'per_batch')
  def test_huge_finite_gradient_keeps_direction_and_target_norm(self, mode):
    g = (np.random.default_rng(10).normal(size=(1, 4096)) * 1e18).astype(np.float32)
    with np.errstate(over='ignore'):
      assert np.all(np.isfinite(g)) and not np.isfinite(np.sum(g * g))  # float32 sum(g^2) = inf
    out = self.variant(lambda x, g: _bgn_grad(x, g, mode=mode))(jnp.ones_like(g), g)
    assert np.linalg.norm(np.asarray(out, np.float64)) > 0  # not flushed to 0
    _check_direction_and_norm(out, g, mode, 1e-6, rtol=1e-6)
    ref, s = _np_bgn(g, mode, 'sqrt_units', 1e-6)  # float64 g / ||g|| does not overflow
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-6 * s / 64)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(1e-6, 1e-30)
  def test_per_sample_rows_of_any_scale_each_get_their_norm(self, eps):
    rng = np.random.default_rng(11)
    # One huge row (sum of squares inf), one ordinary, one tiny (squares underflow) and one of
    # entries up to 3e38 whose norm itself (2e40) is beyond float32.
    scales = np.array([1e18, 1.0, 1e-25, 1e37])[:, None]
    g = (np.clip(rng.normal(size=(4, 4096)), -3, 3) * scales).astype(np.float32)
    g[3, 0] = 3e38
    out = self.variant(lambda x, g: _bgn_grad(x, g, eps=eps))(jnp.ones_like(g), g)
    _check_direction_and_norm(out, g, 'per_sample', eps, rtol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(1e-30, 1e-40)
  def test_tiny_gradient_with_tiny_eps_keeps_direction_and_norm(self, eps):
    rng = np.random.default_rng(12)
    g = (rng.normal(size=(2, 4096)) * 1e-30).astype(np.float32)
    # Every 16th entry subnormal (down to the smallest, 1.4e-45): at most flushed by XLA:CPU, which
    # changes the direction by < 1e-9; the float32 squares of all entries underflow to 0.
    g[:, ::16] = (rng.uniform(-1, 1, size=(2, 256)) * 1e-38).astype(np.float32)
    g[:, 1] = np.float32(1.4e-45)
    assert np.sum(g.astype(np.float32) ** 2) < 1e-45
    out = self.variant(lambda x, g: _bgn_grad(x, g, eps=eps))(jnp.ones_like(g), g)
    # With eps = 1e-30 ~ ||g|| / 64 the norm is 64 * ||g|| / (||g|| + eps) ~ 63.0, not 64 and not
    # 64 * ||g|| / eps (the norm read as 0).
    _check_direction_and_norm(out, g, 'per_sample', eps, rtol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(1e-6, 1e-44)
  def test_all_subnormal_gradient_is_flushed_or_normalized_never_nan(self, eps):
    g = np.full((2, 64), 1e-40, np.float32)
    g[1] *= -np.arange(64, dtype=np.float32) / 64
    out = self.variant(lambda x, g: _bgn_grad(x, g, eps=eps))(jnp.ones_like(g), g)
    _check_direction_and_norm(out, g, 'per_sample', eps, rtol=1e-6)  # 0 where XLA flushes

  @chex.variants(with_jit=True, without_jit=True)
  def test_zero_slices_map_to_zero_without_nan_next_to_huge_ones(self):
    x = jnp.ones((3, 4096))
    g = np.zeros((3, 4096), np.float32)
    g[1] = np.random.default_rng(13).normal(size=4096) * 1e18
    fn = self.variant(lambda x, g: _bgn_grad(x, g))
    out = np.asarray(fn(x, g))
    np.testing.assert_array_equal(out[[0, 2]], 0.0)
    _check_direction_and_norm(out, g, 'per_sample', 1e-6, rtol=1e-6)
    # Reverse-over-reverse at zero slices next to a huge one: finite.
    w = jnp.linspace(-1.0, 1.0, 4096)
    h = self.variant(jax.grad(lambda g: jnp.sum(_bgn_grad(x, g) * w)))(jnp.asarray(g))
    assert np.all(np.isfinite(h))

  @chex.variants(with_jit=True, without_jit=True)
  def test_all_zero_gradient_with_subnormal_eps_maps_to_zero(self):
    # eps = 1e-40 is a float32 subnormal (0 to XLA:CPU): the norm and eps are both 0.
    x = jnp.ones((2, 8))
    out = self.variant(lambda x, g: _bgn_grad(x, g, eps=1e-40))(x, jnp.zeros((2, 8)))
    np.testing.assert_array_equal(np.asarray(out), 0.0)
    h = self.variant(jax.grad(lambda g: jnp.sum(_bgn_grad(x, g, eps=1e-40) * jnp.arange(8.0))))(
        jnp.zeros((2, 8)))
    assert np.all(np.isfinite(h))

  @parameterized.parameters('per_sample', 'per_batch')
  def test_float64_gradient_is_rescaled_in_float64(self, mode):
    with jax.enable_x64(True):
      rng = np.random.default_rng(14)
      g = rng.normal(size=(4, 1000)) * np.logspace(-3, 3, 4)[:, None]
      out = _bgn_grad(jnp.ones((4, 1000), jnp.float64), jnp.asarray(g), mode=mode)
      assert out.dtype == jnp.float64
      ref, _ = _np_bgn(g, mode, 'sqrt_units', 1e-6)
      rel = np.max(np.abs(np.asarray(out) - ref)) / np.max(np.abs(ref))
      assert rel < 1e-14, rel  # a float32 norm gives ~1e-7
      # float64 extremes: sum(g^2) overflows at 1e200 and underflows at 1e-200.
      for scale, eps in ((1e200, 1e-6), (1e-200, 1e-300)):
        gx = g * scale
        out = _bgn_grad(jnp.ones((4, 1000), jnp.float64), jnp.asarray(gx), mode=mode, eps=eps)
        assert out.dtype == jnp.float64
        _check_direction_and_norm(out, gx, mode, eps, rtol=1e-14)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters((jnp.bfloat16, 1e18), (jnp.bfloat16, 1e-30), (jnp.float16, 1e4),
                            (jnp.float16, 1e-6))
  def test_half_precision_gradients_keep_dtype_at_extreme_scales(self, dtype, scale):
    # bfloat16 has float32's range: its float32 sum of squares overflows / underflows the same
    # way; float16 is rescaled in float32 (its squares overflow float16 above 256, not float32).
    g = jnp.asarray(np.random.default_rng(15).normal(size=(2, 4096)) * scale, dtype)
    eps = 1e-6 if scale >= 1 else 1e-30
    out = self.variant(lambda x, g: _bgn_grad(x, g, eps=eps))(jnp.ones_like(g), g)
    assert out.dtype == dtype
    _check_direction_and_norm(out, g, 'per_sample', eps, rtol=1e-2)


def _formula_jacobian(h, eps):
  """float64 autodiff Jacobian of ``v -> s * v / (||v|| + eps)`` per row of ``h``: (B, n, B, n)."""
  b, n = h.shape
  ref = np.zeros((b, n, b, n))
  with jax.enable_x64(True):
    f = lambda v: np.sqrt(n) * v / (jnp.sqrt(jnp.sum(v * v)) + eps)
    for i in range(b):
      ref[i, :, i, :] = np.asarray(jax.jacfwd(f)(jnp.asarray(h[i], jnp.float64)))
  return ref


@pytest.mark.parametrize('scale, eps', [(2.0 ** 83, 1e-6), (2.0 ** -83, 1e-30)],
                         ids=['overflow-1e25', 'underflow-1e-25'])
def test_second_order_through_the_rescaled_path_is_that_of_the_formula(scale, eps):
  """jax.hessian / jacrev(grad) where float32 sum(g^2) overflows (scale 1e25 over 3 units) or
  underflows (1e-25, eps 1e-30), next to an ordinary row: the Jacobian of s * g / (||g|| + eps).

  Reference: float64 autodiff on the scaled-down copy h = g / k (k a power of two, so exact),
  since s * g / (||g|| + eps) at g = k h is s * h / (||h|| + eps / k): J(g; eps) = J(h; eps/k) / k.
  """
  h = np.asarray(jax.random.normal(jax.random.key(16), (2, 3)), np.float64)
  k = np.array([scale, 1.0])[:, None]
  x = jnp.asarray(h * k, jnp.float32)
  f = lambda x: 0.5 * jnp.sum(backward_grad_norm(x, eps=eps) ** 2)
  ref = np.zeros((2, 3, 2, 3))
  for i in range(2):
    ref[i, :, i, :] = _formula_jacobian(h[i:i + 1], eps / k[i, 0])[0, :, 0, :] / k[i, 0]
  for jac in (jax.hessian(f)(x), jax.jacrev(jax.grad(f))(x), jax.jit(jax.hessian(f))(x)):
    jac = np.asarray(jac, np.float64)
    assert np.all(np.isfinite(jac))
    for i in range(2):
      np.testing.assert_allclose(jac[i, :, i, :], ref[i, :, i, :], rtol=1e-5,
                                 atol=1e-6 * np.max(np.abs(ref[i, :, i, :])))
    np.testing.assert_array_equal(jac[0, :, 1, :], 0.0)
    np.testing.assert_array_equal(jac[1, :, 0, :], 0.0)


@hypothesis.settings(max_examples=30, deadline=None)
@hypothesis.given(
    k=st.integers(-40, 38),
    batch=st.integers(1, 4),
    units=st.sampled_from([1, 5, 64, 4096]),
    eps=st.sampled_from([1e-6, 1e-3, 1e-20, 1e-37]),
    mode=st.sampled_from(['per_sample', 'per_batch']),
    seed=st.integers(0, 2**16),
)
def test_property_any_float32_scale_keeps_direction_and_norm(k, batch, units, eps, mode, seed):
  """float32 gradients of scale 10^k, k in [-40, 38]: finite output, norm
  s * ||g|| / (||g|| + eps) and the direction of g (of g with subnormals flushed, where XLA
  flushes them)."""
  rng = np.random.default_rng(seed)
  g = (np.clip(rng.normal(size=(batch, units)), -3, 3) * 10.0 ** k).astype(np.float32)
  assert np.all(np.isfinite(g))
  out = _bgn_grad(jnp.ones_like(g), g, mode=mode, eps=eps)
  assert out.dtype == jnp.float32
  _check_direction_and_norm(out, g, mode, eps, rtol=1e-5)
