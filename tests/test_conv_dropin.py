"""jaxnorm's conv layers as drop-ins for flax.linen.Conv / flax.nnx.Conv.

- ``jaxnorm.linen.Conv`` / ``jaxnorm.nnx.Conv`` against ``flax.linen.Conv`` / ``flax.nnx.Conv``
  over the signature (int and tuple kernel sizes, strides, every padding form, input and kernel
  dilation, groups 1 / 2 / depthwise, bias or not, mask, dtypes, 1-D to 3-D, batch axes): the
  same parameter tree, the same initial values, the same outputs and gradients;
- every linen conv layer as the ``conv`` of a ResNet-18 written like Flax's ImageNet example
  (``tests/flax_style_resnet.py``, which calls its convs with ``use_bias=False``);
- grouped WS / Scaled WS / PWS against numpy standardization + ``lax.conv_general_dilated`` with
  ``feature_group_count``;
- error messages naming the layer, the argument, what was expected and what was given.
"""

from __future__ import annotations

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

import jaxnorm.linen.conv as linen_conv
from jaxnorm import linen as jl
from jaxnorm import nnx as jn
from tests.flax_style_resnet import ResNet18


def _x(shape, seed=0, dtype=jnp.float32):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype)


def _perturbed(tree, scale=0.1):
  """Every leaf moved by seeded noise (so biases and scales are not at their init values)."""
  return jax.tree.map(lambda p: (p + scale * _x(p.shape, seed=p.size)).astype(p.dtype), tree)


# (input shape, keyword arguments shared by flax's and jaxnorm's layer); out features 8.
_MASK = np.tril(np.ones((3, 3, 4, 8), np.float32))
SIGNATURES = [
    ((2, 9, 4), dict(kernel_size=3, strides=2)),                       # int kernel_size: (3,)
    ((2, 5, 9, 4), dict(kernel_size=3)),                               # int on rank 4: 2 batch axes
    ((2, 9, 8, 4), dict(kernel_size=(3, 3), strides=(2, 1), padding='VALID',
                        feature_group_count=2, use_bias=False)),
    ((2, 9, 8, 4), dict(kernel_size=(3, 3), padding='CIRCULAR', kernel_dilation=2,
                        feature_group_count=4)),                       # depthwise, multiplier 2
    ((2, 9, 8, 4), dict(kernel_size=(3, 2), strides=2, padding='REFLECT')),
    ((2, 7, 8, 4), dict(kernel_size=(2, 3), padding=((1, 2), (0, 1)), input_dilation=(2, 1),
                        kernel_dilation=(1, 2), feature_group_count=2)),
    ((2, 9, 8, 4), dict(kernel_size=(3, 3), strides=2, padding=1, precision='highest')),
    ((2, 9, 8, 4), dict(kernel_size=(3, 3), padding=(1, (0, 2)), input_dilation=2)),
    ((2, 11, 4), dict(kernel_size=(4,), padding='CAUSAL', kernel_dilation=2,
                      feature_group_count=4)),
    ((2, 5, 4, 6, 4), dict(kernel_size=(3, 2, 3), strides=2, feature_group_count=2)),   # 3-D
    ((6, 7, 4), dict(kernel_size=(3, 3), strides=None, padding='SAME_LOWER')),  # unbatched
    ((3, 2, 6, 6, 4), dict(kernel_size=(3, 3), mask=_MASK)),           # 2 batch axes, masked
    ((2, 8, 8, 4), dict(kernel_size=(3, 3), strides=2, dtype=jnp.bfloat16)),
    ((2, 8, 8, 4), dict(kernel_size=(3, 3), param_dtype=jnp.bfloat16, feature_group_count=2)),
]
_IDS = [f'{len(s)}d-{"-".join(sorted(k))}' for s, k in SIGNATURES]


def _tolerance(kwargs):
  # The custom backward sums in another order than autodiff: bf16 rounding in bf16; in float32,
  # gradients of size ~30 summed over a few hundred terms differ by a few 1e-6 (measured 2.3e-6
  # with grouped, dilated kernels under jax 0.10.2).
  low = kwargs.get('dtype') == jnp.bfloat16 or kwargs.get('param_dtype') == jnp.bfloat16
  return dict(rtol=2e-2, atol=2e-2) if low else dict(rtol=1e-5, atol=1e-5)


def _loss(y):
  return jnp.sum(jnp.tanh(y.astype(jnp.float32)) ** 2)


@pytest.mark.parametrize('shape,kwargs', SIGNATURES, ids=_IDS)
def test_linen_conv_equals_flax_linen_conv(shape, kwargs):
  x = _x(shape, seed=len(shape))
  ours, ref = jl.Conv(8, **kwargs), nn.Conv(8, **kwargs)
  variables = ref.init(jax.random.key(1), x)
  ours_vars = ours.init(jax.random.key(1), x)
  # Same tree, shapes, dtypes and (same initializers, same key) values as flax.
  assert jax.tree.map(jnp.shape, ours_vars) == jax.tree.map(jnp.shape, variables)
  chex.assert_trees_all_equal(ours_vars, variables)
  variables = _perturbed(variables)

  @jax.jit
  def both(variables, x):
    outs = []
    for layer in (ours, ref):
      f = lambda v, x, layer=layer: layer.apply(v, x)
      y, vjp = jax.vjp(f, variables, x)
      outs.append((y, vjp(jax.grad(_loss)(y))))
    return outs

  (y, grads), (y_ref, grads_ref) = both(variables, x)
  assert y.shape == y_ref.shape and y.dtype == y_ref.dtype
  np.testing.assert_array_equal(y, y_ref)  # the forward is the same lax call
  chex.assert_trees_all_equal_dtypes(grads, grads_ref)
  chex.assert_trees_all_close(grads, grads_ref, **_tolerance(kwargs))


def _set_params(module, values):
  state = nnx.state(module, nnx.Param)
  nnx.replace_by_pure_dict(state, dict(values))
  nnx.update(module, state)


def _nnx_kwargs(shape, kwargs):
  kw = dict(kwargs)
  return (shape[-1], 8, kw.pop('kernel_size'), kw.pop('strides', 1)), kw


_NNX = list(range(0, len(SIGNATURES), 2)) + [1, 3, 11]  # int rank 4, depthwise, mask


@pytest.mark.parametrize('shape,kwargs', [SIGNATURES[i] for i in _NNX],
                         ids=[_IDS[i] for i in _NNX])
def test_nnx_conv_equals_flax_nnx_conv(shape, kwargs):
  x = _x(shape, seed=len(shape))
  args, kw = _nnx_kwargs(shape, kwargs)
  ours, ref = jn.Conv(*args, **kw, rngs=nnx.Rngs(3)), nnx.Conv(*args, **kw, rngs=nnx.Rngs(3))
  ours_p, ref_p = nnx.state(ours, nnx.Param), nnx.state(ref, nnx.Param)
  assert jax.tree.map(jnp.shape, ours_p) == jax.tree.map(jnp.shape, ref_p)
  chex.assert_trees_all_equal(nnx.to_pure_dict(ours_p), nnx.to_pure_dict(ref_p))  # same rngs draws
  assert (ours.bias is None) == (ref.bias is None) and ours.kernel_size == ref.kernel_size
  new = _perturbed(nnx.to_pure_dict(ref_p))
  for m in (ours, ref):
    _set_params(m, new)

  @nnx.jit
  def both(ours, ref, x):
    outs = []
    for m in (ours, ref):
      y = m(x)
      g = nnx.grad(lambda m, x: _loss(m(x)), argnums=(0, 1))(m, x)
      outs.append((y, (nnx.to_pure_dict(nnx.state(g[0], nnx.Param)), g[1])))
    return outs

  (y, grads), (y_ref, grads_ref) = both(ours, ref, x)
  assert y.shape == y_ref.shape and y.dtype == y_ref.dtype
  np.testing.assert_array_equal(y, y_ref)
  chex.assert_trees_all_close(grads, grads_ref, **_tolerance(kwargs))


# ----------------------------------------------------------------------------------------------
# Every conv layer inside a ResNet-18 written like Flax's examples (use_bias=False convs)
# ----------------------------------------------------------------------------------------------

def _ws_reference(w, eps):
  flat = np.asarray(w, np.float64).reshape(-1, w.shape[-1])
  return ((flat - flat.mean(0)) / np.sqrt(flat.var(0) + eps)).reshape(w.shape)


@pytest.mark.slow  # a whole model: ~10 s of XLA compilation per layer on 2 CPU cores
@pytest.mark.parametrize('layer', [jl.Conv, jl.WSConv, jl.ScaledWSConv,
                                   functools.partial(jl.PWSConv, gamma=1e-3, init_alpha=True)],
                         ids=['Conv', 'WSConv', 'ScaledWSConv', 'PWSConv'])
def test_every_conv_layer_drops_into_a_flax_style_resnet18(layer, monkeypatch):
  x = _x((2, 32, 32, 3))
  model = ResNet18(num_classes=10, num_filters=8, conv=layer)
  variables = jax.jit(model.init)(jax.random.key(0), x)
  params = variables['params']
  # use_bias=False was honoured: every conv has a kernel (and gain / alpha) but no bias.
  conv_params = {k: v for k, v in jax.tree_util.tree_flatten_with_path(params)[0]
                 if 'conv' in jax.tree_util.keystr(k).lower()}
  assert conv_params and not any('bias' in jax.tree_util.keystr(k) for k in conv_params)

  # Record the kernel each conv layer actually convolves with, keyed by the layer's path.
  current, kernels = [], {}
  real_conv = linen_conv.conv

  def spy(x, k, **kw):
    kernels[current[-1]] = k
    return real_conv(x, k, **kw)

  def interceptor(next_fun, args, kwargs, context):
    if isinstance(context.module, linen_conv._ConvBase) and context.method_name == '__call__':
      current.append(context.module.path)
      try:
        return next_fun(*args, **kwargs)
      finally:
        current.pop()
    return next_fun(*args, **kwargs)

  monkeypatch.setattr(linen_conv, 'conv', spy)

  def loss(params, batch_stats, x):
    kernels.clear()
    with nn.intercept_methods(interceptor):
      y, state = model.apply({'params': params, 'batch_stats': batch_stats}, x,
                             mutable=['batch_stats'])
    return jnp.sum(jax.nn.log_softmax(y)[:, 0]), (y, state, dict(kernels))

  (value, (y, state, effective)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(
      params, variables['batch_stats'], x)
  assert y.shape == (2, 10) and np.all(np.isfinite(y)) and np.isfinite(value)
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  assert all(np.all(np.isfinite(s)) for s in jax.tree.leaves(state))
  assert len(effective) == 20  # every conv was seen: stem, 8 blocks x 2, 3 projections
  name = layer.func.__name__ if isinstance(layer, functools.partial) else layer.__name__
  for path, k_eff in effective.items():
    p = functools.reduce(lambda t, key: t[key], path, params)
    w, k_eff = np.asarray(p['kernel'], np.float64), np.asarray(k_eff, np.float64)
    flat_w, flat_k = w.reshape(-1, w.shape[-1]), k_eff.reshape(-1, w.shape[-1])
    fan_in, var = flat_w.shape[0], flat_w.var(0)
    if name == 'Conv':
      np.testing.assert_array_equal(k_eff, w)
      continue
    # Standardized: per-filter mean 0 (the raw kernel's is not) ...
    np.testing.assert_allclose(flat_k.mean(0), 0.0, atol=1e-6 * np.abs(flat_k).max())
    assert np.abs(flat_w.mean(0)).max() > 1e-4
    if name == 'WSConv':  # ... variance var / (var + eps), ~1
      np.testing.assert_allclose(flat_k.var(0), var / (var + 1e-5), rtol=1e-4)
      np.testing.assert_allclose(k_eff, _ws_reference(w, 1e-5), rtol=1e-4, atol=1e-5)
    elif name == 'ScaledWSConv':  # ... variance gain^2 / fan_in
      np.testing.assert_allclose(flat_k.var(0), np.asarray(p['gain']) ** 2 / fan_in, rtol=1e-4)
    else:  # PWSConv: variance (2 / fan_in) alpha^2 var / (var + gamma)
      alpha = np.asarray(p['alpha'], np.float64)
      np.testing.assert_allclose(flat_k.var(0), 2 / fan_in * alpha ** 2 * var / (var + 1e-3),
                                 rtol=1e-4)
      np.testing.assert_allclose(alpha, alpha[0])  # the data-dependent init: one scalar


# ----------------------------------------------------------------------------------------------
# Grouped WS / Scaled WS / PWS against numpy standardization + lax grouped convolution
# ----------------------------------------------------------------------------------------------

def _np_standardize(w, kind, eps=None, gamma=None, mode='fan_in', equiv=False, scale=None):
  """Per output filter over its (kh, kw, Cin / G) entries, float64 numpy."""
  flat = np.asarray(w, np.float64).reshape(-1, w.shape[-1])
  n = flat.shape[0]  # fan_in = kh * kw * Cin / G
  c = flat - flat.mean(0)
  if kind == 'ws':
    out = c / np.sqrt(flat.var(0) + eps)
  elif kind == 'ws_std':
    out = c / (flat.std(0, ddof=1) + eps)
  elif kind == 'scaled_ws':
    out = c / np.sqrt(np.maximum(n * flat.var(0), eps))
  else:  # torch's fan convention on the grouped kernel: fan_out = kh * kw * Cout
    fan = n if mode == 'fan_in' else n // w.shape[-2] * w.shape[-1]
    g = gamma * 2 / fan if equiv else gamma
    out = np.sqrt(2 / fan) * c / np.sqrt(flat.var(0) + g)
  if scale is not None:
    out = out * np.asarray(scale, np.float64)
  return out.reshape(w.shape)


GROUPED_LAYERS = [
    ('ws', 2, dict(), dict(eps=1e-5)),
    ('ws_std', 6, dict(method='ws_std'), dict(eps=1e-5)),
    ('scaled_ws', 2, dict(), dict(eps=1e-4)),
    ('pws', 6, dict(gamma=1e-3), dict(gamma=1e-3)),
    ('pws', 2, dict(gamma=0.1, mode='fan_out', equiv=True),
     dict(gamma=0.1, mode='fan_out', equiv=True)),
]
_CLASSES = {'ws': 'WSConv', 'ws_std': 'WSConv', 'scaled_ws': 'ScaledWSConv', 'pws': 'PWSConv'}


@pytest.mark.parametrize('kind,groups,layer_kw,ref_kw', GROUPED_LAYERS)
def test_grouped_standardized_convs_equal_numpy_and_lax_reference(kind, groups, layer_kw, ref_kw):
  x = _x((2, 7, 6, 6), seed=groups)
  name = _CLASSES[kind]
  kw = dict(kernel_size=(3, 3), strides=2, padding=((1, 1), (0, 2)), feature_group_count=groups)
  layer = getattr(jl, name)(12, **kw, **layer_kw)
  variables = _perturbed(layer.init(jax.random.key(0), x), scale=0.3)
  params = variables['params']
  assert params['kernel'].shape == (3, 3, 6 // groups, 12) and params['bias'].shape == (12,)
  scale = params.get('gain', params.get('alpha'))
  w_hat = _np_standardize(params['kernel'], kind, scale=scale, **ref_kw)
  dn = ('NHWC', 'HWIO', 'NHWC')
  conv = functools.partial(lax.conv_general_dilated, window_strides=(2, 2),
                           padding=((1, 1), (0, 2)), dimension_numbers=dn,
                           feature_group_count=groups, precision=lax.Precision.HIGHEST)
  want = np.asarray(conv(x, jnp.asarray(w_hat, jnp.float32))) + np.asarray(params['bias'])
  y = layer.apply(variables, x)
  np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4)

  # Gradients: autodiff of a direct jnp formula (per-group filters) + lax's grouped conv.
  def direct(params, x):
    w = params['kernel']
    n = np.prod(w.shape[:-1])
    c = w - jnp.mean(w, (0, 1, 2))
    var = jnp.mean(c ** 2, (0, 1, 2))
    if kind == 'ws':
      wh = c / jnp.sqrt(var + 1e-5)
    elif kind == 'ws_std':
      wh = c / (jnp.sqrt(var * n / (n - 1)) + 1e-5)
    elif kind == 'scaled_ws':
      wh = params['gain'] * c / jnp.sqrt(jnp.maximum(n * var, 1e-4))
    else:
      fan = n if ref_kw.get('mode', 'fan_in') == 'fan_in' else n // w.shape[-2] * w.shape[-1]
      gamma = ref_kw['gamma'] * (2 / fan if ref_kw.get('equiv') else 1)
      wh = params['alpha'] * np.sqrt(2 / fan) * c / jnp.sqrt(var + gamma)
    return conv(x, wh) + params['bias']

  loss = lambda f: jax.grad(lambda p, x: jnp.sum(jnp.tanh(f(p, x)) ** 2), argnums=(0, 1))
  got = jax.jit(loss(lambda p, x: layer.apply({'params': p}, x)))(params, x)
  ref = jax.jit(loss(direct))(params, x)
  chex.assert_trees_all_close(got, ref, rtol=1e-4, atol=1e-4)

  # The NNX layer with the same parameters gives the same output.
  mod = getattr(jn, name)(6, 12, **kw, **layer_kw, rngs=nnx.Rngs(0))
  _set_params(mod, params)
  np.testing.assert_allclose(mod(x), y, rtol=1e-6, atol=1e-6)


def test_use_bias_and_defaults_of_the_standardized_layers():
  x = jnp.ones((1, 5, 5, 4))
  for name, extra in [('WSConv', set()), ('ScaledWSConv', {'gain'}), ('PWSConv', {'alpha'})]:
    with_bias = getattr(jl, name)(4, (3, 3)).init(jax.random.key(0), x)['params']
    without = getattr(jl, name)(4, (3, 3), use_bias=False).init(jax.random.key(0), x)['params']
    assert set(with_bias) == {'kernel', 'bias'} | extra  # the references have a bias
    assert set(without) == {'kernel'} | extra
    mod = getattr(jn, name)(4, 4, (3, 3), use_bias=False, rngs=nnx.Rngs(0))
    assert set(nnx.to_pure_dict(nnx.state(mod, nnx.Param))) == {'kernel'} | extra


# ----------------------------------------------------------------------------------------------
# Errors name the layer, the argument, what was expected and what was given
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize('make,shape,match', [
    (lambda: jl.Conv(8, (3, 3), feature_group_count=3), (1, 5, 5, 4),
     r'Conv: argument `feature_group_count` expected a divisor of in_features 4, got 3\.'),
    (lambda: jl.PWSConv(6, (3, 3), feature_group_count=4), (1, 5, 5, 4),
     r'PWSConv: argument `feature_group_count` expected a divisor of features 6, got 4\.'),
    (lambda: jl.WSConv(8, (3, 3), mask=np.ones((3, 3, 4, 4))), (1, 5, 5, 4),
     r'WSConv: argument `mask` expected the kernel shape \(3, 3, 4, 8\), got shape'),
    (lambda: jl.ScaledWSConv(8, (3, 0)), (1, 5, 5, 4),
     r'ScaledWSConv: argument `kernel_size` expected a positive int .*, got \(3, 0\)\.'),
    (lambda: jl.Conv(8, (3, 3), padding='CAUSAL'), (1, 5, 5, 4),
     r"Conv: argument `padding` expected 'CAUSAL' only for a 1-D convolution"),
    (lambda: jl.Conv(8, (3, 3), input_dilation=2), (1, 5, 5, 4),
     r'Conv: argument `padding` expected explicit .* input_dilation'),
    (lambda: jl.Conv(8, (3, 3), padding=((1, 1),)), (1, 5, 5, 4),
     r'Conv: argument `padding` expected 2 entries'),
    (lambda: jl.WSConv(8, (3, 3, 3)), (5, 5, 4),
     r'WSConv: argument `inputs` expected an array of rank >= 4'),
])
def test_bad_arguments_name_layer_argument_expected_and_got(make, shape, match):
  with pytest.raises(ValueError, match=match):
    make().init(jax.random.key(0), jnp.ones(shape))


def test_nnx_bad_arguments_name_layer_argument_expected_and_got():
  with pytest.raises(ValueError, match=r'WSConv: argument `feature_group_count` expected a '
                     r'divisor of in_features 6, got 4\.'):
    jn.WSConv(6, 8, (3, 3), feature_group_count=4, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r'Conv: argument `inputs` expected 6 channels'):
    jn.Conv(6, 8, (3, 3), feature_group_count=2, rngs=nnx.Rngs(0))(jnp.ones((1, 5, 5, 4)))
  with pytest.raises(ValueError, match=r'ScaledWSConv: argument `mask` expected the kernel shape'):
    jn.ScaledWSConv(4, 8, (3, 3), mask=jnp.ones((3, 3)), rngs=nnx.Rngs(0))
