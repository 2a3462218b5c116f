"""Tests of `register_norm`: a normalization defined outside the package, used by every model."""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnorm.linen import ScaledWSConv
from jaxnorm.models import (
  NORMS,
  NFResidualBlock,
  NormSpec,
  ResidualMLP,
  ResNet,
  cifar_resnet,
  get_norm,
  register_norm,
  registered_norms,
  unregister_norm,
)
from jaxnorm.models.registry import Layers

X = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 3))


class RMSNorm(nn.Module):
  """RMS normalization over the channels: ``x / sqrt(mean(x^2) + eps) * scale``."""
  scale_init: Callable = nn.initializers.ones
  epsilon: float = 1e-6

  @nn.compact
  def __call__(self, x):
    scale = self.param('scale', self.scale_init, (x.shape[-1],))
    return x * jax.lax.rsqrt(jnp.mean(x**2, axis=-1, keepdims=True) + self.epsilon) * scale


def rms_norm(spec, train, *, name, scale_init):
  del spec, train
  return RMSNorm(scale_init=scale_init, name=name)


@pytest.fixture
def register():
  """``register(name, **kwargs)`` for the test; every name it added is removed afterwards."""
  added = []

  def _register(name, **kwargs):
    entry = register_norm(name, **kwargs)
    added.append(name)
    return entry

  yield _register
  for name in added:
    if name in NORMS:
      unregister_norm(name)


def _paths(tree, leaf: str) -> set[tuple[str, ...]]:
  """The module paths holding a leaf named ``leaf``."""
  out = set()
  for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]:
    keys = tuple(k.key for k in path)
    if keys[-1] == leaf:
      out.add(keys[:-1])
  return out


def _conv(x, kernel, stride=1):
  p = kernel.shape[0] // 2
  return jax.lax.conv_general_dilated(x, kernel, (stride, stride), ((p, p), (p, p)),
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                      precision=jax.lax.Precision.HIGHEST)


def _rms(x, scale):
  return x * jax.lax.rsqrt(jnp.mean(x**2, axis=-1, keepdims=True) + 1e-6) * scale


def test_user_norm_sits_where_batch_norm_would_and_the_model_equals_a_hand_computation(register):
  register('my_rms', norm=rms_norm)
  model = cifar_resnet(8, width=4, norm='my_rms', scan=False)
  variables = jax.jit(model.init)(jax.random.PRNGKey(1), X)
  bn = jax.eval_shape(cifar_resnet(8, width=4, norm='batch_norm', scan=False).init,
                      jax.random.PRNGKey(1), X)
  # The user's module replaces every BatchNorm (stem, each branch norm, shortcut norms), with the
  # same conv layout, and has no running statistics.
  assert _paths(variables['params'], 'scale') == _paths(bn['params'], 'scale')
  assert _paths(variables['params'], 'kernel') == _paths(bn['params'], 'kernel')
  assert 'batch_stats' not in variables
  y = jax.jit(lambda v: model.apply(v, X, train=True))(variables)
  assert y.shape == (2, 10) and np.all(np.isfinite(y))

  # A one-stage, one-block ResNet v1 by hand: relu(rms(conv(x))), then
  # relu(h + rms(conv(relu(rms(conv(h)))))), global mean, Dense.
  tiny = ResNet(stage_sizes=(1,), widths=(4,), strides=(1,), stem_width=4, norm='my_rms',
                num_classes=3, scan=False)
  v = jax.jit(tiny.init)(jax.random.PRNGKey(2), X)
  p = v['params']
  blk = p['stage_0']['block_0']
  h = jax.nn.relu(_rms(_conv(X, p['stem_conv']['kernel']), p['stem_norm']['scale']))
  f = jax.nn.relu(_rms(_conv(h, blk['conv_0']['kernel']), blk['norm_0']['scale']))
  f = _rms(_conv(f, blk['conv_1']['kernel']), blk['norm_1']['scale'])
  want = jnp.mean(jax.nn.relu(h + f), axis=(1, 2)) @ p['head']['kernel'] + p['head']['bias']
  got = jax.jit(lambda v: tiny.apply(v, X, train=False))(v)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_user_norm_gets_the_zero_scale_init_of_the_last_branch_norm(register):
  register('my_rms', norm=rms_norm)
  model = cifar_resnet(8, width=4, norm='my_rms', zero_init_residual=True, scan=False)
  params = jax.jit(model.init)(jax.random.PRNGKey(1), X)['params']
  block = params['stage_0']['block_0']
  np.testing.assert_array_equal(block['norm_1']['scale'], 0.0)
  np.testing.assert_array_equal(block['norm_0']['scale'], 1.0)


def test_registered_name_is_accepted_by_norm_spec_and_listed(register):
  assert 'my_rms' not in NORMS
  entry = register('my_rms', norm=rms_norm, description='RMS norm')
  assert 'my_rms' in NORMS and NORMS[-1] == 'my_rms'
  assert get_norm('my_rms') is entry and entry.has_activation_norm
  spec = NormSpec(name='my_rms', epsilon=1e-3)
  assert spec.has_activation_norm and not spec.is_nf
  assert 'my_rms' in registered_norms('resnet') and 'my_rms' not in registered_norms('mlp')
  unregister_norm('my_rms')
  assert 'my_rms' not in NORMS
  with pytest.raises(ValueError, match='`norm`'):
    NormSpec(name='my_rms')


def test_duplicate_and_built_in_names_are_refused(register):
  register('my_rms', norm=rms_norm)
  with pytest.raises(ValueError, match=r"register_norm: argument `name` expected a name not "
                     r"registered yet \(pass overwrite=True.*got 'my_rms'"):
    register_norm('my_rms', norm=rms_norm)
  replaced = register_norm('my_rms', norm=None, overwrite=True)
  assert get_norm('my_rms') is replaced and not replaced.has_activation_norm
  with pytest.raises(ValueError, match=r"`name` expected a name that is not built in.*"
                     r"got 'batch_norm'"):
    register_norm('batch_norm', norm=rms_norm, overwrite=True)
  with pytest.raises(ValueError, match='built-ins cannot be removed'):
    unregister_norm('none')


@pytest.mark.parametrize('kwargs, exc, message', [
  (dict(norm='rms'), TypeError, r'`norm` expected a callable or None'),
  (dict(conv=3), TypeError, r'`conv` expected a callable or None'),
  (dict(families=('transformer',)), ValueError, r"`families` expected one of 'resnet', 'mlp'"),
  (dict(families=()), ValueError, r'`families` expected at least one of'),
  (dict(nf=True, families=('mlp',)), ValueError, r"`families` expected no 'mlp'"),
])
def test_bad_registrations_fail_naming_the_argument(kwargs, exc, message):
  with pytest.raises(exc, match=message):
    register_norm('bad_norm', **kwargs)
  assert 'bad_norm' not in NORMS


def test_unknown_norm_error_lists_the_registered_names(register):
  register('my_rms', norm=rms_norm)
  with pytest.raises(ValueError, match=r"ResNet: argument `norm` expected one of 'batch_norm'.*"
                     r"'pws', 'my_rms', got 'layer_norm'"):
    cifar_resnet(8, norm='layer_norm').init(jax.random.PRNGKey(0), X)
  with pytest.raises(ValueError, match=r"NormSpec: argument `norm`.*'my_rms', got 'layer_norm'"):
    NormSpec(name='layer_norm')


def test_registered_norm_without_activation_norm_is_the_identity_like_none(register):
  register('plain', description='no normalization, registered')
  for kw in (dict(style='v1'), dict(style='v2', skip_init=0.5), dict(style='relu_first')):
    none = cifar_resnet(8, width=4, norm='none', scan=False, **kw)
    plain = cifar_resnet(8, width=4, norm='plain', scan=False, **kw)
    variables = jax.jit(none.init)(jax.random.PRNGKey(1), X)
    assert (jax.tree.structure(jax.eval_shape(plain.init, jax.random.PRNGKey(1), X))
            == jax.tree.structure(variables))
    ys = jax.jit(lambda v, none=none, plain=plain: (plain.apply(v, X, train=True),
                                                    none.apply(v, X, train=True)))(variables)
    np.testing.assert_array_equal(*ys)


def test_mlp_family_accepts_registered_rank2_norms_only(register):
  register('my_rms', norm=rms_norm)
  register('my_rms_mlp', norm=rms_norm, families=('resnet', 'mlp'))
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 6))
  with pytest.raises(ValueError, match=r"ResidualMLP: argument `norm` expected one of "
                     r"'batch_norm', 'ghost_batch_norm', 'none', 'my_rms_mlp', got 'my_rms'"):
    ResidualMLP(depth=2, width=8, norm='my_rms').init(jax.random.PRNGKey(0), x)
  model = ResidualMLP(depth=3, width=8, norm='my_rms_mlp', scan=True)
  variables = jax.jit(model.init)(jax.random.PRNGKey(1), x)
  assert variables['params']['scanned_blocks']['norm']['scale'].shape == (2, 8)
  assert variables['params']['final_norm']['scale'].shape == (8,)
  assert np.all(np.isfinite(jax.jit(model.apply)(variables, x)))


def test_registered_conv_factory_gets_first_and_the_bias_default(register):
  calls = []

  def conv(spec, features, kernel_size, strides, *, padding, name, first, use_bias):
    calls.append((name, first, use_bias))
    return nn.Conv(features, kernel_size, strides, padding=padding, use_bias=use_bias, name=name)

  def layer_norm(spec, train, *, name):
    return nn.LayerNorm(epsilon=spec.epsilon, name=name)

  register('biased', conv=conv, outer_norm=layer_norm, conv_bias=True)
  model = cifar_resnet(8, width=4, norm='biased', style='relu_first', scan=False)
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0), X)['params']
  assert params['stem_conv']['bias'].shape == (4,)
  # The outer norm follows the stem and precedes the head; no norm inside the blocks.
  assert set(params['stem_norm']) == set(params['final_norm']) == {'scale', 'bias'}
  assert all(not k.startswith('norm') for k in params['stage_1']['block_0'])
  firsts = {name for name, first, _ in calls if first}
  assert firsts == {'stem_conv', 'conv_0', 'shortcut_conv'}
  assert all(use_bias for *_, use_bias in calls)
  calls.clear()
  jax.eval_shape(cifar_resnet(8, width=4, norm='biased', conv_bias=False).init,
                 jax.random.PRNGKey(0), X)
  assert calls and not any(use_bias for *_, use_bias in calls)


def _scaled_ws(spec, features, kernel_size, strides, *, padding, name, first, use_bias):
  return ScaledWSConv(features=features, kernel_size=kernel_size, strides=strides,
                      padding=padding, name=name)


@pytest.mark.slow
@pytest.mark.parametrize('scan', [False, True])
def test_registered_nf_norm_equals_the_built_in_scaled_ws(register, scan):
  register('my_nf', conv=_scaled_ws, nf=True, conv_bias=True)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 3))
  ours = cifar_resnet(14, width=4, norm='my_nf', scan=scan)  # style defaults to 'v2'
  builtin = cifar_resnet(14, width=4, norm='scaled_ws', scan=scan)
  variables = jax.jit(builtin.init)(jax.random.PRNGKey(1), x)
  np.testing.assert_array_equal(jax.jit(ours.apply)(variables, x),
                                jax.jit(builtin.apply)(variables, x))
  with pytest.raises(ValueError, match=r"`style` expected 'v2' or 'relu_first' with "
                     r"norm='my_nf'"):
    cifar_resnet(8, norm='my_nf', style='v1').init(jax.random.PRNGKey(0), x)


def test_nf_block_picks_the_beta_of_its_index():
  # Block j of a stage multiplies its pre-activation by betas[j] and passes j + 1 on.
  layers = Layers(spec=NormSpec('scaled_ws'))
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 4, 3))
  block = NFResidualBlock(layers=layers, features=3, style='v2', betas=(1.0, 0.5))
  variables = jax.jit(block.init, static_argnums=2)(jax.random.PRNGKey(1), (x, jnp.int32(0)),
                                                     False)

  @jax.jit
  def run(variables):
    alone = NFResidualBlock(layers=layers, features=3, style='v2', betas=(0.5,))
    return (block.apply(variables, (x, jnp.int32(1)), False),
            alone.apply(variables, (x, jnp.int32(0)), False)[0],
            block.apply(variables, (x, jnp.int32(0)), False)[0])

  (y1, j), y_alone, y_first = run(variables)
  assert int(j) == 2
  np.testing.assert_array_equal(y1, y_alone)
  assert not np.allclose(y1, y_first)


def test_training_config_takes_a_registered_norm(register):
  from jaxnorm.training.config import model_config
  from jaxnorm.training.loop import build_model

  register('my_rms', norm=rms_norm)
  model = build_model(model_config('cifar_resnet', depth=8, width=4, norm='my_rms'), 10)
  assert model.norm == 'my_rms'
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), X)
  assert ('stem_norm',) in _paths(variables['params'], 'scale')
  assert 'batch_stats' not in variables
