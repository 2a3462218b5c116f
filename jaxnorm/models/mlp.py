"""Deep MLPs: a pre-activation residual MLP (De & Smith's toy model) and a plain MLP (BGN paper).

Both take a `norm` registered for the 'mlp' family (``registry.registered_norms('mlp')``: the
built-ins 'batch_norm', 'ghost_batch_norm', 'none', and user norms registered with
``families=('resnet', 'mlp')`` or ``('mlp',)``); an MLP uses only the activation normalization.

References:
  De & Smith (2020), 'Batch Normalization Biases Residual Blocks Towards the Identity Function in
  Deep Networks', arXiv:2002.10444 (the residual MLP: input Dense(1000) then residual blocks,
  LeCun-normal init).
  Cabana & Lago-Fernandez (2021), 'Backward Gradient Normalization in Deep Neural Networks',
  arXiv:2106.09475 (very deep plain MLPs, BGN after hidden layers; the placement on the
  post-activation is this package's reconstruction).
  Panigrahi, Chen & Kuo (2018), 'Analysis on Gradient Propagation in Batch Normalized Residual
  Networks', arXiv:1812.00342 (plain BatchNorm nets for comparison).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from numbers import Real

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxnorm.functional import _backward_grad_norm as bgn_lib
from jaxnorm.functional._checks import check_choice, fail
from jaxnorm.linen.backward_grad_norm import BackwardGradNorm
from jaxnorm.models.registry import (
  Layers,
  NormSpec,
  check_bgn,
  check_count,
  make_norm_spec,
  registered_norms,
  resolve_skip_init,
)
from jaxnorm.models.stacking import default_scan, run_blocks
from jaxnorm.models.taps import perturb

BGN_POSITIONS = ('post', 'pre')

ACTIVATIONS: dict[str, Callable] = {
  'relu': jax.nn.relu,
  'tanh': jnp.tanh,
  'sigmoid': jax.nn.sigmoid,
  'gelu': jax.nn.gelu,
  'linear': lambda x: x,
}


def mlp_norms() -> tuple[str, ...]:
  """The names an MLP accepts: those registered for the 'mlp' family."""
  return registered_norms('mlp')


def _mlp_spec(norm, layer: str) -> NormSpec:
  return make_norm_spec(norm, layer, family='mlp')


def _flatten(x):
  return x.reshape((x.shape[0], -1))


class _MLPBlock(nn.Module):
  """Pre-activation residual block ``x + gain * Dense(relu(norm(x)))`` (He-normal Dense)."""
  layers: Layers
  width: int
  skip_init: float | None = None
  scan_carry: bool = False

  @nn.compact
  def __call__(self, x, train: bool):
    L = self.layers
    h = jax.nn.relu(L.norm(train, name='norm')(x))
    h = L.bgn_node(h, 'layer', name='bgn_pre')
    branch = nn.Dense(self.width, kernel_init=nn.initializers.he_normal(), name='dense')(h)
    self.sow('intermediates', 'branch', branch)
    if self.skip_init is not None:
      branch = L.skip_gain(self.skip_init, name='skip_init')(branch)
    out = x + branch
    out = perturb(self, 'skip', out)
    self.sow('intermediates', 'skip', out)
    out = L.bgn_node(out, 'block', name='bgn_block')
    out = L.bgn_node(out, 'layer', name='bgn_out')
    return (out, None) if self.scan_carry else out


class ResidualMLP(nn.Module):
  """Residual MLP: ``Dense(width)`` (LeCun normal), ``depth`` blocks ``x + g*Dense(relu(norm(x)))``.

  With N(0, 1) inputs the input projection gives a unit-variance skip path; with BatchNorm each
  branch adds ~1/2 (He-normal Dense after relu of a unit-variance input), so the skip-path variance
  grows linearly in depth at init (De & Smith's sqrt(depth) argument); without normalization it
  doubles per block; with SkipInit(0) it stays exactly constant.

  Args:
    depth: number of residual blocks.
    width: hidden width.
    norm: 'batch_norm', 'ghost_batch_norm', 'none', another name registered for the 'mlp'
      family (``mlp_norms()``), or a ``NormSpec``.
    skip_init: None, a float, or 'inv_sqrt_depth'.
    num_classes: outputs of the head (``relu(norm(x)) -> Dense``).
    bgn: BackwardGradNorm placement: 'none', 'block', 'layer'.
    scan: scan blocks 1..depth-1 (None: automatic).
    remat: rematerialise each block.

  References:
    De & Smith (2020), 'Batch Normalization Biases Residual Blocks Towards the Identity Function
    in Deep Networks', arXiv:2002.10444.
  """
  depth: int
  width: int
  norm: str | NormSpec = 'batch_norm'
  skip_init: float | str | None = None
  num_classes: int = 10
  bgn: str = 'none'
  scan: bool | None = None
  remat: bool = False

  @nn.compact
  def __call__(self, x, train: bool = False):
    spec = _mlp_spec(self.norm, 'ResidualMLP')
    check_count('ResidualMLP', 'depth', self.depth)
    check_count('ResidualMLP', 'width', self.width)
    check_count('ResidualMLP', 'num_classes', self.num_classes)
    check_bgn(self.bgn, 'ResidualMLP')
    L = Layers(spec=spec, bgn=self.bgn)
    skip_init = resolve_skip_init(self.skip_init, self.depth, 'ResidualMLP')
    scan = default_scan() if self.scan is None else self.scan
    x = nn.Dense(self.width, kernel_init=nn.initializers.lecun_normal(),
                 name='input_projection')(_flatten(x))
    x = perturb(self, 'stem', x)
    self.sow('intermediates', 'stem', x)
    kw = dict(layers=L, width=self.width, skip_init=skip_init)
    x = run_blocks(_MLPBlock, kw, kw, self.depth, x, train, scan=scan, remat=self.remat)
    x = jax.nn.relu(L.norm(train, name='final_norm')(x))
    return nn.Dense(self.num_classes, name='head')(x)


def _check_bgn_target(target) -> None:
  if isinstance(target, str):
    check_choice('MLP', 'bgn_target', target, bgn_lib.TARGETS)
  elif not isinstance(target, Real) or isinstance(target, bool):
    fail('MLP', 'bgn_target', "'sqrt_units', 'unit' or a positive Python float",
         f'{type(target).__name__} {target!r}', TypeError)
  elif not (math.isfinite(target) and target > 0):
    fail('MLP', 'bgn_target', 'a finite positive number', repr(target))


class _MLPLayer(nn.Module):
  """One hidden layer of the plain MLP: ``act(norm(Dense(x)))``, tapped as 'layer'.

  ``bgn`` (a dict of BackwardGradNorm keywords, or None for no node) puts a node on the
  activation's output (``position='post'``) or on its input (``'pre'``).
  """
  layers: Layers
  width: int
  activation: str
  kernel_init: Callable
  bgn: dict | None = None
  bgn_position: str = 'post'

  @nn.compact
  def __call__(self, x, train: bool):
    L = self.layers
    h = nn.Dense(self.width, kernel_init=self.kernel_init, use_bias=not L.spec.has_activation_norm,
                 name='dense')(x)
    h = L.norm(train, name='norm')(h)
    if self.bgn is not None and self.bgn_position == 'pre':
      h = BackwardGradNorm(**self.bgn, name='bgn')(h)
    h = ACTIVATIONS[self.activation](h)
    h = perturb(self, 'layer', h)
    self.sow('intermediates', 'layer', h)
    if self.bgn is not None and self.bgn_position == 'post':
      h = BackwardGradNorm(**self.bgn, name='bgn')(h)
    return h


class MLP(nn.Module):
  r"""A plain deep MLP (no skips): ``depth`` hidden layers ``act(norm(Dense(h)))`` and a head.

  With ``bgn='layer'``, Backward Gradient Normalization nodes (identity forward; backward
  :math:`g \mapsto s\,g/(\lVert g\rVert_2 + \epsilon)`, Cabana & Lago-Fernandez 2021) sit in
  the hidden layers. The paper's body is not public, so where and how they normalize is a
  reconstruction; the ``bgn_*`` fields name each choice (their defaults are jaxnorm's
  reconstruction: a per-sample norm to ``sqrt(width)`` after every hidden layer's activation).

  Args:
    depth: number of hidden layers.
    width: hidden width.
    activation: 'relu', 'tanh', 'sigmoid', 'gelu' or 'linear'.
    bgn: 'none' or 'layer' (BackwardGradNorm nodes in the hidden layers, placed by
      ``bgn_every`` and ``bgn_position``).
    norm: 'none' (default), 'batch_norm' or 'ghost_batch_norm' (a plain BN net, as in Panigrahi,
      Chen & Kuo 2018), another name registered for the 'mlp' family, or a ``NormSpec``.
    num_classes: outputs of the head.
    kernel_init: None = He normal for relu, LeCun normal otherwise.
    bgn_mode: reconstruction option, the nodes' norm axes: 'per_sample' (default; one norm per
      example) or 'per_batch' (one norm over the whole (batch, width) gradient).
    bgn_target: reconstruction option, the norm :math:`s` the gradient is given:
      'sqrt_units' (default; :math:`\sqrt{n}` for the :math:`n` entries normed over), 'unit'
      or a positive float.
    bgn_every: reconstruction option, a node after every ``bgn_every``-th hidden layer (layers
      ``k-1, 2k-1, ...`` counted from 0); 1 (default) = every hidden layer.
    bgn_position: reconstruction option, 'post' (default; on the activation's output, so the
      gradient is normalized before it passes the activation's derivative) or 'pre' (on the
      activation's input, after the Dense layer and its normalization).

  References:
    Cabana & Lago-Fernandez (2021), 'Backward Gradient Normalization in Deep Neural Networks',
    arXiv:2106.09475, https://arxiv.org/abs/2106.09475; Panigrahi, Chen & Kuo (2018), 'Analysis
    on Gradient Propagation in Batch Normalized Residual Networks', arXiv:1812.00342.
  """
  depth: int
  width: int
  activation: str = 'relu'
  bgn: str = 'none'
  norm: str | NormSpec = 'none'
  num_classes: int = 10
  kernel_init: Callable | None = None
  bgn_mode: str = 'per_sample'
  bgn_target: str | float = 'sqrt_units'
  bgn_every: int = 1
  bgn_position: str = 'post'

  @nn.compact
  def __call__(self, x, train: bool = False):
    spec = _mlp_spec(self.norm, 'MLP')
    check_choice('MLP', 'activation', self.activation, tuple(ACTIVATIONS))
    check_count('MLP', 'depth', self.depth)
    check_count('MLP', 'width', self.width)
    check_count('MLP', 'num_classes', self.num_classes)
    if self.bgn not in ('none', 'layer'):
      fail('MLP', 'bgn', "one of 'none', 'layer'", repr(self.bgn))
    check_choice('MLP', 'bgn_mode', self.bgn_mode, bgn_lib.MODES)
    _check_bgn_target(self.bgn_target)
    check_count('MLP', 'bgn_every', self.bgn_every)
    check_choice('MLP', 'bgn_position', self.bgn_position, BGN_POSITIONS)
    L = Layers(spec=spec)
    node = dict(mode=self.bgn_mode, target=self.bgn_target)
    init = self.kernel_init
    if init is None:
      init = (nn.initializers.he_normal() if self.activation == 'relu'
              else nn.initializers.lecun_normal())
    h = _flatten(x)
    for i in range(self.depth):
      has_node = self.bgn == 'layer' and (i + 1) % self.bgn_every == 0
      h = _MLPLayer(layers=L, width=self.width, activation=self.activation, kernel_init=init,
                    bgn=node if has_node else None, bgn_position=self.bgn_position,
                    name=f'layer_{i}')(h, train)
    return nn.Dense(self.num_classes, name='head')(h)
