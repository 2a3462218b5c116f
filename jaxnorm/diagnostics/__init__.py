"""Diagnostics: how signal and gradient propagate through any Flax model, beside theory.

- ``signal_propagation``: forward SPPs and backward gradient statistics in one pass: per block for
  jaxnorm's models, per module call for any linen or NNX model, unmodified (``module_taps``).
- ``theory``: closed-form predictions (De & Smith, NF-ResNets, Panigrahi, Bjorck, PWS).
- ``sweeps``: relative-loss sweeps, channel statistics by depth, logit-gradient maps (Bjorck).
- ``spectra``: singular values of random-matrix products and of layer Jacobians (Bjorck).
- ``weights``: the PWS "shift" statistic of a kernel, the all-ones (average) component of a
  kernel or of its gradient, the kernels a model's conv layers apply (``effective_kernels``) and
  both per layer on a batch (``filter_mean_statistics``).
- ``plots``: per-block figures, one line per normalization, theory dashed.

References: Brock, De & Smith (2021), "Characterizing signal propagation to close the performance
gap in unnormalized ResNets", arXiv:2101.08692; the modules' docstrings cite the others.
"""

from jaxnorm.diagnostics import theory as theory
from jaxnorm.diagnostics.signal_propagation import signal_propagation as signal_propagation
from jaxnorm.diagnostics.signal_report import ModuleStats as ModuleStats
from jaxnorm.diagnostics.signal_report import SignalReport as SignalReport
from jaxnorm.diagnostics.signal_report import TapStats as TapStats
from jaxnorm.diagnostics.spectra import (
  gaussian_product_singular_values as gaussian_product_singular_values,
)
from jaxnorm.diagnostics.spectra import jacobian_singular_values as jacobian_singular_values
from jaxnorm.diagnostics.spectra import layer_jacobian_spectra as layer_jacobian_spectra
from jaxnorm.diagnostics.sweeps import channel_stats_by_depth as channel_stats_by_depth
from jaxnorm.diagnostics.sweeps import classification_loss_fn as classification_loss_fn
from jaxnorm.diagnostics.sweeps import divergence_step_size as divergence_step_size
from jaxnorm.diagnostics.sweeps import logit_gradient_map as logit_gradient_map
from jaxnorm.diagnostics.sweeps import relative_loss_sweep as relative_loss_sweep
from jaxnorm.diagnostics.weights import all_ones_component as all_ones_component
from jaxnorm.diagnostics.weights import all_ones_fraction as all_ones_fraction
from jaxnorm.diagnostics.weights import effective_kernels as effective_kernels
from jaxnorm.diagnostics.weights import filter_mean_statistics as filter_mean_statistics
from jaxnorm.diagnostics.weights import shift_statistic as shift_statistic
