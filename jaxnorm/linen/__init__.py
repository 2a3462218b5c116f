"""Flax linen modules: thin shells over ``jaxnorm.functional`` that own parameters and state.

Every name exported here is public API.
"""

# --- BatchNorm (Panigrahi et al.; De & Smith ghost BatchNorm) ---

# --- Backward Gradient Normalization (Cabana & Lago-Fernandez) and SkipInit (De & Smith) ---

# --- Convolutions: Conv, WSConv, ScaledWSConv, PWSConv (Qiao et al.; Brock et al.; Liu et al.) ---
