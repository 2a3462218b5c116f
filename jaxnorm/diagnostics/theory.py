"""Closed-form predictions at initialization for the five papers' signal-propagation claims.

Every function here is pure numpy: it takes Python numbers and returns numbers or numpy arrays, so
it can be overlaid on measurements (``jaxnorm.diagnostics.plots``) and asserted against in tests.

Conventions. A residual network is a stem followed by blocks ``x_{l+1} = x_l + alpha * f_l(x_l)``,
``l = 0 .. L-1``. Per-block arrays have length ``L + 1``: index 0 is the stem output (the input of
the first block), index ``l + 1`` the skip path after block ``l``. The statistics are those of
``jaxnorm.functional.signal_metrics`` (those of Brock, De & Smith 2021): ``avg_var`` = mean over
channels of the batch variance, ``avg_sq_mean`` = mean over channels of the squared batch mean.

References:
  De & Smith (2020), "Batch Normalization Biases Residual Blocks Towards the Identity Function in
  Deep Networks", arXiv:2002.10444 (SkipInit).
  Brock, De & Smith (2021), "Characterizing signal propagation to close the performance gap in
  unnormalized ResNets", arXiv:2101.08692 (NF-ResNets).
  Panigrahi, Chen & Kuo (2018), "Analysis on Gradient Propagation in Batch Normalized Residual
  Networks", arXiv:1812.00342.
  Bjorck, Gomes, Selman & Weinberger (2018), "Understanding Batch Normalization",
  arXiv:1806.02375.
  Liu, Ge, Li & Gui (2021), "Delving into Variance Transmission and Normalization: Shift of
  Average Gradient Makes the Network Collapse", AAAI 2021, arXiv:2103.11590 (PWS).
"""

from __future__ import annotations

import math

import numpy as np

from jaxnorm.functional._checks import check_choice, check_positive, fail

_LAYER = 'jaxnorm.diagnostics.theory'
RESIDUAL_NORMS = ('batch_norm', 'none')

# E[relu(z)] and Var[relu(z)] for z ~ N(0, 1).
RELU_MEAN = 1.0 / math.sqrt(2.0 * math.pi)
RELU_VAR = 0.5 - 1.0 / (2.0 * math.pi)
# Weight of grad_sq_mean in the BN gradient-variance recurrence: twice the variance of the ReLU mask
# 1[z > 0] left after removing its mean and its projection on z (z ~ N(0, 1)):
# 2 (1/4 - E[z 1[z > 0]]^2) = 2 (1/4 - 1/(2 pi)) = 1/2 - 1/pi.
BN_GRAD_MEAN_WEIGHT = 0.5 - 1.0 / math.pi

# Gauss-Hermite (probabilists') nodes for expectations over the channel means, E_{u~N(0,1)} h(u).
_GH_NODES, _GH_WEIGHTS = np.polynomial.hermite_e.hermegauss(80)
_GH_WEIGHTS = _GH_WEIGHTS / _GH_WEIGHTS.sum()


def _phi(t):
  return np.exp(-0.5 * t * t) / math.sqrt(2.0 * math.pi)


def _Phi(t):
  return 0.5 * (1.0 + np.vectorize(math.erf)(t / math.sqrt(2.0)))


def relu_moments(mu, var):
  """Mean and second moment of ``relu(z)`` for ``z ~ N(mu, var)`` (elementwise, numpy).

  ``E relu(z) = mu Phi(t) + s phi(t)``, ``E relu(z)^2 = (mu^2 + var) Phi(t) + mu s phi(t)``, with
  ``s = sqrt(var)``, ``t = mu / s`` (the rectified-Gaussian moments).

  Args:
    mu: mean(s) of the Gaussian.
    var: variance(s), positive.

  Returns:
    ``(first_moment, second_moment)`` as numpy arrays.

  References:
    Standard identity (the moments of a rectified Gaussian); used by every residual recurrence
    below.
  """
  mu = np.asarray(mu, np.float64)
  s = np.sqrt(np.asarray(var, np.float64))
  t = mu / s
  m1 = mu * _Phi(t) + s * _phi(t)
  m2 = (mu * mu + s * s) * _Phi(t) + mu * s * _phi(t)
  return m1, m2


def _check_depth(arg: str, depth) -> int:
  if not isinstance(depth, (int, np.integer)) or depth < 0:
    fail(_LAYER, arg, 'a non-negative int', repr(depth))
  return int(depth)


def residual_skip_moments(num_blocks: int, *, norm: str = 'batch_norm', alpha: float = 1.0,
                          var0: float = 1.0, sq_mean0: float = 0.0) -> dict[str, np.ndarray]:
  """Predicted skip-path ``avg_var`` / ``avg_sq_mean`` per block of a pre-activation residual net.

  Model (the MLP analogue of the pre-activation ResNets of De & Smith 2020 and of the signal
  propagation plots of Brock, De & Smith 2021):
  ``x_{l+1} = x_l + alpha * W_l relu(N(x_l))`` with ``W_l`` He-normal (variance ``2 / fan_in``),
  ``N`` = per-channel BatchNorm (``norm='batch_norm'``) or the identity (``norm='none'``).

  Derivation (a reconstruction, not the papers' text). Model each channel ``j`` of ``x_l`` over the
  batch as ``N(mu_j, v)`` with the channel means ``mu_j ~ N(0, S)`` across channels, so
  ``avg_var = v`` and ``avg_sq_mean = S``. Let ``m_j = mean_B relu(N(x)_j)`` and
  ``s_j = mean_B relu(N(x)_j)^2``. Averaging over the fresh, independent ``W_l``, the branch output
  ``h_c = sum_j W_cj relu(.)_j`` has squared channel mean ``2 E_j[m_j^2]`` and channel variance
  ``2 E_j[s_j - m_j^2]``, and is uncorrelated with ``x_l``, so

      v_{l+1} = v_l + alpha^2 * 2 E_j[s_j - m_j^2],     S_{l+1} = S_l + alpha^2 * 2 E_j[m_j^2].

  * BatchNorm: ``N(x)_j ~ N(0, 1)`` whatever ``(v, S)``, so ``m = 1/sqrt(2 pi)``, ``s = 1/2`` and
    the skip path grows *linearly*: ``avg_var`` by ``alpha^2 (1 - 1/pi) ~ 0.68``, ``avg_sq_mean`` by
    ``alpha^2 / pi ~ 0.32`` per block (De & Smith: the branch is ``~1/sqrt(l)`` of the skip path).
  * No normalization: ``E_j[s_j] = (v + S)/2``, so the total second moment ``v + S`` is multiplied
    by ``1 + alpha^2`` per block: it *doubles* for ``alpha = 1`` (geometric growth), stays exactly
    constant for SkipInit ``alpha = 0`` and is bounded by ``e`` for ``alpha = 1/sqrt(L)``
    (``(1 + 1/L)^L < e``). The split between ``v`` and ``S`` uses Gauss-Hermite quadrature over
    ``mu_j``.

  Args:
    num_blocks: number of residual blocks L (>= 0).
    norm: 'batch_norm' or 'none' (the residual branch's normalization).
    alpha: scalar gain on the residual branch (1 = plain ResNet; 0 or 1/sqrt(L) = SkipInit).
    var0: ``avg_var`` of the stem output (1 for N(0,1) inputs through a LeCun-normal projection).
    sq_mean0: ``avg_sq_mean`` of the stem output.

  Returns:
    dict with numpy float64 arrays ``avg_var``, ``avg_sq_mean`` (length L + 1, index 0 = stem) and
    ``res_avg_var`` (length L: variance of the branch output *before* ``alpha``).

  Example:
    >>> from jaxnorm.diagnostics import theory
    >>> theory.residual_skip_moments(4, norm='batch_norm')['avg_var'].round(2)  # linear
    array([1.  , 1.68, 2.36, 3.05, 3.73])
    >>> theory.residual_skip_moments(4, norm='none')['avg_var'].round(2)        # geometric
    array([1.  , 1.68, 2.88, 4.99, 8.76])

  References:
    De & Smith (2020), "Batch Normalization Biases Residual Blocks Towards the Identity Function in
    Deep Networks", arXiv:2002.10444 (the sqrt(depth) argument, SkipInit).
    Brock, De & Smith (2021), "Characterizing signal propagation to close the performance gap in
    unnormalized ResNets", arXiv:2101.08692 (signal propagation plots at initialization:
    +0.68 / +0.32 per block). The (v, S) split for the unnormalized net is a reconstruction.
  """
  num_blocks = _check_depth('num_blocks', num_blocks)
  check_choice(_LAYER, 'norm', norm, RESIDUAL_NORMS)
  check_positive(_LAYER, 'var0', var0)
  check_positive(_LAYER, 'sq_mean0', sq_mean0, allow_zero=True)
  v, s_mean = float(var0), float(sq_mean0)
  avg_var, avg_sq_mean, res_var = [v], [s_mean], []
  a2 = float(alpha) ** 2
  for _ in range(num_blocks):
    if norm == 'batch_norm':
      e_m2, e_s = RELU_MEAN ** 2, 0.5
    else:
      mu = math.sqrt(s_mean) * _GH_NODES
      m1, m2 = relu_moments(mu, np.full_like(mu, v))
      e_m2, e_s = float(_GH_WEIGHTS @ (m1 * m1)), float(_GH_WEIGHTS @ m2)
    branch_var, branch_sq_mean = 2.0 * (e_s - e_m2), 2.0 * e_m2
    res_var.append(branch_var)
    v, s_mean = v + a2 * branch_var, s_mean + a2 * branch_sq_mean
    avg_var.append(v)
    avg_sq_mean.append(s_mean)
  return {'avg_var': np.asarray(avg_var), 'avg_sq_mean': np.asarray(avg_sq_mean),
          'res_avg_var': np.asarray(res_var)}


def bn_preactivation_slopes(alpha: float = 1.0) -> dict[str, float]:
  """Per-block growth of the skip path of a BN pre-activation residual net (linear regime).

  ``d avg_var / d l = alpha^2 (1 - 1/pi)``, ``d avg_sq_mean / d l = alpha^2 / pi``, and their sum is
  ``alpha^2`` (He init keeps ``E[branch^2] = 1``). See ``residual_skip_moments`` for the derivation.

  Args:
    alpha: residual-branch gain.

  Returns:
    ``{'avg_var': ..., 'avg_sq_mean': ...}`` slopes per block.

  References:
    De & Smith (2020), "Batch Normalization Biases Residual Blocks Towards the Identity Function in
    Deep Networks", arXiv:2002.10444.
    Brock, De & Smith (2021), "Characterizing signal propagation to close the performance gap in
    unnormalized ResNets", arXiv:2101.08692 (+0.68 / +0.32 per block).
  """
  a2 = float(alpha) ** 2
  return {'avg_var': a2 * 2.0 * RELU_VAR, 'avg_sq_mean': a2 * 2.0 * RELU_MEAN ** 2}


def unnormalized_growth_factor(alpha: float = 1.0) -> float:
  """Factor by which an unnormalized residual block multiplies the skip path's second moment.

  ``E[x_{l+1}^2] = (1 + alpha^2) E[x_l^2]`` for He-init ReLU branches (see
  ``residual_skip_moments``): 2 for a plain ResNet (doubling), 1 for SkipInit(0).

  Args:
    alpha: residual-branch gain.

  Returns:
    The per-block growth factor.

  References:
    De & Smith (2020), "Batch Normalization Biases Residual Blocks Towards the Identity Function in
    Deep Networks", arXiv:2002.10444 (the sqrt(depth) argument).
  """
  return 1.0 + float(alpha) ** 2


def nf_expected_variance(num_blocks: int, alpha: float = 0.2) -> np.ndarray:
  """NF-ResNet expected skip-path variance after block j of a stage: ``1 + (j + 1) alpha^2``.

  Each block adds ``alpha * f(x / beta)`` whose branch has unit variance (scaled WS + gamma-scaled
  activations), and ``expected_std`` is reset to 1 at each stage's first block (its shortcut is a
  conv on the normalized input), so the variance after block ``j = 0, 1, ...`` is
  ``1 + (j + 1) alpha^2``.

  Args:
    num_blocks: blocks in the stage (>= 0).
    alpha: the NF-ResNet alpha (0.2 in nf_resnet.py).

  Returns:
    numpy array of length ``num_blocks``.

  References:
    Brock, De & Smith (2021), "Characterizing signal propagation to close the performance gap in
    unnormalized ResNets", arXiv:2101.08692; deepmind-research ``nfnets/nf_resnet.py`` (the
    ``expected_std`` bookkeeping).
  """
  num_blocks = _check_depth('num_blocks', num_blocks)
  return 1.0 + (np.arange(num_blocks) + 1.0) * float(alpha) ** 2


def gradient_variance_recurrence(avg_var: np.ndarray, *, norm: str = 'batch_norm',
                                 alpha: float = 1.0, grad_var_out: float = 1.0,
                                 grad_sq_mean_out: float = 0.0) -> dict[str, np.ndarray]:
  """Predicted ``grad_var`` / ``grad_sq_mean`` of dL/d(skip path), from the last block backwards.

  A reconstruction (the paper's text is not available) of the gradient-variance analysis of
  Panigrahi, Chen & Kuo (2018), specialised to pre-activation blocks
  ``x_{l+1} = x_l + alpha W relu(BN(x_l))`` (He-normal W):

  * BatchNorm: the branch's backward is ``(alpha / sigma_l) P D W^T g`` with ``D`` the ReLU mask
    ``d = 1[z > 0]`` of the normalized input ``z ~ N(0, 1)`` and ``P`` the BN projection, which
    removes, per channel, the batch mean and the component along ``z`` (the BatchNorm backward
    pass). Write the incoming gradient per channel as its batch mean plus a fluctuation
    (``grad_sq_mean`` and ``grad_var`` of the tap). The fresh He-normal ``W^T`` doubles both:
    ``r_bj = mu_j + e_bj``, ``E_j mu_j^2 = 2 grad_sq_mean``, ``Var e = 2 grad_var``. Through the
    mask (independent of ``r``), ``d e`` has variance ``grad_var`` (the mask halves
    ``2 grad_var``), while ``d mu_j`` has batch variance ``mu_j^2 Var(d) = mu_j^2 / 4``, of which
    ``P`` also removes the part along ``z``, ``mu_j^2 Cov(d, z)^2 = mu_j^2 / (2 pi)``; the
    branch's gradient has zero batch mean. So, with ``sigma_l^2 = avg_var_l`` and
    ``k = 2 (1/4 - 1/(2 pi)) = 1/2 - 1/pi`` (``BN_GRAD_MEAN_WEIGHT``):

        grad_sq_mean_l = grad_sq_mean_{l+1}
        grad_var_l = grad_var_{l+1} + alpha^2 (grad_var_{l+1} + k grad_sq_mean_{l+1}) / avg_var_l

    With ``avg_var_l ~ v0 + c l`` the product ``prod (1 + 1/avg_var_l)`` grows like ``L^(1/c)``:
    polynomially in depth (BN and the skip "confine" the gradient variance).
  * No normalization: the branch Jacobian ``alpha W D`` multiplies the gradient's second moment by
    ``1 + alpha^2`` per block: exponential (``2^L``) for alpha = 1, constant for SkipInit(0). The
    mean/variance split is not modelled: both are scaled by ``1 + alpha^2``.

  Args:
    avg_var: forward skip-path ``avg_var`` per block, length L + 1 (index 0 = stem, as returned by
      ``residual_skip_moments``); only indices 0..L-1 (the inputs of the blocks) are used.
    norm: 'batch_norm' or 'none'.
    alpha: residual-branch gain.
    grad_var_out: ``grad_var`` at the output of the last block (index L).
    grad_sq_mean_out: ``grad_sq_mean`` at index L.

  Returns:
    dict with numpy arrays ``grad_var`` and ``grad_sq_mean``, length L + 1, index as ``avg_var``.

  References:
    Panigrahi, Chen & Kuo (2018), "Analysis on Gradient Propagation in Batch Normalized Residual
    Networks", arXiv:1812.00342; the recurrence is a reconstruction (the paper's text is not
    available).
  """
  check_choice(_LAYER, 'norm', norm, RESIDUAL_NORMS)
  avg_var = np.asarray(avg_var, np.float64)
  if avg_var.ndim != 1 or avg_var.size < 1:
    fail(_LAYER, 'avg_var', 'a 1-D array of length L + 1 >= 1', f'shape {avg_var.shape}')
  n = avg_var.size
  a2 = float(alpha) ** 2
  gv, gm = np.empty(n), np.empty(n)
  gv[-1], gm[-1] = grad_var_out, grad_sq_mean_out
  for i in range(n - 2, -1, -1):
    if norm == 'batch_norm':
      gm[i] = gm[i + 1]
      gv[i] = gv[i + 1] + a2 * (gv[i + 1] + BN_GRAD_MEAN_WEIGHT * gm[i + 1]) / avg_var[i]
    else:
      gm[i] = gm[i + 1] * (1.0 + a2)
      gv[i] = gv[i + 1] * (1.0 + a2)
  return {'grad_var': gv, 'grad_sq_mean': gm}


def bn_gradient_growth_exponent(alpha: float = 1.0) -> float:
  """Exponent p of the BN-ResNet gradient-variance ratio ``grad_var_0 / grad_var_L ~ L^p``.

  From ``gradient_variance_recurrence`` with ``avg_var_l ~ l alpha^2 (1 - 1/pi)`` (and a zero-mean
  gradient): ``prod_l (1 + alpha^2 / avg_var_l) ~ exp(sum 1/((1 - 1/pi) l)) ~ L^(1/(1 - 1/pi))``,
  so ``p = pi / (pi - 1) ~ 1.47``, independent of alpha.

  Returns:
    The exponent p.

  References:
    Panigrahi, Chen & Kuo (2018), "Analysis on Gradient Propagation in Batch Normalized Residual
    Networks", arXiv:1812.00342; a reconstruction (the paper's text is not available), from
    ``gradient_variance_recurrence``.
  """
  del alpha
  return 1.0 / (2.0 * RELU_VAR)


def plain_bn_gradient_growth() -> float:
  """Per-layer gradient-variance growth of a plain (no-skip) ReLU BN network: ``pi / (pi - 1)``.

  Returns:
    ``pi / (pi - 1) ~ 1.467`` (Yang et al. 2019).

  References:
    Yang, Pennington, Rao, Sohl-Dickstein & Schoenholz (2019), "A Mean Field Theory of Batch
    Normalization", ICLR 2019, arXiv:1902.08129 (the plain network, beside the residual one of
    Panigrahi, Chen & Kuo (2018), "Analysis on Gradient Propagation in Batch Normalized Residual
    Networks", arXiv:1812.00342).
  """
  return math.pi / (math.pi - 1.0)


def gaussian_product_max_singular_value(num_matrices: int) -> float:
  """Limit (N -> inf) of the largest singular value of a product of M Gaussian N(0, 1/N) matrices.

  The squared singular values of a product of M Ginibre matrices follow the Fuss-Catalan law, whose
  support is ``[0, (M + 1)^(M + 1) / M^M]``, so ``s_max -> sqrt((M + 1)^(M + 1) / M^M)``: 2 for one
  matrix (quarter circle on [0, 2]), ~3.08 for three, ~3.86 for five.

  Args:
    num_matrices: M >= 1.

  Returns:
    The limiting largest singular value.

  References:
    Bjorck, Gomes, Selman & Weinberger (2018), "Understanding Batch Normalization",
    arXiv:1806.02375 (the comparison with random-matrix theory).
  """
  m = _check_depth('num_matrices', num_matrices)
  if m < 1:
    fail(_LAYER, 'num_matrices', 'an int >= 1', repr(num_matrices))
  return math.sqrt((m + 1) ** (m + 1) / m ** m)


def pws_filter_sum_of_squares(sigma2, gamma: float, alpha: float = 1.0):
  """Per-filter sum of squares of the PWS kernel: ``2 alpha^2 sigma^2 / (sigma^2 + gamma)``.

  ``W_hat_o = sqrt(2/fan) alpha (W_o - mu_o) / sqrt(sigma_o^2 + gamma)`` over the ``fan`` entries of
  filter o, and ``sum (W_o - mu_o)^2 = fan sigma_o^2`` (biased variance), so
  ``sum W_hat_o^2 = 2 alpha^2 sigma_o^2 / (sigma_o^2 + gamma)``: the He value 2 only when
  ``gamma << sigma^2``. The layer's variance gain on a ReLU input is this sum times 1/2.

  Args:
    sigma2: the (biased) variance of each filter's raw weights (scalar or array).
    gamma: the PWS epsilon, inside the square root.
    alpha: PWS per-channel gain.

  Returns:
    The sum of squares, same shape as ``sigma2``.

  References:
    Liu, Ge, Li & Gui (2021), "Delving into Variance Transmission and Normalization: Shift of
    Average Gradient Makes the Network Collapse", AAAI 2021, arXiv:2103.11590; the reference
    implementation, lyxzzz/PWSConv ``pws_layer.py`` (``gamma`` inside the square root).
  """
  gamma = np.asarray(gamma, np.float64)
  if np.any(gamma < 0):
    fail(_LAYER, 'gamma', 'a non-negative number', gamma)
  sigma2 = np.asarray(sigma2, np.float64)
  return 2.0 * float(alpha) ** 2 * sigma2 / (sigma2 + gamma)


def pws_gain_per_layer(fan_ins, gamma: float, *, equiv: bool = False) -> np.ndarray:
  """PWS sum of squares ``2 sigma^2 / (sigma^2 + gamma)`` at He init for each layer's fan-in.

  At init the raw weights have ``sigma^2 = 2 / fan`` (kaiming normal); with ``equiv=True`` the
  reference implementation uses ``gamma * 2 / fan``, which gives the depth-independent
  ``2 / (1 + gamma)``. Dividing by 2 gives the squared gain relative to He init (e.g. fan 4608
  with gamma 1e-3: 0.30).

  Args:
    fan_ins: sequence of fan-ins (kh * kw * C_in).
    gamma: PWS epsilon.
    equiv: the reference's ``equiv`` mode.

  Returns:
    numpy array, one value per layer (2 = He init preserved).

  References:
    Liu, Ge, Li & Gui (2021), "Delving into Variance Transmission and Normalization: Shift of
    Average Gradient Makes the Network Collapse", AAAI 2021, arXiv:2103.11590.
  """
  fans = np.asarray(fan_ins, np.float64)
  if np.any(fans <= 0):
    fail(_LAYER, 'fan_ins', 'positive fan-ins', fan_ins)
  sigma2 = 2.0 / fans
  g = gamma * 2.0 / fans if equiv else gamma
  return pws_filter_sum_of_squares(sigma2, g)


def predicted_block_curves(avg_var, avg_sq_mean, grad_var, grad_sq_mean,
                           stages, *, norm: str, skip_init=None, bgn: str = 'none') -> dict:
  """The theory lines drawn beside a measured per-block report, or None where none applies.

  The measured series are per tap, index 0 the stem and index ``l + 1`` the skip path after block
  ``l`` (``SignalReport.series``), of a residual network with ``stages`` blocks per stage, built
  with the model keywords ``norm``, ``skip_init`` and ``bgn`` of ``jaxnorm.models``.

  Forward (``avg_var``): within each stage, :func:`residual_skip_moments` runs from the measured
  skip-path moments at the stage's first tap (a stage transition changes the width and resets the
  statistics), with ``alpha`` the SkipInit gain (``1 / sqrt(total blocks)`` for
  ``'inv_sqrt_depth'``, 1 without SkipInit). ``norm='scaled_ws'`` (NF-ResNets) uses
  :func:`nf_expected_variance`. BGN nodes are the identity forward: the ``norm`` line applies.
  Backward (``grad_var``): :func:`gradient_variance_recurrence` from the measured gradient at the
  last tap, on the predicted (or, where undefined, measured) forward variance; none for BGN,
  which rescales the gradient by design, and none for NF-ResNets.

  Args:
    avg_var, avg_sq_mean, grad_var, grad_sq_mean: measured series, length ``sum(stages) + 1``.
    stages: blocks per stage.
    norm: the model's ``norm`` (``'batch_norm'``, ``'none'``, ``'scaled_ws'``; others: None).
    skip_init: the model's ``skip_init`` (None, a float or ``'inv_sqrt_depth'``).
    bgn: the model's ``bgn`` placement.

  Returns:
    ``{'avg_var': array or None, 'grad_var': array or None}``, each of the series' length.
  """
  avg_var, avg_sq_mean = np.asarray(avg_var, np.float64), np.asarray(avg_sq_mean, np.float64)
  total = sum(stages)
  if avg_var.shape != (total + 1,):
    fail(_LAYER, 'avg_var', f'a series of length sum(stages) + 1 = {total + 1}',
         f'length {avg_var.shape}')
  if skip_init is None:
    alpha = 1.0
  elif skip_init == 'inv_sqrt_depth':
    alpha = 1.0 / math.sqrt(total)
  else:
    alpha = float(skip_init)
  if norm == 'scaled_ws':
    fwd = np.concatenate([[np.nan]] + [nf_expected_variance(n) for n in stages])
    return {'avg_var': fwd, 'grad_var': None}
  if norm not in RESIDUAL_NORMS:
    return {'avg_var': None, 'grad_var': None}
  fwd, start = [avg_var[0]], 1
  for si, n in enumerate(stages):
    # First stage: run from the stem; later stages: from the measured first block of the stage.
    v0, s0, k = ((avg_var[0], avg_sq_mean[0], n) if si == 0
                 else (avg_var[start], avg_sq_mean[start], n - 1))
    pred = residual_skip_moments(k, norm=norm, alpha=alpha, var0=v0, sq_mean0=s0)
    fwd.extend(pred['avg_var'][1:] if si == 0 else pred['avg_var'])
    start += n
  fwd = np.asarray(fwd)
  if bgn != 'none':
    return {'avg_var': fwd, 'grad_var': None}
  g = gradient_variance_recurrence(
      np.where(np.isfinite(fwd), fwd, avg_var), norm=norm, alpha=alpha,
      grad_var_out=float(np.asarray(grad_var)[-1]),
      grad_sq_mean_out=float(np.asarray(grad_sq_mean)[-1]))
  return {'avg_var': fwd, 'grad_var': g['grad_var']}
