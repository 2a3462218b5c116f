"""jaxnorm.nnx.BatchNorm equals jaxnorm.linen.BatchNorm (same params -> same outputs, gradients and
running statistics), in the style of Flax's own linen/nnx consistency tests; and it equals
``flax.nnx.BatchNorm`` (two-pass variance) as well.
"""

from __future__ import annotations

import inspect

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from bn_reference import assert_close, batches, linen_train_steps, nontrivial_params
from flax import nnx

from jaxnorm import linen as jlinen
from jaxnorm import nnx as jnnx

SHAPES = {'nhwc': (8, 3, 3, 4), 'nc': (16, 5)}


def _run_linen(module, params, xs, w, mask):
  outs, stats, y_eval = linen_train_steps(module, params, xs, w, mask)
  return ([(y, gx, gp['scale'], gp['bias']) for y, (gx, gp) in outs],
          (stats['mean'], stats['var']), y_eval)


def _run_nnx(model, params, xs, w, mask):
  model.scale[...] = params['scale']
  model.bias[...] = params['bias']
  graphdef, state = nnx.split(model)

  @jax.jit
  def step(state, x):
    def loss(x, state):
      m = nnx.merge(graphdef, state)
      y = m(x, use_running_average=False, mask=mask)
      return jnp.sum(jnp.sin(y.astype(jnp.float32)) * w), (y, nnx.state(m))
    (_, (y, new_state)), grads = jax.value_and_grad(loss, (0, 1), has_aux=True)(x, state)
    return y, grads, new_state

  outs = []
  for x in xs:
    y, (gx, gs), state = step(state, x)
    outs.append((y, gx, gs['scale'][...], gs['bias'][...]))
  nnx.update(model, state)
  y_eval = model(xs[0], use_running_average=True)
  return outs, (model.mean[...], model.var[...]), y_eval


class LinenConsistencyTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ('nhwc', 'nhwc', {}, False, jnp.float32),
      ('nc', 'nc', {}, False, jnp.float32),
      ('nhwc_ghost', 'nhwc', dict(ghost_batch_size=4), False, jnp.float32),
      ('nc_autodiff', 'nc', dict(closed_form_backward=False), False, jnp.float32),
      ('nc_mask', 'nc', {}, True, jnp.float32),
      ('nhwc_bf16', 'nhwc', dict(dtype=jnp.bfloat16), False, jnp.bfloat16),
  )
  def test_same_params_same_outputs_gradients_and_running_stats(self, layout, kw, masked, dtype):
    shape = SHAPES[layout]
    xs = batches(shape, 3, dtype)
    w = jax.random.normal(jax.random.key(9), shape)
    mask = (jnp.arange(shape[0]) % 4 != 1)[:, None] if masked else None
    kw = dict(momentum=0.8, epsilon=1e-3, **kw)
    params = nontrivial_params((shape[-1],))
    ref = _run_linen(jlinen.BatchNorm(**kw), params, xs, w, mask)
    ours = _run_nnx(jnnx.BatchNorm(shape[-1], rngs=nnx.Rngs(0), **kw), params, xs, w, mask)
    assert_close(ours, ref, 1e-6)

  def test_equals_flax_nnx_batch_norm(self):
    shape = SHAPES['nhwc']
    xs = batches(shape, 3)
    w = jax.random.normal(jax.random.key(9), shape)
    params = nontrivial_params((shape[-1],))
    kw = dict(momentum=0.8, epsilon=1e-3, rngs=nnx.Rngs(0))
    ours = _run_nnx(jnnx.BatchNorm(shape[-1], **kw), params, xs, w, None)
    ref = _run_nnx(nnx.BatchNorm(shape[-1], use_fast_variance=False, **kw), params, xs, w, None)
    assert_close(ours, ref, 2e-5)

  def test_variables_are_params_and_batch_stats_like_linen(self):
    model = jnnx.BatchNorm(6, rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    stats = nnx.state(model, nnx.BatchStat)
    linen_vars = jlinen.BatchNorm().init(jax.random.key(0), jnp.ones((2, 6)),
                                         use_running_average=False)
    self.assertEqual(set(params.keys()), set(linen_vars['params']))
    self.assertEqual(set(stats.keys()), set(linen_vars['batch_stats']))
    for name in ('scale', 'bias'):
      np.testing.assert_array_equal(params[name][...], linen_vars['params'][name])
    for name in ('mean', 'var'):
      np.testing.assert_array_equal(stats[name][...], linen_vars['batch_stats'][name])
    no_scale = jnnx.BatchNorm(6, use_scale=False, use_bias=False, rngs=nnx.Rngs(0))
    self.assertEmpty(jax.tree_util.tree_leaves(nnx.state(no_scale, nnx.Param)))

  def test_nnx_jit_training_step_updates_running_stats_in_place(self):
    x = batches(SHAPES['nc'], 1)[0]
    model = jnnx.BatchNorm(5, momentum=0.5, rngs=nnx.Rngs(0))

    @nnx.jit
    def step(model, x):
      return nnx.grad(lambda m: jnp.sum(m(x) ** 3))(model)

    grads = step(model, x)
    np.testing.assert_allclose(model.mean[...], 0.5 * np.asarray(x, np.float64).mean(0),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.var[...], 0.5 + 0.5 * np.asarray(x, np.float64).var(0),
                               rtol=1e-5)
    self.assertEqual(grads['scale'][...].shape, (5,))
    # Eval through nnx.view uses the running statistics.
    y = nnx.view(model, use_running_average=True)(x)
    ref = (np.asarray(x, np.float64) - model.mean[...]) / np.sqrt(model.var[...] + 1e-5)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)

  def test_missing_use_running_average_raises(self):
    model = jnnx.BatchNorm(5, use_running_average=None, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match='use_running_average'):
      model(jnp.ones((4, 5)))


def test_linen_reference_is_flax_like():
  # Sanity of the reference used above: jaxnorm.linen.BatchNorm == flax.linen.BatchNorm (eval).
  x = batches((4, 3), 1)[0]
  v = nn.BatchNorm().init(jax.random.key(0), x, use_running_average=True)
  np.testing.assert_allclose(jlinen.BatchNorm().apply(v, x, use_running_average=True),
                             nn.BatchNorm().apply(v, x, use_running_average=True), rtol=1e-7)


def _vmap_run(model, x, w):
  """Per-example ``jax.vmap(..., axis_name='b')`` of a training call: output, new running
  statistics, and the parameter gradients of ``sum(sin(y) * w)`` (grad of vmap)."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def per_example(params, rest, xi):
    m = nnx.merge(graphdef, params, rest)
    y = m(xi, use_running_average=False)
    return y, nnx.state(m, nnx.BatchStat)

  batched = jax.vmap(per_example, in_axes=(None, None, 0), axis_name='b', out_axes=(0, None))
  loss = lambda p: jnp.sum(jnp.sin(batched(p, rest, x)[0]) * w)
  y, stats = jax.jit(batched)(params, rest, x)
  grads = jax.jit(jax.grad(loss))(params)
  return y, stats['mean'][...], stats['var'][...], grads['scale'][...], grads['bias'][...]


@pytest.mark.parametrize('closed_form', [True, False])
def test_per_example_vmap_with_axis_name_equals_flax_nnx(closed_form):
  x = batches((8, 3), 1)[0]
  w = jax.random.normal(jax.random.key(9), x.shape)
  kw = dict(axis_name='b', momentum=0.8, rngs=nnx.Rngs(0))
  ours = _vmap_run(jnnx.BatchNorm(3, closed_form_backward=closed_form, **kw), x, w)
  ref = _vmap_run(nnx.BatchNorm(3, use_fast_variance=False, **kw), x, w)
  assert_close(ours, ref, 2e-5)


@pytest.mark.parametrize('kw, x, exc, match', [
    (dict(), jnp.float32(1.0), ValueError, '`x` expected an array of rank >= 1'),
    (dict(axis=2), jnp.ones((4, 3)), ValueError, '`axis`'),
    (dict(axis=(0, -2)), jnp.ones((4, 3)), ValueError, 'distinct axes'),
])
def test_bad_call_raises_naming_layer_and_argument(kw, x, exc, match):
  model = jnnx.BatchNorm(3, rngs=nnx.Rngs(0), **kw)
  with pytest.raises(exc, match=match) as info:
    model(x)
  assert str(info.value).startswith('BatchNorm: argument `')


@pytest.mark.parametrize('momentum, exc', [(1.5, ValueError), (-0.1, ValueError),
                                           (float('nan'), ValueError), (None, TypeError)])
def test_momentum_outside_unit_interval_raises(momentum, exc):
  with pytest.raises(exc, match='BatchNorm: argument `momentum`'):
    jnnx.BatchNorm(3, momentum=momentum, rngs=nnx.Rngs(0))
  model = jnnx.BatchNorm(3, rngs=nnx.Rngs(0))
  model.momentum = momentum  # changed after construction: caught at the call
  with pytest.raises(exc, match='BatchNorm: argument `momentum`'):
    model(jnp.ones((4, 3)))


def test_mask_selecting_one_value_per_channel():
  x = batches((8, 3), 1)[0]
  mask = (jnp.arange(8) == 5)[:, None]
  model = jnnx.BatchNorm(3, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='at least 2 values per channel'):
    model(x, mask=mask)  # concrete mask: the error of the unmasked path

  @nnx.jit
  def step(model, x, mask):  # traced mask: NaN statistics and outputs, not finite garbage
    return model(x, mask=mask)

  y = step(model, x, mask)
  assert bool(jnp.all(jnp.isnan(y))) and bool(jnp.all(jnp.isnan(model.var[...])))


def test_default_arguments_equal_flax_nnx():
  """Every constructor argument shared with flax.nnx.BatchNorm has flax's default and kind."""
  ours = inspect.signature(jnnx.BatchNorm.__init__).parameters
  ref = inspect.signature(nnx.BatchNorm.__init__).parameters
  # Known differences: flax's `promote_dtype` hook (jaxnorm's dtype rules are fixed, those of
  # flax.linen.BatchNorm) and jaxnorm's own three options.
  assert set(ref) - set(ours) == {'promote_dtype'}
  assert set(ours) - set(ref) == {'force_float32_reductions', 'ghost_batch_size',
                                  'closed_form_backward'}
  for name, p in ref.items():
    if name in ours:
      assert ours[name].kind == p.kind, name
      assert ours[name].default == p.default, (name, ours[name].default, p.default)
  assert [ours[n].default for n in ('force_float32_reductions', 'ghost_batch_size',
                                    'closed_form_backward')] == [True, None, True]
