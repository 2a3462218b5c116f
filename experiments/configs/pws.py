r"""Liu, Ge, Li & Gui (2021): the shift of the average gradient, and PWS that removes it.

``python -m experiments.reproduce --paper=pws --scale=cpu --workdir=results/pws``

Study function: ``jaxnorm.studies.pws.run``. Parts (each resumable):

- ``accuracy``: the PWS ResNet (ReLU-first basic blocks, ``jaxnorm.models.pws_nets.pws_net``)
  trained with each normalization of ``accuracy.variants`` (PWS, BatchNorm, GroupNorm, WS +
  GroupNorm, Scaled WS) and each seed of ``accuracy.seeds``: final test accuracy (mean over the
  seeds), beside the paper's CIFAR-10 ResNet-34 numbers.
- ``batch``: PWS, BatchNorm and GroupNorm at each batch size of ``batch.batch_sizes`` for a fixed
  number of epochs (learning rate scaled with the batch), and the exact check that a sample's
  PWS output does not depend on the rest of its batch.
- ``shift``: a network without normalization and the PWS network trained at the learning rates of
  ``shift.runs`` (constant schedule); at every checkpoint, per conv layer, the shift
  ``Var_o(n mean(W_o))`` of the kernel the conv applies and the share of the raw kernel's
  gradient along each filter's all-ones direction (``jaxnorm.diagnostics.filter_mean_statistics``).
- ``gain``: at initialization, the per-filter sum of squares of PWS kernels of the layer shapes of
  ``gain.shapes`` for each gamma and fan mode, beside ``(2 n / fan) alpha^2 sigma^2 / (sigma^2 +
  gamma)``.
- ``gamma``: PWS trained at each (gamma, fan mode) of ``gamma.runs``.
- ``imagenet`` (``full`` only): the ImageNet ResNet-50 table (BN, PWS, GN).

Weight decay (``optimizer.decay_mask``, ``jaxnorm.training.optim.DECAY_MASKS``): ``full`` is the
official recipe, so it uses ``'all_but_alpha'``: the official code puts PWS's alpha in a parameter
group with weight decay 0 and decays every other parameter (kernels, PWS biases, GroupNorm and
BatchNorm affines). ``smoke`` and ``cpu`` keep the package default ``'kernels'`` (kernels only),
the convention of the other studies, so their runs compare normalizations, not decay masks.

Scales: ``smoke`` (seconds: a one-block network, three runs of a few steps), ``cpu`` (the embedded
digits set and a 3-stage, 16-wide PWS ResNet; 14 minutes on 2 cores shared with other jobs),
``full`` (the official recipes: CIFAR-10 ResNet-34, 200 epochs, batch 128, SGD lr 0.1 x 0.1 at
epochs 100 and 150, weight decay 5e-4, gamma 1e-3; ImageNet ResNet-50, 100 epochs, batch 64, lr
0.025 x 0.1 at 30, 60, 90, weight decay 1e-4, gamma 1e-4 with data-dependent alpha; needs an
accelerator and the TFDS data sets; not run here).
"""

from __future__ import annotations

import ml_collections

from jaxnorm.studies.harness import check_scale, training_base

# name -> model keywords on top of `model` (jaxnorm.models.pws_nets.pws_net). The official
# BatchNorm baseline on CIFAR zero-initializes the last BN of each branch.
VARIANTS = {
    'pws': {'norm': 'pws'},
    'batch_norm': {'norm': 'batch_norm', 'zero_init_residual': True},
    'group_norm': {'norm': 'group_norm'},
    'ws': {'norm': 'ws'},
    'scaled_ws': {'norm': 'scaled_ws'},
    'none': {'norm': 'none'},
}


def _train_base(scale: str) -> ml_collections.ConfigDict:
  """The studies' training base with the official schedule shape: x0.1 at 1/2 and 3/4 of training.

  ``full``: the official CIFAR-10 recipe (batch 128, lr 0.1, momentum 0.9, weight decay 5e-4 on
  every parameter but PWS's alpha, 200 epochs, x0.1 at epochs 100 and 150).
  """
  t = training_base(scale)
  t.optimizer.learning_rate = 0.1
  t.optimizer.decay_mask = 'all_but_alpha' if scale == 'full' else 'kernels'
  t.schedule.name = 'step'
  t.schedule.step_boundaries = (0.5, 0.75)
  t.schedule.step_decay = 0.1
  t.checkpoint_every = 1000
  t.keep_checkpoints = 2
  if scale == 'full':
    t.batch_size = 128
    t.checkpoint_every = 5000
  return t


def get_config(scale: str = 'cpu') -> ml_collections.ConfigDict:
  """The study config at ``scale`` ('smoke', 'cpu' or 'full')."""
  check_scale('pws', scale)
  c = ml_collections.ConfigDict()
  c.paper = 'pws'
  c.study = 'jaxnorm.studies.pws'
  c.scale = scale
  c.seed = 0
  c.variants = ml_collections.ConfigDict(VARIANTS)
  c.train = _train_base(scale)
  # pws_net keywords shared by every run; GroupNorm with 2 channels per group in the first stage
  # (as GroupNorm(32) on the official width 64).
  c.model = ml_collections.ConfigDict({
      'name': 'jaxnorm.models.pws_nets:pws_net', 'stage_sizes': (1, 1, 1), 'width': 16,
      'pws_gamma': 1e-3, 'pws_mode': 'fan_in', 'group_norm_groups': 8})
  c.accuracy = ml_collections.ConfigDict({
      'variants': 'pws,batch_norm,group_norm,ws,scaled_ws', 'epochs': 6.0,
      'seeds': (0, 1),  # the claim uses the mean over seeds
      'tolerance': 1.0,  # accuracy points: "matches" within this, on 297 test digits
  })
  c.batch = ml_collections.ConfigDict({
      'variants': 'pws,batch_norm,group_norm', 'batch_sizes': (1, 2, 8, 64, 128), 'epochs': 6.0,
      'reference_batch': 64,  # lr = train lr * batch / reference_batch
      'tolerance': 2.0, 'probe_batch': 16,
  })
  c.shift = ml_collections.ConfigDict({
      # (variant, learning rate): a net without normalization at a moderate and a high rate,
      # PWS at the high one.
      'runs': (('none', 0.1), ('none', 0.4), ('pws', 0.4)),
      'schedule': 'constant', 'steps': 400, 'checkpoints': 40, 'measure_batch': 256,
  })
  c.gain = ml_collections.ConfigDict({
      # (C_in, C_out) of 3x3 conv layers: square layers of growing width (fan_in 144 .. 4608),
      # a stage transition and the digits stem.
      'shapes': ((16, 16), (64, 64), (256, 256), (512, 512), (16, 32), (1, 16)),
      'gammas': (1e-5, 1e-4, 1e-3, 1e-2, 1e-1), 'modes': ('fan_in', 'fan_out'),
  })
  c.gamma = ml_collections.ConfigDict({
      'runs': ((1e-5, 'fan_in'), (1e-4, 'fan_in'), (1e-3, 'fan_in'), (1e-2, 'fan_in'),
               (1e-1, 'fan_in'), (1e-3, 'fan_out')),
      'tolerance': 1.0,
  })
  c.imagenet = ml_collections.ConfigDict({'enabled': False})

  if scale == 'smoke':
    # Three runs of 4 steps: PWS and BatchNorm (accuracy; the batch grid's one size and the
    # shift's PWS run and the gamma sweep's one point are the same PWS run), and the network
    # without normalization.
    c.model.update(stage_sizes=(1,), width=4, group_norm_groups=2)
    c.accuracy.update(variants='pws,batch_norm', epochs=0.17, seeds=(0,))
    c.batch.update(variants='pws,batch_norm', batch_sizes=(64,), epochs=0.17, probe_batch=4)
    c.shift.update(runs=(('none', 0.1), ('pws', 0.1)), schedule='step', steps=4, checkpoints=2,
                   measure_batch=32)
    c.gain.update(shapes=((16, 16), (64, 64)), gammas=(1e-5, 1e-3, 1e-1))
    c.gamma.update(runs=((1e-3, 'fan_in'),))
    c.train.log_every = 2
    c.train.checkpoint_every = 2
    c.train.keep_checkpoints = 3
  elif scale == 'full':
    # The official CIFAR-10 ResNet-34 (pws_resnet(34)): widths 64..512, GroupNorm(32).
    c.model.update(stage_sizes=(3, 4, 6, 3), width=64, group_norm_groups=32)
    c.accuracy.update(epochs=200.0, seeds=(0,), tolerance=0.5)
    # Multiples of 8 (the batch is split over 8 devices); 50 epochs, lr 0.1 x batch / 128.
    c.batch.update(batch_sizes=(8, 16, 32, 64, 128), epochs=50.0, reference_batch=128,
                   tolerance=1.0, probe_batch=64)
    c.shift.update(steps=20 * 50_000 // 128, checkpoints=10, measure_batch=500)
    c.gain.update(shapes=((64, 64), (128, 128), (256, 256), (512, 512), (64, 128), (3, 64)))
    c.gamma.update(runs=tuple((g, m) for m in ('fan_in', 'fan_out')
                              for g in (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)), tolerance=0.5)
    # The official ImageNet ResNet-50 (pws_resnet(50)): PWS gamma 1e-4, fan_in, data-dependent
    # alpha; batch 64 on one GPU, lr 0.025, x0.1 at epochs 30, 60, 90 of 100, weight decay 1e-4.
    c.imagenet = ml_collections.ConfigDict({
        'enabled': True, 'variants': 'batch_norm,pws,group_norm', 'epochs': 100,
        'batch_size': 64, 'learning_rate': 0.025, 'weight_decay': 1e-4,
        'step_boundaries': (0.3, 0.6, 0.9), 'train_examples': 1_281_167, 'image_size': 224})
  return c
