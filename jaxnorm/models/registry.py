"""The `norm` registry: one name chooses every conv and normalization layer of a model.

A model is written once and asks ``Layers`` for its layers (``conv``, ``norm``, ``act``, ...). The
spec's name picks a registry entry (a ``Normalization``) that says what they are. The built-in
entries:

| name | convolution | normalization after each conv | activation |
| --- | --- | --- | --- |
| ``'batch_norm'`` | ``Conv`` (no bias) | ``BatchNorm`` | relu |
| ``'ghost_batch_norm'`` | ``Conv`` (no bias) | ``BatchNorm(ghost_batch_size=...)`` | relu |
| ``'none'`` | ``Conv`` (bias only with ``conv_bias=True``) | none | relu |
| ``'group_norm'`` | ``Conv`` (no bias) | ``GroupNorm(32)`` (``gcd(32, C)`` if C < 32) | relu |
| ``'ws'`` | ``WSConv`` (no bias) | ``GroupNorm`` (Qiao et al.'s GN+WS) | relu |
| ``'scaled_ws'`` | ``ScaledWSConv`` (gain, bias) | none; NF alpha, beta | relu * 1.7139 |
| ``'pws'`` | ``PWSConv`` (alpha, bias) | none; GroupNorm(1) after stem / before head | relu |

A normalization defined outside the package is added with ``register_norm`` and is then accepted
everywhere a built-in name is (``NormSpec(name=...)``, ``cifar_resnet(20, norm=name)``, a training
config's ``model.norm``)::

  class RMSNorm(nn.Module):
    scale_init: Callable = nn.initializers.ones

    @nn.compact
    def __call__(self, x):
      scale = self.param('scale', self.scale_init, (x.shape[-1],))
      return x * jax.lax.rsqrt(jnp.mean(x**2, axis=-1, keepdims=True) + 1e-6) * scale

  register_norm('rms_norm', norm=lambda spec, train, *, name, scale_init: RMSNorm(
      scale_init=scale_init, name=name), families=('resnet', 'mlp'))
  model = cifar_resnet(20, norm='rms_norm')

A name without an activation normalization (``norm=None``) gets the identity after every conv,
as ``'none'`` does. ``'ws'`` pairs WSConv with GroupNorm, the combination Qiao et al. recommend
(Table 1, GN+WS): a WS conv alone has no scale that keeps the variance constant.

References:
  Ioffe & Szegedy (2015), 'Batch Normalization: Accelerating Deep Network Training by Reducing
  Internal Covariate Shift', arXiv:1502.03167.
  Hoffer, Hubara & Soudry (2017), 'Train longer, generalize better: closing the generalization gap
  in large batch training of neural networks', arXiv:1705.08741 (ghost BatchNorm).
  Wu & He (2018), 'Group Normalization', arXiv:1803.08494.
  Qiao, Wang, Liu, Shen & Yuille (2019), 'Micro-Batch Training with Batch-Channel Normalization
  and Weight Standardization', arXiv:1903.10520 (WS, GN+WS).
  De & Smith (2020), 'Batch Normalization Biases Residual Blocks Towards the Identity Function in
  Deep Networks', arXiv:2002.10444 (ghost BatchNorm in residual networks, SkipInit).
  Brock, De & Smith (2021), 'Characterizing signal propagation to close the performance gap in
  unnormalized ResNets', arXiv:2101.08692 (Scaled WS, gamma-scaled relu, NF alpha and beta).
  Liu, Ge, Li & Gui (2021), 'Delving into Variance Transmission and Normalization: Shift of
  Average Gradient Makes the Network Collapse', arXiv:2103.11590 (PWS; GroupNorm(1) after the stem
  and before the head in the official PWS ResNets).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxnorm.functional import _initializers as initializers
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

BGN_PLACEMENTS = ('none', 'block', 'layer')
# Model families a normalization can declare itself fit for: 'resnet' (convolutional ResNets) and
# 'mlp' (ResidualMLP and MLP, whose activation norms see rank-2 (batch, features) input).
FAMILIES = ('resnet', 'mlp')
# NF-ResNet's gamma for relu: sqrt(2 / (1 - 1/pi)), so Var(gamma * relu(z)) = 1 for z ~ N(0, 1).
RELU_GAMMA = 1.7139588594436646

# A conv factory: (spec, features, kernel_size, strides, *, padding, name, first, use_bias) -> a
# flax linen conv module; kernel_size and strides are 2-tuples, padding flax's explicit pairs.
ConvFactory = Callable[..., nn.Module]
# An activation norm factory: (spec, train, *, name, scale_init) -> a callable x -> y.
NormFactory = Callable[..., Callable]
# An outer norm factory: (spec, train, *, name) -> a callable x -> y.
OuterNormFactory = Callable[..., Callable]


def identity(x):
  """The normalization of a name without one: returns ``x`` (no module, no parameters)."""
  return x


def plain_conv(spec: NormSpec, features: int, kernel_size: tuple[int, int],
               strides: tuple[int, int], *, padding, name: str, first: bool,
               use_bias: bool) -> nn.Module:
  """The default conv of a normalization: jaxnorm's ``Conv`` with He-normal kernels.

  He, Zhang, Ren & Sun (2015), 'Delving Deep into Rectifiers: Surpassing Human-Level Performance
  on ImageNet Classification', arXiv:1502.01852 (the He-normal initialization, ``Var(w) =
  2 / fan_in``).
  """
  del spec, first
  return Conv(features=features, kernel_size=kernel_size, strides=strides, padding=padding,
              use_bias=use_bias, kernel_init=initializers.he_normal(), name=name)


@dataclasses.dataclass(frozen=True)
class Normalization:
  """A registry entry: how one `norm` name builds a model's convs, norms and activations.

  Attributes:
    name: the registered name.
    conv: builds every conv, ``conv(spec, features, kernel_size, strides, *, padding, name, first,
      use_bias) -> nn.Module`` (``kernel_size``, ``strides``: 2-tuples; ``padding``: flax's
      explicit ``((lo, hi), (lo, hi))``; ``first``: the stem conv, each block's first conv and
      shortcut convs, which get PWS's data-dependent alpha init; ``use_bias``: the model's
      ``conv_bias``, or ``conv_bias`` below when the model leaves it None).
    norm: the activation normalization after each conv, ``norm(spec, train, *, name, scale_init)
      -> callable``, or None (the identity; ``scale_init`` is zeros on the last normalization of
      a residual branch with ``zero_init_residual``, ones otherwise).
    outer_norm: for a name without ``norm``: the normalization after the stem and before the head,
      ``outer_norm(spec, train, *, name) -> callable``, or None (the identity).
    nf: NF-ResNet bookkeeping: pre-activation blocks ``x + alpha * f(act(x) * beta)`` with
      ``beta = 1 / expected_std`` and the gamma-scaled relu ``1.7139 * relu``.
    conv_bias: whether convs have a bias when the model's ``conv_bias`` is None.
    families: the model families accepting the name: 'resnet' and/or 'mlp' (an MLP uses only
      ``norm``, on rank-2 input).
    description: one line for tables and error messages.

  References:
    Brock, De & Smith (2021), 'Characterizing signal propagation to close the performance gap in
    unnormalized ResNets', arXiv:2101.08692 (the NF-ResNet bookkeeping of ``nf``).
  """
  name: str
  conv: ConvFactory = plain_conv
  norm: NormFactory | None = None
  outer_norm: OuterNormFactory | None = None
  nf: bool = False
  conv_bias: bool = False
  families: frozenset[str] = frozenset({'resnet'})
  description: str = ''

  @property
  def has_activation_norm(self) -> bool:
    """Whether every conv is followed by an activation normalization layer."""
    return self.norm is not None


_REGISTRY: dict[str, Normalization] = {}
_BUILTIN: set[str] = set()


class _RegisteredNames(Sequence):
  """A read-only, live view of the registered names, in registration order (built-ins first)."""

  def __getitem__(self, index):
    return tuple(_REGISTRY)[index]

  def __len__(self) -> int:
    return len(_REGISTRY)

  def __iter__(self) -> Iterator[str]:
    return iter(tuple(_REGISTRY))

  def __contains__(self, name) -> bool:
    return isinstance(name, str) and name in _REGISTRY

  def __eq__(self, other) -> bool:
    return isinstance(other, Sequence) and tuple(self) == tuple(other)

  __hash__ = None

  def __repr__(self) -> str:
    return repr(tuple(_REGISTRY))


# Every registered name (a live read-only view: names registered later appear in it).
NORMS: Sequence[str] = _RegisteredNames()


def registered_norms(family: str | None = None) -> tuple[str, ...]:
  """The registered names (built-ins first), optionally only those accepted by ``family``."""
  if family is not None:
    check_choice('registered_norms', 'family', family, FAMILIES)
  return tuple(n for n, e in _REGISTRY.items() if family is None or family in e.families)


def get_norm(name: str, layer: str = 'get_norm') -> Normalization:
  """The registry entry of ``name``.

  Raises:
    ValueError: naming the argument `norm` and every registered name, for an unknown name.
  """
  check_choice(layer, 'norm', name, NORMS)
  return _REGISTRY[name]


def _check_factory(arg: str, value, optional: bool) -> None:
  if value is None and optional:
    return
  if not callable(value):
    fail('register_norm', arg, 'a callable' + (' or None' if optional else ''), repr(value),
         TypeError)


def register_norm(name: str, *, norm: NormFactory | None = None, conv: ConvFactory | None = None,
                  outer_norm: OuterNormFactory | None = None, nf: bool = False,
                  conv_bias: bool = False, families: Iterable[str] = ('resnet',),
                  description: str = '', overwrite: bool = False) -> Normalization:
  """Registers a normalization under ``name``, for every model of ``jaxnorm.models``.

  Args:
    name: the name models take as ``norm=`` (and ``NormSpec(name=...)``).
    norm: the activation normalization after each conv, ``norm(spec, train, *, name, scale_init)
      -> callable`` (typically a flax module built with ``name=name``, so its variables sit where
      BatchNorm's would), or None for none (the identity).
    conv: the conv factory, ``conv(spec, features, kernel_size, strides, *, padding, name, first,
      use_bias) -> nn.Module``; None = ``plain_conv`` (He-normal ``Conv``).
    outer_norm: the normalization after the stem and before the head when ``norm`` is None,
      ``outer_norm(spec, train, *, name) -> callable``; None = the identity.
    nf: NF-ResNet bookkeeping (alpha, beta, gamma-scaled relu; ResNets default to and require
      pre-activation blocks).
    conv_bias: whether convs have a bias when a model's ``conv_bias`` is None.
    families: model families accepting the name, among ``FAMILIES`` ('resnet', 'mlp'). 'mlp'
      requires the default conv, no ``outer_norm`` and ``nf=False`` (an MLP has no convs, stem or
      NF blocks), and a ``norm`` that works on rank-2 ``(batch, features)`` input.
    description: one line for tables.
    overwrite: replace an existing user-registered entry of the same name (built-in names cannot
      be replaced).

  Returns:
    The new ``Normalization`` entry.

  Raises:
    ValueError: for a duplicate name without ``overwrite``, a built-in name, an unknown family, or
      an 'mlp' entry with a conv, an outer norm or NF bookkeeping.
    TypeError: for a non-string name or a non-callable factory.

  Example:
    >>> import flax.linen as nn, jax, jax.numpy as jnp
    >>> from jaxnorm.models import cifar_resnet, register_norm, unregister_norm
    >>> class RMSNorm(nn.Module):
    ...   scale_init: object = nn.initializers.ones
    ...   @nn.compact
    ...   def __call__(self, x):
    ...     scale = self.param('scale', self.scale_init, (x.shape[-1],))
    ...     return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * scale
    >>> entry = register_norm('doc_rms', norm=lambda spec, train, *, name, scale_init: RMSNorm(
    ...     scale_init=scale_init, name=name))
    >>> model = cifar_resnet(8, norm='doc_rms')
    >>> params = jax.eval_shape(model.init, jax.random.key(0), jnp.ones((2, 8, 8, 3)))['params']
    >>> params['stem_norm']['scale'].shape
    (16,)
    >>> _ = unregister_norm('doc_rms')
  """
  if not isinstance(name, str) or not name or name != name.strip():
    fail('register_norm', 'name', 'a non-empty string without surrounding spaces', repr(name),
         TypeError if not isinstance(name, str) else ValueError)
  if name in _BUILTIN:
    fail('register_norm', 'name', 'a name that is not built in (built-ins: '
         + ', '.join(repr(n) for n in sorted(_BUILTIN)) + ')', repr(name))
  if name in _REGISTRY and not overwrite:
    fail('register_norm', 'name', 'a name not registered yet (pass overwrite=True to replace it; '
         'registered: ' + ', '.join(repr(n) for n in _REGISTRY) + ')', repr(name))
  _check_factory('norm', norm, optional=True)
  _check_factory('conv', conv, optional=True)
  _check_factory('outer_norm', outer_norm, optional=True)
  families = frozenset([families] if isinstance(families, str) else families)
  if not families:
    fail('register_norm', 'families', 'at least one of ' + ', '.join(map(repr, FAMILIES)), '()')
  for family in sorted(families):
    check_choice('register_norm', 'families', family, FAMILIES)
  if 'mlp' in families and (conv is not None or outer_norm is not None or nf):
    fail('register_norm', 'families', "no 'mlp' for an entry with a conv, an outer_norm or nf=True "
         '(MLPs use only the activation norm)', sorted(families))
  entry = Normalization(name=name, conv=plain_conv if conv is None else conv, norm=norm,
                        outer_norm=outer_norm, nf=bool(nf), conv_bias=bool(conv_bias),
                        families=families, description=description)
  _REGISTRY[name] = entry
  return entry


def unregister_norm(name: str) -> Normalization:
  """Removes a user-registered normalization (built-ins stay) and returns its entry.

  Raises:
    ValueError: for a built-in or unknown name.
  """
  if name in _BUILTIN:
    fail('unregister_norm', 'name', 'a user-registered name (built-ins cannot be removed)',
         repr(name))
  entry = get_norm(name, 'unregister_norm')
  del _REGISTRY[name]
  return entry


@dataclasses.dataclass(frozen=True)
class NormSpec:
  """A normalization choice and its hyperparameters.

  Args:
    name: a registered name (``NORMS``: the built-ins and those added with ``register_norm``).
    momentum: BatchNorm running-average momentum (flax convention).
    epsilon: BatchNorm / GroupNorm epsilon.
    ghost_batch_size: sub-batch size of ghost BatchNorm (Hoffer et al. 2017; De & Smith 2020 use
      it in residual networks; the default of 16 is this package's choice).
    group_norm_groups: number of groups G of GroupNorm (an int >= 1). A layer with C >= G channels
      uses G groups, and G must divide C; a narrower layer (C < G, e.g. a smoke-test width) uses
      ``gcd(G, C)`` groups.
    pws_gamma: PWS gamma (epsilon inside the sqrt; the official CIFAR config uses 1e-3).
    pws_mode: PWS fan mode, ``'fan_in'`` or ``'fan_out'``.
    pws_equiv: PWS ``equiv`` mode (gamma scaled by 2/fan).
    pws_init_alpha: PWS data-dependent alpha init (stem, first conv of each block, shortcut).
    nf_alpha: NF-ResNet residual scale alpha (0.2 in Brock et al.).

  References:
    Hoffer, Hubara & Soudry (2017), 'Train longer, generalize better: closing the generalization
    gap in large batch training of neural networks', arXiv:1705.08741 (ghost BatchNorm).
    Liu, Ge, Li & Gui (2021), 'Delving into Variance Transmission and Normalization: Shift of
    Average Gradient Makes the Network Collapse', arXiv:2103.11590 (the PWS options).
    Brock, De & Smith (2021), 'Characterizing signal propagation to close the performance gap in
    unnormalized ResNets', arXiv:2101.08692 (NF alpha).
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
  def entry(self) -> Normalization:
    """The registry entry of ``name``."""
    return get_norm(self.name, 'NormSpec')

  @property
  def has_activation_norm(self) -> bool:
    """Whether every conv is followed by an activation normalization layer."""
    return self.entry.has_activation_norm

  @property
  def is_nf(self) -> bool:
    """Whether blocks use NF-ResNet alpha/beta bookkeeping and the gamma-scaled relu."""
    return self.entry.nf


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


def make_norm_spec(norm: str | NormSpec, layer: str = 'model',
                   family: str | None = None) -> NormSpec:
  """Returns ``norm`` as a ``NormSpec`` (a string is looked up with default hyperparameters).

  Args:
    norm: a registered name or a ``NormSpec``.
    layer: the model named in error messages.
    family: if given, the name must be registered for this model family ('resnet' or 'mlp').

  Raises:
    ValueError: naming the argument `norm` and the valid choices, for an unknown name or one the
      family does not accept.
  """
  if isinstance(norm, NormSpec):
    spec = norm
  elif not isinstance(norm, str):
    fail(layer, 'norm', 'a string or a NormSpec', repr(norm), TypeError)
  else:
    check_choice(layer, 'norm', norm, NORMS)
    spec = NormSpec(name=norm)
  if family is not None:
    check_choice(layer, 'norm', spec.name, registered_norms(family))
  return spec


def check_bgn(bgn: str, layer: str = 'model') -> None:
  """Raises ValueError unless ``bgn`` is a known BackwardGradNorm placement."""
  check_choice(layer, 'bgn', bgn, BGN_PLACEMENTS)


def resolve_skip_init(skip_init, num_blocks: int, layer: str = 'model') -> float | None:
  """Returns the SkipInit gain's initial value: None (no gain), a float, or 1/sqrt(num_blocks).

  De & Smith initialise the gain alpha of ``x + alpha * f(x)`` at 0, or at ``alpha <= 1/sqrt(d)``
  for ``d`` residual blocks (``'inv_sqrt_depth'``).

  References:
    De & Smith (2020), 'Batch Normalization Biases Residual Blocks Towards the Identity Function
    in Deep Networks', arXiv:2002.10444.
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
    spec: the normalization spec; its registry entry (``spec.entry``) builds the layers.
    conv_bias: None = the entry's default (bias on PWS / Scaled-WS convs, off otherwise); True adds
      a bias after every conv (Regularized SkipInit, De & Smith); False removes it where optional.
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

    ``first`` is True for the stem conv, each block's first conv and shortcut convs, as in the
    official PWS ResNets (Liu et al. 2021, arXiv:2103.11590).
    """
    entry = self.spec.entry
    use_bias = entry.conv_bias if self.conv_bias is None else self.conv_bias
    return entry.conv(self.spec, features, (kernel_size, kernel_size), (strides, strides),
                      padding=_pad(kernel_size), name=name, first=first, use_bias=use_bias)

  def dense(self, features: int, *, name: str, kernel_init=None) -> nn.Module:
    """A Dense layer (flax): no Dense variant is normalization-specific in the papers."""
    if kernel_init is None:
      kernel_init = nn.initializers.lecun_normal()
    return nn.Dense(features, kernel_init=kernel_init, name=name)

  # --- normalization ---
  def norm(self, train: bool, *, name: str, last: bool = False) -> Callable:
    """The activation normalization after a conv; the identity when the spec has none.

    ``last`` marks the last normalization of a residual branch (zero-initialised scale when
    ``zero_init_residual``).
    """
    entry = self.spec.entry
    if entry.norm is None:
      return identity
    scale_init = (nn.initializers.zeros if last and self.zero_init_residual
                  else nn.initializers.ones)
    return entry.norm(self.spec, train, name=name, scale_init=scale_init)

  def outer_norm(self, train: bool, *, name: str) -> Callable:
    """The normalization after the stem / before the head of a spec without activation norms.

    PWS: GroupNorm(1), as in the official PWS ResNets (Liu et al. 2021, arXiv:2103.11590). The
    identity for the other built-ins.
    """
    entry = self.spec.entry
    if entry.outer_norm is None:
      return identity
    return entry.outer_norm(self.spec, train, name=name)

  def norm_or_outer(self, train: bool, *, name: str) -> Callable:
    """The activation normalization if the spec has one, else its outer normalization.

    Used after the stem (post-activation and ReLU-first ResNets) and before the head
    (pre-activation ResNets).
    """
    if self.spec.has_activation_norm:
      return self.norm(train, name=name)
    return self.outer_norm(train, name=name)

  # --- activations, gains, gradient nodes ---
  def act(self, x):
    """relu; times NF-ResNet's gamma = 1.7139 for NF specs ('scaled_ws').

    ``gamma = sqrt(2 / (1 - 1/pi))`` makes ``Var(gamma * relu(z)) = 1`` for ``z ~ N(0, 1)``
    (Brock, De & Smith (2021), 'Characterizing signal propagation to close the performance gap in
    unnormalized ResNets', arXiv:2101.08692).
    """
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


# --- the built-in normalizations ---

def _batch_norm(spec: NormSpec, train: bool, *, name: str, scale_init) -> nn.Module:
  return BatchNorm(use_running_average=not train, momentum=spec.momentum, epsilon=spec.epsilon,
                   scale_init=scale_init, ghost_batch_size=None, name=name)


def _ghost_batch_norm(spec: NormSpec, train: bool, *, name: str, scale_init) -> nn.Module:
  return BatchNorm(use_running_average=not train, momentum=spec.momentum, epsilon=spec.epsilon,
                   scale_init=scale_init, ghost_batch_size=spec.ghost_batch_size, name=name)


def _group_norm(spec: NormSpec, train: bool, *, name: str, scale_init) -> nn.Module:
  del train
  return _GroupNorm(max_groups=spec.group_norm_groups, epsilon=spec.epsilon,
                    scale_init=scale_init, name=name)


def _ws_conv(spec: NormSpec, features: int, kernel_size, strides, *, padding, name: str,
             first: bool, use_bias: bool) -> nn.Module:
  del spec, first
  return WSConv(use_bias=use_bias, features=features, kernel_size=kernel_size, strides=strides,
                padding=padding, name=name)


def _scaled_ws_conv(spec: NormSpec, features: int, kernel_size, strides, *, padding, name: str,
                    first: bool, use_bias: bool) -> nn.Module:
  del spec, first, use_bias  # ScaledWSConv always has its bias (conv_bias=True below).
  return ScaledWSConv(features=features, kernel_size=kernel_size, strides=strides,
                      padding=padding, name=name)


def _pws_conv(spec: NormSpec, features: int, kernel_size, strides, *, padding, name: str,
              first: bool, use_bias: bool) -> nn.Module:
  del use_bias  # PWSConv always has its bias (conv_bias=True below).
  return PWSConv(gamma=spec.pws_gamma, mode=spec.pws_mode, equiv=spec.pws_equiv,
                 init_alpha=spec.pws_init_alpha and first, features=features,
                 kernel_size=kernel_size, strides=strides, padding=padding, name=name)


def _pws_outer_norm(spec: NormSpec, train: bool, *, name: str) -> nn.Module:
  del train
  return nn.GroupNorm(num_groups=1, epsilon=spec.epsilon, name=name)


def _register_builtin(name: str, **kwargs: Any) -> None:
  register_norm(name, **kwargs)
  _BUILTIN.add(name)


_register_builtin('batch_norm', norm=_batch_norm, families=FAMILIES,
                  description='Conv (no bias) + BatchNorm')
_register_builtin('ghost_batch_norm', norm=_ghost_batch_norm, families=FAMILIES,
                  description='Conv (no bias) + ghost BatchNorm')
_register_builtin('none', families=FAMILIES, description='Conv, no normalization')
_register_builtin('group_norm', norm=_group_norm, description='Conv (no bias) + GroupNorm')
_register_builtin('ws', conv=_ws_conv, norm=_group_norm, description='WSConv + GroupNorm')
_register_builtin('scaled_ws', conv=_scaled_ws_conv, nf=True, conv_bias=True,
                  description='ScaledWSConv, NF-ResNet alpha/beta, gamma-scaled relu')
_register_builtin('pws', conv=_pws_conv, outer_norm=_pws_outer_norm, conv_bias=True,
                  description='PWSConv, GroupNorm(1) after the stem and before the head')
