"""A CIFAR ResNet (He et al. 6n+2, v1) whose conv and norm layer classes are arguments.

Used to swap exactly one layer kind (flax ``nn.BatchNorm`` vs jaxnorm ``BatchNorm``, ``nn.Conv``
vs ``WSConv`` ...) while everything else in the step stays identical. Same layout as
``jaxnorm.models.cifar_resnet``: 3x3 stem, three stages of n basic blocks (widths w, 2w, 4w,
strides 1, 2, 2), 1x1 projection shortcuts at stage transitions, global average pool, Dense head.

References: He et al. 2016a §4.2.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax.numpy as jnp


def _pad(k: int):
  return ((k // 2, k // 2), (k // 2, k // 2))


class _Block(nn.Module):
  features: int
  strides: int
  conv: Callable[..., nn.Module]
  norm: Callable[..., nn.Module] | None

  @nn.compact
  def __call__(self, x, train: bool):
    def cn(h, f, k, s, name):
      h = self.conv(features=f, kernel_size=(k, k), strides=(s, s), padding=_pad(k),
                    name=f'{name}_conv')(h)
      if self.norm is not None:
        h = self.norm(use_running_average=not train, name=f'{name}_norm')(h)
      return h

    y = nn.relu(cn(x, self.features, 3, self.strides, 'a'))
    y = cn(y, self.features, 3, 1, 'b')
    if self.strides != 1 or x.shape[-1] != self.features:
      x = cn(x, self.features, 1, self.strides, 'proj')
    return nn.relu(x + y)


class SwappableResNet(nn.Module):
  """CIFAR ResNet-(6n+2) v1 with ``conv`` and ``norm`` factories.

  Attributes:
    depth: 6n + 2.
    width: first-stage width.
    conv: called as ``conv(features=, kernel_size=, strides=, padding=, name=)``.
    norm: called as ``norm(use_running_average=, name=)``, or None for no normalization.
    num_classes: classifier outputs.
  """

  depth: int = 20
  width: int = 16
  conv: Callable[..., nn.Module] = nn.Conv
  norm: Callable[..., nn.Module] | None = nn.BatchNorm
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = False):
    n = (self.depth - 2) // 6
    x = self.conv(features=self.width, kernel_size=(3, 3), padding=_pad(3), name='stem_conv')(x)
    if self.norm is not None:
      x = self.norm(use_running_average=not train, name='stem_norm')(x)
    x = nn.relu(x)
    for si, (mult, stride) in enumerate(((1, 1), (2, 2), (4, 2))):
      for bi in range(n):
        x = _Block(self.width * mult, stride if bi == 0 else 1, self.conv, self.norm,
                   name=f'stage{si}_block{bi}')(x, train)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, name='head')(x)


def factory(cls: type[nn.Module], **fixed: Any) -> Callable[..., nn.Module]:
  """``cls`` with some fields fixed (e.g. ``use_bias=False``, ``momentum=0.9``)."""

  def make(**kw):
    return cls(**fixed, **kw)

  return make
