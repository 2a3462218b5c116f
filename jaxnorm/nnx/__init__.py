"""Flax NNX modules: the layers of ``jaxnorm.linen`` over the same ``jaxnorm.functional`` code.

Models stay linen (see ``jaxnorm.models``); these layers are for users whose own code is NNX.
Equivalence with linen (same parameters, same outputs and gradients) is tested in
``tests/test_nnx_*.py``.
"""

# --- BatchNorm ---
from jaxnorm.nnx.batch_norm import BatchNorm as BatchNorm

# isort: split

# --- BackwardGradNorm and SkipInit ---
from jaxnorm.nnx.backward_grad_norm import BackwardGradNorm as BackwardGradNorm
from jaxnorm.nnx.skip_init import SkipInit as SkipInit

# --- Convolutions: Conv, WSConv, ScaledWSConv, PWSConv ---
# isort: split
from jaxnorm.nnx.conv import Conv as Conv
from jaxnorm.nnx.conv import PWSConv as PWSConv
from jaxnorm.nnx.conv import ScaledWSConv as ScaledWSConv
from jaxnorm.nnx.conv import WSConv as WSConv
