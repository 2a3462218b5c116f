"""Tests of the generic ResNet and its presets: parameter counts, every norm spec, SkipInit."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnorm.models import (
  NORMS,
  NormSpec,
  ResNet,
  block_taps,
  cifar_resnet,
  pws_resnet,
  resnet50,
  wide_resnet,
)


def _count(model, shape):
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros(shape))
  return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(shapes['params']))


CIFAR, IMAGENET = (1, 32, 32, 3), (1, 64, 64, 3)


@pytest.mark.slow
@pytest.mark.parametrize('make, shape, published_millions', [
  (lambda: cifar_resnet(20, scan=True), CIFAR, 0.27),  # He et al. 2016a, Table 6
  (lambda: cifar_resnet(110, scan=True), CIFAR, 1.7),
  (lambda: resnet50('v1', scan=True), IMAGENET, 25.6),  # He et al. 2016a, Table 1
  (lambda: resnet50('v2', scan=True), IMAGENET, 25.6),
  (lambda: wide_resnet(16, 4, scan=True), CIFAR, 2.7),  # Zagoruyko & Komodakis, Table 1 (2.75M)
])
def test_parameter_counts_match_the_published_ones(make, shape, published_millions):
  # Published counts are rounded (ResNet-20 0.27M = 272,474 here with projection shortcuts).
  count = _count(make(), shape)
  assert abs(count / 1e6 - published_millions) < 0.02 * published_millions, count


@pytest.mark.slow
def test_scanned_and_unrolled_count_the_same_parameters_and_deep_presets_build():
  assert _count(cifar_resnet(20, scan=False), CIFAR) == _count(cifar_resnet(20, scan=True), CIFAR)
  # ResNet-1202 (19.4M) and WRN-1000-1 build in seconds when scanned.
  assert abs(_count(cifar_resnet(1202, scan=True), CIFAR) / 1e6 - 19.4) < 0.1
  assert _count(wide_resnet(1000, 1, scan=True), CIFAR) > 0
  # The official PWS ResNets (Liu, Ge, Li & Gui (2021), arXiv:2103.11590): ResNet-50 without
  # its 1000-way head is 23.5M.
  pws50 = _count(pws_resnet(50, scan=True), IMAGENET)
  assert abs((pws50 - 2048 * 1000 - 1000) / 1e6 - 23.51) < 0.03
  assert abs(_count(pws_resnet(34, scan=True), CIFAR) / 1e6 - 21.3) < 0.1


@pytest.mark.slow
@pytest.mark.parametrize('norm', NORMS)
def test_every_norm_spec_runs_forward_and_backward(norm):
  spec = NormSpec(name=norm, ghost_batch_size=2)
  model = cifar_resnet(14, width=4, norm=spec, skip_init=0.5, bgn='block', scan=True,
                       style='v2' if norm == 'scaled_ws' else 'v1')
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 8, 8, 3))
  variables = jax.jit(model.init)(jax.random.PRNGKey(1), x)

  def loss(params):
    out, state = model.apply({**variables, 'params': params}, x, train=True,
                             mutable=['batch_stats'])
    return jnp.mean(out**2), state

  (value, state), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables['params'])
  assert np.isfinite(value)
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))
  assert ('batch_stats' in state) == (norm in ('batch_norm', 'ghost_batch_norm'))


@pytest.mark.slow
@pytest.mark.parametrize('make', [
  lambda: resnet50('v2', width=2, num_classes=3, scan=True, regularized=True),
  lambda: pws_resnet(50, width=2, scan=True),
  lambda: pws_resnet(34, width=2, scan=False, remat=True),
  lambda: wide_resnet(10, 1, base_width=2, norm=NormSpec('ghost_batch_norm', ghost_batch_size=2),
                      skip_init='inv_sqrt_depth'),
])
def test_presets_run_forward_and_backward_at_smoke_size(make):
  model = make()
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 32, 32, 3))
  variables = jax.jit(model.init)(jax.random.PRNGKey(1), x)

  def loss(params):
    out, _ = model.apply({**variables, 'params': params}, x, train=True, mutable=['batch_stats'],
                         rngs={'dropout': jax.random.PRNGKey(2)})
    return jnp.mean(out**2)

  grads = jax.jit(jax.grad(loss))(variables['params'])
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


@pytest.mark.slow
@pytest.mark.parametrize('style', ['v2', 'relu_first'])
def test_skip_init_zero_makes_every_identity_block_the_identity_at_init(style):
  # De & Smith: x_{l+1} = x_l + alpha * f(x_l) with alpha = 0: the skip path is exactly constant
  # within a stage (blocks without a projection), while the branches are not zero.
  model = cifar_resnet(20, width=4, norm='none', skip_init=0.0, style=style, scan=True)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 3))
  variables = jax.jit(model.init)(jax.random.PRNGKey(1), x)
  _, state = jax.jit(lambda v: model.apply(v, x, mutable=['intermediates']))(variables)
  skips = block_taps(state['intermediates'], 'skip')
  branches = block_taps(state['intermediates'], 'branch')
  for stage in range(3):
    first = 3 * stage
    for i in (first + 1, first + 2):
      np.testing.assert_array_equal(skips[i], skips[i - 1])
      assert float(jnp.var(branches[i])) > 0


def test_unknown_arguments_fail_fast_with_the_choices():
  x = jnp.zeros((1, 8, 8, 3))
  with pytest.raises(ValueError, match=r"ResNet: argument `norm` expected one of 'batch_norm'"):
    cifar_resnet(8, norm='layer_norm').init(jax.random.PRNGKey(0), x)
  with pytest.raises(ValueError, match='`style`'):
    cifar_resnet(8, style='v3').init(jax.random.PRNGKey(0), x)
  with pytest.raises(ValueError, match='`bgn`'):
    cifar_resnet(8, bgn='every').init(jax.random.PRNGKey(0), x)
  with pytest.raises(ValueError, match='`style`'):
    cifar_resnet(8, norm='scaled_ws', style='v1').init(jax.random.PRNGKey(0), x)
  with pytest.raises(ValueError, match='`depth`'):
    cifar_resnet(21)
  with pytest.raises(ValueError, match='`stage_sizes`'):
    ResNet(stage_sizes=(1, 1), widths=(4,), strides=(1,)).init(jax.random.PRNGKey(0), x)


@pytest.mark.parametrize('make, exc, message', [
  (lambda: cifar_resnet('20'), TypeError,
   r"cifar_resnet: argument `depth` expected an int >= 1, got '20' of type str"),
  (lambda: cifar_resnet(8, width=0), ValueError,
   r'cifar_resnet: argument `width` expected an int >= 1, got 0'),
  (lambda: cifar_resnet(8, num_classes=-1), ValueError,
   r'cifar_resnet: argument `num_classes` expected an int >= 1, got -1'),
  (lambda: cifar_resnet(8, width=2.5), TypeError, r'cifar_resnet: argument `width`.*float'),
  (lambda: wide_resnet('16'), TypeError, r'wide_resnet: argument `depth`.*str'),
  (lambda: wide_resnet(16, 0), ValueError, r'wide_resnet: argument `width`.*got 0'),
  (lambda: wide_resnet(16, 1, base_width=0), ValueError, r'wide_resnet: argument `base_width`'),
  (lambda: resnet50(width=0), ValueError, r'resnet50: argument `width`.*got 0'),
  (lambda: resnet50(num_classes=0), ValueError, r'resnet50: argument `num_classes`.*got 0'),
  (lambda: pws_resnet('34'), TypeError, r'pws_resnet: argument `depth`.*str'),
  (lambda: pws_resnet(34, width=-2), ValueError, r'pws_resnet: argument `width`.*got -2'),
  (lambda: pws_resnet(34, num_classes=0), ValueError, r'pws_resnet: argument `num_classes`'),
])
def test_preset_counts_fail_fast_naming_the_argument(make, exc, message):
  # Before: ZeroDivisionError in an initializer, or "'<' not supported between 'str' and 'int'".
  with pytest.raises(exc, match=message):
    make()


@pytest.mark.parametrize('kwargs, message', [
  (dict(widths=(4, 0)), r'ResNet: argument `widths` expected an int >= 1, got 0'),
  (dict(stem_width=0), r'ResNet: argument `stem_width` expected an int >= 1, got 0'),
  (dict(num_classes=0), r'ResNet: argument `num_classes` expected an int >= 1, got 0'),
  (dict(stage_sizes=(1, -1)), r'ResNet: argument `stage_sizes` expected an int >= 1, got -1'),
])
def test_resnet_module_counts_fail_fast_naming_the_argument(kwargs, message):
  base = dict(stage_sizes=(1, 1), widths=(4, 8), strides=(1, 2), norm='none')
  with pytest.raises(ValueError, match=message):
    ResNet(**{**base, **kwargs}).init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))
  with pytest.raises(TypeError, match=r'ResNet: argument `num_classes`.*str'):
    ResNet(**{**base, 'num_classes': '10'}).init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))


def test_residual_block_features_fail_fast():
  from jaxnorm.models import ResidualBlock
  from jaxnorm.models.registry import Layers

  block = ResidualBlock(layers=Layers(spec=NormSpec('none')), features=0)
  with pytest.raises(ValueError, match=r'ResidualBlock: argument `features`.*got 0'):
    block.init(jax.random.PRNGKey(0), jnp.zeros((1, 4, 4, 2)), False)


@pytest.mark.parametrize('groups, exc, message', [
  (0, ValueError, r'NormSpec: argument `group_norm_groups` expected an int >= 1, got 0'),
  (-4, ValueError, r'NormSpec: argument `group_norm_groups` expected an int >= 1, got -4'),
  (2.0, TypeError, r'NormSpec: argument `group_norm_groups`.*float'),
])
def test_group_norm_groups_must_be_a_positive_int(groups, exc, message):
  # Before: gcd(0, C) = C and gcd(-4, C) silently picked a group count.
  with pytest.raises(exc, match=message):
    NormSpec('group_norm', group_norm_groups=groups)


def test_group_norm_groups_must_divide_the_channels_of_wide_layers():
  x = jnp.zeros((2, 8, 8, 3))
  # 3 groups on 16 channels: gcd would silently use 1 group (a LayerNorm); now a clear error.
  model = cifar_resnet(8, width=16, norm=NormSpec('group_norm', group_norm_groups=3), scan=False)
  with pytest.raises(ValueError, match=r'GroupNorm stem_norm: argument '
                     r'`group_norm_groups` expected a divisor of the 16 channels.*got 3'):
    model.init(jax.random.PRNGKey(0), x)
  # Narrow layers (C < groups) use gcd(groups, C) groups: the default 32 works at width 4.
  variables = cifar_resnet(8, width=4, norm='group_norm').init(jax.random.PRNGKey(0), x)
  assert variables['params']['stem_norm']['group_norm']['scale'].shape == (4,)


@pytest.mark.parametrize('make', [
    lambda **kw: cifar_resnet(8, width=4, **kw),
    lambda **kw: wide_resnet(10, 1, base_width=4, **kw),
])
def test_regularized_skipinit_has_no_normalization(make):
  # De & Smith's Regularized SkipInit: no normalization layer, SkipInit(0), conv biases, dropout.
  model = make(regularized=True)
  variables = jax.eval_shape(model.init, jax.random.key(0), jnp.ones((2, 8, 8, 3)))
  assert 'batch_stats' not in variables
  paths = ['/'.join(str(getattr(k, 'key', k)) for k in path)
           for path, _ in jax.tree_util.tree_leaves_with_path(variables['params'])]
  assert not [p for p in paths if 'norm' in p.split('/')[-2].lower()], paths
  assert any(p.endswith('skip_init/gain') for p in paths)
  assert any('conv' in p and p.endswith('bias') for p in paths)
  assert model.dropout_rate > 0 and model.skip_init == 0.0
  with pytest.raises(ValueError, match='regularized'):
    make(regularized=True, norm='group_norm')


def test_block_scale_divides_every_block_output_by_sqrt2():
  """x_{l+1} = (x_l + f(x_l)) / sqrt(2): the sown skip taps equal (input + branch) * scale."""
  import jax
  import numpy as np

  from jaxnorm import models

  scale = 0.5 ** 0.5
  model = models.ResNet(stage_sizes=(3,), widths=(4,), strides=(1,), stem_width=4, style='v2',
                        norm='none', block_scale=scale, scan=False)
  x = np.random.default_rng(0).standard_normal((2, 6, 6, 3)).astype(np.float32)
  variables = model.init(jax.random.PRNGKey(0), x)
  _, state = model.apply(variables, x, mutable=['intermediates'])
  inter = state['intermediates']
  prev = np.asarray(inter['stem'][0])
  blocks = inter['stage_0']
  for i in range(3):
    b = blocks[f'block_{i}']
    skip, branch = np.asarray(b['skip'][0]), np.asarray(b['branch'][0])
    np.testing.assert_allclose(skip, (prev + branch) * scale, rtol=1e-5, atol=1e-6)
    prev = skip
  # Unnormalized, He init: E|x + f(x)|^2 ~ 2 E|x|^2, so dividing by sqrt(2) keeps the second
  # moment of the skip path near its stem value instead of doubling it per block.
  assert 0.2 < np.mean(prev ** 2) / np.mean(np.asarray(inter['stem'][0]) ** 2) < 5


def test_block_scale_rejects_non_positive_and_fixup():
  import jax
  import numpy as np
  import pytest

  from jaxnorm import models

  x = np.zeros((2, 4, 4, 3), np.float32)
  for kw in ({'block_scale': 0.0, 'norm': 'none'}, {'block_scale': 0.7, 'fixup': True,
                                                     'norm': 'none'}):
    model = models.ResNet(stage_sizes=(1,), widths=(4,), strides=(1,), stem_width=4,
                          style='v2', **kw)
    with pytest.raises(ValueError, match='block_scale'):
      model.init(jax.random.PRNGKey(0), x)


def _norm_paths(variables) -> list[str]:
  """The normalization layers of a variable tree (one entry per BatchNorm mean)."""
  return ['/'.join(str(getattr(k, 'key', k)) for k in path)
          for path, _ in jax.tree_util.tree_leaves_with_path(variables.get('batch_stats', {}))
          if str(getattr(path[-1], 'key', path[-1])) == 'mean']


@pytest.mark.parametrize('k, expected', [
    (0, 0),  # norm='none'
    (1, 2),  # the last block's two branch norms
    (3, 7),  # the last stage: 3 blocks x 2 + its projection shortcut's norm
    (4, 9),  # cuts stage 1: its last block too (2 more)
    (9, 21),  # every block (9 x 2 + 2 shortcut norms) and the stem norm
])
def test_norm_last_blocks_counts_the_normalized_layers(k, expected):
  """Bjorck et al.'s BatchNorm in the last layers only: ResNet-20 ('v1', 9 blocks)."""
  model = cifar_resnet(20, width=4, norm_last_blocks=k, scan=False)
  variables = jax.eval_shape(model.init, jax.random.key(0), jnp.ones((2, 8, 8, 3)))
  paths = _norm_paths(variables)
  assert len(paths) == expected, paths
  normed = {p.split('/')[0] + '/' + p.split('/')[1] for p in paths if p.startswith('stage_')}
  blocks = [f'stage_{s}/block_{b}' for s in range(3) for b in range(3)]
  assert normed == set(blocks[len(blocks) - k:])
  assert ('stem_norm/mean' in paths) == (k == 9)


@pytest.mark.parametrize('style', ['v1', 'v2'])
@pytest.mark.parametrize('scan', [False, True])
def test_norm_last_blocks_at_the_extremes_is_the_plain_model(style, scan):
  """k = 0 is norm='none' and k = all blocks the normalized model: same variables, same output."""
  x = np.random.default_rng(0).standard_normal((4, 8, 8, 3)).astype(np.float32)
  for k, norm in ((0, 'none'), (6, 'batch_norm')):
    mixed = cifar_resnet(14, width=4, style=style, norm_last_blocks=k, scan=scan)
    plain = cifar_resnet(14, width=4, style=style, norm=norm, scan=scan)
    v_mixed = mixed.init(jax.random.key(1), x)
    v_plain = plain.init(jax.random.key(1), x)
    assert jax.tree.structure(v_mixed) == jax.tree.structure(v_plain)
    jax.tree.map(np.testing.assert_array_equal, v_mixed, v_plain)
    out_mixed, _ = mixed.apply(v_mixed, x, train=True, mutable=['batch_stats'])
    out_plain, _ = plain.apply(v_plain, x, train=True, mutable=['batch_stats'])
    np.testing.assert_array_equal(np.asarray(out_mixed), np.asarray(out_plain))


def test_norm_last_blocks_cutting_a_scanned_stage_matches_the_unrolled_model():
  """The cut stage is unrolled, the others scanned: the same network as all unrolled."""
  from jaxnorm.models import stack_blocks

  x = np.random.default_rng(0).standard_normal((4, 8, 8, 3)).astype(np.float32)
  unrolled = cifar_resnet(20, width=4, style='v2', norm_last_blocks=4, scan=False)
  scanned = cifar_resnet(20, width=4, style='v2', norm_last_blocks=4, scan=True)
  v = unrolled.init(jax.random.key(2), x)
  v_scanned = scanned.init(jax.random.key(2), x)
  assert 'scanned_blocks' in v_scanned['params']['stage_0']
  assert 'scanned_blocks' not in v_scanned['params']['stage_1']  # the cut stage
  # 'v2': two norms per block (norm_pre, norm_0), the final norm (k >= 1), no stem norm.
  assert 'final_norm' in v['batch_stats'] and len(_norm_paths(v)) == 4 * 2 + 1
  stacked = {c: {name: t if name == 'stage_1' else stack_blocks(t) for name, t in tree.items()}
             for c, tree in v.items()}
  assert jax.tree.structure(stacked) == jax.tree.structure(v_scanned)
  out, _ = unrolled.apply(v, x, train=True, mutable=['batch_stats'])
  out_scanned, _ = scanned.apply(stacked, x, train=True, mutable=['batch_stats'])
  np.testing.assert_allclose(np.asarray(out), np.asarray(out_scanned), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('kwargs', [
    {'norm_last_blocks': -1}, {'norm_last_blocks': 7}, {'norm_last_blocks': True},
    {'norm_last_blocks': 1.0}, {'norm_last_blocks': 1, 'norm': 'none'},
    {'norm_last_blocks': 1, 'norm': 'scaled_ws', 'style': 'v2'},
    {'norm_last_blocks': 1, 'fixup': True},
])
def test_norm_last_blocks_rejects_bad_values_naming_the_argument(kwargs):
  model = cifar_resnet(14, width=4, **kwargs)
  with pytest.raises(ValueError, match='norm_last_blocks'):
    model.init(jax.random.key(0), jnp.ones((2, 8, 8, 3)))


def test_norm_last_blocks_is_a_model_config_field():
  from jaxnorm.training.config import model_config
  from jaxnorm.training.loop import build_model

  assert model_config('cifar_resnet').norm_last_blocks is None
  model = build_model(model_config('cifar_resnet', depth=14, width=4, norm_last_blocks=2), 10)
  assert model.norm_last_blocks == 2
