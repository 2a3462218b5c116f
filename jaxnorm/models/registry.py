"""The `norm` registry: one spec string chooses every conv and normalization layer of a model.

A model is written once and asks the registry for layers (`conv`, `norm`, `act`, ...). The spec
chooses what they are:

| spec | convolution | normalization after each conv | activation |
| --- | --- | --- | --- |
| ``'batch_norm'`` | ``Conv`` (no bias) | ``BatchNorm`` | relu |
| ``'ghost_batch_norm'`` | ``Conv`` (no bias) | ``BatchNorm(ghost_batch_size=...)`` | relu |
| ``'none'`` | ``Conv`` (bias only with ``conv_bias=True``) | none | relu |
| ``'group_norm'`` | ``Conv`` (no bias) | ``GroupNorm(32)`` (``gcd(32, C)`` if C < 32) | relu |
| ``'ws'`` | ``WSConv`` (no bias) | ``GroupNorm`` (Qiao et al.'s GN+WS) | relu |
| ``'scaled_ws'`` | ``ScaledWSConv`` (gain, bias) | none; NF alpha, beta | relu * 1.7139 |
| ``'pws'`` | ``PWSConv`` (alpha, bias) | none; GroupNorm(1) after stem / before head | relu |

References: papers.md §0 (BatchNorm), §3 (De & Smith: ghost BatchNorm, SkipInit), §5 (Liu et al.:
PWS, GroupNorm(1) stem/neck of the official PWS ResNets), §5b (Qiao et al.: WS, used with GN;
Brock et al.: Scaled WS, gamma-scaled relu, NF alpha/beta). That ``'ws'`` pairs WSConv with
GroupNorm is the combination Qiao et al. recommend (Table 1, GN+WS); a WS conv alone has no scale
that keeps the variance constant.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxnorm.functional import initializers
from jaxnorm.functional._checks import check_choice, check_positive, fail
from jaxnorm.linen import (
  BackwardGradNorm,
  BatchNorm,
  Conv,
  PWSConv,
  ScaledWSConv,
  SkipInit,
  WSConv,
)

NORMS = ('batch_norm', 'ghost_batch_norm', 'none', 'group_norm', 'ws', 'scaled_ws', 'pws')
BGN_PLACEMENTS = ('none', 'block', 'layer')
# NF-ResNet's gamma for relu: sqrt(2 / (1 - 1/pi)), so Var(gamma * relu(z)) = 1 for z ~ N(0, 1).
RELU_GAMMA = 1.7139588594436646
# Norm specs whose convs are followed by an activation normalization layer.
_ACTIVATION_NORMS = ('batch_norm', 'ghost_batch_norm', 'group_norm', 'ws')


@dataclasses.dataclass(frozen=True)
class NormSpec:
  """A normalization choice and its hyperparameters.

  Args:
    name: one of ``NORMS``.
    momentum: BatchNorm running-average momentum (flax convention).
    epsilon: BatchNorm / GroupNorm epsilon.
    ghost_batch_size: sub-batch size of ghost BatchNorm (De & Smith; [recon] default 16).
    group_norm_groups: number of groups G of GroupNorm (an int >= 1). A layer with C >= G channels
      uses G groups, and G must divide C; a narrower layer (C < G, e.g. a smoke-test width) uses
      ``gcd(G, C)`` groups.
    pws_gamma: PWS gamma (epsilon inside the sqrt; the official CIFAR config uses 1e-3).
    pws_mode: PWS fan mode, ``'fan_in'`` or ``'fan_out'``.
    pws_equiv: PWS ``equiv`` mode (gamma scaled by 2/fan).
    pws_init_alpha: PWS data-dependent alpha init (stem, first conv of each block, shortcut).
    nf_alpha: NF-ResNet residual scale alpha (0.2 in Brock et al.).

  References: papers.md §3 (ghost BN), §5(a) (PWS options), §5b (NF alpha).
  """
  name: str = 'batch_norm'
  momentum: float = 0.9
  epsilon: float = 1e-5
  ghost_batch_size: int = 16
  group_norm_groups: int = 32
  pws_gamma: float = 1e-3
  pws_mode: str = 'fan_in'
  pws_equiv: bool = False
  pws_init_alpha: bool = False
  nf_alpha: float = 0.2

  def __post_init__(self):
    check_choice('NormSpec', 'norm', self.name, NORMS)
    check_choice('NormSpec', 'pws_mode', self.pws_mode, ('fan_in', 'fan_out'))
    check_count('NormSpec', 'ghost_batch_size', self.ghost_batch_size)
    check_count('NormSpec', 'group_norm_groups', self.group_norm_groups)
    check_positive('NormSpec', 'nf_alpha', self.nf_alpha)

  @property
  def has_activation_norm(self) -> bool:
    """Whether every conv is followed by an activation normalization layer."""
    return self.name in _ACTIVATION_NORMS

  @property
  def is_nf(self) -> bool:
    """Whether blocks use NF-ResNet alpha/beta bookkeeping and the gamma-scaled relu."""
    return self.name == 'scaled_ws'


def check_count(layer: str, arg: str, value, minimum: int = 1) -> int:
  """Returns ``value`` as an int after checking it is an integer (not a bool) ``>= minimum``.

  Used for widths, depths, class and group counts, where a 0 or a string would otherwise surface
  far away (a division by zero in an initializer, a comparison of str and int).

  Raises:
    TypeError: naming ``layer`` and ``arg``, when ``value`` is not an integer.
    ValueError: naming ``layer`` and ``arg``, when ``value < minimum``.
  """
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    fail(layer, arg, f'an int >= {minimum}', f'{value!r} of type {type(value).__name__}',
         TypeError)
  if value < minimum:
    fail(layer, arg, f'an int >= {minimum}', repr(value))
  return int(value)


def make_norm_spec(norm: str | NormSpec, layer: str = 'model') -> NormSpec:
  """Returns ``norm`` as a ``NormSpec`` (a string is looked up with default hyperparameters).

  Raises:
    ValueError: naming the argument `norm` and the valid choices, for an unknown spec.
  """
  if isinstance(norm, NormSpec):
    return norm
  if not isinstance(norm, str):
    fail(layer, 'norm', 'a string or a NormSpec', repr(norm), TypeError)
  check_choice(layer, 'norm', norm, NORMS)
  return NormSpec(name=norm)


def check_bgn(bgn: str, layer: str = 'model') -> None:
  """Raises ValueError unless ``bgn`` is a known BackwardGradNorm placement."""
  check_choice(layer, 'bgn', bgn, BGN_PLACEMENTS)


def resolve_skip_init(skip_init, num_blocks: int, layer: str = 'model') -> float | None:
  """Returns the SkipInit gain's initial value: None (no gain), a float, or 1/sqrt(num_blocks).

  References: De & Smith, papers.md §3 (alpha = 0 or alpha <= 1/sqrt(d), d = number of blocks).
  """
  if skip_init is None:
    return None
  if isinstance(skip_init, str):
    if skip_init != 'inv_sqrt_depth':
      fail(layer, 'skip_init', "None, a float or 'inv_sqrt_depth'", repr(skip_init))
    return 1.0 / math.sqrt(num_blocks)
  if isinstance(skip_init, bool) or not isinstance(skip_init, (int, float)):
    fail(layer, 'skip_init', "None, a float or 'inv_sqrt_depth'", repr(skip_init), TypeError)
  return float(skip_init)


def _pad(kernel_size: int) -> tuple[tuple[int, int], tuple[int, int]]:
  p = kernel_size // 2
  return ((p, p), (p, p))


@dataclasses.dataclass(frozen=True)
class Layers:
  """Layer factories for one `norm` spec, used by every model of this package.

  Args:
    spec: the normalization spec.
    conv_bias: None = the spec's default (bias on PWS / Scaled-WS convs, off otherwise); True adds a
      bias after every conv (Regularized SkipInit, De & Smith); False removes it where optional.
    bgn: BackwardGradNorm placement ('none' | 'block' | 'layer').
    zero_init_residual: initialise the last normalization scale of every residual branch at 0.
  """
  spec: NormSpec
  conv_bias: bool | None = None
  bgn: str = 'none'
  zero_init_residual: bool = False

  # --- convolutions ---
  def conv(self, features: int, kernel_size: int, strides: int = 1, *, name: str,
           first: bool = False) -> nn.Module:
    """A conv layer; ``first`` marks the convs that get PWS's data-dependent alpha init.

    ``first`` is True for the stem conv, each block's first conv and shortcut convs (official PWS
    ResNets, papers.md §5(a)).
    """
    spec = self.spec
    kw: dict[str, Any] = dict(features=features, kernel_size=(kernel_size, kernel_size),
                              strides=(strides, strides), padding=_pad(kernel_size), name=name)
    use_bias = self.conv_bias
    if spec.name == 'pws':
      return PWSConv(gamma=spec.pws_gamma, mode=spec.pws_mode, equiv=spec.pws_equiv,
                 init_alpha=spec.pws_init_alpha and first, **kw)
    if spec.name == 'scaled_ws':
      return ScaledWSConv(**kw)
    if use_bias is None:
      use_bias = False
    if spec.name == 'ws':
      return WSConv(use_bias=use_bias, **kw)
    return Conv(use_bias=use_bias, kernel_init=initializers.he_normal(), **kw)

  def dense(self, features: int, *, name: str, kernel_init=None) -> nn.Module:
    """A Dense layer (flax): no Dense variant is normalization-specific in the papers."""
    if kernel_init is None:
      kernel_init = nn.initializers.lecun_normal()
    return nn.Dense(features, kernel_init=kernel_init, name=name)

  # --- normalization ---
  def norm(self, train: bool, *, name: str, last: bool = False) -> Callable | None:
    """The activation normalization after a conv, or None when the spec has none.

    ``last`` marks the last normalization of a residual branch (zero-initialised scale when
    ``zero_init_residual``).
    """
    spec = self.spec
    scale_init = (nn.initializers.zeros if last and self.zero_init_residual
                  else nn.initializers.ones)
    if spec.name in ('batch_norm', 'ghost_batch_norm'):
      ghost = spec.ghost_batch_size if spec.name == 'ghost_batch_norm' else None
      return BatchNorm(use_running_average=not train, momentum=spec.momentum,
                       epsilon=spec.epsilon, scale_init=scale_init, ghost_batch_size=ghost,
                       name=name)
    if spec.name in ('group_norm', 'ws'):
      return _GroupNorm(max_groups=spec.group_norm_groups, epsilon=spec.epsilon,
                        scale_init=scale_init, name=name)
    return None

  def outer_norm(self, *, name: str) -> Callable | None:
    """Normalization after the stem and before the head for specs without activation norms.

    PWS: GroupNorm(1), as in the official PWS ResNets (papers.md §5(b)). Other weight-only specs
    ('none', 'scaled_ws'): None.
    """
    if self.spec.name == 'pws':
      return nn.GroupNorm(num_groups=1, epsilon=self.spec.epsilon, name=name)
    return None

  # --- activations, gains, gradient nodes ---
  def act(self, x):
    """relu, times NF-ResNet's gamma = 1.7139 for 'scaled_ws' (Brock et al. 2021a)."""
    y = jax.nn.relu(x)
    if self.spec.is_nf:
      y = y * jnp.asarray(RELU_GAMMA, y.dtype)
    return y

  def skip_gain(self, init_value: float, *, name: str) -> nn.Module:
    """SkipInit's learnable scalar gain at the end of a residual branch (param 'gain')."""
    return SkipInit(init_value=init_value, name=name)

  def bgn_node(self, x, where: str, *, name: str):
    """Applies a BackwardGradNorm node when ``bgn`` selects placement ``where``, else returns x."""
    if self.bgn != where:
      return x
    return BackwardGradNorm(name=name)(x)


class _GroupNorm(nn.Module):
  """flax GroupNorm: ``max_groups`` groups, or ``gcd(max_groups, C)`` on C < max_groups channels.

  Narrow layers (smoke-test widths) thus still work, while a wide layer whose channel count the
  requested group count does not divide fails fast instead of silently using fewer groups.
  """
  max_groups: int = 32
  epsilon: float = 1e-5
  scale_init: Callable = nn.initializers.ones

  @nn.compact
  def __call__(self, x):
    channels = x.shape[-1]
    layer = 'GroupNorm ' + '/'.join(self.scope.path) if self.scope is not None else 'GroupNorm'
    check_count(layer, 'group_norm_groups', self.max_groups)
    if channels >= self.max_groups and channels % self.max_groups:
      fail(layer, 'group_norm_groups',
           f'a divisor of the {channels} channels of its input (or a count > {channels})',
           self.max_groups)
    groups = math.gcd(self.max_groups, channels)
    return nn.GroupNorm(num_groups=groups, epsilon=self.epsilon, scale_init=self.scale_init,
                        name='group_norm')(x)
