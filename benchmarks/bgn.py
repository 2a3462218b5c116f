"""Section 2: ``BackwardGradNorm`` overhead in 50-layer MLP steps and a ResNet-56 step.

The same model, parameters and batch with ``bgn='none'`` (baseline) and with BGN nodes
(MLP: after every hidden layer, ``bgn='layer'``; ResNet-56: after every block, ``bgn='block'``, and
after every activation too, ``bgn='layer'``). Targets: <= 1.03x (ReLU MLP-50 at width 512,
ResNet-56); <= 1.02x for the tanh MLP-50 at batch 128 and widths 128 to 1024 (a BGN node is one
reduction per layer).

References: Cabana & Lago-Fernandez, "Backward Gradient Normalization in Deep Neural Networks",
arXiv 2106.09475 (2021); issue 6 item 2.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from benchmarks.common import (
  Sizes,
  cifar_batch,
  emit,
  init_variables,
  new_table,
  ratio_rows,
  train_step_candidate,
)
from benchmarks.timing import Table, interleaved
from jaxnorm.models import MLP, cifar_resnet

TARGET = 1.03
TANH_TARGET = 1.02
TANH_WIDTHS = (128, 256, 512, 1024)


def run(sizes: Sizes) -> list[Table]:
  """The section-2 table: MLP-50 (ReLU; tanh at four widths) and ResNet-56, with and without BGN."""
  table = new_table('2. BackwardGradNorm overhead in a training step', sizes, [
    'x baseline = step time with BGN / same step without BGN (same parameters and batch, '
    f'interleaved calls); target <= {TARGET:.2f}x ({TANH_TARGET:.2f}x for the tanh rows).',
    'MLP: 50 hidden Dense+ReLU layers (plain, He init), BGN after every hidden layer.',
    'MLP tanh: 50 hidden Dense+tanh layers (plain, LeCun init), BGN after every hidden layer, '
    f'batch 128, widths {", ".join(map(str, TANH_WIDTHS))}; target <= {TANH_TARGET:.2f}x. '
    'Each width is its own interleaved pair; narrower (faster) steps get more rounds '
    '(3 x 4 x 1024 / width).',
    "ResNet-56: jaxnorm.models.cifar_resnet(56) with BatchNorm; 'block' = BGN after every "
    "residual block, 'layer' = also after every activation inside the branches and the stem.",
  ])
  width, batch, features = (8, 4, 16) if sizes.smoke else (512, 128, 784)
  x = jax.random.normal(jax.random.PRNGKey(0), (batch, features), jnp.float32)
  y = jax.random.randint(jax.random.PRNGKey(1), (batch,), 0, 10)
  variables = init_variables(MLP(depth=sizes.mlp_depth, width=width), x)
  res = interleaved({f'MLP-{sizes.mlp_depth} (width {width}, batch {batch}) bgn={b}':
                     train_step_candidate(MLP(depth=sizes.mlp_depth, width=width, bgn=b), x, y,
                                          variables)
                     for b in ('none', 'layer')}, repeats=sizes.repeats * 4, warmup=sizes.warmup)
  table.rows += ratio_rows(res, next(iter(res)), TARGET)
  emit(table)  # partial: the ReLU MLP rows

  widths = (8, 16) if sizes.smoke else TANH_WIDTHS
  for width in widths:
    model = functools.partial(MLP, depth=sizes.mlp_depth, width=width, activation='tanh')
    variables = init_variables(model(), x)
    res = interleaved({f'MLP-{sizes.mlp_depth} tanh (width {width}, batch {batch}) bgn={b}':
                       train_step_candidate(model(bgn=b), x, y, variables)
                       for b in ('none', 'layer')},
                      repeats=sizes.repeats * 4 * max(1, max(widths) // width),
                      warmup=sizes.warmup)
    table.rows += ratio_rows(res, next(iter(res)), TANH_TARGET)
    emit(table)  # partial: one more width

  x, y = cifar_batch(sizes.batch, sizes.image)
  variables = init_variables(cifar_resnet(sizes.resnet56, width=sizes.width), x)
  res = interleaved({f'ResNet-56 (batch {sizes.batch}) bgn={b}':
                     train_step_candidate(cifar_resnet(sizes.resnet56, width=sizes.width, bgn=b),
                                          x, y, variables)
                     for b in ('none', 'block', 'layer')},
                    repeats=sizes.repeats, warmup=sizes.warmup)
  table.rows += ratio_rows(res, next(iter(res)), TARGET)
  return [table]
