r"""Panigrahi, Chen & Kuo (2018): BatchNorm and the skip path confine the gradient variance.

``python -m experiments.reproduce --paper=panigrahi --scale=cpu --workdir=results/panigrahi``

Study function: ``jaxnorm.studies.panigrahi.run``. Parts (each resumable):

- ``init``: the variance of dL/d(skip path) per block at initialization, for each depth of
  ``init.depths``, in a one-stage pre-activation ResNet with BatchNorm and without normalization
  and in plain (no-skip) BatchNorm and unnormalized MLPs, beside
  ``jaxnorm.diagnostics.theory``: polynomial in depth with BN + skip, exponential without.
- ``training``: ``training.variants`` trained on real data (the embedded digits set), the
  per-block gradient variance measured on a fixed training batch at every checkpoint.
- ``depth_width``: ResNets of ``depth_width.shapes`` (blocks per stage, width) at about the same
  parameter count, trained alike: the abstract's "shallower yet wider" claim.

Scales: ``smoke`` (seconds), ``cpu`` (minutes on 2 cores; the numbers of REPRODUCTION.md),
``full`` (CIFAR-10, the paper's likely setting: a reconstruction, since the paper's text and code
are not public; not run here).
"""

from __future__ import annotations

import ml_collections

from jaxnorm.studies.harness import check_scale, training_base


def _train_base(scale: str) -> ml_collections.ConfigDict:
  t = training_base(scale)
  t.optimizer.learning_rate = 0.05
  return t


def get_config(scale: str = 'cpu') -> ml_collections.ConfigDict:
  """The study config at ``scale`` ('smoke', 'cpu' or 'full')."""
  check_scale('panigrahi', scale)
  c = ml_collections.ConfigDict()
  c.paper = 'panigrahi'
  c.study = 'jaxnorm.studies.panigrahi'
  c.scale = scale
  c.seed = 0
  c.train = _train_base(scale)
  c.init = ml_collections.ConfigDict({
      'depths': (10, 25, 50, 100), 'width': 16, 'mlp_width': 256, 'image_size': 8,
      'batch_size': 64})
  c.training = ml_collections.ConfigDict({
      # name -> (model factory keywords); MLPs of `depth` blocks / layers on the flattened digits.
      'variants': ml_collections.ConfigDict({
          'bn_skip': {'name': 'ResidualMLP', 'norm': 'batch_norm'},
          'none_skip': {'name': 'ResidualMLP', 'norm': 'none'},
          'bn_plain': {'name': 'MLP', 'norm': 'batch_norm'},
      }),
      'depth': 30, 'width': 128, 'steps': 400, 'checkpoints': 4,
      'learning_rates': ml_collections.ConfigDict(
          {'bn_skip': 0.05, 'none_skip': 1e-4, 'bn_plain': 0.05}),
  })
  c.depth_width = ml_collections.ConfigDict({
      # (blocks per stage, width) of 3-stage CIFAR ResNets at about 0.1M parameters.
      'shapes': ((1, 24), (3, 15), (9, 9), (18, 6)),
      'steps': 300, 'learning_rate': 0.1, 'batch_size': 64,
  })
  if scale == 'smoke':
    c.init.update(depths=(2, 4), width=4, mlp_width=16, batch_size=16)
    c.training.update(depth=4, width=16, steps=4, checkpoints=2)
    c.training.variants = ml_collections.ConfigDict(
        {'bn_skip': {'name': 'ResidualMLP', 'norm': 'batch_norm'}})
    c.depth_width.update(shapes=((1, 4),), steps=2)
    c.train.log_every = 2
  elif scale == 'full':
    c.init.update(depths=(10, 30, 100, 300, 1000), width=64, mlp_width=1024, image_size=32,
                  batch_size=256)
    c.training.update(depth=100, width=512, steps=20_000, checkpoints=10)
    c.depth_width.update(shapes=((3, 64), (9, 38), (18, 27), (54, 16)), steps=64_000,
                         batch_size=128)
  return c
