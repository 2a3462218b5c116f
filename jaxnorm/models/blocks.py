"""Residual blocks (basic and bottleneck) in three styles, generic in the `norm` spec.

Styles (``f`` = residual branch, ``sc`` = shortcut, ``g`` = SkipInit gain):

- ``'v1'`` (He et al. 2016a, post-activation): ``f = norm(conv(act(norm(conv(x)))))``,
  ``out = act(sc(x) + g * f)`` with ``sc = norm(conv1x1(x))`` at a projection.
- ``'v2'`` (He et al. 2016b, pre-activation; De & Smith 2020, Bjorck et al. 2018):
  ``p = act(norm(x))``, ``f = conv(act(norm(conv(p))))``, ``out = sc + g * f`` with
  ``sc = conv1x1(p)`` at a projection.
- ``'relu_first'`` (official PWS ResNets, Liu et al. 2021): ``p = relu(x)``, ``f = norm(conv(act(
  norm(conv(p)))))``, ``out = sc + g * f`` with ``sc = norm(conv1x1(p))`` at a projection; no act
  after the add.

``NFResidualBlock`` is the NF-ResNet variant (Brock et al. 2021) for specs with NF bookkeeping
(``'scaled_ws'``): ``p = act(x) * beta`` in 'v2' and ``out = sc + alpha * g * f``.

``FixupResidualBlock`` (``jaxnorm.models.fixup``) is the Fixup variant (Zhang, Dauphin & Ma 2019)
of the unnormalized 'v1' / 'v2' blocks: scalar biases and a multiplier in the branch, its last conv
initialised at 0.

Bottleneck branches are 1x1 -> 3x3 (stride here) -> 1x1 with 4x output channels.

Instrumentation (kept exact for ``jaxnorm.diagnostics``): ``sow('intermediates', 'branch', f)``
with ``f`` before its gain/alpha; ``out = perturb('skip', out)``; ``sow('intermediates', 'skip',
out)``; then a BackwardGradNorm node if ``bgn='block'`` (so the 'skip' gradient tap reads the
gradient after BGN's rescaling, the one that flows on into the block).

References:
  He, Zhang, Ren & Sun (2016a), 'Deep Residual Learning for Image Recognition', arXiv:1512.03385.
  He, Zhang, Ren & Sun (2016b), 'Identity Mappings in Deep Residual Networks', arXiv:1603.05027.
  Bjorck, Gomes, Selman & Weinberger (2018), 'Understanding Batch Normalization',
  arXiv:1806.02375.
  De & Smith (2020), 'Batch Normalization Biases Residual Blocks Towards the Identity Function in
  Deep Networks', arXiv:2002.10444 (SkipInit gain at the end of the branch).
  Liu, Ge, Li & Gui (2021), 'Delving into Variance Transmission and Normalization: Shift of
  Average Gradient Makes the Network Collapse', arXiv:2103.11590 (ReLU-first blocks).
  Brock, De & Smith (2021), 'Characterizing signal propagation to close the performance gap in
  unnormalized ResNets', arXiv:2101.08692 (NF-ResNet alpha and beta).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from jaxnorm.functional._checks import check_choice, fail
from jaxnorm.models.registry import Layers, check_count
from jaxnorm.models.taps import perturb

STYLES = ('v1', 'v2', 'relu_first')
EXPANSION = 4  # bottleneck output channels / branch width


class ResidualBlock(nn.Module):
  """A residual block (basic or bottleneck) in style 'v1', 'v2' or 'relu_first'.

  Args:
    layers: the registry's layer factories (norm spec, conv bias, BGN placement).
    features: branch width (basic: output width; bottleneck: output width / 4).
    strides: stride of the block (on the first 3x3 conv).
    bottleneck: bottleneck (1x1-3x3-1x1) instead of basic (3x3-3x3) branch.
    style: 'v1', 'v2' or 'relu_first'.
    projection: a 1x1 conv shortcut (width or stride changes) instead of the identity.
    skip_init: None (no gain) or the initial value of SkipInit's scalar gain.
    block_scale: None, or a fixed factor on the block output ``(sc + g * f) * block_scale``
      (De & Smith's "divide the residual block by sqrt(2)" baseline: ``0.5 ** 0.5``).
    scan_carry: return ``(out, None)`` (the body of ``nn.scan``) instead of ``out``.

  Call: ``block(x, train)``.

  Returns:
    The skip-path activation after the block (or ``(it, None)`` with ``scan_carry``).

  References:
    He, Zhang, Ren & Sun (2016a), 'Deep Residual Learning for Image Recognition',
    arXiv:1512.03385; He, Zhang, Ren & Sun (2016b), 'Identity Mappings in Deep Residual
    Networks', arXiv:1603.05027; De & Smith (2020), 'Batch Normalization Biases Residual Blocks
    Towards the Identity Function in Deep Networks', arXiv:2002.10444; Liu, Ge, Li & Gui (2021),
    'Delving into Variance Transmission and Normalization: Shift of Average Gradient Makes the
    Network Collapse', arXiv:2103.11590.
  """
  layers: Layers
  features: int
  strides: int = 1
  bottleneck: bool = False
  style: str = 'v1'
  projection: bool = False
  skip_init: float | None = None
  block_scale: float | None = None
  scan_carry: bool = False

  @nn.compact
  def __call__(self, x, train: bool):
    self._check()
    out = self._residual(x, self._pre_activation(x, train), train)
    return (out, None) if self.scan_carry else out

  def _check(self) -> None:
    check_choice(type(self).__name__, 'style', self.style, STYLES)
    check_count(type(self).__name__, 'features', self.features)
    check_count(type(self).__name__, 'strides', self.strides)

  def _pre_activation(self, x, train: bool):
    """What the branch (and a projection shortcut, in v2/relu_first) sees."""
    L = self.layers
    if self.style == 'v1':
      return x
    if self.style == 'v2':
      return L.act(L.norm(train, name='norm_pre')(x))
    return L.act(x)  # relu_first: ReLU first, no activation after the add

  def _scale_branch(self, h):
    """The branch after its SkipInit gain, before the add (hook for NF-ResNet's alpha)."""
    return h

  @property
  def out_features(self) -> int:
    """Output channels: ``features`` (basic) or ``4 * features`` (bottleneck)."""
    return self.features * (EXPANSION if self.bottleneck else 1)

  def _branch_shapes(self) -> list[tuple[int, int, int]]:
    """``(features, kernel_size, strides)`` of every conv of the branch, in order."""
    if self.bottleneck:
      return [(self.features, 1, 1), (self.features, 3, self.strides), (self.out_features, 1, 1)]
    return [(self.features, 3, self.strides), (self.features, 3, 1)]

  def _tap_output(self, out):
    """The block output's taps (perturb + sow 'skip') and BackwardGradNorm nodes."""
    L = self.layers
    out = perturb(self, 'skip', out)
    self.sow('intermediates', 'skip', out)
    out = L.bgn_node(out, 'block', name='bgn_block')
    return L.bgn_node(out, 'layer', name='bgn_out')

  def _residual(self, x, p, train: bool):
    """The block given its input ``x`` and pre-activation ``p``: branch, shortcut, add, taps."""
    L = self.layers
    act = L.act
    out_features = self.out_features
    shapes = self._branch_shapes()

    if self.style != 'v1':
      p = L.bgn_node(p, 'layer', name='bgn_pre')

    h = p
    n = len(shapes)
    for i, (feats, k, s) in enumerate(shapes):
      h = L.conv(feats, k, s, name=f'conv_{i}', first=i == 0)(h)
      last = i == n - 1
      if self.style in ('v1', 'relu_first'):
        h = L.norm(train, name=f'norm_{i}', last=last)(h)
        if not last:
          h = L.bgn_node(act(h), 'layer', name=f'bgn_{i}')
      elif not last:  # v2: norm + act before the next conv
        h = act(L.norm(train, name=f'norm_{i}')(h))
        h = L.bgn_node(h, 'layer', name=f'bgn_{i}')
    self.sow('intermediates', 'branch', h)

    if self.skip_init is not None:
      h = L.skip_gain(self.skip_init, name='skip_init')(h)
    h = self._scale_branch(h)

    if self.projection:
      sc = L.conv(out_features, 1, self.strides, name='shortcut_conv', first=True)(p)
      if self.style != 'v2':
        sc = L.norm(train, name='shortcut_norm')(sc)
    else:
      sc = x
    out = sc + h
    if self.block_scale is not None:
      out = out * self.block_scale
    if self.style == 'v1':
      out = act(out)
    return self._tap_output(out)


class NFResidualBlock(ResidualBlock):
  r"""An NF-ResNet block: ``ResidualBlock`` with Brock et al.'s alpha/beta bookkeeping.

  In 'v2' (the NF-ResNet style) the block computes

  .. math::

    x_{i+1} = sc(p_i) + \alpha \, g \, f(p_i), \qquad p_i = \mathrm{act}(x_i) \, \beta_i, \qquad
    \beta_i = 1 / \sqrt{\mathrm{Var}(x_i)} \text{ (expected at init)},

  with ``act`` the gamma-scaled relu and ``sc`` the identity or a 1x1 conv of ``p_i``; in
  'relu_first' it is ``p_i = act(x_i)`` (no beta) and the same ``alpha``. ``alpha`` is the spec's
  ``nf_alpha``; ``betas`` are the expected-std reciprocals of the blocks of the stage
  (``resnet.nf_betas``), one per block.

  Args:
    betas: ``beta_j`` of every block j of the stage (block j picks ``betas[j]``).
    (the other fields as ``ResidualBlock``; style 'v2' or 'relu_first').

  Call: ``block((x, j), train)`` with ``j`` the block's int32 index in its stage; returns
  ``(out, j + 1)`` (or ``((out, j + 1), None)`` with ``scan_carry``), so the index travels with
  the activation through ``stacking.run_blocks``, unrolled or scanned.

  References:
    Brock, De & Smith (2021), 'Characterizing signal propagation to close the performance gap in
    unnormalized ResNets', arXiv:2101.08692 (Section 4, NF-ResNets; ``nf_resnet.py`` of
    deepmind-research).
  """
  betas: tuple[float, ...] = (1.0,)

  @nn.compact
  def __call__(self, carry, train: bool):
    x, index = carry
    self._check()
    if self.style == 'v1':
      fail('NFResidualBlock', 'style', "'v2' or 'relu_first' (NF-ResNets are pre-activation)",
           repr(self.style))
    if self.style == 'v2':
      beta = jnp.asarray(self.betas, jnp.float32)[index]
      p = self.layers.act(x) * beta.astype(x.dtype)
    else:
      p = self.layers.act(x)
    out = (self._residual(x, p, train), index + 1)
    return (out, None) if self.scan_carry else out

  def _scale_branch(self, h):
    return h * jnp.asarray(self.layers.spec.nf_alpha, h.dtype)
