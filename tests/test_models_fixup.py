"""Tests of Fixup (Zhang, Dauphin & Ma 2019, arXiv:1901.09321) as a ResNet option.

The init rule (zero classifier and last branch conv, the other branch convs at He init times
``L ** (-1 / (2m - 2))``, scalar biases and a multiplier per branch), the identity blocks it
gives, that training starts from it, and its argument checks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxnorm.diagnostics.signal_propagation import signal_propagation
from jaxnorm.models import (
  ResNet,
  block_taps,
  cifar_resnet,
  decay_mask,
  resnet50,
  stack_blocks,
  stem_tap,
  unstack_blocks,
  wide_resnet,
)
from jaxnorm.models.fixup import fixup_branch_scale
from jaxnorm.training.config import model_config
from jaxnorm.training.loop import build_model

X = jax.random.normal(jax.random.PRNGKey(0), (4, 8, 8, 3))


def _tiny(style='v1', bottleneck=False, **kw):
  """A 2-stage Fixup ResNet (L = 4 blocks) with tiny widths, unrolled."""
  kw = dict(stage_sizes=(2, 2), widths=(4, 8), stem_width=4 if not bottleneck else 16,
            strides=(1, 2), bottleneck=bottleneck, style=style, norm='none', fixup=True,
            num_classes=5, scan=False, **kw)
  return ResNet(**kw)


def _init(model, seed=1, x=X):
  return jax.jit(model.init)(jax.random.PRNGKey(seed), x)


def _blocks(params):
  """``(path, block params)`` of every residual block, in network order (unrolled layout)."""
  params = unstack_blocks(params)
  out = []
  for stage in sorted(k for k in params if k.startswith('stage_')):
    for block in sorted(params[stage], key=lambda k: int(k.split('_')[1])):
      out.append((f'{stage}/{block}', params[stage][block]))
  return out


@pytest.mark.parametrize('style', ['v1', 'v2'])
@pytest.mark.parametrize('bottleneck', [False, True])
def test_logits_are_the_head_bias_and_identity_blocks_are_the_identity_at_init(style,
                                                                                bottleneck):
  model = _tiny(style, bottleneck)
  variables = _init(model)
  params = variables['params']
  # Give the head bias distinct values: with a zero classifier the logits are exactly that bias.
  head_bias = jnp.arange(5.0) - 2.0
  params = {**params, 'head': {**params['head'], 'bias': head_bias}}
  apply = jax.jit(lambda p: model.apply({'params': p}, X, train=True, mutable=['intermediates']))
  logits, state = apply(params)
  np.testing.assert_array_equal(logits, jnp.broadcast_to(head_bias, logits.shape))

  inter = state['intermediates']
  skips, branches = block_taps(inter, 'skip'), block_taps(inter, 'branch')
  assert len(skips) == len(branches) == model.num_blocks == 4
  inputs = [stem_tap(inter)] + skips[:-1]
  identity_blocks = 0
  for x_in, branch, out in zip(inputs, branches, skips, strict=True):
    np.testing.assert_array_equal(branch, 0.0)  # last branch conv at 0
    if x_in.shape == out.shape:  # identity shortcut: the block is exactly the identity
      identity_blocks += 1
      assert float(jnp.abs(out).max()) > 0
      np.testing.assert_array_equal(out, x_in)
  # stage_0/block_0 (stem width = stage-0 output width), stage_0/block_1 and stage_1/block_1;
  # stage_1/block_0 projects (stride 2).
  assert identity_blocks == 3


@pytest.mark.parametrize('bottleneck, m', [(False, 2), (True, 3)])
def test_inner_branch_convs_have_the_fixup_std_and_last_convs_are_zero(bottleneck, m):
  if bottleneck:
    model = ResNet(stage_sizes=(2, 2), widths=(8, 16), stem_width=32, strides=(1, 2),
                   bottleneck=True, norm='none', fixup=True, scan=True)
  else:
    model = cifar_resnet(14, width=8, fixup=True, scan=True)
  params = jax.device_get(_init(model)['params'])
  blocks = _blocks(params)
  num_blocks = len(blocks)
  assert num_blocks == model.num_blocks == (4 if bottleneck else 6)
  expected = num_blocks ** (-1.0 / (2 * m - 2))  # L^(-1/(2m-2)): 6^-0.5, 4^-0.25
  assert fixup_branch_scale(num_blocks, m) == pytest.approx(expected)

  inner, shortcut, n_inner = [], [], 0
  for path, block in blocks:
    convs = sorted(k for k in block if k.startswith('conv_'))
    assert len(convs) == m, path
    for name in convs[:-1]:
      kernel = np.asarray(block[name]['kernel'], np.float64)
      fan_in = np.prod(kernel.shape[:-1])
      inner.append((kernel / np.sqrt(2.0 / fan_in)).ravel())  # in units of the He std
      n_inner += kernel.size
    np.testing.assert_array_equal(block[convs[-1]]['kernel'], 0.0, err_msg=path)
    if 'shortcut_conv' in block:
      kernel = np.asarray(block['shortcut_conv']['kernel'], np.float64)
      shortcut.append((kernel / np.sqrt(2.0 / np.prod(kernel.shape[:-1]))).ravel())
  z = np.concatenate(inner)
  std = np.sqrt(np.mean(z**2))
  # Relative sampling error of a std from n draws: ~ 1/sqrt(2n) (< 1% here); allow 4 sigma.
  tol = 4.0 / np.sqrt(2.0 * z.size)
  assert abs(std / expected - 1.0) < tol, (std, expected, z.size)
  assert abs(np.mean(z)) < 4.0 * std / np.sqrt(z.size)
  # Projection shortcuts keep plain He init (not rescaled); classifier at 0.
  s = np.concatenate(shortcut)
  assert abs(np.sqrt(np.mean(s**2)) - 1.0) < 4.0 / np.sqrt(2.0 * s.size)
  np.testing.assert_array_equal(params['head']['kernel'], 0.0)
  np.testing.assert_array_equal(params['head']['bias'], 0.0)


@pytest.mark.parametrize('bottleneck, m', [(False, 2), (True, 3)])
def test_every_branch_has_2m_scalar_biases_at_0_and_one_scale_at_1(bottleneck, m):
  model = _tiny('v2', bottleneck)
  params = _init(model)['params']
  for path, block in _blocks(params):
    biases = sorted(k for k in block if k.startswith('bias_'))
    assert biases == sorted(f'bias_{i}{s}' for i in range(m) for s in 'ab'), path
    for k in biases:
      assert block[k]['bias'].shape == ()
      assert float(block[k]['bias']) == 0.0
    assert block['scale']['scale'].shape == () and float(block['scale']['scale']) == 1.0
  scalars = [a for a in jax.tree.leaves(params) if a.shape == ()]
  # 2m biases + 1 scale per branch (4 + 1 for basic blocks), a stem and a head scalar bias.
  assert len(scalars) == model.num_blocks * (2 * m + 1) + 2
  assert float(params['stem_bias']['bias']) == 0.0 and float(params['head_bias']['bias']) == 0.0


def test_decay_mask_excludes_every_fixup_scalar():
  model = cifar_resnet(8, width=4, fixup=True, scan=False)
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0), X)['params']
  mask = dict(jax.tree_util.tree_flatten_with_path(decay_mask(params))[0])
  scalars, kernels = [], []
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    if leaf.shape == ():
      scalars.append(path)
      assert mask[path] is False, jax.tree_util.keystr(path)
    else:
      assert mask[path] is (path[-1].key == 'kernel'), jax.tree_util.keystr(path)
      kernels += [path] if mask[path] else []
  # Every Fixup scalar (4 biases + 1 scale per basic branch, stem and head biases) is kept out.
  assert len(scalars) == 5 * model.num_blocks + 2
  assert len(kernels) == 1 + 2 * model.num_blocks + 2 + 1  # stem, branches, shortcuts, head


@pytest.mark.slow
def test_training_starts_gradients_reach_every_layer_and_the_loss_falls():
  model = _tiny('v1')
  params = _init(model)['params']
  labels = jnp.array([0, 1, 2, 3])

  def loss_fn(p):
    logits = model.apply({'params': p}, X, train=True)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  grad_fn = jax.jit(jax.value_and_grad(loss_fn))

  def nonzero(tree):
    return {jax.tree_util.keystr(p): bool(jnp.any(g != 0))
            for p, g in jax.tree_util.tree_flatten_with_path(tree)[0]}

  loss0, g = grad_fn(params)
  assert float(loss0) == pytest.approx(np.log(5.0), rel=1e-6)  # uniform logits at init
  # Step 0: the zero classifier blocks the backward signal, only the head learns.
  nz = nonzero(g)
  assert {p for p, v in nz.items() if v} == {"['head']['kernel']", "['head']['bias']"}
  losses = [float(loss0)]
  lr = 0.1
  for step in range(1, 9):
    params = jax.tree.map(lambda p, g: p - lr * g, params, g)
    loss, g = grad_fn(params)
    losses.append(float(loss))
    nz = nonzero(g)
    if step == 1:  # the zero-initialised last convs now get a gradient: the blocks start moving
      last = [p for p in nz if "['conv_1']['kernel']" in p]
      assert len(last) == model.num_blocks and all(nz[p] for p in last)
    if step == 2:  # and through them every layer (the multiplier saw a non-zero branch)
      assert all(nz.values()), [p for p, v in nz.items() if not v]
  assert np.all(np.diff(losses) < 0), losses
  assert losses[-1] < 0.95 * losses[0], losses


@pytest.mark.parametrize('style', ['v1', 'v2'])
def test_scanned_and_unrolled_fixup_compute_the_same_function(style):
  kw = dict(stage_sizes=(3,), widths=(4,), strides=(1,), stem_width=2, style=style,
            norm='none', fixup=True)
  unrolled, scanned = ResNet(**kw, scan=False), ResNet(**kw, scan=True)
  params = _init(unrolled)['params']
  shapes = jax.eval_shape(scanned.init, jax.random.PRNGKey(1), X)['params']
  stacked = stack_blocks(params)
  assert (jax.tree.structure(stacked) == jax.tree.structure(shapes))
  assert jax.tree.map(jnp.shape, stacked) == jax.tree.map(lambda s: s.shape, shapes)
  # Move every parameter off its init (zeros included), so the comparison is not 0 == 0.
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(2), len(leaves))
  params = jax.tree.unflatten(tree, [a + 0.2 * jax.random.normal(k, a.shape)
                                     for a, k in zip(leaves, keys, strict=True)])
  out_u, st_u = jax.jit(lambda p: unrolled.apply({'params': p}, X, mutable=['intermediates']))(
      params)
  out_s, st_s = jax.jit(lambda p: scanned.apply({'params': p}, X, mutable=['intermediates']))(
      stack_blocks(params))
  assert float(jnp.abs(out_u).max()) > 0
  np.testing.assert_allclose(out_s, out_u, rtol=1e-5, atol=1e-5)
  for a, b in zip(block_taps(st_s['intermediates'], 'skip'),
                  block_taps(st_u['intermediates'], 'skip'), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_signal_propagation_finds_every_fixup_block():
  model = cifar_resnet(8, width=4, fixup=True, style='v2', scan=True)
  variables = _init(model)
  report = signal_propagation(model, variables, X)
  assert len(report.blocks) == model.num_blocks == 3
  for block in report.blocks:
    assert block.res_avg_var == 0.0  # zero last conv: the branches are 0 at init
    assert block.avg_var > 0.0
    assert block.grad_var == 0.0  # the zero classifier passes no gradient back at init
  assert report.stem is not None and report.stem.avg_var > 0.0


def test_fixup_is_a_factory_keyword_of_the_presets_and_the_training_config():
  c = model_config('wide_resnet', fixup=True, depth=10, width=1, base_width=4)
  assert c.fixup is True and model_config('cifar_resnet').fixup is False
  model = build_model(c, num_classes=10)
  assert model.fixup and model.norm == 'none' and model.style == 'v2'
  assert cifar_resnet(8, fixup=True).norm == 'none'
  assert resnet50(width=2, fixup=True).fixup and not cifar_resnet(8).fixup


def _init_shapes(model):
  return jax.eval_shape(model.init, jax.random.PRNGKey(0), X)


@pytest.mark.parametrize('kwargs, arg', [
  (dict(norm='batch_norm'), 'norm'),
  (dict(norm='scaled_ws', style='v2'), 'norm'),
  (dict(skip_init=0.0), 'skip_init'),
  (dict(skip_init='inv_sqrt_depth'), 'skip_init'),
  (dict(style='relu_first'), 'style'),
])
def test_fixup_fails_clearly_with_a_norm_skip_init_or_relu_first(kwargs, arg):
  kw = dict(stage_sizes=(1,), widths=(4,), strides=(1,), stem_width=4, norm='none', fixup=True)
  kw.update(kwargs)
  with pytest.raises(ValueError, match=f'ResNet: argument `{arg}` expected .*fixup=True'):
    _init_shapes(ResNet(**kw))


def test_fixup_presets_fail_clearly_with_another_norm_or_regularized():
  with pytest.raises(ValueError, match='cifar_resnet: argument `norm` expected .*fixup=True'):
    cifar_resnet(8, norm='group_norm', fixup=True)
  with pytest.raises(ValueError, match='wide_resnet: argument `fixup` expected False with '
                     'regularized=True'):
    wide_resnet(10, 1, fixup=True, regularized=True)
  with pytest.raises(ValueError, match='ResNet: argument `skip_init`'):
    _init_shapes(cifar_resnet(8, width=4, fixup=True, skip_init=0.0))
