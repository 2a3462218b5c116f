r"""Cabana & Lago-Fernandez (2021): Backward Gradient Normalization in very deep plain MLPs.

``python -m experiments.reproduce --paper=bgn --scale=cpu --workdir=results/bgn``

Study function: ``jaxnorm.studies.bgn.run``. Parts (each resumable):

- ``init``: the norm of ``dL/dW_l`` (``jax.grad`` of the cross-entropy with respect to each hidden
  layer's ``dense`` kernel, float64) at initialization, for each depth of ``init.depths`` and each
  activation, with and without BGN (the same parameters: the node has none), and for every
  reconstruction choice of ``variants`` at ``init.variant_depth``.
- ``ladder``: plain MLPs trained on real data, with and without BGN, for each data set, depth and
  activation; each arm over its own learning-rate grid (BGN rescales the gradient, so a shared
  learning rate would compare step sizes, not methods). The per-layer gradient norms are measured
  on a fixed training batch at every checkpoint of the runs of ``ladder.gradient_depth``.
- ``choices``: the same comparison for every reconstruction choice of ``variants`` (norm axes,
  target, every-k placement, pre- vs post-activation) at one data set, depth and activation.

The paper's body is not public: depths, widths, data sets, optimizer, learning rates and BGN's
details are a reconstruction (docs/papers/bgn.md), which is why each BGN choice is a variant.

Scales: ``smoke`` (seconds), ``cpu`` (minutes on 2 cores: the embedded digits and the 5,000-image
MNIST subset), ``full`` (MNIST and CIFAR-10, the paper's likely setting: a reconstruction, not run
here).
"""

from __future__ import annotations

import ml_collections

from jaxnorm.studies.harness import check_scale, training_base

# BGN reconstruction choices (MLP keywords, see jaxnorm.models.MLP); each is trained over the BGN
# learning-rate grid times its factor in `lr_factors`.
VARIANTS = {
    'bgn': {'bgn': 'layer'},
    'per_batch': {'bgn': 'layer', 'bgn_mode': 'per_batch'},
    'unit': {'bgn': 'layer', 'bgn_target': 'unit'},
    'every_k': {'bgn': 'layer', 'bgn_every': 5},
    'pre': {'bgn': 'layer', 'bgn_position': 'pre'},
}


def _train_base(scale: str) -> ml_collections.ConfigDict:
  """The studies' training base (``training_base``): no weight decay, no augmentation (flattened
  images into an MLP), the loss logged every 100 steps (500 at ``full``, batch 128)."""
  t = training_base(scale)
  t.augment = False
  t.optimizer.weight_decay = 0.0
  t.optimizer.learning_rate = 0.1
  t.log_every = 100
  if scale == 'full':
    t.batch_size = 128
    t.log_every = 500
  return t


def get_config(scale: str = 'cpu') -> ml_collections.ConfigDict:
  """The study config at ``scale`` ('smoke', 'cpu' or 'full')."""
  check_scale('bgn', scale)
  c = ml_collections.ConfigDict()
  c.paper = 'bgn'
  c.study = 'jaxnorm.studies.bgn'
  c.scale = scale
  c.seed = 0
  c.width = 64
  c.train = _train_base(scale)
  c.variants = ml_collections.ConfigDict({k: dict(v) for k, v in VARIANTS.items()})
  c.init = ml_collections.ConfigDict({
      'dataset': 'digits', 'batch_size': 64, 'depths': (10, 30, 100),
      'activations': ('sigmoid', 'tanh', 'relu'), 'variant_depth': 30,
      'variant_activation': 'sigmoid'})
  c.ladder = ml_collections.ConfigDict({
      'datasets': ('digits', 'mnist_subset'),
      # per data set, in the order of `datasets`: depths, activations, training steps
      'depths': ((10, 30), (10,)),
      'activations': (('sigmoid', 'tanh', 'relu'), ('sigmoid',)),
      'steps': (1500, 800),
      # Each arm's own grid: plain SGD's usual range; BGN's gradient has a per-sample norm of
      # sqrt(width) at every hidden layer (a sum, not a mean, over the batch), and its best
      # learning rate moves with the activation's derivative, so its grid is lower and wider.
      # Both grids span four decades, so that no arm's best rate is chosen at an end of its grid
      # (sigmoid networks want larger steps than ReLU ones).
      'learning_rates': ml_collections.ConfigDict(
          {'none': (1.0, 0.1, 0.01, 0.001), 'bgn': (1e-2, 1e-3, 1e-4, 1e-5)}),
      'checkpoints': 4, 'gradient_depth': 30})
  c.choices = ml_collections.ConfigDict({
      'dataset': 'digits', 'depth': 10, 'activation': 'sigmoid',
      'variants': ('per_batch', 'unit', 'every_k', 'pre'),
      # the BGN grid's values tried for each choice (times its lr factor)
      'learning_rates': (1e-2, 1e-3, 1e-4)})
  if scale == 'smoke':
    c.width = 16
    c.variants = ml_collections.ConfigDict({k: dict(VARIANTS[k]) for k in ('bgn', 'per_batch')})
    c.variants.every_k = {'bgn': 'layer', 'bgn_every': 2}
    c.init.update(batch_size=16, depths=(3,), activations=('sigmoid',), variant_depth=3)
    c.ladder.update(datasets=('digits',), depths=((3,),), activations=(('sigmoid',),),
                    steps=(4,), checkpoints=1, gradient_depth=3)
    c.ladder.learning_rates = ml_collections.ConfigDict({'none': (0.1,), 'bgn': (1e-3,)})
    c.choices.update(depth=3, variants=('per_batch',), learning_rates=(1e-3,))
    c.train.log_every = 2
  elif scale == 'full':
    c.width = 512
    c.train.dataset = 'mnist'
    c.init.update(dataset='mnist', batch_size=128, depths=(10, 30, 50, 100, 200),
                  variant_depth=100)
    c.ladder.update(datasets=('mnist', 'cifar10'), depths=((10, 30, 50, 100), (10, 30, 50, 100)),
                    activations=(('sigmoid', 'tanh', 'relu'), ('sigmoid', 'tanh', 'relu')),
                    steps=(20 * 60_000 // 128, 40 * 50_000 // 128), checkpoints=10,
                    gradient_depth=100)
    c.ladder.learning_rates = ml_collections.ConfigDict(
        {'none': (0.1, 0.03, 0.01, 0.003), 'bgn': (1e-3, 1e-4, 1e-5, 1e-6)})
    c.choices.update(dataset='mnist', depth=30, learning_rates=(1e-3, 1e-4, 1e-5, 1e-6))
  # a 'unit' target gives each hidden layer's gradient 1/sqrt(width) of the default norm
  c.lr_factors = ml_collections.ConfigDict(
      {'bgn': 1.0, 'per_batch': 1.0, 'unit': c.width ** 0.5, 'every_k': 1.0, 'pre': 1.0})
  return c
