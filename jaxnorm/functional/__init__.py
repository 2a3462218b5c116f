"""Pure-JAX normalization math: no Flax import, usable from Haiku, Equinox or plain JAX.

Every name here is a function (or a small type) of the public API; the modules that implement
them are private (``jaxnorm.functional._batch_norm``, ...), one per paper or idea, each with the
equations and the paper in its docstring.

- BatchNorm (Ioffe & Szegedy 2015; the closed-form backward; ghost batches of De & Smith 2020):
  ``batch_norm``, ``batch_statistics``, ``normalize``.
- Backward Gradient Normalization (Cabana & Lago-Fernandez 2021): ``backward_grad_norm``,
  ``normalize_gradient``.
- Kernel standardization, WS / Scaled WS / PWS (Qiao et al. 2019; Brock, De & Smith 2021; Liu,
  Ge, Li & Gui 2021): ``standardize_kernel``, ``pws_init_alpha``, ``pws_fan``.
- A convolution whose backward pass is canonical forward convolutions (fast under ``lax.scan`` on
  XLA:CPU): ``conv``, ``resolve_padding``.
- SkipInit (De & Smith 2020): ``skip_init``.
- Signal-propagation statistics (Brock, De & Smith 2021): ``signal_metrics``, ``SignalMetrics``.
- Initializers, bit-identical to ``jax.nn.initializers`` and cheaper to compile:
  ``variance_scaling``, ``he_normal``, ``lecun_normal``.
"""

# --- BatchNorm ---
from jaxnorm.functional._batch_norm import batch_norm as batch_norm
from jaxnorm.functional._batch_norm import batch_statistics as batch_statistics
from jaxnorm.functional._batch_norm import normalize as normalize

# isort: split

# --- Backward Gradient Normalization ---
from jaxnorm.functional._backward_grad_norm import backward_grad_norm as backward_grad_norm
from jaxnorm.functional._backward_grad_norm import normalize_gradient as normalize_gradient

# isort: split

# --- Kernel standardization: WS, Scaled WS, PWS ---
from jaxnorm.functional._kernel_standardization import pws_fan as pws_fan
from jaxnorm.functional._kernel_standardization import pws_init_alpha as pws_init_alpha
from jaxnorm.functional._kernel_standardization import standardize_kernel as standardize_kernel

# isort: split

# --- Convolution with a canonical-layout backward ---
from jaxnorm.functional._conv import conv as conv
from jaxnorm.functional._conv import resolve_padding as resolve_padding

# isort: split

# --- SkipInit, signal metrics, initializers ---
from jaxnorm.functional._initializers import he_normal as he_normal
from jaxnorm.functional._initializers import lecun_normal as lecun_normal
from jaxnorm.functional._initializers import variance_scaling as variance_scaling
from jaxnorm.functional._signal_metrics import SignalMetrics as SignalMetrics
from jaxnorm.functional._signal_metrics import signal_metrics as signal_metrics
from jaxnorm.functional._skip_init import skip_init as skip_init
