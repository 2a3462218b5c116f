"""Models of the five papers (ResNets, Wide-ResNets, deep MLPs), generic in their normalization.

A study is "same model, different ``norm``": every model takes a ``norm`` spec ('batch_norm',
'ghost_batch_norm', 'none', 'group_norm', 'ws', 'scaled_ws', 'pws', or a name added with
``register_norm``; see ``registry``) plus the orthogonal options ``skip_init`` (None | float |
'inv_sqrt_depth') and ``bgn`` ('none' | 'block' | 'layer'), and is called as
``model.apply(variables, x, train=bool, mutable=[...])``::

  model = cifar_resnet(110, norm='none', skip_init=0.0)
  variables = model.init(jax.random.PRNGKey(0), x)
  logits, state = model.apply(variables, x, train=True, mutable=['batch_stats'])

A normalization defined elsewhere joins every model by name::

  register_norm('my_rms', norm=lambda spec, train, *, name, scale_init: MyRMSNorm(
      scale_init=scale_init, name=name))
  model = cifar_resnet(20, norm='my_rms')  # MyRMSNorm wherever BatchNorm would be

Why the models are Flax linen (and the NNX layers exist for users' own NNX code):

- depth: identical blocks of a stage run under ``nn.scan`` with their params and batch_stats (and
  every other collection) stacked on a leading axis, with optional ``nn.remat``; linen's lifted
  transforms handle every collection by one filter (``variable_axes={True: 0}``), so compile time
  stays flat up to ResNet-1202 and WRN-1000. (In NNX, scanning ``BatchStat`` needs explicit
  ``StateAxes``; broadcasting it silently shares one set of statistics.)
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

References:
  He, Zhang, Ren & Sun (2016a), 'Deep Residual Learning for Image Recognition', arXiv:1512.03385.
  He, Zhang, Ren & Sun (2016b), 'Identity Mappings in Deep Residual Networks', arXiv:1603.05027.
  Panigrahi, Chen & Kuo (2018), 'Analysis on Gradient Propagation in Batch Normalized Residual
  Networks', arXiv:1812.00342.
  Bjorck, Gomes, Selman & Weinberger (2018), 'Understanding Batch Normalization',
  arXiv:1806.02375.
  De & Smith (2020), 'Batch Normalization Biases Residual Blocks Towards the Identity Function in
  Deep Networks', arXiv:2002.10444.
  Zhang, Dauphin & Ma (2019), 'Fixup Initialization: Residual Learning Without Normalization',
  arXiv:1901.09321 (``fixup=True`` of the ResNets).
  Cabana & Lago-Fernandez (2021), 'Backward Gradient Normalization in Deep Neural Networks',
  arXiv:2106.09475.
  Liu, Ge, Li & Gui (2021), 'Delving into Variance Transmission and Normalization: Shift of
  Average Gradient Makes the Network Collapse', arXiv:2103.11590.
  Brock, De & Smith (2021), 'Characterizing signal propagation to close the performance gap in
  unnormalized ResNets', arXiv:2101.08692.
"""

from jaxnorm.models.blocks import NFResidualBlock as NFResidualBlock
from jaxnorm.models.blocks import ResidualBlock as ResidualBlock
from jaxnorm.models.decay import decay_mask as decay_mask
from jaxnorm.models.fixup import FixupResidualBlock as FixupResidualBlock
from jaxnorm.models.mlp import MLP as MLP
from jaxnorm.models.mlp import ResidualMLP as ResidualMLP
from jaxnorm.models.registry import NORMS as NORMS
from jaxnorm.models.registry import Normalization as Normalization
from jaxnorm.models.registry import NormSpec as NormSpec
from jaxnorm.models.registry import get_norm as get_norm
from jaxnorm.models.registry import register_norm as register_norm
from jaxnorm.models.registry import registered_norms as registered_norms
from jaxnorm.models.registry import unregister_norm as unregister_norm
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
