"""A ResNet written the way Flax users write one (their examples' conventions), for the tests.

It is *not* built from jaxnorm's models: conv and norm layers are ``ModuleDef`` fields bound with
``functools.partial`` (so any ``nn.Conv``-like / ``nn.BatchNorm``-like class drops in), the stage
sizes are a list (the module is not hashable), blocks are plain ``nn.compact`` modules with no
taps, and the conv layers are called with ``use_bias=False``, a tuple ``kernel_size``,
tuple strides and explicit padding pairs. Tests use it to check that jaxnorm's layers are
drop-ins and that its diagnostics read any model unmodified.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

ModuleDef = Any


class BasicBlock(nn.Module):
  """Two 3x3 convs with a norm after each, a projected shortcut when the shape changes."""
  filters: int
  conv: ModuleDef
  norm: ModuleDef
  act: Callable = nn.relu
  strides: tuple[int, int] = (1, 1)

  @nn.compact
  def __call__(self, x):
    shortcut = x
    h = self.act(self.norm()(self.conv(self.filters, (3, 3), self.strides)(x)))
    h = self.norm(scale_init=nn.initializers.zeros_init())(self.conv(self.filters, (3, 3))(h))
    if shortcut.shape != h.shape:
      shortcut = self.conv(self.filters, (1, 1), self.strides, name='proj_conv')(shortcut)
      shortcut = self.norm(name='proj_norm')(shortcut)
    return self.act(shortcut + h)


class FlaxStyleResNet(nn.Module):
  """ResNet v1 with an ImageNet stem (7x7/2 conv, 3x3/2 max pool)."""
  stage_sizes: Sequence[int]
  num_classes: int = 10
  num_filters: int = 64
  conv: ModuleDef = nn.Conv
  norm: ModuleDef = nn.BatchNorm
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = True):
    conv = partial(self.conv, use_bias=False, dtype=self.dtype)
    norm = partial(self.norm, use_running_average=not train, momentum=0.9, epsilon=1e-5,
                   dtype=self.dtype)
    x = conv(self.num_filters, (7, 7), (2, 2), padding=[(3, 3), (3, 3)], name='stem_conv')(x)
    x = nn.relu(norm(name='stem_norm')(x))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding='SAME')
    for i, size in enumerate(self.stage_sizes):
      for j in range(size):
        strides = (2, 2) if i > 0 and j == 0 else (1, 1)
        x = BasicBlock(self.num_filters * 2 ** i, conv=conv, norm=norm, strides=strides)(x)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, dtype=self.dtype)(x)


ResNet18 = partial(FlaxStyleResNet, stage_sizes=[2, 2, 2, 2])
