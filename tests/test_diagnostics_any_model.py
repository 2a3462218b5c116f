"""signal_propagation on models written without jaxnorm's taps: the module view, checked exactly.

Every statistic is compared with an independent computation: the forward ones with numpy on the
outputs Flax itself records (``capture_intermediates=True``) or on a hand-written forward pass,
the gradient ones with ``jax.grad`` with respect to perturbations placed by hand
(``Module.perturb`` in a modified copy of the model, or arguments of a hand-written function).
"""

from __future__ import annotations

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax_style_resnet import ResNet18

from jaxnorm.diagnostics.signal_propagation import (
  _measure,
  gaussian_logit_probe,
  signal_propagation,
)


def _np_stats(a) -> tuple[float, float]:
  """(avg_sq_mean, avg_var) of a channels-last array, statistics over every other axis (numpy)."""
  a = np.asarray(a, np.float64).reshape(-1, np.shape(a)[-1])
  return float(np.mean(a.mean(0) ** 2)), float(np.mean(a.var(0)))


def _assert_stats(entry, act=None, grad=None, rel=1e-4):
  """``entry``'s forward (from ``act``) and gradient (from ``grad``) statistics match numpy."""
  if act is not None:
    sq, var = _np_stats(act)
    assert entry.avg_var == pytest.approx(var, rel=rel), entry.path
    assert entry.avg_sq_mean == pytest.approx(sq, rel=10 * rel, abs=1e-6 * var), entry.path
  if grad is not None:
    gsq, gvar = _np_stats(grad)
    assert entry.grad_var == pytest.approx(gvar, rel=rel), entry.path
    assert entry.grad_sq_mean == pytest.approx(gsq, rel=10 * rel, abs=1e-6 * gvar), entry.path


def _random_variables(model, x, seed=0, **kwargs):
  """He-normal kernels, N(0, 0.1^2) biases, U(0.5, 1.5) norm scales, from numpy (no init compile).

  Non-trivial scales and biases make every gradient non-zero (the Flax ResNet's last norm of each
  block starts at scale 0, which would zero the branch gradients).
  """
  shapes = jax.eval_shape(lambda k: model.init(k, x, **kwargs), jax.random.key(0))
  rs = np.random.RandomState(seed)

  def fill(path, s):
    name = path[-1].key
    if name == 'kernel':
      fan_in = int(np.prod(s.shape[:-1]))
      return jnp.asarray(rs.normal(0, np.sqrt(2 / fan_in), s.shape), s.dtype)
    if name == 'scale':
      return jnp.asarray(rs.uniform(0.5, 1.5, s.shape), s.dtype)
    if name == 'var':
      return jnp.ones(s.shape, s.dtype)
    if name == 'mean':
      return jnp.zeros(s.shape, s.dtype)
    return jnp.asarray(rs.normal(0, 0.1, s.shape), s.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


# --- A ResNet-18 written like Flax's examples (list field: not hashable; no taps) ---------------


class Conv(nn.Conv):
  """nn.Conv whose output carries a perturbation (the hand-modified copy; same parameter names)."""

  @nn.compact
  def __call__(self, x):
    return self.perturb('out', super().__call__(x))


class BatchNorm(nn.BatchNorm):
  """nn.BatchNorm whose output carries a perturbation."""

  @nn.compact
  def __call__(self, x, use_running_average=None):
    return self.perturb('out', super().__call__(x, use_running_average))


@pytest.fixture(scope='module')
def resnet():
  model = ResNet18(num_filters=8)
  x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
  variables = _random_variables(model, x, train=False)
  return model, variables, x, signal_propagation(model, variables, x)


def test_flax_resnet18_modules_in_network_order(resnet):
  model, variables, x, rep = resnet
  with pytest.raises(TypeError):
    hash(model)  # the list field: the case that used to fail as a static jit argument
  paths = [m.path for m in rep.modules]
  assert paths[:3] == ['stem_conv', 'stem_norm', 'BasicBlock_0/Conv_0']
  assert paths[-1] == 'Dense_0' and rep.modules[-1].module == 'Dense'
  blocks = [p for p in paths if '/' not in p and p.startswith('BasicBlock')]
  assert blocks == [f'BasicBlock_{i}' for i in range(8)]
  # A block's own output follows its layers; projections at the three stage transitions.
  i = paths.index('BasicBlock_2')
  assert paths[i - 6:i] == [f'BasicBlock_2/{n}' for n in ('Conv_0', 'BatchNorm_0', 'Conv_1',
                                                          'BatchNorm_1', 'proj_conv', 'proj_norm')]
  assert len(paths) == 2 + 8 * 5 + 3 * 2 + 1 and len(set(paths)) == len(paths)
  assert rep.modules[0].shape == (4, 16, 16, 8) and rep.modules[-2].shape == (4, 1, 1, 64)
  assert not rep.blocks and rep.stem is None and not rep.unresolved_modules
  # Parameters in network order too (the stem first, not alphabetically after 'Dense_0').
  keys = list(rep.weight_grad_norms)
  assert keys[0].startswith('stem_conv/') and keys[-1].startswith('Dense_0/')
  table = rep.to_table()
  assert 'BasicBlock_7/BatchNorm_1' in table and table.count('\n') == len(paths) + 1
  json.dumps(rep.to_dict())


def test_flax_resnet18_statistics_match_capture_intermediates_and_perturb_gradients(resnet):
  model, variables, x, rep = resnet
  # Independently: Flax's own capture of every module's output, and jax.grad w.r.t. Flax
  # perturbations added by hand after every conv and norm, of the same loss.
  tapped = ResNet18(num_filters=8, conv=Conv, norm=BatchNorm)
  _, shapes = jax.eval_shape(lambda: tapped.apply(variables, x, mutable=['perturbations',
                                                                          'batch_stats']))
  perts = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes['perturbations'])
  probe = gaussian_logit_probe((4, 10))

  def loss(p):
    logits, mut = tapped.apply({**variables, 'perturbations': p}, x, train=True,
                               capture_intermediates=True,
                               mutable=['intermediates', 'batch_stats'])
    return jnp.sum(probe * logits) / 4, (mut['intermediates'], logits)

  grads, (inter, logits) = jax.jit(jax.grad(loss, has_aux=True))(perts)
  node = lambda tree, path: (lambda t: [t := t[k] for k in path.split('/')][-1])(tree)
  checked = 0
  for entry in rep.modules:
    act = node(inter, entry.path)['__call__'][0]
    grad = node(grads, entry.path)['out'] if entry.module in ('Conv', 'BatchNorm') else None
    _assert_stats(entry, act, grad)
    checked += grad is not None
  assert checked == 2 + 8 * 4 + 3 * 2
  # The head and the last block, in closed form: logits = mean_hw(h) W + b, L = <probe, logits>/B.
  w = np.asarray(variables['params']['Dense_0']['kernel'])
  _assert_stats(rep.module('Dense_0'), logits, np.asarray(probe) / 4)
  g_last = np.broadcast_to((np.asarray(probe) @ w.T / 4)[:, None, None, :], (4, 1, 1, 64))
  _assert_stats(rep.module('BasicBlock_7'), grad=g_last)
  # float32: the report's loss and this jitted one sum in another order (measured 1.2e-5).
  assert rep.loss == pytest.approx(float(jnp.sum(probe * logits) / 4), rel=1e-4)


def test_unhashable_model_reuses_the_compiled_pass(resnet):
  model, variables, x, rep = resnet
  before = _measure._cache_size()
  again = signal_propagation(ResNet18(num_filters=8), jax.tree.map(lambda a: a + 0, variables), x)
  assert _measure._cache_size() == before
  np.testing.assert_array_equal(again.module_series('grad_var'), rep.module_series('grad_var'))


# --- A pre-LN transformer block ----------------------------------------------------------------


class TransformerBlock(nn.Module):
  """x + MHA(LN(x)), then + MLP(LN(.)); ``taps=True``: the hand-modified copy (perturbations)."""

  heads: int = 4
  taps: bool = False

  @nn.compact
  def __call__(self, x):
    tap = (lambda n, v: self.perturb(n, v)) if self.taps else (lambda n, v: v)
    d = x.shape[-1]
    h = tap('ln0', nn.LayerNorm()(x))
    x = x + tap('attn', nn.MultiHeadDotProductAttention(num_heads=self.heads)(h))
    h = tap('ln1', nn.LayerNorm()(x))
    h = nn.gelu(tap('fc1', nn.Dense(4 * d)(h)))
    return x + tap('fc2', nn.Dense(d)(h))


@pytest.fixture(scope='module')
def transformer():
  model = TransformerBlock()
  x = jax.random.normal(jax.random.key(2), (2, 8, 16))
  variables = _random_variables(model, x)
  return model, variables, x, signal_propagation(model, variables, x)


def test_transformer_block_modules_and_statistics(transformer):
  model, variables, x, rep = transformer
  mha = 'MultiHeadDotProductAttention_0'
  assert [m.path for m in rep.modules] == [
    'LayerNorm_0', f'{mha}/query', f'{mha}/key', f'{mha}/value', f'{mha}/out', mha,
    'LayerNorm_1', 'Dense_0', 'Dense_1']
  assert rep.module(f'{mha}/query').shape == (2, 8, 4, 4)  # (batch, length, heads, head dim)

  tapped = TransformerBlock(taps=True)
  _, shapes = jax.eval_shape(lambda: tapped.apply(variables, x, mutable=['perturbations']))
  perts = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes['perturbations'])
  probe = gaussian_logit_probe(x.shape)

  def loss(p):
    y, mut = tapped.apply({**variables, 'perturbations': p}, x, capture_intermediates=True,
                          mutable=['intermediates'])
    return jnp.sum(probe * y) / 2, mut['intermediates']

  grads, inter = jax.jit(jax.grad(loss, has_aux=True))(perts)
  node = lambda path: (lambda t: [t := t[k] for k in path.split('/')][-1])(inter)
  grad_of = {'LayerNorm_0': 'ln0', mha: 'attn', f'{mha}/out': 'attn', 'LayerNorm_1': 'ln1',
             'Dense_0': 'fc1', 'Dense_1': 'fc2'}
  for entry in rep.modules:
    g = grads[grad_of[entry.path]] if entry.path in grad_of else None
    _assert_stats(entry, node(entry.path)['__call__'][0], g)
  # The last Dense feeds the output through the residual sum: dL/dy = probe / B exactly.
  _assert_stats(rep.module('Dense_1'), grad=np.asarray(probe) / 2, rel=1e-6)


def test_module_selection_by_class_and_predicate(transformer):
  model, variables, x, full = transformer
  dense = signal_propagation(model, variables, x, modules=nn.Dense)
  assert [m.path for m in dense.modules] == ['Dense_0', 'Dense_1']
  attn = signal_propagation(model, variables, x,
                            modules=lambda path, m: path.startswith('MultiHead'))
  assert [m.module for m in attn.modules] == ['DenseGeneral'] * 4 + ['MultiHeadDotProductAttention']
  for rep in (dense, attn):  # the selection changes what is read, not the numbers
    for m in rep.modules:
      assert m == full.module(m.path)


class _Pair(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(4)(x), x


class _SharedAndPair(nn.Module):
  """A shared Dense called twice, and a submodule returning a tuple (skipped by default)."""

  @nn.compact
  def __call__(self, x, train: bool = True):
    dense = nn.Dense(x.shape[-1], name='shared')
    h, _ = _Pair()(nn.relu(dense(nn.relu(dense(x)))))
    return h


def test_shared_modules_get_one_entry_per_call_and_tuple_outputs_are_skipped():
  model = _SharedAndPair()
  x = jax.random.normal(jax.random.key(3), (6, 5))
  variables = _random_variables(model, x)
  rep = signal_propagation(model, variables, x)
  assert [(m.path, m.call) for m in rep.modules] == [('shared', 0), ('shared', 1),
                                                     ('_Pair_0/Dense_0', 0)]
  assert rep.modules[1].name == 'shared[1]'
  p = variables['params']['shared']
  w, b = np.asarray(p['kernel'], np.float64), np.asarray(p['bias'], np.float64)
  h0 = np.asarray(x, np.float64) @ w + b
  h1 = np.maximum(h0, 0) @ w + b
  _assert_stats(rep.modules[0], h0)
  _assert_stats(rep.modules[1], h1)
  with pytest.raises(ValueError, match='`modules`.*_Pair_0 \\(_Pair\\) returning a tuple'):
    signal_propagation(model, variables, x, modules=(_Pair,))


# --- NNX ----------------------------------------------------------------------------------------


class NnxNet(nnx.Module):
  """Linear -> BatchNorm -> relu -> (shared Linear -> relu) x 2 -> Linear."""

  def __init__(self, rngs: nnx.Rngs):
    self.inp = nnx.Linear(6, 16, rngs=rngs)
    self.bn = nnx.BatchNorm(16, rngs=rngs)
    self.hidden = nnx.Linear(16, 16, rngs=rngs)
    self.out = nnx.Linear(16, 4, rngs=rngs)

  def __call__(self, x):
    h = nnx.relu(self.bn(self.inp(x)))
    h = nnx.relu(self.hidden(h))
    h = nnx.relu(self.hidden(h))
    return self.out(h)


def test_nnx_model_matches_a_hand_written_forward_and_its_gradients():
  model = NnxNet(nnx.Rngs(0))
  model.bn.scale[...] = jnp.linspace(0.5, 1.5, 16)
  model.bn.bias[...] = jnp.linspace(-0.3, 0.3, 16)
  model.eval()  # training mode is set inside the call, on a copy
  x = jax.random.normal(jax.random.key(4), (12, 6)) + 0.5
  stats_before = np.asarray(model.bn.mean[...]).copy()
  rep = signal_propagation(model, None, x)
  assert [(m.path, m.call, m.module) for m in rep.modules] == [
    ('inp', 0, 'Linear'), ('bn', 0, 'BatchNorm'), ('hidden', 0, 'Linear'), ('hidden', 1, 'Linear'),
    ('out', 0, 'Linear')]
  assert model.bn.use_running_average and np.array_equal(model.bn.mean[...], stats_before)

  p = {k: np.asarray(v[...], np.float64) for k, v in {
    'w1': model.inp.kernel, 'b1': model.inp.bias, 'g': model.bn.scale, 'beta': model.bn.bias,
    'wh': model.hidden.kernel, 'bh': model.hidden.bias, 'wo': model.out.kernel,
    'bo': model.out.bias}.items()}
  probe = gaussian_logit_probe((12, 4))

  def forward(e, xp=jnp):
    z1 = xp.asarray(np.asarray(x, np.float64)) @ p['w1'] + p['b1'] + e[0]
    mu, var = z1.mean(0), ((z1 - z1.mean(0)) ** 2).mean(0)
    bn = (z1 - mu) / xp.sqrt(var + 1e-5) * p['g'] + p['beta'] + e[1]
    z2 = xp.maximum(bn, 0) @ p['wh'] + p['bh'] + e[2]
    z3 = xp.maximum(z2, 0) @ p['wh'] + p['bh'] + e[3]
    y = xp.maximum(z3, 0) @ p['wo'] + p['bo'] + e[4]
    return [z1, bn, z2, z3, y]

  shapes = [(12, 16)] * 4 + [(12, 4)]
  acts = forward([np.zeros(s) for s in shapes], np)  # float64 numpy
  loss = lambda e: jnp.sum(probe * forward(e)[-1]) / 12
  value, grads = jax.jit(jax.value_and_grad(loss))([jnp.zeros(s, jnp.float32) for s in shapes])
  for entry, a, g in zip(rep.modules, acts, grads, strict=True):
    _assert_stats(entry, a, g, rel=1e-3)
  assert rep.loss == pytest.approx(float(value), rel=1e-4)
  assert list(rep.weight_grad_norms) == ['inp/bias', 'inp/kernel', 'bn/bias', 'bn/scale',
                                         'hidden/bias', 'hidden/kernel', 'out/bias', 'out/kernel']
  # The model's state passed explicitly: the same numbers (and the same compiled pass).
  again = signal_propagation(model, nnx.state(model), x)
  np.testing.assert_array_equal(again.module_series('grad_var'), rep.module_series('grad_var'))
  with pytest.raises(ValueError, match='rng'):
    signal_propagation(model, None, x, rng=jax.random.key(0))


# --- jaxnorm's own models, lifted transforms, errors -------------------------------------------


def test_jaxnorm_model_keeps_its_block_view_and_adds_modules_on_request():
  from jaxnorm.models import cifar_resnet

  model = cifar_resnet(8, width=4, scan=False)
  x = jax.random.normal(jax.random.key(1), (6, 8, 8, 3))
  rep = signal_propagation(model, None, x, init_rng=jax.random.key(0))
  assert rep.modules == [] and len(rep.blocks) == 3 and rep.stem is not None
  both = signal_propagation(model, None, x, init_rng=jax.random.key(0), modules=True)
  for field in ('avg_var', 'avg_sq_mean', 'grad_var', 'grad_sq_mean', 'res_avg_var'):
    np.testing.assert_allclose(both.series(field), rep.series(field), rtol=1e-5, atol=1e-12)
  assert list(both.weight_grad_norms) == list(rep.weight_grad_norms)
  np.testing.assert_allclose(list(both.weight_grad_norms.values()),
                             list(rep.weight_grad_norms.values()), rtol=1e-5)
  paths = [m.path for m in both.modules]
  assert paths.index('stage_0/block_0') < paths.index('stage_1/block_0') < len(paths) - 1
  # The block's output is the skip tap: both views read the same activation and gradient.
  blk = both.module('stage_2/block_0')
  assert blk.avg_var == pytest.approx(rep.blocks[-1].avg_var, rel=1e-6)
  assert blk.grad_var == pytest.approx(rep.blocks[-1].grad_var, rel=1e-6)


class _ScanBody(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    return nn.relu(nn.Dense(x.shape[-1])(x)), None


class _Lifted(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Dense(8, name='inp')(x)
    x, _ = nn.scan(_ScanBody, variable_axes={'params': 0}, split_rngs={'params': True},
                   length=3)(name='stack')(x, None)
    x = nn.remat(nn.Dense)(8, name='ckpt')(x)
    return nn.Dense(3, name='head')(x)


def test_modules_inside_lifted_transforms_are_listed_not_measured():
  model = _Lifted()
  x = jax.random.normal(jax.random.key(5), (4, 8))
  variables = _random_variables(model, x)
  rep = signal_propagation(model, variables, x)
  assert [m.path for m in rep.modules] == ['inp', 'head']
  assert set(rep.unresolved_modules) == {'stack/Dense_0', 'ckpt'}
  assert 'not measured' in rep.to_table()


class _Broken(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3)(x) @ jnp.ones((5, 2))


class _TupleOut(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3)(x), x


def test_errors_name_the_function_and_argument():
  x = jnp.ones((4, 2))
  v = {'params': {'Dense_0': {'kernel': jnp.ones((2, 3)), 'bias': jnp.zeros(3)}}}
  with pytest.raises(TypeError, match='signal_propagation: argument `model`.*model.apply'):
    signal_propagation(_Broken(), v, x)
  with pytest.raises(ValueError, match='argument `model`.*one floating-point array'):
    signal_propagation(_TupleOut(), v, x)
  with pytest.raises(TypeError, match='argument `x`'):
    signal_propagation(_TupleOut(), v, x.astype(jnp.int32))
  with pytest.raises(TypeError, match='argument `modules`'):
    signal_propagation(_TupleOut(), v, x, modules='Dense')
  with pytest.raises(ValueError, match='argument `apply_kwargs`'):
    signal_propagation(_TupleOut(), v, x, apply_kwargs={'train': False})
