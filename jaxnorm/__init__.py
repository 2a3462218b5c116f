"""jaxnorm: normalization in deep networks, usable, measurable and understood.

Subpackages (imports point one way: functional <- linen/nnx <- models <- diagnostics/training
<- studies):

- ``jaxnorm.functional``: pure JAX math (BatchNorm with a closed-form backward, Backward Gradient
  Normalization, kernel standardization, a custom-VJP convolution, SkipInit, signal metrics).
- ``jaxnorm.linen`` / ``jaxnorm.nnx``: Flax modules over that math.
- ``jaxnorm.models``: ResNets, Wide-ResNets and deep MLPs, generic in their normalization.
- ``jaxnorm.diagnostics``: signal propagation, theory curves, learning-rate sweeps, spectra.
- ``jaxnorm.training``: data, jitted multi-device training, checkpoints.
- ``jaxnorm.studies``: the papers' reproduction studies and their harness (claims, resumable runs).

``import jaxnorm`` alone gives every subpackage: each is imported on first attribute access
(``jaxnorm.linen.BatchNorm``), so importing jaxnorm costs nothing until a subpackage is used.
"""

import importlib as _importlib
import typing as _typing

__version__ = '0.1.0'

_SUBPACKAGES = ('functional', 'linen', 'nnx', 'models', 'diagnostics', 'training', 'studies',
                'invariants')

if _typing.TYPE_CHECKING:
  from jaxnorm import diagnostics as diagnostics
  from jaxnorm import functional as functional
  from jaxnorm import invariants as invariants
  from jaxnorm import linen as linen
  from jaxnorm import models as models
  from jaxnorm import nnx as nnx
  from jaxnorm import studies as studies
  from jaxnorm import training as training


def __getattr__(name: str):
  if name in _SUBPACKAGES:
    module = _importlib.import_module(f'jaxnorm.{name}')
    globals()[name] = module
    return module
  raise AttributeError(f"module 'jaxnorm' has no attribute {name!r}")


def __dir__():
  return sorted({*globals(), *_SUBPACKAGES})
