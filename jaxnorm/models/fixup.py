"""Fixup: residual networks trained without normalization, by initialization and scalar params.

Fixup (Zhang, Dauphin & Ma 2019) makes an unnormalized ResNet with ``L`` residual branches of
``m`` weight layers each trainable by three changes:

1. the classification layer and the last weight layer of every residual branch start at 0, so
   every block starts as the identity on its input (up to its post-add relu in 'v1', the identity
   on the non-negative activations it receives) and the logits start at the head's bias, 0;
2. every other weight layer inside a branch starts from He init (``Var(w) = 2 / fan_in``) with its
   standard deviation multiplied by ``L ** (-1 / (2m - 2))`` (``L ** -0.5`` for basic blocks,
   ``L ** -0.25`` for bottlenecks). Once the last layers move away from 0, each branch's
   contribution to the output then changes by ``O(1 / L)`` per SGD step, so the sum of the ``L``
   branches changes by ``O(1)``, whatever the depth;
3. each branch gets a scalar multiplier (init 1, on the branch output) and scalar biases (init 0)
   before every conv, linear layer and element-wise activation.

Layout here (``i`` = index of the conv in the branch, ``m`` convs, ``b`` = scalar bias, ``s`` = the
multiplier)::

  h = p                       # the block's pre-activation: x ('v1') or relu(x) ('v2')
  h = conv_0(h + b_0a)        # a projection shortcut sees p + b_0a too
  h = relu(h + b_0b)          # every conv but the last
  h = conv_1(h + b_1a) ...
  f = conv_{m-1}(h + b_{m-1}a) * s + b_{m-1}b
  out = relu(sc + f) ('v1')   or   sc + f ('v2')

as in the reference code (``bias1a`` before conv1, ``bias1b`` before the relu, ``bias2a`` before
conv2, ``scale`` and ``bias2b`` after it). A basic block thus has 4 scalar biases and 1 scale, a
bottleneck 6 and 1. The network adds one scalar bias after the stem conv (before the stem relu
in 'v1', before the first block's pre-activation relu in 'v2') and one before the classifier.
The scalars sit in modules whose parameter is named 'bias' or 'scale', so ``decay_mask`` leaves
them out of weight decay, as the paper does.

References:
  Zhang, Dauphin & Ma (2019), 'Fixup Initialization: Residual Learning Without Normalization',
  arXiv:1901.09321, https://arxiv.org/abs/1901.09321 (Section 3, the Fixup rule; reference code
  github.com/hongyi-zhang/Fixup).
  De & Smith (2020), 'Batch Normalization Biases Residual Blocks Towards the Identity Function in
  Deep Networks', arXiv:2002.10444, https://arxiv.org/abs/2002.10444 (Fixup as an unnormalized
  baseline next to SkipInit).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxnorm.functional import _initializers as initializers
from jaxnorm.functional._checks import fail
from jaxnorm.linen import Conv
from jaxnorm.models.blocks import ResidualBlock
from jaxnorm.models.registry import check_count

FIXUP_STYLES = ('v1', 'v2')


def fixup_branch_scale(num_blocks: int, num_layers: int) -> float:
  """Fixup's std multiplier ``L ** (-1 / (2m - 2))`` of the inner layers of a residual branch.

  Args:
    num_blocks: ``L``, the number of residual branches of the whole network.
    num_layers: ``m``, the number of weight layers of one branch (2 basic, 3 bottleneck); >= 2.

  Returns:
    The factor by which the He-init standard deviation of every weight layer of a branch but the
    last is multiplied.

  References:
    Zhang, Dauphin & Ma (2019), 'Fixup Initialization: Residual Learning Without Normalization',
    arXiv:1901.09321, https://arxiv.org/abs/1901.09321 (Section 3, rule 2).
  """
  check_count('fixup_branch_scale', 'num_blocks', num_blocks)
  check_count('fixup_branch_scale', 'num_layers', num_layers, minimum=2)
  return float(num_blocks) ** (-1.0 / (2 * num_layers - 2))


def fixup_kernel_init(num_blocks: int, num_layers: int):
  """He-normal kernels (``Var = 2 / fan_in``) with std times ``L ** (-1 / (2m - 2))``.

  Args:
    num_blocks: ``L``, the number of residual branches of the network.
    num_layers: ``m``, the number of weight layers per branch.

  Returns:
    An initializer ``init(key, shape, dtype)`` (truncated normal, as ``he_normal``, rescaled to
    the target variance ``2 * L ** (-1 / (m - 1)) / fan_in``).

  References:
    Zhang, Dauphin & Ma (2019), 'Fixup Initialization: Residual Learning Without Normalization',
    arXiv:1901.09321, https://arxiv.org/abs/1901.09321 (Section 3, rule 2).
  """
  factor = fixup_branch_scale(num_blocks, num_layers)
  return initializers.variance_scaling(2.0 * factor**2, 'fan_in', 'truncated_normal')


class ScalarBias(nn.Module):
  """Adds a learnable scalar ``bias`` (shape ``()``, init 0) to its input.

  Fixup's scalar bias before each conv, linear layer and activation. The parameter is named
  'bias', so ``decay_mask`` excludes it from weight decay.

  Attributes:
    param_dtype: dtype of ``bias``; the sum keeps the input's dtype.

  Returns:
    ``x + bias``.

  References:
    Zhang, Dauphin & Ma (2019), 'Fixup Initialization: Residual Learning Without Normalization',
    arXiv:1901.09321, https://arxiv.org/abs/1901.09321 (Section 3, rule 3).
  """
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    bias = self.param('bias', nn.initializers.zeros, (), self.param_dtype)
    return x + bias.astype(x.dtype)


class ScalarScale(nn.Module):
  """Multiplies its input by a learnable scalar ``scale`` (shape ``()``, init 1).

  Fixup's multiplier at the end of each residual branch. The parameter is named 'scale', so
  ``decay_mask`` excludes it from weight decay.

  Attributes:
    param_dtype: dtype of ``scale``; the product keeps the input's dtype.

  Returns:
    ``scale * x``.

  References:
    Zhang, Dauphin & Ma (2019), 'Fixup Initialization: Residual Learning Without Normalization',
    arXiv:1901.09321, https://arxiv.org/abs/1901.09321 (Section 3, rule 3).
  """
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = self.param('scale', nn.initializers.ones, (), self.param_dtype)
    return x * scale.astype(x.dtype)


class FixupResidualBlock(ResidualBlock):
  """A Fixup residual block (basic or bottleneck; style 'v1' or 'v2'; no normalization).

  The branch is the ``ResidualBlock`` branch of the same style with ``norm='none'``, plus Fixup's
  scalars (module docstring): a scalar bias before every conv and every inner relu, a scalar
  multiplier and a last scalar bias at the end. The last conv of the branch starts at 0; the others
  start from He init with std times ``L ** (-1 / (2m - 2))``, ``L = num_blocks``, ``m`` = number of
  convs of the branch. A projection shortcut is the ResNet's 1x1 conv (plain He init, not
  rescaled), applied to the pre-activation plus the first scalar bias, as in the reference code.

  The taps are those of ``ResidualBlock``: 'branch' is the last conv's output before the
  multiplier (the branch before its gain), 'skip' the block output.

  Args:
    num_blocks: ``L``, the number of residual blocks of the whole network.
    (the other fields as ``ResidualBlock``; ``layers.spec`` must be 'none', ``skip_init`` None.)

  Call: ``block(x, train)``.

  Returns:
    The skip-path activation after the block (or ``(it, None)`` with ``scan_carry``).

  References:
    Zhang, Dauphin & Ma (2019), 'Fixup Initialization: Residual Learning Without Normalization',
    arXiv:1901.09321, https://arxiv.org/abs/1901.09321 (Section 3; ``fixup_resnet_cifar.py`` and
    ``fixup_resnet_imagenet.py`` of github.com/hongyi-zhang/Fixup).
  """
  num_blocks: int = 1

  @nn.compact
  def __call__(self, x, train: bool):
    self._check()
    layer = type(self).__name__
    if self.style not in FIXUP_STYLES:
      fail(layer, 'style', "'v1' or 'v2' with Fixup", repr(self.style))
    if self.layers.spec.name != 'none':
      fail(layer, 'norm', "'none' with Fixup (Fixup replaces normalization)",
           repr(self.layers.spec.name))
    if self.skip_init is not None:
      fail(layer, 'skip_init', 'None with Fixup (the branch has its own scalar multiplier)',
           repr(self.skip_init))
    check_count(layer, 'num_blocks', self.num_blocks)
    out = self._residual(x, self._pre_activation(x, train), train)
    return (out, None) if self.scan_carry else out

  def _conv(self, features: int, kernel_size: int, strides: int, *, name: str, kernel_init):
    L = self.layers
    use_bias = L.spec.entry.conv_bias if L.conv_bias is None else L.conv_bias
    pad = kernel_size // 2
    return Conv(features=features, kernel_size=(kernel_size, kernel_size),
                strides=(strides, strides), padding=((pad, pad), (pad, pad)), use_bias=use_bias,
                kernel_init=kernel_init, name=name)

  def _residual(self, x, p, train: bool):
    del train  # No normalization: train and eval compute the same function.
    L = self.layers
    shapes = self._branch_shapes()
    m = len(shapes)
    inner_init = fixup_kernel_init(self.num_blocks, m)

    if self.style != 'v1':
      p = L.bgn_node(p, 'layer', name='bgn_pre')
    p_biased = ScalarBias(name='bias_0a')(p)  # what conv_0 and a projection shortcut see
    h = p_biased
    for i, (feats, k, s) in enumerate(shapes):
      last = i == m - 1
      if i > 0:
        h = ScalarBias(name=f'bias_{i}a')(h)
      h = self._conv(feats, k, s, name=f'conv_{i}',
                     kernel_init=nn.initializers.zeros if last else inner_init)(h)
      if not last:
        h = L.act(ScalarBias(name=f'bias_{i}b')(h))
        h = L.bgn_node(h, 'layer', name=f'bgn_{i}')
    self.sow('intermediates', 'branch', h)
    h = ScalarBias(name=f'bias_{m - 1}b')(ScalarScale(name='scale')(h))

    if self.projection:
      sc = L.conv(self.out_features, 1, self.strides, name='shortcut_conv', first=True)(p_biased)
    else:
      sc = x
    out = sc + h
    if self.style == 'v1':
      out = L.act(out)
    return self._tap_output(out)
