r"""De & Smith (2020): BatchNorm downscales residual branches; SkipInit trains without it.

``python -m experiments.reproduce --paper=skipinit --scale=cpu --workdir=results/skipinit``

Study function: ``jaxnorm.studies.skipinit.run``. Parts (each resumable):

- ``ratio``: the residual-branch / skip-path std ratio per block at initialization, for a
  one-stage pre-activation ResNet and a residual MLP, BatchNorm vs no normalization, beside the
  ``1/sqrt(l)`` law (``jaxnorm.diagnostics.theory.residual_skip_moments``).
- ``ladder``: train every variant of ``variants`` at each depth of ``ladder.depths`` (Wide-ResNets,
  ``6n + 4``) over the learning-rate grid ``ladder.learning_rates`` (powers of 2, as the paper):
  which train, which diverge, and the best test accuracy.
- ``batch``: BatchNorm, ghost BatchNorm and SkipInit(0) over ``batch.batch_sizes`` x
  ``batch.learning_rates`` at a fixed epoch budget: BatchNorm's advantage (and its larger optimal
  learning rate) should appear only at large batch.
- ``baselines``: Regularized SkipInit (no normalization layer at all; SkipInit + biases + dropout)
  and Fixup (Zhang, Dauphin & Ma 2019) at the ladder's first depth.

Scales: ``smoke`` (seconds: one tiny depth, two variants, a few steps), ``cpu`` (the embedded
digits set, depths 16 and 100, about 20 minutes on 2 cores), ``full`` (the paper's CIFAR-10 depth
table with depths 16 / 100 / 1000 and the ImageNet ResNet-50-V2 batch-size table; needs an
accelerator and the TFDS data sets; not run here). The Wide-ResNet width (``widen``) of the paper's
CIFAR-10 table is not recoverable (2 or 4); ``full`` uses 2, a reconstruction.
"""

from __future__ import annotations

import ml_collections

from jaxnorm.studies.harness import check_scale, training_base

VARIANTS = {
    'batch_norm': {'norm': 'batch_norm'},
    'skip_init_0': {'norm': 'none', 'skip_init': 0.0},
    'skip_init_inv_sqrt_depth': {'norm': 'none', 'skip_init': 'inv_sqrt_depth'},
    'skip_init_1': {'norm': 'none', 'skip_init': 1.0},
    'divide_by_sqrt2': {'norm': 'none', 'block_scale': 0.5 ** 0.5},
    'ghost_batch_norm': {'norm': 'ghost_batch_norm'},
    'regularized_skip_init': {'norm': 'none', 'regularized': True},
    'fixup': {'norm': 'none', 'fixup': True},
    'skip_init_biases': {'norm': 'none', 'skip_init': 0.0, 'conv_bias': True},
    'fixup_dropout': {'norm': 'none', 'fixup': True, 'dropout_rate': 0.2},
}


def _train_base(scale: str) -> ml_collections.ConfigDict:
  """The studies' training base (``training_base``) with checkpoints every 100 steps, 2 kept."""
  t = training_base(scale)
  t.checkpoint_every = 1000 if scale == 'full' else 100
  t.keep_checkpoints = 2
  return t


def get_config(scale: str = 'cpu') -> ml_collections.ConfigDict:
  """The study config at ``scale`` ('smoke', 'cpu' or 'full')."""
  check_scale('skipinit', scale)
  c = ml_collections.ConfigDict()
  c.paper = 'skipinit'
  c.study = 'jaxnorm.studies.skipinit'
  c.scale = scale
  c.seed = 0
  c.variants = ml_collections.ConfigDict(VARIANTS)
  c.train = _train_base(scale)
  c.model = ml_collections.ConfigDict({'name': 'wide_resnet', 'widen': 1, 'base_width': 8})

  c.ratio = ml_collections.ConfigDict(
      {'blocks': 100, 'width': 16, 'mlp_width': 256, 'image_size': 8, 'batch_size': 64})
  c.ladder = ml_collections.ConfigDict({
      'depths': (16, 100),
      'variants': ('batch_norm,skip_init_0,skip_init_inv_sqrt_depth,skip_init_1,'
                   'divide_by_sqrt2'),
      'learning_rates': (2.0 ** -4, 2.0 ** -2, 2.0 ** 0),
      'steps': 300,
  })
  c.batch = ml_collections.ConfigDict({
      'depth': 16,
      'variants': 'batch_norm,ghost_batch_norm,skip_init_0',
      'batch_sizes': (32, 128, 512),
      'learning_rates': (2.0 ** -5, 2.0 ** -3, 2.0 ** -1, 2.0 ** 1),
      'epochs': 4.0,
  })
  c.baselines = ml_collections.ConfigDict({
      'variants': 'regularized_skip_init,fixup'})
  c.imagenet = ml_collections.ConfigDict({'enabled': False})

  if scale == 'smoke':
    c.model.base_width = 4
    c.ratio.update(blocks=6, width=4, mlp_width=32, batch_size=16)
    c.ladder.update(depths=(10,), variants='batch_norm,skip_init_0',
                    learning_rates=(2.0 ** -2,), steps=4)
    # The batch grid's one run is the ladder's BatchNorm run (4 steps of 64): trained once.
    c.batch.update(depth=10, variants='batch_norm', batch_sizes=(64,),
                   learning_rates=(2.0 ** -2,), epochs=0.17)
    c.baselines.update(variants='regularized_skip_init')
    c.train.log_every = 2
    c.train.checkpoint_every = 4
  elif scale == 'full':
    # CIFAR-10 depth table (Table 1 of the paper): WRN-d-2, batch 64, 200 epochs of 50,000.
    c.model.update(widen=2, base_width=16)
    c.ratio.update(blocks=1000, width=16, mlp_width=1000, image_size=32, batch_size=256)
    c.ladder.update(depths=(16, 100, 1000),
                    variants=('batch_norm,skip_init_0,skip_init_inv_sqrt_depth,skip_init_1,'
                              'divide_by_sqrt2'),
                    learning_rates=tuple(2.0 ** k for k in range(-5, 1)),
                    steps=200 * 50_000 // 64)
    c.batch.update(depth=16, batch_sizes=tuple(2 ** k for k in range(4, 13)),
                   learning_rates=tuple(2.0 ** k for k in range(-7, 3)), epochs=50.0)
    c.baselines.update(variants='regularized_skip_init,fixup,skip_init_biases')
    # ImageNet ResNet-50-V2 batch-size table: 90 epochs, lr 0.1 x batch / 256 (a
    # reconstruction), 5 epochs of warm-up.
    c.imagenet = ml_collections.ConfigDict({
        'enabled': True,
        'variants': 'batch_norm,fixup,skip_init_biases,fixup_dropout,regularized_skip_init',
        'batch_sizes': (256, 1024, 4096), 'epochs': 90, 'base_learning_rate': 0.1,
        'warmup_epochs': 5, 'train_examples': 1_281_167, 'image_size': 224})
  return c
