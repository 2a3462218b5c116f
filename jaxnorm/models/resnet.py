"""A generic ResNet (basic/bottleneck, v1/v2/relu_first, CIFAR/ImageNet stem) and its presets.

Presets: ``cifar_resnet(depth)`` (He et al. 6n+2: 20, 56, 110, 1202), ``wide_resnet(depth, width)``
(Zagoruyko & Komodakis, WRN-d-k, d = 6n+4), ``resnet50(style)`` (v1 or v2), ``pws_resnet(depth)``
(the official PWS ResNets: CIFAR ResNet-34, ImageNet ResNet-50). All are called as
``model.apply(variables, x, train=bool, mutable=[...])``.

References:
  He, Zhang, Ren & Sun (2016a), 'Deep Residual Learning for Image Recognition', arXiv:1512.03385.
  He, Zhang, Ren & Sun (2016b), 'Identity Mappings in Deep Residual Networks', arXiv:1603.05027.
  Zagoruyko & Komodakis (2016), 'Wide Residual Networks', arXiv:1605.07146.
  Zhang, Dauphin & Ma (2019), 'Fixup Initialization: Residual Learning Without Normalization',
  arXiv:1901.09321 (``fixup=True``; see ``jaxnorm.models.fixup``).
  Bjorck, Gomes, Selman & Weinberger (2018), 'Understanding Batch Normalization',
  arXiv:1806.02375 (ResNet-110).
  De & Smith (2020), 'Batch Normalization Biases Residual Blocks Towards the Identity Function in
  Deep Networks', arXiv:2002.10444 (SkipInit, Regularized SkipInit).
  Liu, Ge, Li & Gui (2021), 'Delving into Variance Transmission and Normalization: Shift of
  Average Gradient Makes the Network Collapse', arXiv:2103.11590 (the PWS ResNets).
  Brock, De & Smith (2021), 'Characterizing signal propagation to close the performance gap in
  unnormalized ResNets', arXiv:2101.08692 (NF-ResNet bookkeeping).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

from jaxnorm.functional._checks import check_choice, check_positive, fail
from jaxnorm.models.blocks import EXPANSION, STYLES, NFResidualBlock, ResidualBlock
from jaxnorm.models.fixup import FIXUP_STYLES, FixupResidualBlock, ScalarBias
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


def nf_betas(stage_sizes: Sequence[int], alpha: float) -> list[list[float]]:
  r"""NF-ResNet's per-block ``beta = 1 / expected_std``, per stage.

  The expected variance of the skip path at initialization follows

  .. math::

    \mathrm{Var}(x_{i+1}) = \mathrm{Var}(x_i) + \alpha^2,

  since each branch has unit variance (Scaled WS and the gamma-scaled relu) and is scaled by
  ``alpha``. ``expected_std`` starts at 1; at a stage's first block it is reset to 1 after computing
  beta (the shortcut conv there sees ``act(x) * beta``, a unit-variance signal, and replaces the
  skip path). So block j >= 1 of a stage has ``beta = 1 / sqrt(1 + j alpha^2)``, and block 0 the
  reciprocal of the previous stage's final expected std.

  Args:
    stage_sizes: number of blocks per stage.
    alpha: the residual scale alpha.

  Returns:
    One list of betas per stage, one per block.

  References:
    Brock, De & Smith (2021), 'Characterizing signal propagation to close the performance gap in
    unnormalized ResNets', arXiv:2101.08692 (Section 4; ``nf_resnet.py`` of deepmind-research).
  """
  expected_std = 1.0
  out = []
  for n in stage_sizes:
    stage = []
    for i in range(n):
      stage.append(1.0 / expected_std)
      if i == 0:
        expected_std = 1.0
      expected_std = math.sqrt(expected_std**2 + alpha**2)
    out.append(stage)
  return out


class ResNet(nn.Module):
  """A ResNet generic in its normalization.

  Args:
    stage_sizes: number of blocks per stage.
    widths: branch width per stage (bottleneck outputs are 4x).
    stem_width: output channels of the stem conv.
    strides: stride of each stage's first block.
    bottleneck: bottleneck blocks instead of basic.
    style: 'v1' (post-activation), 'v2' (pre-activation), 'relu_first' (PWS); None = 'v2' for
      a norm with NF-ResNet bookkeeping ('scaled_ws'; NF-ResNets are pre-activation), 'v1'
      otherwise.
    stem: 'cifar' (3x3/1 conv) or 'imagenet' (7x7/2 conv + 3x3/2 maxpool).
    norm: a registered name (``registry.NORMS``; see ``register_norm``) or a ``NormSpec``.
    skip_init: None (no SkipInit gain), a float (initial gain), or 'inv_sqrt_depth'.
    bgn: BackwardGradNorm placement: 'none', 'block' (every block output), 'layer' (also every
      activation inside the branches and the stem).
    conv_bias: None = spec default; True = biases after every conv (Regularized SkipInit).
    dropout_rate: dropout before the head (Regularized SkipInit).
    zero_init_residual: last norm scale of every branch initialised at 0.
    num_classes: classifier outputs.
    scan: scan identical blocks of a stage (None: automatic, see ``stacking.default_scan``).
    remat: rematerialise each block in the backward pass.
    fixup: Fixup (Zhang, Dauphin & Ma 2019; ``jaxnorm.models.fixup``): ``FixupResidualBlock``
      blocks (last branch conv at 0, the other branch convs He init times
      ``L ** (-1 / (2m - 2))`` with ``L = num_blocks``, scalar biases and a multiplier per branch),
      a scalar bias after the stem conv and before the head, and a head initialised at 0.
      Requires ``norm='none'``, ``skip_init=None`` and style 'v1' or 'v2'.
    block_scale: None, or a fixed factor on every block's output, ``x_{l+1} = (x_l + f(x_l)) *
      block_scale`` (before the post-add activation in 'v1'): ``0.5 ** 0.5`` is De & Smith's
      "divide the residual block by sqrt(2)" baseline, which keeps the unnormalized skip path's
      variance constant at init but, unlike SkipInit, shrinks the earlier blocks' share.
    norm_last_blocks: None (every block normalized by ``norm``), or ``k`` in ``0 ..
      num_blocks``: only the last ``k`` residual blocks (counted over the whole network) use
      ``norm``, and the final norm before the head ('v2' / 'relu_first') when ``k >= 1``; the
      stem norm ('v1' / 'relu_first') only when ``k = num_blocks``. The other blocks are built as
      with ``norm='none'`` (same names, no normalization), so ``k = 0`` is the ``norm='none'``
      network and ``k = num_blocks`` the fully normalized one, parameter for parameter. Bjorck
      et al.'s "BatchNorm in the last layers only". A stage that the boundary cuts is unrolled
      (its blocks are not identical); the others are scanned as usual. In 'v1' a stage's first
      block normalizes the skip path through its projection shortcut, so ``k`` = a whole number of
      stages normalizes the activations that reach the head. Requires a spec with activation
      norms (e.g. 'batch_norm', 'group_norm'; not NF specs) and ``fixup=False``.

  References:
    He, Zhang, Ren & Sun (2016a), 'Deep Residual Learning for Image Recognition',
    arXiv:1512.03385; He, Zhang, Ren & Sun (2016b), 'Identity Mappings in Deep Residual
    Networks', arXiv:1603.05027; Zhang, Dauphin & Ma (2019), 'Fixup Initialization: Residual
    Learning Without Normalization', arXiv:1901.09321; De & Smith (2020), 'Batch Normalization
    Biases Residual Blocks Towards the Identity Function in Deep Networks', arXiv:2002.10444; Liu,
    Ge, Li & Gui (2021), 'Delving into Variance Transmission and Normalization: Shift of Average
    Gradient Makes the Network Collapse', arXiv:2103.11590; Brock, De & Smith (2021),
    'Characterizing signal propagation to close the performance gap in unnormalized ResNets',
    arXiv:2101.08692; Bjorck, Gomes, Selman & Weinberger (2018), 'Understanding Batch
    Normalization', arXiv:1806.02375 (``norm_last_blocks``).
  """
  stage_sizes: Sequence[int]
  widths: Sequence[int]
  stem_width: int = 16
  strides: Sequence[int] = (1, 2, 2)
  bottleneck: bool = False
  style: str | None = None
  stem: str = 'cifar'
  norm: str | NormSpec = 'batch_norm'
  skip_init: float | str | None = None
  bgn: str = 'none'
  conv_bias: bool | None = None
  dropout_rate: float = 0.0
  zero_init_residual: bool = False
  num_classes: int = 10
  scan: bool | None = None
  remat: bool = False
  fixup: bool = False
  block_scale: float | None = None
  norm_last_blocks: int | None = None

  def _check(self) -> tuple[NormSpec, str]:
    spec = make_norm_spec(self.norm, 'ResNet', family='resnet')
    style = self.style or ('v2' if spec.is_nf else 'v1')
    check_choice('ResNet', 'style', style, STYLES)
    check_choice('ResNet', 'stem', self.stem, ('cifar', 'imagenet'))
    check_bgn(self.bgn, 'ResNet')
    if spec.is_nf and style == 'v1':
      fail('ResNet', 'style', f"'v2' or 'relu_first' with norm={spec.name!r} (NF-ResNets are "
           'pre-activation)', repr(style))
    if not (len(self.stage_sizes) == len(self.widths) == len(self.strides)):
      fail('ResNet', 'stage_sizes', 'as many entries as `widths` and `strides`',
           f'{len(self.stage_sizes)}, {len(self.widths)}, {len(self.strides)}')
    for n in self.stage_sizes:
      check_count('ResNet', 'stage_sizes', n)
    for w in self.widths:
      check_count('ResNet', 'widths', w)
    for st in self.strides:
      check_count('ResNet', 'strides', st)
    check_count('ResNet', 'stem_width', self.stem_width)
    check_count('ResNet', 'num_classes', self.num_classes)
    check_positive('ResNet', 'dropout_rate', self.dropout_rate, allow_zero=True)
    if self.block_scale is not None:
      check_positive('ResNet', 'block_scale', self.block_scale)
      if self.fixup or spec.is_nf:
        fail('ResNet', 'block_scale', 'None with fixup=True or an NF-ResNet spec (they scale '
             'their own branches)', repr(self.block_scale))
    if self.fixup:
      if spec.name != 'none':
        fail('ResNet', 'norm', "'none' with fixup=True (Fixup replaces normalization; no "
             'normalized or NF spec)', repr(spec.name))
      if self.skip_init is not None:
        fail('ResNet', 'skip_init', 'None with fixup=True (each Fixup branch has its own scalar '
             'multiplier)', repr(self.skip_init))
      if style not in FIXUP_STYLES:
        fail('ResNet', 'style', "'v1' or 'v2' with fixup=True", repr(style))
    k = self.norm_last_blocks
    if k is not None:
      if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= self.num_blocks:
        fail('ResNet', 'norm_last_blocks', f'None or an int in [0, {self.num_blocks}] (the '
             'number of blocks)', repr(k))
      if not spec.has_activation_norm or spec.is_nf or self.fixup:
        fail('ResNet', 'norm_last_blocks', 'None with fixup=True or a spec without activation '
             f'norms (norm={spec.name!r})', repr(k))
    return spec, style

  @property
  def num_blocks(self) -> int:
    return sum(self.stage_sizes)

  @nn.compact
  def __call__(self, x, train: bool = False):
    spec, style = self._check()
    L = Layers(spec=spec, conv_bias=self.conv_bias, bgn=self.bgn,
               zero_init_residual=self.zero_init_residual)
    skip_init = resolve_skip_init(self.skip_init, self.num_blocks, 'ResNet')
    scan = default_scan() if self.scan is None else self.scan
    # norm_last_blocks: blocks before `first_normed` (and the outer norms, see the docstring) are
    # built by `plain`, the layers of norm='none' with the same options.
    normed = self.num_blocks if self.norm_last_blocks is None else self.norm_last_blocks
    first_normed = self.num_blocks - normed
    plain = L if normed == self.num_blocks else Layers(
        spec=make_norm_spec('none', 'ResNet'), conv_bias=self.conv_bias, bgn=self.bgn,
        zero_init_residual=self.zero_init_residual)
    L_stem = L if normed == self.num_blocks else plain
    L_head = L if normed >= 1 else plain

    # Stem.
    k, s = (3, 1) if self.stem == 'cifar' else (7, 2)
    x = L.conv(self.stem_width, k, s, name='stem_conv', first=True)(x)
    if self.fixup:  # Fixup: a scalar bias before the stem relu (v1) or the first block's (v2).
      x = ScalarBias(name='stem_bias')(x)
    if style != 'v2':
      x = L.act(L_stem.norm_or_outer(train, name='stem_norm')(x))
    if self.stem == 'imagenet':
      x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
    x = perturb(self, 'stem', x)
    self.sow('intermediates', 'stem', x)
    x = L.bgn_node(x, 'layer', name='bgn_stem')

    # Stages (NF specs: NF-ResNet blocks, each stage given its blocks' betas).
    betas = nf_betas(self.stage_sizes, spec.nf_alpha) if spec.is_nf else None
    in_features = self.stem_width
    offset = 0  # index of the stage's first block in the network
    for si, (n, width, stride) in enumerate(zip(self.stage_sizes, self.widths, self.strides,
                                                strict=True)):
      out_features = width * (EXPANSION if self.bottleneck else 1)
      unnormalized = min(max(first_normed - offset, 0), n)  # leading plain blocks of the stage
      offset += n
      common = dict(layers=L if unnormalized == 0 else plain, features=width,
                    bottleneck=self.bottleneck, style=style, skip_init=skip_init)
      if self.block_scale is not None:
        common['block_scale'] = float(self.block_scale)
      first = dict(common, strides=stride,
                   projection=stride != 1 or in_features != out_features)
      stage = dict(first=first, rest=dict(common), n=n, scan=scan, remat=self.remat,
                   name=f'stage_{si}')
      if self.fixup:
        x = _FixupStage(**stage, num_blocks=self.num_blocks)(x, train)
      elif 0 < unnormalized < n:
        x = _MixedStage(**dict(stage, scan=False), unnormalized=unnormalized, normed=L)(x, train)
      elif betas is None:
        x = _Stage(**stage)(x, train)
      else:
        x = _NFStage(**stage, betas=tuple(betas[si]))(x, train)
      in_features = out_features

    # Neck and head.
    if style == 'v2':
      x = L.act(L_head.norm_or_outer(train, name='final_norm')(x))
    elif style == 'relu_first':
      x = L.act(L_head.outer_norm(train, name='final_norm')(x))
    x = jnp.mean(x, axis=(1, 2))
    if self.dropout_rate > 0:
      x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    if self.fixup:  # Fixup: a scalar bias before the classifier, which starts at 0.
      x = ScalarBias(name='head_bias')(x)
      return nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros, name='head')(x)
    return nn.Dense(self.num_classes, name='head')(x)


class _Stage(nn.Module):
  """One stage: block_0 (may project) then n-1 identical blocks (scanned or unrolled)."""
  first: dict
  rest: dict
  n: int
  scan: bool
  remat: bool

  @nn.compact
  def __call__(self, x, train: bool):
    return run_blocks(ResidualBlock, self.first, self.rest, self.n, x, train, scan=self.scan,
                      remat=self.remat)


class _MixedStage(_Stage):
  """A stage cut by ``ResNet.norm_last_blocks``: its first ``unnormalized`` blocks are built
  with the layers of ``first`` / ``rest`` (norm 'none'), the others with ``normed``; unrolled
  (``block_0 .. block_{n-1}``, the unrolled layout of ``stacking.run_blocks``).

  Bjorck, Gomes, Selman & Weinberger (2018), 'Understanding Batch Normalization',
  arXiv:1806.02375 (BatchNorm in the last layers only).
  """
  unnormalized: int = 0
  normed: Layers | None = None

  @nn.compact
  def __call__(self, x, train: bool):
    cls = nn.remat(ResidualBlock, static_argnums=(2,)) if self.remat else ResidualBlock
    for i in range(self.n):
      kw = dict(self.first if i == 0 else self.rest)
      if i >= self.unnormalized:
        kw['layers'] = self.normed
      x = cls(**kw, name=f'block_{i}')(x, train)
    return x


class _NFStage(_Stage):
  """A stage of NF-ResNet blocks (``NFResidualBlock``), block j with ``beta = betas[j]``.

  The blocks carry their index in the stage next to the activation, so the scanned blocks pick
  their own beta (Brock, De & Smith (2021), 'Characterizing signal propagation to close the
  performance gap in unnormalized ResNets', arXiv:2101.08692).
  """
  betas: tuple[float, ...] = ()

  @nn.compact
  def __call__(self, x, train: bool):
    extra = dict(betas=self.betas)
    x, _ = run_blocks(NFResidualBlock, {**self.first, **extra}, {**self.rest, **extra}, self.n,
                      (x, jnp.zeros((), jnp.int32)), train, scan=self.scan, remat=self.remat)
    return x


class _FixupStage(_Stage):
  """A stage of Fixup blocks (``FixupResidualBlock``), each told the network's block count ``L``.

  Zhang, Dauphin & Ma (2019), 'Fixup Initialization: Residual Learning Without Normalization',
  arXiv:1901.09321.
  """
  num_blocks: int = 1

  @nn.compact
  def __call__(self, x, train: bool):
    extra = dict(num_blocks=self.num_blocks)
    return run_blocks(FixupResidualBlock, {**self.first, **extra}, {**self.rest, **extra},
                      self.n, x, train, scan=self.scan, remat=self.remat)


def _check_preset(layer: str, **counts) -> None:
  """Fails fast on a non-int or non-positive depth / width / class count of a preset."""
  for arg, value in counts.items():
    check_count(layer, arg, value)


def _regularized(kw: dict, regularized: bool, norm, layer: str) -> tuple[dict, object]:
  """Regularized SkipInit (De & Smith): no normalization, SkipInit(0), conv biases, dropout.

  The paper's variant is unnormalized, so ``regularized=True`` builds ``norm='none'``: the
  presets' default ``'batch_norm'`` is replaced, and any other norm raises. The dropout rate is
  not recoverable from the public material (a reconstruction: 0.2 by default here).

  Returns:
    ``(kw, norm)``: the model keywords and the norm to build with.
  """
  if regularized:
    if norm not in ('batch_norm', 'none'):
      fail(layer, 'norm', "'none' (or the default) with regularized=True: Regularized SkipInit "
           'is unnormalized', repr(norm))
    norm = 'none'

    if kw.get('skip_init') is None:
      kw['skip_init'] = 0.0
    kw.setdefault('conv_bias', True)
    if not kw.get('dropout_rate'):
      kw['dropout_rate'] = 0.2
  return kw, norm


def _fixup(fixup: bool, regularized: bool, norm, layer: str):
  """The norm a preset builds with ``fixup``: Fixup is unnormalized, so the default becomes 'none'.

  As with ``regularized=True``, the presets' default ``'batch_norm'`` is replaced by ``'none'``;
  any other normalization, and ``regularized=True`` (a different unnormalized ResNet), raise.

  Returns:
    The norm to build with.
  """
  if not fixup:
    return norm
  if regularized:
    fail(layer, 'fixup', 'False with regularized=True (Fixup and Regularized SkipInit are two '
         'different unnormalized ResNets)', True)
  if isinstance(norm, str) and norm == 'batch_norm':
    return 'none'
  name = norm.name if isinstance(norm, NormSpec) else norm
  if name != 'none':
    fail(layer, 'norm', "'none' (or the default) with fixup=True: Fixup is unnormalized",
         repr(name))
  return norm


def cifar_resnet(depth: int = 20, *, width: int = 16, norm: str | NormSpec = 'batch_norm',
                 skip_init=None, num_classes: int = 10, regularized: bool = False,
                 fixup: bool = False, **kwargs) -> ResNet:
  """He et al.'s CIFAR ResNet-(6n+2): 3 stages of n basic blocks, widths w, 2w, 4w (w = 16).

  Projection (1x1 conv) shortcuts at the stage transitions (He et al.'s option B).

  Args:
    depth: 6n + 2 (20, 32, 44, 56, 110, 1202, ...).
    width: first-stage width (16 in the paper; smaller for smoke tests).
    norm: normalization spec.
    skip_init: SkipInit gain init (None, float, 'inv_sqrt_depth').
    num_classes: classifier outputs.
    regularized: Regularized SkipInit (SkipInit + conv biases + dropout before the head).
    fixup: Fixup (``ResNet.fixup``); builds ``norm='none'`` (the default 'batch_norm' is
      replaced, another norm raises), the paper's CIFAR setting with the default style 'v1'.
    ``**kwargs``: further ``ResNet`` fields (style, bgn, scan, remat, ...).

  Returns:
    A ``ResNet`` (ResNet-20: 0.27M parameters, ResNet-110: 1.7M).

  References:
    He, Zhang, Ren & Sun (2016a), 'Deep Residual Learning for Image Recognition',
    arXiv:1512.03385, Section 4.2; Bjorck, Gomes, Selman & Weinberger (2018), 'Understanding
    Batch Normalization', arXiv:1806.02375 (ResNet-110); Zhang, Dauphin & Ma (2019), 'Fixup
    Initialization: Residual Learning Without Normalization', arXiv:1901.09321 (Fixup).
  """
  _check_preset('cifar_resnet', depth=depth, width=width, num_classes=num_classes)
  if depth < 8 or (depth - 2) % 6:
    fail('cifar_resnet', 'depth', '6n + 2 with n >= 1 (20, 56, 110, 1202, ...)', depth)
  n = (depth - 2) // 6
  norm = _fixup(fixup, regularized, norm, 'cifar_resnet')
  kw, norm = _regularized(dict(skip_init=skip_init, **kwargs), regularized, norm, 'cifar_resnet')
  return ResNet(stage_sizes=(n, n, n), widths=(width, 2 * width, 4 * width), stem_width=width,
                strides=(1, 2, 2), stem='cifar', norm=norm, num_classes=num_classes, fixup=fixup,
                **kw)


def wide_resnet(depth: int = 16, width: int = 4, *, base_width: int = 16,
                norm: str | NormSpec = 'batch_norm', skip_init=None, num_classes: int = 10,
                regularized: bool = False, fixup: bool = False, **kwargs) -> ResNet:
  """WRN-depth-width: pre-activation, 3 stages of (depth-4)/6 basic blocks, widths 16k, 32k, 64k.

  Args:
    depth: 6n + 4 (16, 28, 40, 100, 1000, ...).
    width: widening factor k.
    base_width: 16 in the paper (smaller for smoke tests); stem width = base_width.
    norm, skip_init, num_classes, regularized, fixup, ``**kwargs``: as ``cifar_resnet``
      (Fixup in the WRN's pre-activation style 'v2', De & Smith's Fixup baseline).

  Returns:
    A ``ResNet`` (WRN-16-4: 2.7M parameters).

  References:
    Zagoruyko & Komodakis (2016), 'Wide Residual Networks', arXiv:1605.07146; De & Smith (2020),
    'Batch Normalization Biases Residual Blocks Towards the Identity Function in Deep Networks',
    arXiv:2002.10444 (depths 16, 100, 1000); Zhang, Dauphin & Ma (2019), 'Fixup Initialization:
    Residual Learning Without Normalization', arXiv:1901.09321 (Fixup).
  """
  _check_preset('wide_resnet', depth=depth, width=width, base_width=base_width,
                num_classes=num_classes)
  if depth < 10 or (depth - 4) % 6:
    fail('wide_resnet', 'depth', '6n + 4 with n >= 1 (16, 28, 100, 1000, ...)', depth)
  n = (depth - 4) // 6
  norm = _fixup(fixup, regularized, norm, 'wide_resnet')
  kw, norm = _regularized(dict(skip_init=skip_init, **kwargs), regularized, norm, 'wide_resnet')
  kw.setdefault('style', 'v2')
  return ResNet(stage_sizes=(n, n, n), widths=tuple(base_width * width * m for m in (1, 2, 4)),
                stem_width=base_width, strides=(1, 2, 2), stem='cifar', norm=norm,
                num_classes=num_classes, fixup=fixup, **kw)


def resnet50(style: str = 'v1', *, width: int = 64, norm: str | NormSpec = 'batch_norm',
             skip_init=None, num_classes: int = 1000, regularized: bool = False,
             fixup: bool = False, **kwargs) -> ResNet:
  """ImageNet ResNet-50: 7x7/2 stem + maxpool, bottleneck stages [3, 4, 6, 3], stride on the 3x3.

  Args:
    style: 'v1' or 'v2' (De & Smith's ResNet-50-V2).
    width: first-stage branch width (64; smaller for smoke tests).
    norm, skip_init, num_classes, regularized, fixup, ``**kwargs``: as ``cifar_resnet`` (Fixup's
      ImageNet model: bottleneck branches, m = 3, inner convs scaled by ``L ** -0.25``).

  Returns:
    A ``ResNet`` (25.6M parameters with 1000 classes).

  References:
    He, Zhang, Ren & Sun (2016a), 'Deep Residual Learning for Image Recognition',
    arXiv:1512.03385; He, Zhang, Ren & Sun (2016b), 'Identity Mappings in Deep Residual
    Networks', arXiv:1603.05027; De & Smith (2020), 'Batch Normalization Biases Residual Blocks
    Towards the Identity Function in Deep Networks', arXiv:2002.10444 (ResNet-50-V2); Zhang,
    Dauphin & Ma (2019), 'Fixup Initialization: Residual Learning Without Normalization',
    arXiv:1901.09321 (Fixup ResNet-50).
  """
  _check_preset('resnet50', width=width, num_classes=num_classes)
  norm = _fixup(fixup, regularized, norm, 'resnet50')
  kw, norm = _regularized(dict(skip_init=skip_init, **kwargs), regularized, norm, 'resnet50')
  return ResNet(stage_sizes=(3, 4, 6, 3), widths=tuple(width * m for m in (1, 2, 4, 8)),
                stem_width=width, strides=(1, 2, 2, 2), bottleneck=True, style=style,
                stem='imagenet', norm=norm, num_classes=num_classes, fixup=fixup, **kw)


def pws_resnet(depth: int = 34, *, width: int = 64, norm: str | NormSpec = 'pws',
               skip_init=None, num_classes: int | None = None, **kwargs) -> ResNet:
  """The official PWS ResNets (lyxzzz/PWSConv): ReLU-first blocks, GroupNorm(1) stem and neck.

  depth 34: CIFAR ``ResNet_Cifar`` (basic [3, 4, 6, 3], widths 64..512, 3x3/1 stem, no maxpool;
  PWS gamma 1e-3, fan_in, no data-dependent alpha). depth 50: ImageNet ResNet-50 (bottleneck
  [3, 4, 6, 3], 7x7/2 stem + maxpool; PWS gamma 1e-4, fan_in, data-dependent alpha).

  Args:
    depth: 34 or 50.
    width: first-stage width (64; smaller for smoke tests).
    norm: 'pws' (the paper's hyperparameters for this depth), another spec (the repository's
      baselines, e.g. 'batch_norm', 'group_norm'), or a ``NormSpec``.
    skip_init: SkipInit gain init (None in the paper).
    num_classes: default 10 (depth 34) or 1000 (depth 50).
    ``**kwargs``: further ``ResNet`` fields.

  Returns:
    A ``ResNet`` with style 'relu_first'.

  References:
    Liu, Ge, Li & Gui (2021), 'Delving into Variance Transmission and Normalization: Shift of
    Average Gradient Makes the Network Collapse', arXiv:2103.11590; the official code,
    github.com/lyxzzz/PWSConv.
  """
  _check_preset('pws_resnet', depth=depth, width=width,
                num_classes=1 if num_classes is None else num_classes)
  check_choice('pws_resnet', 'depth', depth, (34, 50))
  cifar = depth == 34
  if norm == 'pws':
    norm = NormSpec(name='pws', pws_gamma=1e-3 if cifar else 1e-4, pws_mode='fan_in',
                    pws_init_alpha=not cifar)
  if num_classes is None:
    num_classes = 10 if cifar else 1000
  kw = dict(skip_init=skip_init, **kwargs)
  kw.setdefault('style', 'relu_first')
  return ResNet(stage_sizes=(3, 4, 6, 3), widths=tuple(width * m for m in (1, 2, 4, 8)),
                stem_width=width, strides=(1, 2, 2, 2), bottleneck=not cifar,
                stem='cifar' if cifar else 'imagenet', norm=norm, num_classes=num_classes, **kw)
