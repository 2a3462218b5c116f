"""Models of the five papers (ResNets, Wide-ResNets, deep MLPs), generic in their normalization.

A study is "same model, different ``norm``": every model takes a ``norm`` spec ('batch_norm',
'ghost_batch_norm', 'none', 'group_norm', 'ws', 'scaled_ws', 'pws'; see ``registry``) plus the
orthogonal options ``skip_init`` (None | float | 'inv_sqrt_depth') and ``bgn`` ('none' | 'block' |
'layer'), and is called as ``model.apply(variables, x, train=bool, mutable=[...])``::

  model = cifar_resnet(110, norm='none', skip_init=0.0)
  variables = model.init(jax.random.PRNGKey(0), x)
  logits, state = model.apply(variables, x, train=True, mutable=['batch_stats'])

Why the models are Flax linen (and the NNX layers exist for users' own NNX code):

- depth: identical blocks of a stage run under ``nn.scan`` with their params and batch_stats (and
  every other collection) stacked on a leading axis, with optional ``nn.remat``; linen's lifted
  transforms handle every collection by one filter (``variable_axes={True: 0}``), so compile time
  stays flat up to ResNet-1202 and WRN-1000. (In NNX, scanning ``BatchStat`` needs explicit
  ``StateAxes``; broadcasting it silently shares one set of statistics, ECOSYSTEM.md.)
- instrumentation: per-block ``sow('intermediates', ...)`` and ``perturb(...)`` gradient taps
  work unchanged inside ``nn.scan`` (they come back stacked), so diagnostics read any model
  without changing it (``taps.block_taps``).

Instrumentation contract: the stem output is tapped as 'stem'; every residual block sows 'branch'
(residual branch before its gain / SkipInit / alpha) and perturbs + sows 'skip' (skip-path
activation after the block); the plain MLP taps 'layer' per hidden layer. Perturbations are zeros,
so outputs are unchanged. They are per call, not variables: ``init`` returns only ``params`` and
the state collections (``batch_stats``), which work for any batch size;
``zero_perturbations(model, variables, x, ...)`` builds the zero tree for one batch
(``taps.perturb`` skips the tap in ``init``).

References: papers.md §1-§5b; ECOSYSTEM.md "Depth: scan vs unrolled".
"""

from jaxnorm.models.blocks import ResidualBlock as ResidualBlock
from jaxnorm.models.decay import decay_mask as decay_mask
from jaxnorm.models.mlp import MLP as MLP
from jaxnorm.models.mlp import ResidualMLP as ResidualMLP
from jaxnorm.models.registry import NORMS as NORMS
from jaxnorm.models.registry import NormSpec as NormSpec
from jaxnorm.models.resnet import ResNet as ResNet
from jaxnorm.models.resnet import cifar_resnet as cifar_resnet
from jaxnorm.models.resnet import pws_resnet as pws_resnet
from jaxnorm.models.resnet import resnet50 as resnet50
from jaxnorm.models.resnet import wide_resnet as wide_resnet
from jaxnorm.models.stacking import stack_blocks as stack_blocks
from jaxnorm.models.stacking import unstack_blocks as unstack_blocks
from jaxnorm.models.taps import block_tap_groups as block_tap_groups
from jaxnorm.models.taps import block_taps as block_taps
from jaxnorm.models.taps import stem_tap as stem_tap
from jaxnorm.models.taps import zero_perturbations as zero_perturbations
