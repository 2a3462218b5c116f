"""Residual blocks (basic and bottleneck) in three styles, generic in the `norm` spec.

Styles (``f`` = residual branch, ``sc`` = shortcut, ``g`` = SkipInit gain, ``a`` = NF alpha):

- ``'v1'`` (He et al. 2016a, post-activation): ``f = norm(conv(act(norm(conv(x)))))``,
  ``out = act(sc(x) + g * f)`` with ``sc = norm(conv1x1(x))`` at a projection.
- ``'v2'`` (He et al. 2016b, pre-activation; De & Smith, Bjorck et al.): ``p = act(norm(x))``,
  ``f = conv(act(norm(conv(p))))``, ``out = sc + a * g * f`` with ``sc = conv1x1(p)`` at a
  projection.
  With ``'scaled_ws'`` the pre-activation is NF-ResNet's ``p = act(x) * beta`` (Brock et al.).
- ``'relu_first'`` (official PWS ResNets, Liu et al.): ``p = relu(x)``, ``f = norm(conv(act(norm(
  conv(p)))))``, ``out = sc + g * f`` with ``sc = norm(conv1x1(p))`` at a projection; no act after
  the add.

Bottleneck branches are 1x1 -> 3x3 (stride here) -> 1x1 with 4x output channels.

Instrumentation (kept exact for ``jaxnorm.diagnostics``): ``sow('intermediates', 'branch', f)``
with ``f`` before its gain/alpha; ``out = perturb('skip', out)``; ``sow('intermediates', 'skip',
out)``; then a BackwardGradNorm node if ``bgn='block'`` (so the 'skip' gradient tap reads the
gradient after BGN's rescaling, the one that flows on into the block).

References: papers.md §1 (placement), §3 (SkipInit gain at the end of the branch), §5(b) (ReLU-first
blocks), §5b (NF-ResNet alpha/beta).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from jaxnorm.functional._checks import check_choice
from jaxnorm.models.registry import Layers, check_count
from jaxnorm.models.taps import perturb

STYLES = ('v1', 'v2', 'relu_first')
EXPANSION = 4  # bottleneck output channels / branch width


def _maybe(layer, x):
  return x if layer is None else layer(x)


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
    scan_carry: return ``(out, None)`` (the body of ``nn.scan``) instead of ``out``.

  Call: ``block(x, train, beta)``; ``beta`` (a float32 scalar) is NF-ResNet's 1/expected_std,
  used only with ``norm='scaled_ws'``.

  Returns:
    The skip-path activation after the block (or ``(it, None)`` with ``scan_carry``).

  References: He et al. 2016a/b; De & Smith 2020 (papers.md §3); Liu et al. 2021 (§5(b));
  Brock et al. 2021a (§5b).
  """
  layers: Layers
  features: int
  strides: int = 1
  bottleneck: bool = False
  style: str = 'v1'
  projection: bool = False
  skip_init: float | None = None
  scan_carry: bool = False

  @nn.compact
  def __call__(self, x, train: bool, beta):
    check_choice('ResidualBlock', 'style', self.style, STYLES)
    check_count('ResidualBlock', 'features', self.features)
    check_count('ResidualBlock', 'strides', self.strides)
    L = self.layers
    act = L.act
    out_features = self.features * (EXPANSION if self.bottleneck else 1)
    if self.bottleneck:
      shapes = [(self.features, 1, 1), (self.features, 3, self.strides), (out_features, 1, 1)]
    else:
      shapes = [(self.features, 3, self.strides), (self.features, 3, 1)]

    def branch_layer(h, i):
      feats, k, s = shapes[i]
      h = L.conv(feats, k, s, name=f'conv_{i}', first=i == 0)(h)
      return h

    # Pre-activation p: what the branch (and a projection shortcut, in v2/relu_first) sees.
    if self.style == 'v1':
      p = x
    elif self.style == 'v2':
      if L.spec.is_nf:
        p = act(x) * beta.astype(x.dtype)  # NF-ResNet: act(h) * beta, beta = 1/expected_std
      else:
        p = act(_maybe(L.norm(train, name='norm_pre'), x))
    else:  # relu_first: ReLU first, no activation after the add
      p = act(x)
    if self.style != 'v1':
      p = L.bgn_node(p, 'layer', name='bgn_pre')

    h = p
    n = len(shapes)
    for i in range(n):
      h = branch_layer(h, i)
      last = i == n - 1
      if self.style in ('v1', 'relu_first'):
        h = _maybe(L.norm(train, name=f'norm_{i}', last=last), h)
        if not last:
          h = L.bgn_node(act(h), 'layer', name=f'bgn_{i}')
      elif not last:  # v2: norm + act before the next conv
        h = act(_maybe(L.norm(train, name=f'norm_{i}'), h))
        h = L.bgn_node(h, 'layer', name=f'bgn_{i}')
    branch = h
    self.sow('intermediates', 'branch', branch)

    if self.skip_init is not None:
      h = L.skip_gain(self.skip_init, name='skip_init')(h)
    if L.spec.is_nf and self.style != 'v1':
      h = h * jnp.asarray(L.spec.nf_alpha, h.dtype)

    if self.projection:
      sc = L.conv(out_features, 1, self.strides, name='shortcut_conv', first=True)(p)
      if self.style != 'v2':
        sc = _maybe(L.norm(train, name='shortcut_norm'), sc)
    else:
      sc = x
    out = sc + h
    if self.style == 'v1':
      out = act(out)
    out = perturb(self, 'skip', out)
    self.sow('intermediates', 'skip', out)
    out = L.bgn_node(out, 'block', name='bgn_block')
    out = L.bgn_node(out, 'layer', name='bgn_out')
    if self.scan_carry:
      return out, None
    return out
