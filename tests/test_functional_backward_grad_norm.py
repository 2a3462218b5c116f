"""Tests of jaxnorm.functional.backward_grad_norm against numpy and the paper's claims."""

from __future__ import annotations

import math

import chex
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from jaxnorm.functional.backward_grad_norm import backward_grad_norm


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
  """Paper claim (papers.md 2(d)): without BGN the first/last hidden weight-gradient ratio
  vanishes by orders of magnitude at init; with BGN after each hidden layer it is O(1)."""
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
