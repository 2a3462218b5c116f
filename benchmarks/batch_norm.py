"""Section 1: jaxnorm ``BatchNorm`` (closed-form and autodiff backward) vs ``flax.linen.BatchNorm``.

Train-mode forward + backward of the layer alone (gradients with respect to the input, scale and
bias of ``sum(w * bn(x))`` for a fixed random cotangent ``w``) and inside a ResNet-20 SGD step
where only the norm layer class differs (convs are ``flax.linen.Conv`` everywhere).
Target: jaxnorm <= 1.00x flax in time; less XLA peak memory with the closed-form backward.

See BENCHMARKS.md, section 1 (the closed-form BatchNorm backward of jaxnorm.functional.batch_norm).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from benchmarks.common import Sizes, cifar_batch, new_table, ratio_rows, train_step_candidate
from benchmarks.resnet20 import SwappableResNet, factory
from benchmarks.timing import Table, interleaved
from jaxnorm.linen import BatchNorm

TARGET = 1.00

REFERENCE = 'flax nn.BatchNorm (two-pass variance)'
NORMS = {
  'flax nn.BatchNorm': factory(nn.BatchNorm, momentum=0.9),
  # The like-for-like reference: jaxnorm always uses the centred two-pass variance.
  REFERENCE: factory(nn.BatchNorm, momentum=0.9, use_fast_variance=False),
  'jaxnorm BatchNorm (closed-form bwd)': factory(BatchNorm, momentum=0.9),
  'jaxnorm BatchNorm (autodiff bwd)': factory(BatchNorm, momentum=0.9, closed_form_backward=False),
}
BASELINE = 'flax nn.BatchNorm'


def _layer_candidate(make, x):
  layer = make(use_running_average=False)
  variables = layer.init(jax.random.PRNGKey(0), x)
  w = jax.random.normal(jax.random.PRNGKey(1), x.shape, x.dtype)

  def fwd_bwd(params, stats, x, w):
    def loss(p, x):
      y, _ = layer.apply({'params': p, 'batch_stats': stats}, x, mutable=['batch_stats'])
      return jnp.sum(w * y)

    return jax.grad(loss, argnums=(0, 1))(params, x)

  return fwd_bwd, (variables['params'], variables['batch_stats'], x, w)


def _without_reference_verdict(rows):
  """The two-pass flax row is a reference point, not a candidate: blank its verdict."""
  return [r[:-1] + [''] if r[0].endswith(REFERENCE) else r for r in rows]


def run(sizes: Sizes) -> list[Table]:
  """Both tables of section 1."""
  shapes = ([(4, 8, 8, 4)] if sizes.smoke else
            [(128, 32, 32, 16), (128, 8, 8, 64), (256, 1024)])
  layer = new_table('1a. BatchNorm layer alone: train-mode forward + backward', sizes, [
    'One jitted call = forward in training mode + gradients w.r.t. x, scale and bias.',
    'x baseline = median time / median time of flax nn.BatchNorm on the same shape, same run; '
    f'target <= {TARGET:.2f}x, and less peak memory for the closed-form backward.',
    'XLA peak MiB = compiled.memory_analysis() of the jitted function (arguments + outputs + '
    'temporaries), which includes the input and its gradient.',
    f'{REFERENCE}: flax with use_fast_variance=False, the same centred two-pass variance as '
    'jaxnorm (flax\'s default E[x^2] - E[x]^2 reads x once less and loses precision on offset '
    'inputs); it carries no target.',
  ])
  for shape in shapes:
    x = jax.random.normal(jax.random.PRNGKey(2), shape, jnp.float32) * 2.0 + 0.5
    res = interleaved({n: _layer_candidate(m, x) for n, m in NORMS.items()},
                      repeats=sizes.repeats * 4, warmup=sizes.warmup)
    layer.rows += _without_reference_verdict(ratio_rows(res, BASELINE, TARGET, label=f'{shape}: '))

  x, y = cifar_batch(sizes.batch, sizes.image)
  model_res = interleaved(
    {n: train_step_candidate(SwappableResNet(sizes.resnet20, sizes.width,
                                             conv=factory(nn.Conv, use_bias=False), norm=m), x, y)
     for n, m in NORMS.items()}, repeats=sizes.repeats, warmup=sizes.warmup)
  step = new_table(f'1b. BatchNorm inside a ResNet-20 SGD step (batch {sizes.batch})', sizes, [
    'Same ResNet-20 (flax nn.Conv convs, SGD momentum 0.9), only the BatchNorm class differs.',
    f'Target <= {TARGET:.2f}x flax in time.',
  ])
  step.rows += _without_reference_verdict(ratio_rows(model_res, BASELINE, TARGET))
  return [layer, step]
