r"""Bjorck, Gomes, Selman & Weinberger (2018): BatchNorm helps because it allows larger steps.

``python -m experiments.reproduce --paper=bjorck --scale=cpu --workdir=results/bjorck``

Study function: ``jaxnorm.studies.bjorck.run``. Parts (each resumable):

- ``train``: the CIFAR ResNet with BatchNorm at ``runs.bn_learning_rates`` (the paper's 0.1,
  0.003 and 0.0001) and without at ``runs.none_learning_rates`` (the paper's 0.0001, and 0.1,
  the rate BN allows, at which it diverges), the rate divided by 10 at half of training: with
  the small rate BatchNorm brings no gain, the gain comes from the larger rate it allows.
- ``sweep``: the relative loss ``L_B(theta - eta grad L_B(theta)) / L_B(theta)`` on training
  mini-batches ``measure.sweep_batches`` (1, 4, 7; theta = the parameters reached there when
  training at each network's own rate), eta on a log grid from ``measure.lo`` to ``measure.hi``
  (the paper's 1e-5 .. 1e-1, extended to 10 to find where BN diverges): the divergence step size
  (relative loss > 1e3) with and without BatchNorm.
- ``init``: at initialization, on the first training mini-batch: channel means and variances at
  three depths (``measure.layers``: layers 8, 44 and 80 of ResNet-110, proportional depths for
  other depths) as the parameters move along one gradient step of size ``measure.step_size``;
  channel mean and std at every block; dL/dlogits over a batch of ``measure.logit_batch``;
  the gradients of the middle block's first conv.
- ``spectra``: singular values of products of 1, 3, 5 Gaussian matrices beside the theory's
  largest one, and the layer-Jacobian spectra of the first stage of the networks.
- ``last``: BatchNorm in the last ``last.blocks`` blocks only (``ResNet.norm_last_blocks``):
  its divergence step size and its training at ``last.learning_rates``.

Scales: ``smoke`` (seconds: a 3-block ResNet-8, 3-step runs), ``cpu`` (ResNet-56, width 8, on
the embedded digits set; about 10 minutes on 2 cores), ``full`` (ResNet-110 on CIFAR-10 with
the paper's learning rates; needs an accelerator and the TFDS data set; not run here). The
number of epochs and the weight decay of the paper's runs are not known: ``full`` takes He et
al.'s 64,000 steps of batch 128 (about 164 epochs) and the library default 5e-4, reconstructions.
"""

from __future__ import annotations

import ml_collections

from jaxnorm.studies.harness import check_scale, training_base


def _train_base(scale: str) -> ml_collections.ConfigDict:
  """The studies' training base (``training_base``) with He et al.'s CIFAR recipe: batch 128, the
  rate divided by 10 at half of training, one checkpoint at the end."""
  t = training_base(scale)
  t.batch_size = 128
  t.schedule.name = 'step'
  t.schedule.step_boundaries = (0.5,)
  t.schedule.step_decay = 0.1
  t.total_steps = 200
  t.log_every = 10
  t.checkpoint_every = 200
  t.keep_checkpoints = 2
  if scale == 'full':
    t.total_steps = 64_000
    t.log_every = 100
    t.checkpoint_every = 2000
  return t


def get_config(scale: str = 'cpu') -> ml_collections.ConfigDict:
  """The study config at ``scale`` ('smoke', 'cpu' or 'full')."""
  check_scale('bjorck', scale)
  c = ml_collections.ConfigDict()
  c.paper = 'bjorck'
  c.study = 'jaxnorm.studies.bjorck'
  c.scale = scale
  c.seed = 0
  c.train = _train_base(scale)
  # He et al.'s CIFAR ResNet (post-activation 'v1', projection shortcuts), 6n + 2 layers.
  c.model = ml_collections.ConfigDict({'depth': 56, 'width': 8, 'style': 'v1'})
  c.runs = ml_collections.ConfigDict({
      'bn_learning_rates': (0.1, 0.003, 0.0001),
      # 0.1 too: the rate BN allows, which the unnormalized net cannot take (it diverges fast).
      'none_learning_rates': (0.0001, 0.1),
  })
  c.measure = ml_collections.ConfigDict({
      'sweep_batches': (1, 4, 7),  # 1-based training mini-batches
      # The rate of the training steps that reach them: each network's own (the paper's).
      'trajectory_rates': ml_collections.ConfigDict({'bn': 0.1, 'none': 0.0001, 'last': 0.1}),
      'lo': 1e-5, 'hi': 10.0, 'num': 25, 'threshold': 1e3,
      'layers': (8, 44, 80),  # of ResNet-110 (109 conv layers); proportional at other depths
      'step_size': 0.1,  # the gradient step the activations are followed along
      'fractions': 11,
      'logit_batch': 128,
      'histogram_values': 4096,
  })
  c.spectra = ml_collections.ConfigDict({
      'size': 400, 'num_matrices': (1, 3, 5), 'num_samples': 4, 'jacobian_batch': 16,
      'jacobian_blocks': 9, 'jacobian_crop': 8,
  })
  c.last = ml_collections.ConfigDict({'blocks': (9,), 'learning_rates': (0.1, 0.003)})

  if scale == 'smoke':
    c.model.update(depth=8, width=4)
    c.train.update(batch_size=16, total_steps=3, log_every=1, checkpoint_every=3)
    # Two runs at one rate (each run compiles its own step): the training claims' code runs,
    # their numbers mean nothing at 3 steps.
    c.runs.update(bn_learning_rates=(0.1,), none_learning_rates=(0.1,))
    c.measure.update(sweep_batches=(1,), num=9, fractions=3, logit_batch=16,
                     histogram_values=256)
    c.spectra.update(size=32, num_samples=1, jacobian_batch=16, jacobian_blocks=1)
    c.last.update(blocks=(), learning_rates=())  # ResNet.norm_last_blocks has its own tests
  elif scale == 'full':
    c.model.update(depth=110, width=16)
    c.measure.update(hi=10.0, num=25, fractions=21)
    c.spectra.update(size=1000, num_samples=4, jacobian_batch=8, jacobian_blocks=18)
    # BatchNorm in the last stage (18 blocks) or the last 6 blocks of ResNet-110 only.
    c.last.update(blocks=(18, 6), learning_rates=(0.1, 0.003))
  return c
