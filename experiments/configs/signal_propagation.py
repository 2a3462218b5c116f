r"""Signal propagation at initialization under every normalization (the `make demo` job).

Launch::

  python experiments/signal_propagation.py                                   # the demo
  python experiments/signal_propagation.py --config=experiments/configs/signal_propagation.py:small
  python experiments/signal_propagation.py --config.norms=batch_norm,none --config.resnet.blocks=30

``get_config()`` is the demo (a 100-block pre-activation ResNet of width 8 on 8x8 inputs and a
100-block residual MLP of width 128, batch 32, about a minute on 2 CPU cores); ``'small'`` is a
few seconds per model (for tests).

Fields:

- ``variants``: name -> the model keywords of one normalization (``norm``, ``skip_init``,
  ``bgn``), the same for the ResNet and the MLP; ``resnet_only``: the variants that standardize
  conv kernels (the residual MLP has none).
- ``norms``, ``models``: comma-separated variants and models (``resnet``, ``mlp``) to run.
- ``resnet.{blocks, width}``: one stage of basic pre-activation blocks after a CIFAR stem (one
  stage keeps the compile small and the theory free of stage transitions).
- ``mlp.{depth, width}``: without normalization the variance doubles per block; beyond about 120
  blocks float32 overflows.
- ``batch_size``, ``image_size`` (Gaussian inputs), ``dataset`` (``gaussian``, ``digits`` or a
  local TFDS ``cifar10``; never downloaded), ``seed``, ``workers`` (models measured concurrently;
  0: one per CPU core), ``output_dir``.
"""

from __future__ import annotations

import ml_collections

VARIANTS = {
    'batch_norm': {'norm': 'batch_norm'},
    'none': {'norm': 'none'},
    'skip_init_0': {'norm': 'none', 'skip_init': 0.0},
    'skip_init_inv_sqrt_depth': {'norm': 'none', 'skip_init': 'inv_sqrt_depth'},
    'pws': {'norm': 'pws'},
    'scaled_ws': {'norm': 'scaled_ws'},
    'bgn': {'norm': 'none', 'bgn': 'block'},
}
RESNET_ONLY = ('pws', 'scaled_ws')


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  """The demo's config; ``arg='small'`` for tiny models."""
  c = ml_collections.ConfigDict()
  c.variants = ml_collections.ConfigDict(VARIANTS)
  c.resnet_only = ','.join(RESNET_ONLY)
  c.norms = ','.join(VARIANTS)
  c.models = 'resnet,mlp'
  c.resnet = ml_collections.ConfigDict({'blocks': 100, 'width': 8})
  c.mlp = ml_collections.ConfigDict({'depth': 100, 'width': 128})
  c.batch_size = 32
  c.image_size = 8
  c.dataset = 'gaussian'
  c.seed = 0
  c.workers = 0
  c.output_dir = 'results/signal_propagation'
  if arg == 'small':
    c.resnet.blocks, c.resnet.width = 6, 4
    c.mlp.depth, c.mlp.width = 12, 32
    c.batch_size = 16
  elif arg:
    raise ValueError(f"signal_propagation.get_config: argument `arg` expected '' or 'small', got "
                     f'{arg!r}.')
  return c
