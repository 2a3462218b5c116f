"""Quickstart: a small BatchNorm ResNet on the embedded digits set (offline, CPU).

Launch::

  python experiments/train.py --config=experiments/configs/quickstart.py:smoke \
      --workdir=/tmp/jaxnorm/quickstart

``smoke`` is a laptop-sized run (well under a minute on 2 CPU cores, test accuracy far above the
10% of chance); no argument runs the longer default.
"""

from __future__ import annotations

from jaxnorm.training.config import default_config


def get_config(arg: str = ''):
  """Returns the quickstart config; ``arg='smoke'`` for the short run."""
  c = default_config()
  c.dataset = 'digits'
  c.augment = False
  c.model.name = 'cifar_resnet'
  c.model.depth = 8
  c.model.norm = 'batch_norm'
  c.batch_size = 64
  c.eval_batch_size = 304  # 297 test images in one padded batch; a multiple of 8 devices.
  c.optimizer.name = 'sgd'
  c.optimizer.learning_rate = 0.05
  c.optimizer.momentum = 0.9
  c.optimizer.nesterov = True
  c.optimizer.weight_decay = 5e-4
  c.schedule.name = 'cosine'
  c.schedule.warmup_steps = 10
  c.total_steps = 600
  c.log_every = 20
  c.eval_every = 200
  c.checkpoint_every = 200
  if arg == 'smoke':
    c.total_steps = 120
    c.log_every = 10
    c.eval_every = 60
    c.checkpoint_every = 60
  elif arg:
    raise ValueError(f"quickstart.get_config: argument `arg` expected '' or 'smoke', got {arg!r}.")
  return c
