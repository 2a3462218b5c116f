"""Deep MLPs: a pre-activation residual MLP (De & Smith's toy model) and a plain MLP (BGN paper).

References: De & Smith 2020 (papers.md §3(b): input Dense(1000) then residual blocks, LeCun-normal
init); Cabana & Lago-Fernandez 2021 (papers.md §2: very deep plain MLPs, BGN after hidden layers,
[recon] placement on the post-activation); Panigrahi et al. (§1: plain BN nets for comparison).
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxnorm.functional._checks import check_choice, fail
from jaxnorm.models.registry import (
  Layers,
  NormSpec,
  check_bgn,
  check_count,
  make_norm_spec,
  resolve_skip_init,
)
from jaxnorm.models.stacking import default_scan, run_blocks
from jaxnorm.models.taps import perturb

MLP_NORMS = ('batch_norm', 'ghost_batch_norm', 'none')
ACTIVATIONS: dict[str, Callable] = {
  'relu': jax.nn.relu,
  'tanh': jnp.tanh,
  'sigmoid': jax.nn.sigmoid,
  'gelu': jax.nn.gelu,
  'linear': lambda x: x,
}


def _mlp_spec(norm, layer: str) -> NormSpec:
  spec = make_norm_spec(norm, layer)
  check_choice(layer, 'norm', spec.name, MLP_NORMS)
  return spec


def _flatten(x):
  return x.reshape((x.shape[0], -1))


class _MLPBlock(nn.Module):
  """Pre-activation residual block ``x + gain * Dense(relu(norm(x)))`` (He-normal Dense)."""
  layers: Layers
  width: int
  skip_init: float | None = None
  scan_carry: bool = False

  @nn.compact
  def __call__(self, x, train: bool, beta):
    del beta
    L = self.layers
    norm = L.norm(train, name='norm')
    h = jax.nn.relu(x if norm is None else norm(x))
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
    norm: 'batch_norm', 'ghost_batch_norm' or 'none' (or a ``NormSpec``).
    skip_init: None, a float, or 'inv_sqrt_depth'.
    num_classes: outputs of the head (``relu(norm(x)) -> Dense``).
    bgn: BackwardGradNorm placement: 'none', 'block', 'layer'.
    scan: scan blocks 1..depth-1 (None: automatic).
    remat: rematerialise each block.

  References: De & Smith 2020, papers.md §3.
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
    x = run_blocks(_MLPBlock, kw, kw, self.depth, x, train, None, scan=scan, remat=self.remat)
    norm = L.norm(train, name='final_norm')
    x = jax.nn.relu(x if norm is None else norm(x))
    return nn.Dense(self.num_classes, name='head')(x)


class _MLPLayer(nn.Module):
  """One hidden layer of the plain MLP: ``act(norm(Dense(x)))``, tapped as 'layer'."""
  layers: Layers
  width: int
  activation: str
  kernel_init: Callable

  @nn.compact
  def __call__(self, x, train: bool):
    L = self.layers
    h = nn.Dense(self.width, kernel_init=self.kernel_init, use_bias=not L.spec.has_activation_norm,
                 name='dense')(x)
    norm = L.norm(train, name='norm')
    h = ACTIVATIONS[self.activation](h if norm is None else norm(h))
    h = perturb(self, 'layer', h)
    self.sow('intermediates', 'layer', h)
    return L.bgn_node(h, 'layer', name='bgn')


class MLP(nn.Module):
  """A plain deep MLP (no skips): ``depth`` hidden layers ``act(norm(Dense(h)))`` and a head.

  Args:
    depth: number of hidden layers.
    width: hidden width.
    activation: 'relu', 'tanh', 'sigmoid', 'gelu' or 'linear'.
    bgn: 'none' or 'layer' (a BackwardGradNorm node after every hidden layer's activation;
      [recon] placement, papers.md §2).
    norm: 'none' (default), 'batch_norm' or 'ghost_batch_norm' (a plain BN net, papers.md §1).
    num_classes: outputs of the head.
    kernel_init: None = He normal for relu, LeCun normal otherwise.

  References: Cabana & Lago-Fernandez 2021, papers.md §2.
  """
  depth: int
  width: int
  activation: str = 'relu'
  bgn: str = 'none'
  norm: str | NormSpec = 'none'
  num_classes: int = 10
  kernel_init: Callable | None = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    spec = _mlp_spec(self.norm, 'MLP')
    check_choice('MLP', 'activation', self.activation, tuple(ACTIVATIONS))
    check_count('MLP', 'depth', self.depth)
    check_count('MLP', 'width', self.width)
    check_count('MLP', 'num_classes', self.num_classes)
    if self.bgn not in ('none', 'layer'):
      fail('MLP', 'bgn', "one of 'none', 'layer'", repr(self.bgn))
    L = Layers(spec=spec, bgn=self.bgn)
    init = self.kernel_init
    if init is None:
      init = (nn.initializers.he_normal() if self.activation == 'relu'
              else nn.initializers.lecun_normal())
    h = _flatten(x)
    for i in range(self.depth):
      h = _MLPLayer(layers=L, width=self.width, activation=self.activation, kernel_init=init,
                    name=f'layer_{i}')(h, train)
    return nn.Dense(self.num_classes, name='head')(h)
