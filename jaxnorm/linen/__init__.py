"""Flax linen modules: thin shells over ``jaxnorm.functional`` that own parameters and state.

Every name exported here is public API.
"""

# --- BatchNorm (Panigrahi et al.; De & Smith ghost BatchNorm) ---
from jaxnorm.linen.batch_norm import BatchNorm as BatchNorm

# isort: split

# --- Backward Gradient Normalization (Cabana & Lago-Fernandez) and SkipInit (De & Smith) ---
from jaxnorm.linen.backward_grad_norm import BackwardGradNorm as BackwardGradNorm
from jaxnorm.linen.skip_init import SkipInit as SkipInit

# --- Convolutions: Conv, WSConv, ScaledWSConv, PWSConv (Qiao et al.; Brock et al.; Liu et al.) ---
# isort: split
from jaxnorm.linen.conv import Conv as Conv
from jaxnorm.linen.conv import PWSConv as PWSConv
from jaxnorm.linen.conv import ScaledWSConv as ScaledWSConv
from jaxnorm.linen.conv import WSConv as WSConv
