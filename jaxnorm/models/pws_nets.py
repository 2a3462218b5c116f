"""PWS ResNets of any size, with every PWS option as a plain keyword (for training configs).

``pws_resnet(34)`` / ``pws_resnet(50)`` are the two networks of the official code with their
hyperparameters. ``pws_net`` builds the same ReLU-first ResNet (the official ``ResNet_Cifar``
layout: 3x3/1 stem, basic blocks, GroupNorm(1) after the stem and before the head for PWS) with
any stage sizes and width, and takes the ``NormSpec`` options flat, so that a training config
(``model.name = 'jaxnorm.models.pws_nets:pws_net'``) can set gamma, the fan mode or the number of
GroupNorm groups, e.g. for a gamma sweep on a small network.

References:
  Liu, Ge, Li & Gui (2021), 'Delving into Variance Transmission and Normalization: Shift of
  Average Gradient Makes the Network Collapse', arXiv:2103.11590; the official code,
  github.com/lyxzzz/PWSConv (``ResNet_Cifar``, ``pws_layer.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

from jaxnorm.functional._checks import check_positive, fail
from jaxnorm.models.registry import NormSpec
from jaxnorm.models.resnet import ResNet

_LAYER = 'pws_net'


def pws_net(stage_sizes: Sequence[int] = (3, 4, 6, 3), width: int = 64, *, norm: str = 'pws',
            pws_gamma: float = 1e-3, pws_mode: str = 'fan_in', pws_equiv: bool = False,
            pws_init_alpha: bool = False, group_norm_groups: int = 32,
            zero_init_residual: bool = False, scan: bool | None = None,
            num_classes: int = 10) -> ResNet:
  r"""A ReLU-first ResNet of basic blocks (the official PWS CIFAR layout) of any size.

  Stage ``s`` has ``stage_sizes[s]`` basic blocks of width ``width * 2**s`` and stride 2 from the
  second stage on; the stem is a 3x3/1 conv. With the defaults it is ``pws_resnet(34)``, the
  official CIFAR ResNet-34. The PWS convs compute

  .. math::

    \hat W_o = \sqrt{2 / \mathrm{fan}}\; \alpha_o\, \frac{W_o - \mu_o}{\sqrt{\sigma_o^2 + \gamma}}.

  Args:
    stage_sizes: blocks per stage (1 to 4 stages).
    width: first-stage width.
    norm: a registered normalization name ('pws', 'batch_norm', 'group_norm', 'ws',
      'scaled_ws', 'none', ...).
    pws_gamma: PWS gamma (``NormSpec.pws_gamma``; 1e-3 in the official CIFAR config).
    pws_mode: PWS fan mode, 'fan_in' or 'fan_out'.
    pws_equiv: PWS ``equiv`` (gamma scaled by 2 / fan).
    pws_init_alpha: PWS data-dependent alpha init (stem, first conv of each block, shortcut).
    group_norm_groups: GroupNorm groups of 'group_norm' / 'ws' (``NormSpec.group_norm_groups``).
    zero_init_residual: last norm scale of each branch at 0 (the official BN baseline on CIFAR).
    scan: scan identical blocks (None: automatic).
    num_classes: classifier outputs.

  Returns:
    A ``ResNet`` with style 'relu_first'.

  References:
    Liu, Ge, Li & Gui (2021), 'Delving into Variance Transmission and Normalization: Shift of
    Average Gradient Makes the Network Collapse', arXiv:2103.11590; official ``ResNet_Cifar``.
  """
  stage_sizes = tuple(stage_sizes)
  if not 1 <= len(stage_sizes) <= 4 or any(
      isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in stage_sizes):
    fail(_LAYER, 'stage_sizes', '1 to 4 positive integers (blocks per stage)', stage_sizes)
  if isinstance(width, bool) or not isinstance(width, int) or width < 1:
    fail(_LAYER, 'width', 'a positive integer', width)
  check_positive(_LAYER, 'num_classes', num_classes)
  spec = NormSpec(name=norm, pws_gamma=float(pws_gamma), pws_mode=pws_mode,
                  pws_equiv=bool(pws_equiv), pws_init_alpha=bool(pws_init_alpha),
                  group_norm_groups=group_norm_groups)
  n = len(stage_sizes)
  return ResNet(stage_sizes=stage_sizes, widths=tuple(width * 2 ** s for s in range(n)),
                stem_width=width, strides=(1, 2, 2, 2)[:n], bottleneck=False, style='relu_first',
                stem='cifar', norm=spec, num_classes=num_classes,
                zero_init_residual=zero_init_residual, scan=scan)
