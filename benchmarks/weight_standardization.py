"""Section 3: ``WSConv`` / ``ScaledWSConv`` / ``PWSConv`` vs plain convs; PWS vs BN ResNets.

(a) Inside a ResNet-20 SGD step where only the conv class differs (BatchNorm everywhere).
(b) One conv layer at ImageNet ResNet-50 shapes: forward + gradients w.r.t. input and parameters.
(c) PWS vs BatchNorm ResNets end to end (``cifar_resnet(20, norm=...)`` and the official PWS
    CIFAR ResNet-34, ``pws_resnet(34, norm=...)``).
Target for (a): <= 1.05x ``flax.linen.Conv`` (standardizing the kernel is O(weights)); for (b),
<= 1.10x at every shape (where the kernel is as large as the activations). (b) also
times each weight-standardized conv with its standardization differentiated by autodiff
(``closed_form_backward=False``, the path before the closed form), interleaved with the rest.
(b) alone: ``python -c "from benchmarks import common, weight_standardization as b;
print(b.layer_table(common.FULL).to_markdown())"``.

References: Qiao et al. 2019, arXiv:1903.10520 (WS); Brock, De & Smith 2021, arXiv:2101.08692
(Scaled WS); Liu, Ge, Li & Gui 2021, arXiv:2103.11590 (PWS). See BENCHMARKS.md, section 3.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from benchmarks.common import Sizes, cifar_batch, emit, new_table, ratio_rows, train_step_candidate
from benchmarks.resnet20 import SwappableResNet, factory
from benchmarks.timing import Table, interleaved
from jaxnorm.linen import BatchNorm
from jaxnorm.linen.conv import Conv, PWSConv, ScaledWSConv, WSConv
from jaxnorm.models import cifar_resnet, pws_resnet

TARGET = 1.05
LAYER_TARGET = 1.10
BASELINE = 'flax nn.Conv'
CONVS = {
  BASELINE: factory(nn.Conv),
  'jaxnorm Conv': factory(Conv),
  'jaxnorm Conv (autodiff bwd)': factory(Conv, custom_backward=False),
  'WSConv': factory(WSConv),
  'ScaledWSConv': factory(ScaledWSConv),
  'PWSConv': factory(PWSConv),
}

def _with_autodiff_twins(convs):
  """``convs`` with, after each weight-standardized conv, the same class differentiating its
  kernel standardization by autodiff (``closed_form_backward=False``)."""
  standardized = {'WSConv': WSConv, 'ScaledWSConv': ScaledWSConv, 'PWSConv': PWSConv}
  out = {}
  for name, make in convs.items():
    out[name] = make
    if name in standardized:
      out[f'{name} (autodiff std)'] = factory(standardized[name], closed_form_backward=False)
  return out


LAYER_CONVS = _with_autodiff_twins(CONVS)  # (b) only

# (batch, side, in, out, kernel, stride): ResNet-50 v1 layers (He et al. 2016a, Table 1).
RESNET50_SHAPES = (
  (8, 224, 3, 64, 7, 2),     # stem
  (8, 56, 64, 64, 3, 1),     # conv2_x 3x3
  (8, 56, 256, 64, 1, 1),    # conv2_x 1x1 reduce
  (8, 14, 256, 256, 3, 1),   # conv4_x 3x3
  (8, 14, 1024, 256, 1, 1),  # conv4_x 1x1 reduce
  (8, 7, 512, 512, 3, 1),    # conv5_x 3x3
)
SMOKE_SHAPES = ((2, 8, 3, 4, 3, 1),)


def _conv_candidate(make, shape):
  b, side, cin, cout, k, s = shape
  layer = make(features=cout, kernel_size=(k, k), strides=(s, s),
               padding=((k // 2, k // 2), (k // 2, k // 2)))
  x = jax.random.normal(jax.random.PRNGKey(0), (b, side, side, cin), jnp.float32)
  params = layer.init(jax.random.PRNGKey(1), x)['params']
  y_shape = jax.eval_shape(lambda p, x: layer.apply({'params': p}, x), params, x).shape
  w = jax.random.normal(jax.random.PRNGKey(2), y_shape, jnp.float32)

  def fwd_bwd(params, x, w):
    return jax.grad(lambda p, x: jnp.sum(w * layer.apply({'params': p}, x)),
                    argnums=(0, 1))(params, x)

  return fwd_bwd, (params, x, w)


def layer_table(sizes: Sizes) -> Table:
  """Table 3b: one conv layer at the ResNet-50 shapes, every class of ``LAYER_CONVS``."""
  layer = new_table('3b. One conv layer at ImageNet ResNet-50 shapes: forward + backward', sizes, [
    'Shape = (batch, side, in channels, out channels, kernel, stride); gradients w.r.t. input '
    'and parameters of sum(w * conv(x)).',
    '"(autodiff std)": the same layer with closed_form_backward=False (autodiff of the kernel '
    'standardization instead of its closed-form derivative).',
    f'Target <= {LAYER_TARGET:.2f}x flax nn.Conv at every shape.',
  ])
  for shape in (SMOKE_SHAPES if sizes.smoke else RESNET50_SHAPES):
    # 12 timed rounds in FULL mode, as the other single-layer tables (sections 1 and 2).
    res = interleaved({n: _conv_candidate(c, shape) for n, c in LAYER_CONVS.items()},
                      repeats=sizes.repeats * 4, warmup=sizes.warmup)
    layer.rows += ratio_rows(res, BASELINE, LAYER_TARGET, label=f'{shape}: ')
  return emit(layer)


def run(sizes: Sizes) -> list[Table]:
  """The three tables of section 3: in a network (3a), one layer (3b), PWS vs BN (3c)."""
  x, y = cifar_batch(sizes.batch, sizes.image)
  res = interleaved(
    {n: train_step_candidate(SwappableResNet(sizes.resnet20, sizes.width, conv=c,
                                             norm=factory(BatchNorm, momentum=0.9)), x, y)
     for n, c in CONVS.items()}, repeats=sizes.repeats, warmup=sizes.warmup)
  step = new_table(f'3a. Weight-standardized convs inside a ResNet-20 SGD step (batch '
                   f'{sizes.batch})', sizes, [
    'Same ResNet-20 (jaxnorm BatchNorm after every conv), only the conv class differs; each '
    "class with its own defaults (WSConv: bias; ScaledWSConv: gain + bias; PWSConv: alpha + bias;"
    ' nn.Conv / Conv: bias).',
    f'Target: every weight-standardized conv <= {TARGET:.2f}x flax nn.Conv.',
  ])
  step.rows += ratio_rows(res, BASELINE, TARGET)
  emit(step)

  layer = layer_table(sizes)

  e2e = new_table('3c. PWS vs BatchNorm ResNets, one SGD step end to end', sizes, [
    'No target (the PWS paper reports PWS training faster than BN); x baseline < 1 means PWS is '
    'faster than the BatchNorm network of the same architecture.',
    'ResNet-20: jaxnorm.models.cifar_resnet(20, norm=...); ResNet-34: the official PWS CIFAR '
    'ResNet-34 (jaxnorm.models.pws_resnet(34), ReLU-first blocks, GroupNorm(1) stem/neck for '
    'PWS), batch 16 to keep the run short.',
  ], memory=True)
  res = interleaved({f'ResNet-{sizes.resnet20} norm={n}': train_step_candidate(
    cifar_resnet(sizes.resnet20, width=sizes.width, norm=n), x, y) for n in ('batch_norm', 'pws')},
    repeats=sizes.repeats, warmup=sizes.warmup)
  e2e.rows += ratio_rows(res, f'ResNet-{sizes.resnet20} norm=batch_norm', None)
  emit(e2e)
  if sizes.smoke:  # the ResNet-34 compile is the slowest of the smoke run; the path is the same
    return [layer, step, e2e]
  b34 = 16
  x34, y34 = cifar_batch(b34, sizes.image)
  width34 = 64
  res = interleaved({f'PWS ResNet-34 (batch {b34}) norm={n}': train_step_candidate(
    pws_resnet(34, width=width34, norm=n), x34, y34) for n in ('batch_norm', 'pws')},
    repeats=sizes.repeats, warmup=sizes.warmup)
  e2e.rows += ratio_rows(res, next(iter(res)), None)
  return [layer, step, e2e]
