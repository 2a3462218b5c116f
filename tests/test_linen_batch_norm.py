"""jaxnorm.linen.BatchNorm is a drop-in replacement for flax.linen.BatchNorm (numerically equal).

Reference: ``flax.linen.BatchNorm(use_fast_variance=False)`` (the same two-pass variance), and the
Flax default (one-pass variance) to float rounding. Also: multi-device statistics under
``shard_map`` and under ``jit`` with a sharded batch equal the single-device computation.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from bn_reference import assert_close, batches, linen_train_steps, nontrivial_params
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxnorm.linen import BatchNorm

SHAPES = {'nhwc': (8, 3, 3, 4), 'nc': (16, 5)}


def _train(module, xs, w, mask=None):
  """A few training steps from non-trivial params (equal for every module compared)."""
  variables = jax.jit(functools.partial(module.init, use_running_average=False))(
    jax.random.key(1), xs[0])
  params = jax.tree_util.tree_map(lambda p, q: p.astype(q.dtype),
                                  nontrivial_params(variables['params']['scale'].shape),
                                  variables['params'])
  return linen_train_steps(module, params, xs, w, mask)


class FlaxEquivalenceTest(parameterized.TestCase):

  @parameterized.parameters(('nhwc', True, False), ('nc', True, False), ('nhwc', True, True),
                            ('nc', False, True), ('nhwc', False, False))
  def test_training_and_eval_equal_flax_two_pass(self, layout, closed_form, masked):
    shape = SHAPES[layout]
    xs = batches(shape, 3)
    w = jax.random.normal(jax.random.key(9), shape)
    mask = None
    if masked:
      mask = (jnp.arange(shape[0]) % 4 != 1).reshape((shape[0],) + (1,) * (len(shape) - 1))
    kw = dict(momentum=0.8, epsilon=1e-3)
    ours = _train(BatchNorm(closed_form_backward=closed_form, **kw), xs, w, mask)
    ref = _train(nn.BatchNorm(use_fast_variance=False, **kw), xs, w, mask)
    assert_close(ours, ref, 2e-5)

  def test_equal_flax_default_one_pass_variance_to_rounding(self):
    shape = SHAPES['nhwc']
    xs = batches(shape, 2)
    w = jax.random.normal(jax.random.key(9), shape)
    assert_close(_train(BatchNorm(), xs, w), _train(nn.BatchNorm(), xs, w), 1e-4)

  @parameterized.parameters(dict(dtype=None), dict(dtype=jnp.bfloat16))
  def test_bf16_input_equals_flax(self, dtype):
    # bf16 input: float32 statistics; output dtype inferred as in Flax (float32 with float32
    # params, bf16 with dtype=bf16).
    shape = SHAPES['nhwc']
    xs = batches(shape, 2, jnp.bfloat16)
    w = jax.random.normal(jax.random.key(9), shape)
    ours = _train(BatchNorm(dtype=dtype), xs, w)
    ref = _train(nn.BatchNorm(dtype=dtype, use_fast_variance=False), xs, w)
    self.assertEqual(ours[0][0][0].dtype, jnp.float32 if dtype is None else jnp.bfloat16)
    self.assertEqual(ours[1]['mean'].dtype, jnp.float32)
    assert_close(ours, ref, 2e-5)

  def test_variables_structure_shapes_and_dtypes_equal_flax(self):
    x = jnp.ones((4, 3, 6))
    for kw in (dict(), dict(axis=(1, 2)), dict(use_bias=False), dict(use_scale=False),
               dict(param_dtype=jnp.bfloat16, force_float32_reductions=False)):
      spec = lambda v: jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), v)
      ours = BatchNorm(**kw).init(jax.random.key(0), x, use_running_average=False)
      ref = nn.BatchNorm(**kw).init(jax.random.key(0), x, use_running_average=False)
      self.assertEqual(spec(ours), spec(ref))
      assert_close(ours, ref, 0.0)

  def test_feature_axes_tuple_equals_flax(self):
    x = batches((4, 3, 6), 1)[0]
    w = jax.random.normal(jax.random.key(9), x.shape)
    assert_close(_train(BatchNorm(axis=(1, 2)), [x], w),
                  _train(nn.BatchNorm(axis=(1, 2), use_fast_variance=False), [x], w), 2e-5)

  def test_large_offset_statistics_exact_where_flax_default_is_not(self):
    x = 1e4 + jax.random.normal(jax.random.key(0), (64, 8))
    ref_var = np.var(np.asarray(x, np.float64), 0)
    stats = {}
    for name, m in (('ours', BatchNorm(momentum=0.0)), ('flax', nn.BatchNorm(momentum=0.0))):
      v = m.init(jax.random.key(0), x, use_running_average=False)
      _, upd = m.apply(v, x, use_running_average=False, mutable=['batch_stats'])
      stats[name] = np.asarray(upd['batch_stats']['var'])
    np.testing.assert_allclose(stats['ours'], ref_var, rtol=1e-4)
    self.assertGreater(np.max(np.abs(stats['flax'] - ref_var) / ref_var), 1e-2)


class GhostBatchNormTest(parameterized.TestCase):

  def test_ghost_batches_equal_flax_per_group_and_average_stats(self):
    x = batches((12, 2, 2, 3), 1)[0]
    bn = BatchNorm(ghost_batch_size=4, momentum=0.5)
    v = bn.init(jax.random.key(0), x, use_running_average=False)
    y, upd = bn.apply(v, x, use_running_average=False, mutable=['batch_stats'])
    ref = nn.BatchNorm(momentum=0.5, use_fast_variance=False)
    ys, means, vars_ = [], [], []
    for g in jnp.split(x, 3):
      yg, u = ref.apply(v, g, use_running_average=False, mutable=['batch_stats'])
      ys.append(yg)
      means.append(u['batch_stats']['mean'])
      vars_.append(u['batch_stats']['var'])
    np.testing.assert_allclose(y, jnp.concatenate(ys), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(upd['batch_stats']['mean'], np.mean(means, 0), rtol=1e-5)
    np.testing.assert_allclose(upd['batch_stats']['var'], np.mean(vars_, 0), rtol=1e-5)

  def test_init_with_a_batch_of_one_ignores_ghostbatches(self):
    bn = BatchNorm(ghost_batch_size=4)
    v = bn.init(jax.random.key(0), jnp.ones((1, 3)), use_running_average=False)
    self.assertEqual(v['batch_stats']['mean'].shape, (3,))
    with pytest.raises(ValueError, match='ghost_batch_size'):
      bn.apply(v, jnp.ones((6, 3)), use_running_average=False, mutable=['batch_stats'])

  def test_single_value_per_channel_raises_in_training_not_in_eval(self):
    bn = BatchNorm()
    v = bn.init(jax.random.key(0), jnp.ones((1, 3)), use_running_average=False)
    with pytest.raises(ValueError, match='at least 2 values per channel'):
      bn.apply(v, jnp.ones((1, 3)), use_running_average=False, mutable=['batch_stats'])
    np.testing.assert_allclose(bn.apply(v, jnp.ones((1, 3)), use_running_average=True),
                               1.0 / np.sqrt(1.0 + 1e-5) * np.ones((1, 3)), rtol=1e-6)


class MultiDeviceTest(parameterized.TestCase):
  """8 simulated CPU devices (tests/conftest.py)."""

  def _full(self, x, w):
    bn = BatchNorm(momentum=0.9)
    v = bn.init(jax.random.key(0), x, use_running_average=False)

    def loss(params, x):
      y, upd = bn.apply({'params': params, 'batch_stats': v['batch_stats']}, x,
                        use_running_average=False, mutable=['batch_stats'])
      return jnp.sum(jnp.sin(y) * w), (y, upd['batch_stats'])

    return v, loss

  def test_shard_map_with_axis_name_equals_single_device(self):
    mesh = jax.make_mesh((8,), ('batch',))
    x = batches((32, 2, 2, 3), 1)[0]
    w = jax.random.normal(jax.random.key(9), x.shape)
    v, full_loss = self._full(x, w)
    (_, (y_ref, st_ref)), (gp_ref, gx_ref) = jax.jit(
        jax.value_and_grad(full_loss, (0, 1), has_aux=True))(v['params'], x)

    # axis_name is dropped while initializing, so init works outside shard_map.
    bn = BatchNorm(momentum=0.9, axis_name='batch')
    v2 = bn.init(jax.random.key(0), x, use_running_average=False)
    assert_close(v2, v, 0.0)

    def local_step(params, stats, x, w):
      def loss(params, x):
        y, upd = bn.apply({'params': params, 'batch_stats': stats}, x,
                          use_running_average=False, mutable=['batch_stats'])
        return jnp.sum(jnp.sin(y) * w), (y, upd['batch_stats'])
      (_, (y, st)), (gp, gx) = jax.value_and_grad(loss, (0, 1), has_aux=True)(params, x)
      # Gradients of replicated params come back already summed over devices:
      # no further psum / pmean here.
      return y, st, gp, gx

    step = jax.jit(jax.shard_map(
        local_step, mesh=mesh, in_specs=(P(), P(), P('batch'), P('batch')),
        out_specs=(P('batch'), P(), P(), P('batch'))))
    put = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))
    y, st, gp, gx = step(put(v['params'], P()), put(v['batch_stats'], P()), put(x, P('batch')),
                         put(w, P('batch')))
    assert_close((y, st, gp, gx), (y_ref, st_ref, gp_ref, gx_ref), 2e-5)

  def test_jit_with_batch_sharded_over_mesh_equals_single_device(self):
    mesh = jax.make_mesh((8,), ('batch',))
    x = batches((16, 2, 2, 3), 1)[0]
    w = jax.random.normal(jax.random.key(9), x.shape)
    v, loss = self._full(x, w)
    grad = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))
    ref = grad(v['params'], x)
    xs = jax.device_put(x, NamedSharding(mesh, P('batch')))
    assert_close(grad(v['params'], xs), ref, 2e-5)


class VmapAxisNameTest(parameterized.TestCase):
  """Per-example ``jax.vmap(..., axis_name='b')`` (the Equinox convention) equals flax."""

  @parameterized.parameters(True, False)
  def test_grad_of_vmap_and_vmap_of_grad_equal_flax(self, closed_form):
    x = batches((8, 3), 1)[0]
    w = jax.random.normal(jax.random.key(9), x.shape)

    def run(bn):
      v = bn.init(jax.random.key(0), x[0], use_running_average=False)  # one example
      params = nontrivial_params((3,))

      def per_example(p, xi, wi):
        y, upd = bn.apply({'params': p, 'batch_stats': v['batch_stats']}, xi,
                          use_running_average=False, mutable=['batch_stats'])
        return jnp.sum(jnp.sin(y) * wi), (y, upd['batch_stats'])

      batched = jax.vmap(per_example, in_axes=(None, 0, 0), axis_name='b',
                         out_axes=(0, (0, None)))
      loss = lambda p, x: jnp.sum(batched(p, x, w)[0])
      per_ex_grad = jax.grad(lambda p, xi, wi: per_example(p, xi, wi)[0], (0, 1))
      return jax.jit(lambda p, x: (
          batched(p, x, w)[1], jax.grad(loss, (0, 1))(p, x),
          jax.vmap(per_ex_grad, in_axes=(None, 0, 0), axis_name='b')(p, x, w)))(params, x)

    ours = run(BatchNorm(axis_name='b', momentum=0.8, closed_form_backward=closed_form))
    ref = run(nn.BatchNorm(axis_name='b', momentum=0.8, use_fast_variance=False))
    assert_close(ours, ref, 2e-5)

  def test_eval_mode_on_one_example_equals_flax(self):
    x = batches((3,), 1)[0]  # one example (C,), as inside a per-example vmap
    v = {'params': nontrivial_params((3,)),
         'batch_stats': {'mean': jnp.array([0.5, -1.0, 2.0]), 'var': jnp.array([1.0, 4.0, 0.25])}}
    assert_close(BatchNorm().apply(v, x, use_running_average=True),
                 nn.BatchNorm().apply(v, x, use_running_average=True), 1e-6)


class BadInputTest(parameterized.TestCase):

  def _apply(self, bn, x, **kw):
    v = bn.init(jax.random.key(0), x, use_running_average=False)
    return bn.apply(v, x, use_running_average=False, mutable=['batch_stats'], **kw)

  @parameterized.named_parameters(
      ('rank_0', dict(), jnp.float32(1.0), ValueError, '`x` expected an array of rank >= 1'),
      ('axis_too_large', dict(axis=2), jnp.ones((4, 3)), ValueError, '`axis`'),
      ('axis_too_small', dict(axis=-3), jnp.ones((4, 3)), ValueError, '`axis`'),
      ('momentum_above_1', dict(momentum=1.5), jnp.ones((4, 3)), ValueError, '`momentum`'),
      ('momentum_negative', dict(momentum=-0.1), jnp.ones((4, 3)), ValueError, '`momentum`'),
      ('momentum_not_a_number', dict(momentum='0.9'), jnp.ones((4, 3)), TypeError,
       '`momentum`'),
  )
  def test_bad_argument_raises_naming_layer_and_argument(self, kw, x, exc, match):
    with pytest.raises(exc, match=match) as info:
      self._apply(BatchNorm(**kw), x)
    assert str(info.value).startswith('BatchNorm: argument `')

  def test_flax_rejects_the_same_axis(self):
    # The reference behaviour: flax raises for an out-of-range axis as well (no silent modulo).
    with pytest.raises(Exception):  # noqa: B017 (flax's own exception type)
      self._apply(nn.BatchNorm(axis=2), jnp.ones((4, 3)))

  def test_mask_selecting_one_value_per_channel(self):
    x = batches((8, 3), 1)[0]
    mask = (jnp.arange(8) == 5)[:, None]  # one example: variance 0 in every channel
    with pytest.raises(ValueError, match='at least 2 values per channel'):
      self._apply(BatchNorm(), x, mask=mask)  # concrete mask: the unmasked path's error
    # Traced mask (argument of a jitted function): NaN statistics and outputs, never finite
    # garbage of order 1/sqrt(eps).
    bn = BatchNorm()
    v = bn.init(jax.random.key(0), x, use_running_average=False)
    y, upd = jax.jit(lambda v, x, m: bn.apply(v, x, use_running_average=False, mask=m,
                                              mutable=['batch_stats']))(v, x, mask)
    self.assertTrue(bool(jnp.all(jnp.isnan(y))))
    self.assertTrue(bool(jnp.all(jnp.isnan(upd['batch_stats']['var']))))


def test_default_arguments_equal_flax():
  """Every field shared with flax.linen.BatchNorm has flax's default (a changed momentum fails)."""
  ours = {f.name: f for f in dataclasses.fields(BatchNorm)}
  ref = {f.name: f for f in dataclasses.fields(nn.BatchNorm)}
  assert set(ref) <= set(ours), set(ref) - set(ours)  # drop-in: every flax field exists
  assert set(ours) - set(ref) == {'ghost_batch_size', 'closed_form_backward'}
  for name, f in ref.items():
    if name in ('parent', 'name'):
      continue
    assert f.default is not dataclasses.MISSING, name
    assert ours[name].default == f.default, (name, ours[name].default, f.default)
  defaults = {n: f.default for n, f in ours.items()}
  assert (defaults['ghost_batch_size'], defaults['closed_form_backward']) == (None, True)
