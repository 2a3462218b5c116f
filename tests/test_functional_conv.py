"""Tests for jaxnorm.functional.conv: forward = a numpy convolution; custom backward = autodiff."""

from __future__ import annotations

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jaxnorm.functional._conv import _dimension_numbers, conv, resolve_padding


def numpy_conv(x, w, strides, pads, dilation=(1, 1)):
  """Direct NHWC x HWIO convolution in numpy (loops over kernel taps)."""
  x = np.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
  kh, kw = w.shape[:2]
  (sh, sw), (dh, dw) = strides, dilation
  oh = (x.shape[1] - (kh - 1) * dh - 1) // sh + 1
  ow = (x.shape[2] - (kw - 1) * dw - 1) // sw + 1
  y = np.zeros((x.shape[0], oh, ow, w.shape[-1]), np.float64)
  for i in range(kh):
    for j in range(kw):
      patch = x[:, i * dh:i * dh + (oh - 1) * sh + 1:sh, j * dw:j * dw + (ow - 1) * sw + 1:sw, :]
      y += np.einsum('nhwc,co->nhwo', patch, w[i, j])
  return y


def _grads(x, w, cb, **kw):
  loss = lambda x, w: jnp.sum(jnp.sin(conv(x, w, custom_backward=cb, **kw)))
  return jax.grad(loss, argnums=(0, 1))(x, w)


@functools.partial(jax.jit, static_argnames=('strides', 'padding', 'kernel_dilation'))
def _forward_and_both_grads(x, w, strides=1, padding='SAME', kernel_dilation=1):
  """(conv output, custom-VJP grads, autodiff grads), compiled once per case."""
  kw = dict(strides=strides, padding=padding, kernel_dilation=kernel_dilation)
  return conv(x, w, **kw), _grads(x, w, True, **kw), _grads(x, w, False, **kw)


# Kernels 1/3/7 x strides 1/2 x SAME/VALID/explicit, every pair of values covered (the full product
# was checked in development: max error 0 in float64); the input is 7 x 8 (odd and even at once).
_EXPLICIT = ((2, 1), (0, 3))
CASES = [(1, 1, 'SAME'), (1, 2, 'VALID'), (1, 2, _EXPLICIT), (3, 1, 'VALID'), (3, 2, 'SAME'),
         (3, 1, _EXPLICIT), (7, 1, 'SAME'), (7, 2, 'VALID'), (7, 2, _EXPLICIT)]


@pytest.mark.parametrize('k,s,padding', CASES)
def test_forward_equals_numpy_and_custom_backward_equals_autodiff(k, s, padding):
  rng = np.random.default_rng(k * 100 + s)
  x = rng.normal(size=(2, 7, 8, 3)).astype(np.float32)
  w = rng.normal(size=(k, k, 3, 4)).astype(np.float32)
  y, got, want = _forward_and_both_grads(x, w, strides=s, padding=padding)
  pads = resolve_padding(padding, x.shape[1:3], w.shape[:2], (s, s), (1, 1))
  np.testing.assert_allclose(y, numpy_conv(x, w, (s, s), pads), rtol=1e-5, atol=1e-4)
  chex.assert_trees_all_close(got, want, atol=1e-5, rtol=1e-5)


def test_same_padding_matches_lax_same():
  for size, k, s in [(7, 3, 2), (8, 3, 2), (8, 4, 3), (5, 7, 1), (6, 2, 2)]:
    pads = resolve_padding('SAME', (size,), (k,), (s,), (1,))
    want = lax.padtype_to_pads((size,), (k,), (s,), 'SAME')
    assert list(pads) == [tuple(p) for p in want]


@pytest.mark.parametrize('s,padding,dilation', [
    (2, 'SAME', 1), (1, 'VALID', 2), (3, ((3, 0), (1, 4)), 1), (2, 2, 2)])
def test_custom_backward_equals_autodiff_float64(s, padding, dilation):
  with jax.enable_x64(True):
    rng = np.random.default_rng(s)
    x = jnp.asarray(rng.normal(size=(2, 9, 8, 3)))
    w = jnp.asarray(rng.normal(size=(3, 3, 3, 5)))
    _, got, want = _forward_and_both_grads(x, w, strides=s, padding=padding,
                                           kernel_dilation=dilation)
    assert got[0].dtype == jnp.float64 and got[1].dtype == jnp.float64
    chex.assert_trees_all_close(got, want, atol=1e-12, rtol=1e-12)


def numpy_grouped_conv(x, w, strides, pads, dilation, groups):
  """Grouped conv as ``groups`` independent numpy convs over channel slices, concatenated."""
  ci, co = w.shape[-2], w.shape[-1] // groups
  return np.concatenate([
      numpy_conv(x[..., g * ci:(g + 1) * ci], w[..., g * co:(g + 1) * co], strides, pads, dilation)
      for g in range(groups)], axis=-1)


@functools.partial(jax.jit, static_argnames=('kw',))
def _grouped_forward_and_both_grads(x, w, kw):
  kw = dict(kw)
  return conv(x, w, **kw), _grads(x, w, True, **kw), _grads(x, w, False, **kw)


# (x shape, kernel shape, groups, strides, padding, input dilation, kernel dilation): groups 1, 2
# and depthwise (G = Cin, channel multiplier 2), negative (cropping) pads, 1-D and 3-D.
GROUPED = [
    ((2, 9, 8, 6), (3, 3, 3, 4), 2, 2, 'SAME', 1, 1),
    ((2, 9, 8, 6), (3, 2, 3, 6), 2, 1, ((2, 1), (0, 3)), 2, 2),
    ((2, 9, 8, 6), (3, 3, 1, 12), 6, 2, 'VALID', 1, 2),
    ((2, 9, 8, 6), (3, 3, 1, 6), 6, 3, ((5, -1), (-1, 4)), 2, 1),
    ((2, 9, 8, 3), (2, 3, 3, 4), 1, 2, ((1, 2), (3, 0)), 3, 1),
    ((2, 7, 8, 6), (3, 2, 2, 9), 3, 1, 'CIRCULAR', 1, 2),
    ((2, 11, 4), (3, 1, 8), 4, 2, 'CAUSAL', 1, 2),
    ((2, 5, 4, 6, 4), (3, 2, 3, 2, 4), 2, (2, 1, 2), 'SAME', 1, 1),
]


@pytest.mark.parametrize('xs,ws,groups,s,padding,a,d', GROUPED)
def test_grouped_dilated_custom_backward_equals_autodiff_float64(xs, ws, groups, s, padding, a, d):
  with jax.enable_x64(True):
    rng = np.random.default_rng(len(xs) * 10 + groups)
    x = jnp.asarray(rng.normal(size=xs))
    w = jnp.asarray(rng.normal(size=ws))
    kw = (('strides', s), ('padding', padding), ('input_dilation', a), ('kernel_dilation', d),
          ('feature_group_count', groups))
    y, got, want = _grouped_forward_and_both_grads(x, w, kw)
    assert y.dtype == got[0].dtype == got[1].dtype == jnp.float64
    n = x.ndim - 2
    if padding not in ('CIRCULAR', 'CAUSAL'):  # those pad x itself first
      ref = lax.conv_general_dilated(
          x, w, (s,) * n if isinstance(s, int) else s, padding, lhs_dilation=(a,) * n,
          rhs_dilation=(d,) * n, dimension_numbers=_dimension_numbers(n),
          feature_group_count=groups)
      np.testing.assert_allclose(y, ref, rtol=1e-12, atol=1e-12)
    if n == 2 and a == 1 and not isinstance(padding, str):  # an independent numpy reference
      np.testing.assert_allclose(
          y, numpy_grouped_conv(np.asarray(x), np.asarray(w), (s, s), padding, (d, d), groups),
          rtol=1e-10, atol=1e-10)
  chex.assert_trees_all_close(got, want, atol=1e-10, rtol=1e-10)


def test_one_and_three_spatial_axes():
  rng = np.random.default_rng(0)
  for xs, ws in [((2, 9, 3), (3, 3, 4)), ((2, 5, 4, 6, 2), (3, 2, 3, 2, 3))]:
    x = rng.normal(size=xs).astype(np.float32)
    w = rng.normal(size=ws).astype(np.float32)
    _, got, want = _forward_and_both_grads(x, w, strides=2)
    chex.assert_trees_all_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('padding', ['CIRCULAR', 'REFLECT'])
def test_circular_and_reflect_padding_match_flax(padding):
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(2, 6, 7, 3)), jnp.float32)
  layer = nn.Conv(4, (3, 2), padding=padding, use_bias=False)
  params = layer.init(jax.random.key(0), x)
  np.testing.assert_allclose(conv(x, params['params']['kernel'], padding=padding),
                             layer.apply(params, x), rtol=1e-5, atol=1e-5)


class ConvVariantsTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_gradient_with_and_without_jit(self):
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(2, 5, 5, 3)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 3, 3, 4)), jnp.float32)
    got = self.variant(lambda x, w: _grads(x, w, True, strides=2))(x, w)
    _, _, want = _forward_and_both_grads(x, w, strides=2)
    chex.assert_trees_all_close(got, want, atol=1e-5, rtol=1e-5)


def test_vmap_over_kernels_equals_loop():
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(2, 6, 6, 3)), jnp.float32)
  ws = jnp.asarray(rng.normal(size=(4, 3, 3, 3, 2)), jnp.float32)
  g = jax.jit(jax.vmap(lambda w: _grads(x, w, True, strides=2)))(ws)
  for i in range(4):
    _, _, want = _forward_and_both_grads(x, ws[i], strides=2)
    chex.assert_trees_all_close(jax.tree.map(lambda a, i=i: a[i], g), want, atol=1e-5, rtol=1e-5)


def _stack_loss(cb, remat):
  layer = lambda h, w: jax.nn.relu(conv(h, w, padding='SAME', custom_backward=cb))
  if remat:
    layer = jax.checkpoint(layer)

  def loss(ws, x):
    h, _ = lax.scan(lambda h, w: (layer(h, w), None), x, ws)
    return jnp.sum(h ** 2)
  return loss


@pytest.mark.parametrize('remat', [False, True])
def test_scan_and_checkpoint_gradients_equal_autodiff(remat):
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.normal(size=(2, 6, 6, 4)), jnp.float32)
  ws = jnp.asarray(rng.normal(size=(3, 3, 3, 4, 4)) / 6, jnp.float32)
  got = jax.jit(jax.grad(_stack_loss(True, remat), argnums=(0, 1)))(ws, x)
  want = jax.jit(jax.grad(_stack_loss(False, False), argnums=(0, 1)))(ws, x)
  chex.assert_trees_all_close(got, want, atol=1e-4, rtol=1e-4)


def test_bfloat16_in_bfloat16_out_and_gradients():
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.normal(size=(2, 8, 8, 4)), jnp.bfloat16)
  w = jnp.asarray(rng.normal(size=(3, 3, 4, 4)) / 6, jnp.bfloat16)
  assert conv(x, w, strides=2).dtype == jnp.bfloat16
  _, (dx, dw), _ = _forward_and_both_grads(x, w, strides=2)
  assert dx.dtype == jnp.bfloat16 and dw.dtype == jnp.bfloat16
  _, _, (dx32, dw32) = _forward_and_both_grads(x.astype(jnp.float32), w.astype(jnp.float32),
                                               strides=2)
  np.testing.assert_allclose(dx.astype(jnp.float32), dx32, atol=0.05, rtol=0.05)
  np.testing.assert_allclose(dw.astype(jnp.float32), dw32, atol=0.2, rtol=0.05)


def test_forward_mode_needs_custom_backward_false():
  x = jnp.ones((1, 4, 4, 2))
  w = jnp.ones((3, 3, 2, 2))
  with pytest.raises(TypeError, match='forward-mode'):
    jax.jvp(lambda w: conv(x, w), (w,), (w,))
  _, tangent = jax.jvp(lambda w: conv(x, w, custom_backward=False), (w,), (w,))
  np.testing.assert_allclose(tangent, conv(x, w))  # conv is linear in w


def test_hessian_and_reverse_over_reverse_equal_autodiff():
  rng = np.random.default_rng(6)
  x = jnp.asarray(rng.normal(size=(1, 5, 4, 2)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(3, 3, 2, 2)), jnp.float32)
  f = lambda cb: (lambda w: jnp.sum(jnp.sin(conv(x, w, strides=2, custom_backward=cb))))
  np.testing.assert_allclose(jax.jit(jax.hessian(f(True)))(w), jax.jit(jax.hessian(f(False)))(w),
                             rtol=1e-5, atol=1e-5)
  gg = lambda cb: jax.grad(lambda w: jnp.sum(jax.grad(f(cb))(w) ** 2))
  np.testing.assert_allclose(jax.jit(gg(True))(w), jax.jit(gg(False))(w), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('kwargs,match', [
    (dict(feature_group_count=3), 'feature_group_count'),  # 2 input channels: not a divisor
    (dict(feature_group_count=0), 'feature_group_count'),
    (dict(input_dilation=2), 'padding'),  # string padding with input dilation (as flax / lax)
    (dict(padding='CAUSAL'), 'padding'),  # 1-D only (as flax)
    (dict(padding='FULL'), 'padding'),
    (dict(strides=0), 'strides'),
    (dict(padding=((1, 1),)), 'padding'),
])
def test_bad_arguments_raise_value_error(kwargs, match):
  with pytest.raises(ValueError, match=match):
    conv(jnp.ones((1, 4, 4, 2)), jnp.ones((3, 3, 2, 2)), **kwargs)


def test_bad_inputs_raise():
  with pytest.raises(ValueError, match='rank'):
    conv(jnp.ones((4, 4)), jnp.ones((3, 3, 2, 2)))
  with pytest.raises(ValueError, match='input-channel'):
    conv(jnp.ones((1, 4, 4, 3)), jnp.ones((3, 3, 2, 2)))
  with pytest.raises(TypeError, match='floating'):
    conv(jnp.ones((1, 4, 4, 2), jnp.int32), jnp.ones((3, 3, 2, 2)))
  with pytest.raises(ValueError, match='dilated kernel size'):
    conv(jnp.ones((1, 2, 2, 2)), jnp.ones((3, 3, 2, 2)), padding='VALID')


@pytest.mark.parametrize('s,groups', [(1, 1), (2, 3)])
def test_kernel_gradient_summed_over_batch_chunks_equals_autodiff_float64(s, groups):
  # Batch 64 >= KERNEL_GRAD_MIN_BATCH: the kernel gradient runs as a scan over 8 chunks of 8
  # (also for a depthwise conv: 3 channels, 3 groups).
  from jaxnorm.functional import _conv as conv_module

  assert conv_module.KERNEL_GRAD_BATCH_CHUNK == 8 and conv_module.KERNEL_GRAD_MIN_BATCH <= 64
  with jax.enable_x64(True):
    rng = np.random.default_rng(s)
    x = jnp.asarray(rng.normal(size=(64, 7, 6, 3)))
    w = jnp.asarray(rng.normal(size=(3, 3, 3 // groups, 6)))
    kw = (('strides', s), ('padding', 'SAME'), ('feature_group_count', groups))
    _, got, want = _grouped_forward_and_both_grads(x, w, kw)
    hlo = jax.jit(lambda x, w: _grads(x, w, True, **dict(kw))).lower(x, w).as_text()
    assert 'while' in hlo  # the chunked path was taken
    chex.assert_trees_all_close(got, want, atol=1e-12, rtol=1e-12)


def test_kernel_gradient_chunks_of_bfloat16_round_once():
  # bf16 x and g: the chunked kernel gradient is accumulated in float32 and rounded once, so it is
  # the float32 result of the same bf16 values to within one bf16 rounding (2^-8 relative).
  from jaxnorm.functional import _conv as conv_module

  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(64, 6, 6, 4)), jnp.bfloat16)
  g = jnp.asarray(rng.normal(size=(64, 6, 6, 2)), jnp.bfloat16)
  dw_of = lambda w: jax.vjp(lambda w: conv(x, w), w)[1](g)[0]
  dw = jax.jit(dw_of)(jnp.zeros((3, 3, 4, 2), jnp.bfloat16))
  want = conv_module._kernel_grad_conv(
    x.astype(jnp.float32), g.astype(jnp.float32), (3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1),
    (1, 1), 1, None, conv_module._dimension_numbers(2))
  assert dw.dtype == jnp.bfloat16
  np.testing.assert_allclose(dw.astype(jnp.float32), want, rtol=2**-8, atol=1e-6)


@pytest.mark.parametrize('strides, padding, dilation, input_dilation, groups', [
    (1, 'SAME', 1, 1, 1), (2, 'VALID', 1, 1, 1), (1, ((2, 0), (1, 1)), 2, 1, 1),
    (2, ((1, 2), (0, 1)), 1, 2, 2), (1, ((2, 1), (1, 1)), 2, 1, 4)])
def test_second_derivatives_equal_autodiff_float64(strides, padding, dilation, input_dilation,
                                                   groups):
  # Upstream parameter u -> x = tanh(u * x0) -> conv(x, w) -> sin: Hessians w.r.t. (u, x0, w)
  # (forward over reverse), grad of a gradient norm (reverse over reverse) and jacrev(grad).
  # Groups 1, 2 and depthwise (4 channels, 4 groups), with input dilation.
  cin, cout = (3, 2) if groups == 1 else (4, 4)
  kw = dict(strides=strides, padding=padding, kernel_dilation=dilation,
            input_dilation=input_dilation, feature_group_count=groups)
  with jax.enable_x64(True):
    rng = np.random.default_rng(16)
    x0 = jnp.asarray(rng.normal(size=(2, 6, 5, cin)))
    w = jnp.asarray(rng.normal(size=(3, 3, cin // groups, cout)) / 3.0)
    u = jnp.asarray(rng.normal(size=(cin,)))
    cot = jnp.asarray(rng.normal(size=conv(x0, w, **kw).shape))

    def loss(cb):
      def f(u, x0, w):
        y = conv(jnp.tanh(u * x0), w, custom_backward=cb, **kw)
        return jnp.sum(jnp.sin(y) * cot)
      return f

    def derivatives(cb):
      f = loss(cb)
      grad_norm = lambda *a: sum(jnp.sum(g ** 2) for g in jax.grad(f, (0, 1, 2))(*a))
      return {'hessian': jax.hessian(f, (0, 1, 2))(u, x0, w),
              'grad_of_grad': jax.grad(grad_norm, (0, 1, 2))(u, x0, w),
              'jacrev_grad': jax.jacrev(jax.grad(f, 2), (0, 2))(u, x0, w)}

    ours, ref = (jax.jit(lambda c=c: derivatives(c))() for c in (True, False))
  for key in ref:
    for a, b in zip(jax.tree.leaves(ours[key]), jax.tree.leaves(ref[key]), strict=True):
      scale = max(float(np.max(np.abs(b))), 1e-300)
      assert float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) <= 1e-8 * scale, key


def test_second_derivatives_through_the_batch_chunked_kernel_gradient_float64():
  # Batch 64 takes the chunked kernel gradient on CPU (see the chunking test above).
  with jax.enable_x64(True):
    rng = np.random.default_rng(17)
    x = jnp.asarray(rng.normal(size=(64, 4, 4, 2)))
    w = jnp.asarray(rng.normal(size=(3, 3, 2, 2)) / 3.0)

    def derivatives(cb):
      f = lambda x, w: jnp.sum(jnp.sin(conv(jnp.tanh(x), w, custom_backward=cb)))
      grad_norm = lambda x, w: jnp.sum(jax.grad(f, 1)(x, w) ** 2)
      return jax.hessian(f, 1)(x, w), jax.grad(grad_norm, (0, 1))(x, w)

    ours, ref = (jax.jit(lambda c=c: derivatives(c))() for c in (True, False))
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref), strict=True):
    assert float(np.max(np.abs(a - b))) <= 1e-8 * float(np.max(np.abs(b)))
