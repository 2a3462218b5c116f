"""jaxnorm: normalization in deep networks, usable, measurable and understood.

Subpackages (imports point one way: functional <- linen/nnx <- models <- diagnostics/training):

- ``jaxnorm.functional``: pure JAX math (BatchNorm with a closed-form backward, Backward Gradient
  Normalization, kernel standardization, signal metrics).
- ``jaxnorm.linen`` / ``jaxnorm.nnx``: Flax modules over that math.
- ``jaxnorm.models``: ResNets, Wide-ResNets and deep MLPs, generic in their normalization.
- ``jaxnorm.diagnostics``: signal propagation, theory curves, learning-rate sweeps, spectra.
- ``jaxnorm.training``: data, jitted multi-device training, checkpoints.
"""

__version__ = '0.1.0'
