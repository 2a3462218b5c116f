r"""Signal propagation at initialization under every normalization (the `make demo` job).

Launch::

  python experiments/signal_propagation.py                                   # the demo
  python experiments/signal_propagation.py --config=experiments/configs/signal_propagation.py:small
  python experiments/signal_propagation.py --config.norms=batch_norm,none --config.resnet.blocks=30

``get_config()`` is the demo: a 100-block pre-activation ResNet of width 128 on 8x8 inputs (batch
8) and a 100-block residual MLP of width 1024 (batch 32), each measured at ``seeds`` = 8
initializations; ``'small'`` is a few seconds per model (for tests).

Why these sizes: the theory lines (``jaxnorm.diagnostics.theory``) are mean-field, that is
infinite-width, expectations over initializations. Without normalization the skip path's
channel means carry half its energy, and their random-matrix fluctuations set the measured
growth: at width 8 the ResNet grows by x1.57 per block against x1.83 in theory, at width 64 by
x1.76, at width 128 by x1.80 (averages over initializations); and one initialization's
first/last gradient ratio over 100 blocks scatters by a factor of about 2.2 (one standard
deviation) at widths 64 to 128, and by 2.3 in the width-128 MLP (1.35 at width 1024). So the
demo measures wide nets and reports each statistic's geometric mean over ``seeds``
initializations (each with its own input batch); the ResNet's batch is 8 to pay for its width.

Fields:

- ``variants``: name -> the model keywords of one normalization (``norm``, ``skip_init``,
  ``bgn``), the same for the ResNet and the MLP; ``resnet_only``: the variants that standardize
  conv kernels (the residual MLP has none).
- ``norms``, ``models``: comma-separated variants and models (``resnet``, ``mlp``) to run.
- ``resnet.{blocks, width, batch_size}``: one stage of basic pre-activation blocks after a CIFAR
  stem (one stage keeps the compile small), and its batch.
- ``mlp.{depth, width}``: without normalization the variance doubles per block; beyond about 120
  blocks float32 overflows.
- ``batch_size``: the MLP's batch (and the ResNet's when ``resnet.batch_size`` is 0).
- ``seeds``: initializations (and input batches) per model; the figures, the table and the theory
  use the per-block geometric mean of ``avg_var`` / ``grad_var`` over them (arithmetic for the
  squared means), the report keeps each one's summary.
- ``image_size`` (Gaussian inputs), ``dataset`` (``gaussian``, ``digits`` or a local TFDS
  ``cifar10``; never downloaded), ``seed`` (of the first initialization), ``workers`` (models
  measured concurrently; 0: one per CPU core), ``output_dir``.
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
  c.resnet = ml_collections.ConfigDict({'blocks': 100, 'width': 128, 'batch_size': 8})
  c.mlp = ml_collections.ConfigDict({'depth': 100, 'width': 1024})
  c.batch_size = 32
  c.seeds = 8
  c.image_size = 8
  c.dataset = 'gaussian'
  c.seed = 0
  c.workers = 0
  c.output_dir = 'results/signal_propagation'
  if arg == 'small':
    c.resnet.blocks, c.resnet.width, c.resnet.batch_size = 6, 4, 0
    c.mlp.depth, c.mlp.width = 12, 32
    c.batch_size = 16
    c.seeds = 2
  elif arg:
    raise ValueError(f"signal_propagation.get_config: argument `arg` expected '' or 'small', got "
                     f'{arg!r}.')
  return c
