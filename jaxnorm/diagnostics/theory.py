"""Closed-form predictions at initialization for the five papers' signal-propagation claims.

Every function here is pure numpy: it takes Python numbers and returns numbers or numpy arrays, so
it can be overlaid on measurements (``jaxnorm.diagnostics.plots``) and asserted against in tests.

Conventions. A residual network is a stem followed by blocks ``x_{l+1} = x_l + alpha * f_l(x_l)``,
``l = 0 .. L-1``. Per-block arrays have length ``L + 1``: index 0 is the stem output (the input of
the first block), index ``l + 1`` the skip path after block ``l``. The statistics are those of
``jaxnorm.functional.signal_metrics`` (those of Brock, De & Smith 2021): ``avg_var`` = mean over
channels of the batch variance, ``avg_sq_mean`` = mean over channels of the squared batch mean.

Two levels of model. The recurrences of ``residual_skip_moments`` / ``gradient_variance_recurrence``
describe a branch with one weight layer and no spatial structure (the residual MLP, exactly).
``preact_resnet_mean_field`` is the mean field of a pre-activation conv ResNet as built: several
convs per branch with BatchNorm between them, zero padding on a finite grid (``box_operator``),
stride-2 stage transitions, the finite batch (``bn_backward_finite_batch_factor``) and
NF-ResNets' Scaled WS. ``predicted_block_curves`` picks one from a model's description.

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
  Cho & Saul (2009), "Kernel Methods for Deep Learning", NeurIPS 2009 (the arc-cosine kernel).
  Schoenholz, Gilmer, Ganguli & Sohl-Dickstein (2017), "Deep Information Propagation",
  arXiv:1611.01232 (mean-field signal propagation).
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


def _check_batch(arg: str, m, minimum: int) -> int:
  if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < minimum:
    fail(_LAYER, arg, f'an int >= {minimum}', repr(m))
  return int(m)


def residual_skip_moments(num_blocks: int, *, norm: str = 'batch_norm', alpha: float = 1.0,
                          var0: float = 1.0, sq_mean0: float = 0.0,
                          batch_size: int | None = None) -> dict[str, np.ndarray]:
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

  Finite batch (``batch_size = m``, BatchNorm only). The statistics are batch statistics, and
  BatchNorm standardizes each channel over the same m samples, so ``E_j[m_j^2]`` is the expected
  squared *sample* mean of ``relu(z)`` for ``z`` standardized in-sample: to first order in 1/m
  ``1/(2 pi) + (1/4 - 1/(2 pi)) / m`` (the samples of a standardized batch are correlated by
  ``-1/(m - 1)``), while ``E_j[s_j] = 1/2`` exactly. The per-block increments become
  ``(1 - 1/pi) - (1/2 - 1/pi)/m`` and ``1/pi + (1/2 - 1/pi)/m`` (their sum stays 1); see
  :func:`bn_preactivation_slopes`.

  Args:
    num_blocks: number of residual blocks L (>= 0).
    norm: 'batch_norm' or 'none' (the residual branch's normalization).
    alpha: scalar gain on the residual branch (1 = plain ResNet; 0 or 1/sqrt(L) = SkipInit).
    var0: ``avg_var`` of the stem output (1 for N(0,1) inputs through a LeCun-normal projection).
    sq_mean0: ``avg_sq_mean`` of the stem output.
    batch_size: the batch the statistics are taken over (BatchNorm's finite-batch terms above);
      None: an infinite batch.

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
  bn_slopes = bn_preactivation_slopes(batch_size=batch_size)
  for _ in range(num_blocks):
    if norm == 'batch_norm':
      e_m2, e_s = bn_slopes['avg_sq_mean'] / 2.0, 0.5
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


def bn_preactivation_slopes(alpha: float = 1.0, *, batch_size: int | None = None
                            ) -> dict[str, float]:
  """Per-block growth of the skip path of a BN pre-activation residual net (linear regime).

  ``d avg_var / d l = alpha^2 (1 - 1/pi)``, ``d avg_sq_mean / d l = alpha^2 / pi``, and their sum is
  ``alpha^2`` (He init keeps ``E[branch^2] = 1``). See ``residual_skip_moments`` for the derivation.
  With batch statistics over ``m = batch_size`` samples, to first order in 1/m:
  ``alpha^2 ((1 - 1/pi) - (1/2 - 1/pi)/m)`` and ``alpha^2 (1/pi + (1/2 - 1/pi)/m)``.

  Args:
    alpha: residual-branch gain.
    batch_size: the number of samples m of the batch statistics (>= 2); None: infinite.

  Returns:
    ``{'avg_var': ..., 'avg_sq_mean': ...}`` slopes per block.

  References:
    De & Smith (2020), "Batch Normalization Biases Residual Blocks Towards the Identity Function in
    Deep Networks", arXiv:2002.10444.
    Brock, De & Smith (2021), "Characterizing signal propagation to close the performance gap in
    unnormalized ResNets", arXiv:2101.08692 (+0.68 / +0.32 per block).
  """
  a2 = float(alpha) ** 2
  corr = 0.0
  if batch_size is not None:
    # 2 (1/4 - 1/(2 pi)) / m: the squared sample mean of relu(z), z standardized in-sample.
    corr = (0.5 - 1.0 / math.pi) / _check_batch('batch_size', batch_size, 2)
  return {'avg_var': a2 * (2.0 * RELU_VAR - corr),
          'avg_sq_mean': a2 * (2.0 * RELU_MEAN ** 2 + corr)}


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
                                 grad_sq_mean_out: float = 0.0,
                                 batch_size: int | None = None) -> dict[str, np.ndarray]:
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

    Finite batch (``batch_size = m``): the fluctuation term ``grad_var_{l+1} / avg_var_l`` is
    multiplied by :func:`bn_backward_finite_batch_factor` ``(m - 5/2 + 1/pi) / (m - 3)`` (the
    projection removes a little less than ``2/m`` of the masked gradient, and
    ``E[1/sigma_hat^2]`` exceeds ``1/E[sigma_hat^2]`` by ``(m - 1)/(m - 3)``): 1.028 per block at
    m = 32, which compounds to ``+20 %`` on the first/last ratio of a 100-block residual MLP.
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
    batch_size: the batch m BatchNorm normalizes over (> 3); None: infinite (factor 1).

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
  kappa = (bn_backward_finite_batch_factor(batch_size)
           if batch_size is not None and norm == 'batch_norm' else 1.0)
  gv, gm = np.empty(n), np.empty(n)
  gv[-1], gm[-1] = grad_var_out, grad_sq_mean_out
  for i in range(n - 2, -1, -1):
    if norm == 'batch_norm':
      gm[i] = gm[i + 1]
      gv[i] = gv[i + 1] + a2 * (kappa * gv[i + 1] + BN_GRAD_MEAN_WEIGHT * gm[i + 1]) / avg_var[i]
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


# -- Pre-activation conv ResNets: the spatial mean field of the blocks as measured -----------------
#
# The state of an activation tensor at init, in the infinite-width limit (every channel an
# independent draw of the same Gaussian process over (sample, position)), is held as two numpy
# arrays over the P = H * W positions of its grid (row-major):
#   m[p]     = E x(n, p)^2          (second moment at position p, over samples and channels)
#   A[p, q]  = E x(n, p) x(n', q)   (n != n': the part shared across samples; its mean over all
#                                    position pairs is the squared channel mean, avg_sq_mean)
# so that avg_var = mean(m) - mean(A) and avg_sq_mean = mean(A). A gradient is one map G[p].

# NF-ResNet's gamma for relu, sqrt(2 / (1 - 1/pi)): Var(gamma relu(z)) = 1 for z ~ N(0, 1).
NF_RELU_GAMMA = math.sqrt(2.0 / (1.0 - 1.0 / math.pi))
RESNET_NORMS = ('batch_norm', 'none', 'scaled_ws')


def _grid_shape(image_size):
  """None (boundary-free) or an (H, W) tuple of positive ints."""
  if image_size is None:
    return None
  hw = (image_size, image_size) if isinstance(image_size, (int, np.integer)) else image_size
  if (not isinstance(hw, (tuple, list)) or len(hw) != 2 or
      not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1
              for v in hw)):
    fail(_LAYER, 'image_size', 'None, a positive int or an (height, width) pair', repr(image_size))
  return int(hw[0]), int(hw[1])


def _conv_taps(shape, kernel_size: int, stride: int):
  """Index and validity of every kernel tap of a zero-padded conv (pad k // 2, as jaxnorm's).

  Returns ``(idx, valid, out_shape, density)``: ``idx[t, q]`` the flattened input position read
  by tap ``t`` at output position ``q`` and ``valid[t, q]`` 1.0 where that position lies inside
  the grid (0.0 on the zero padding). ``shape=None`` is the boundary-free grid: one position,
  every tap valid (the limit of an image much larger than the receptive fields); ``density`` is
  then ``1 / stride^2``, the output positions per input position, which the transpose needs (on a
  grid the index arrays account for it, and ``density`` is 1).
  """
  k = kernel_size
  if shape is None:
    return np.zeros((k * k, 1), np.intp), np.ones((k * k, 1)), None, 1.0 / stride ** 2
  h, w = shape
  pad = k // 2
  ho, wo = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
  qi, qj = np.meshgrid(np.arange(ho), np.arange(wo), indexing='ij')
  idx, valid = [], []
  for di in range(k):
    for dj in range(k):
      pi, pj = stride * qi + di - pad, stride * qj + dj - pad
      ok = (pi >= 0) & (pi < h) & (pj >= 0) & (pj < w)
      idx.append((np.clip(pi, 0, h - 1) * w + np.clip(pj, 0, w - 1)).ravel())
      valid.append(ok.ravel().astype(np.float64))
  return np.asarray(idx), np.asarray(valid), (ho, wo), 1.0


def box_operator(height: int, width: int | None = None, *, kernel_size: int = 3,
                 stride: int = 1) -> np.ndarray:
  """The receptive-field matrix of a zero-padded ``k x k`` conv on an ``H x W`` grid.

  ``B[q, p] = 1`` when input position ``p`` lies in the ``k x k`` window of output position ``q``
  (rows ``stride * q_i - k//2 + d``, ``d = 0 .. k-1``, likewise columns; positions flattened
  row-major) and 0 where the window falls on the zero padding. A He-normal conv maps the
  per-position second moment ``m`` of its input to ``(2 / k^2) B m`` (every weight independent,
  variance ``2 / (k^2 C_in)``), and its transpose maps the gradient's: the border positions, with
  fewer valid taps, lose variance both ways.

  For ``k = 3``, stride 1 the matrix is the Kronecker product ``T_H (x) T_W`` of the tridiagonal
  all-ones matrices, whose eigenvalues are ``1 + 2 cos(j pi / (n + 1))``; see
  :func:`box_top_eigenvalue`.

  Args:
    height: grid height H (>= 1).
    width: grid width W (default: H).
    kernel_size: k (odd, >= 1).
    stride: conv stride (>= 1).

  Returns:
    float64 array of shape ``(H_out * W_out, H * W)``.

  Example:
    >>> from jaxnorm.diagnostics import theory
    >>> theory.box_operator(3).sum(1).reshape(3, 3)   # valid taps per output position
    array([[4., 6., 4.],
           [6., 9., 6.],
           [4., 6., 4.]])

  References:
    Standard (the zero-padded convolution as a banded matrix); used by
    :func:`preact_resnet_mean_field`.
  """
  width = height if width is None else width
  shape = _grid_shape((height, width))
  if (not isinstance(kernel_size, (int, np.integer)) or kernel_size < 1 or
      kernel_size % 2 == 0):
    fail(_LAYER, 'kernel_size', 'an odd int >= 1', repr(kernel_size))
  stride = _check_batch('stride', stride, 1)
  idx, valid, out, _ = _conv_taps(shape, int(kernel_size), stride)
  b = np.zeros((out[0] * out[1], shape[0] * shape[1]))
  rows = np.arange(idx.shape[1])
  for i, v in zip(idx, valid, strict=True):
    np.add.at(b, (rows, i), v)
  return b


def box_top_eigenvalue(height: int, width: int | None = None) -> float:
  """Largest eigenvalue of the zero-padded 3x3 ``box_operator``: ``prod_n (1 + 2 cos(pi/(n+1)))``.

  The 1-D operator is the ``n x n`` tridiagonal all-ones matrix, with eigenvectors
  ``sin(j pi i / (n + 1))`` and eigenvalues ``1 + 2 cos(j pi / (n + 1))``; the 2-D one is their
  Kronecker product. Divided by 9 it is the factor by which a He conv followed by a ReLU
  multiplies a signal that has settled into the top eigenvector: ``(1 + 2 cos(pi/9))^2 / 9 =
  0.921`` on an 8x8 grid, 0.991 on 32x32, 1 without a boundary.

  Args:
    height: grid height (>= 1).
    width: grid width (default: height).

  Returns:
    The eigenvalue (9 in the limit of a large grid).

  References:
    Standard (the spectrum of a tridiagonal Toeplitz matrix).
  """
  width = height if width is None else width
  h, w = _grid_shape((height, width))
  return float((1 + 2 * math.cos(math.pi / (h + 1))) * (1 + 2 * math.cos(math.pi / (w + 1))))


def bn_backward_finite_batch_factor(batch_size: int) -> float:
  """Gain of BatchNorm's backward on a masked gradient, relative to ``1 / E[batch variance]``.

  BatchNorm over ``m`` samples maps the gradient ``g`` of its output ``z`` (here ``g = 1[z > 0] r``,
  the ReLU mask times an incoming gradient ``r`` independent of ``z`` with zero batch mean, as in
  a BN pre-activation branch) to ``P g / sigma_hat``, ``P`` the projection off ``1`` and ``z``.

  * The projection keeps ``1 - (3/2 - 1/pi) / (m - 1)`` of ``E|g|^2``: of the masked gradient's
    ``(m - 1)/2`` (per unit variance of ``r``), the component along ``1`` holds
    ``m_+ m_- / m^2 ~ 1/4`` (``r`` has zero batch mean) and the component along ``z`` holds
    ``1/2 - 1/(2 pi)`` (``E[z^2 | z > 0] = 1`` and ``E[z 1[z > 0]] = 1/sqrt(2 pi)``).
  * For Gaussian channels ``sigma_hat^2 ~ sigma^2 chi^2_{m-1} / m`` is independent of the
    direction of ``z``, and ``E[1/sigma_hat^2] E[sigma_hat^2] = (m - 1)/(m - 3)``.

  The product, to first order in 1/m: ``(m - 5/2 + 1/pi) / (m - 3)`` (1.028 at m = 32, 1.0065 at
  m = 128, 1 + O(1/m^2) for a conv layer's ``m = N H W``). It multiplies the BatchNorm term of
  every residual block's gradient-variance increment. A modelling choice: the per-channel
  variances are those of Gaussian samples; a finite width adds channel-to-channel spread (its
  Jensen term, a few % per block at width 128 and batch 32, is not included).

  Args:
    batch_size: m, the samples per channel BatchNorm normalizes over (> 3).

  Returns:
    The factor.

  References:
    A derivation for this package (the BatchNorm backward pass of Ioffe & Szegedy (2015), "Batch
    Normalization: Accelerating Deep Network Training by Reducing Internal Covariate Shift",
    arXiv:1502.03167), used in the gradient recurrence of Panigrahi, Chen & Kuo (2018),
    "Analysis on Gradient Propagation in Batch Normalized Residual Networks", arXiv:1812.00342.
  """
  m = _check_batch('batch_size', batch_size, 4)
  return (m - 2.5 + 1.0 / math.pi) / (m - 3.0)


def _arccos_relu(m, a, gain2: float = 1.0):
  """E[relu(u) relu(v)] for zero-mean Gaussians of variances m_p, m_q and covariance a_pq."""
  s = np.sqrt(np.outer(m, m))
  c = np.clip(np.divide(a, s, out=np.zeros_like(a), where=s > 0), -1.0, 1.0)
  th = np.arccos(c)
  return gain2 * s / (2.0 * math.pi) * (np.sqrt(1.0 - c * c) + (math.pi - th) * c)


class _State:
  """(m, A) of one activation tensor over a grid (see the section comment)."""

  def __init__(self, m, a, shape):
    self.m, self.a, self.shape = np.asarray(m, np.float64), np.asarray(a, np.float64), shape

  def scaled(self, c: float) -> _State:
    return _State(self.m * c, self.a * c, self.shape)

  def plus(self, other: _State) -> _State:
    return _State(self.m + other.m, self.a + other.a, self.shape)

  @property
  def avg_var(self) -> float:
    return float(self.m.mean() - self.a.mean())

  @property
  def avg_sq_mean(self) -> float:
    return float(self.a.mean())


def _conv_fwd(x: _State, taps, gain: float, rho=None) -> _State:
  """A conv with independent weights of variance ``gain / (k^2 C_in)``; ``rho``: zero-sum filters.

  Scaled WS standardizes each filter to zero mean (and unit norm, ``gain = 1``); its weights then
  have covariance ``(delta_ab - 1/F) / F`` over the ``F = k^2 C_in`` entries (``F - 1 ~ F``), so the
  output loses the square of the input's mean ``rho`` summed over the valid taps, divided by
  ``k^2`` (exactly the input's mean in the interior: Scaled WS removes the ReLU's mean shift).
  """
  idx, valid, shape, _ = taps
  k2 = idx.shape[0]
  m = gain / k2 * (valid * x.m[idx]).sum(0)
  a = np.zeros((idx.shape[1], idx.shape[1]))
  for i, v in zip(idx, valid, strict=True):
    a += np.outer(v, v) * x.a[np.ix_(i, i)]
  a *= gain / k2
  if rho is not None:
    s = (valid * rho[idx]).sum(0)
    m = m - gain / k2 ** 2 * s * s
    a = a - gain / k2 ** 2 * np.outer(s, s)
  return _State(m, a, shape)


def _conv_bwd(g, taps, n_in: int, gain: float):
  """The transpose of a conv on a gradient map: ``gain / k^2`` times the sum over valid taps."""
  idx, valid, _, density = taps
  out = np.zeros(n_in)
  for i, v in zip(idx, valid, strict=True):
    out += np.bincount(i, weights=v * g, minlength=n_in)
  return out * gain * density / idx.shape[0]


def _relu_fwd(x: _State, gain2: float = 1.0) -> tuple[_State, np.ndarray]:
  """ReLU (times ``sqrt(gain2)``) of a zero-mean Gaussian state; also its mean per position."""
  rho = math.sqrt(gain2) * np.sqrt(x.m / (2.0 * math.pi))
  return _State(gain2 * x.m / 2.0, _arccos_relu(x.m, x.a, gain2), x.shape), rho


def _bn_fwd(x: _State) -> tuple[_State, float]:
  """BatchNorm per channel over (N, H, W): remove the channel mean, divide by the variance."""
  r = x.a.mean(1)
  s = r.mean()
  m = x.m - 2.0 * r + s
  a = x.a - r[:, None] - r[None, :] + s
  var = float(m.mean())
  return _State(m / var, a / var, x.shape), var


def preact_resnet_mean_field(stages, *, image_size=None, widths=None, strides=None,
                             norm: str = 'batch_norm', alpha: float = 1.0,
                             branch_convs: int = 2, batch_size: int | None = None,
                             var0: float | None = None, sq_mean0: float = 0.0,
                             grad_var_out: float = 1.0, nf_alpha: float = 0.2
                             ) -> dict[str, np.ndarray]:
  r"""Skip-path and gradient statistics per block of a pre-activation conv ResNet, at init.

  The network is ``jaxnorm.models.ResNet(style='v2', stem='cifar')`` with basic blocks: a 3x3
  stem conv, then per block ``x_{l+1} = sc(x_l) + alpha f(p_l)``, ``p_l = relu(N(x_l))``,
  ``f = conv_n o relu o N o ... o conv_1`` (``branch_convs`` He-normal 3x3 convs, zero padding 1,
  the stage's stride on the first; ``N`` BatchNorm or the identity), ``sc`` the identity or, where
  the stride or width changes, a 1x1 conv of ``p_l``. ``norm='scaled_ws'`` is the NF-ResNet
  variant: every conv Scaled-WS, ``p = gamma relu(x) beta_l`` (``gamma`` = ``NF_RELU_GAMMA``,
  ``beta_l`` = 1/expected std), inner activations ``gamma relu``, ``alpha`` times ``nf_alpha``.

  Mean field (infinite width; a reconstruction for this package). Each channel is an independent
  zero-mean Gaussian process over (sample, position); the state of a tensor is its second moment
  per position ``m[p]`` and the covariance ``A[p, q]`` between two *different* samples (what the
  samples share: ``mean(A)`` is ``avg_sq_mean``, ``mean(m) - mean(A)`` is ``avg_var``), on the
  ``H x W`` grid of that layer. Exactly, given the state of the input, in expectation over fresh
  weights:

  * conv (He): ``m' = (2/9) B m``, ``A'[q, q'] = (2/9) sum_t A[q+t, q'+t]`` over the taps ``t``
    valid at both ``q`` and ``q'`` (:func:`box_operator` ``B``: zero padding drops the taps on the
    border); Scaled WS: gain 1 and the input's mean removed (see ``_conv_fwd``);
  * ReLU of a zero-mean Gaussian: ``m' = m / 2`` and ``A' = k_1(A)``, the arc-cosine kernel
    ``sqrt(m_p m_q) (sin t + (pi - t) cos t) / (2 pi)``, ``cos t = A / sqrt(m_p m_q)`` (Cho & Saul
    2009): its constant part ``1/(2 pi)`` is the ReLU's mean, which makes channel means grow in an
    unnormalized net;
  * BatchNorm over (N, H, W): subtract the channel mean (``A`` centred over positions), divide by
    the channel variance ``sigma^2 = mean(m) - mean(A)``, which concentrates at infinite width;
  * the branch and the skip path are uncorrelated (the last conv's weights are fresh and
    symmetric), so states add.

  Backward, with the gradient-independence assumption of mean-field theory, a gradient map ``G``
  goes through a conv's transpose as ``(2 C_out / (9 C_in)) B^T G``, through a ReLU's mask as
  ``G / 2`` (the pre-activations are symmetric), and through BatchNorm as ``kappa G / sigma^2``
  with ``kappa`` = :func:`bn_backward_finite_batch_factor` of ``m = batch H W`` (1 when
  ``batch_size`` is None). For the two-conv BN branch the increment is

  .. math::

    G_l = G_{l+1} + \frac{\alpha^2 \kappa^2}{81\, \sigma_l^2 \sigma_{\mathrm{in},l}^2}
    B^\top B^\top G_{l+1},

  where ``sigma_in^2`` is the variance of the first conv's output, which the inner BatchNorm
  divides by: ``1 - 1/pi`` in the interior (the ReLU's variance doubled), so the inner BN alone
  multiplies the branch's gradient gain by ``pi / (pi - 1)``; with zero padding ``B^T B^T / 81``
  is below 1 near the border (``box_top_eigenvalue(8)^2 / 81 = 0.85``).

  Modelling choices (stated, not derived): the stem's output has the profile ``B 1`` of a 3x3
  conv of spatially uniform inputs, scaled to ``var0 + sq_mean0``, and its shared part is
  ``sq_mean0`` times the outer product of the profile's square root (normalized), the
  exact form being unknown from the statistics alone; the last tap's gradient is spatially
  uniform (global average pooling); the gradient's channel mean is not propagated (BatchNorm
  removes it; without normalization it is about ``1/batch`` of the second moment, from the
  N(0, 1) probe), so ``grad_var`` is the second moment; cross-position covariances within one
  sample are not needed and the ``1/batch`` part of the squared channel mean is neglected.

  Accuracy, measured on ``ResNet(style='v2')`` at 8x8 (100 blocks): with BatchNorm the growth per
  block matches to 0.1 % and the first/last gradient ratio to a factor 1.1 at widths 64-128 (1.2
  at width 8: a narrow net's channel variances spread, and ``E[1/sigma^2] > 1/E[sigma^2]``).
  Without normalization the prediction is the ensemble's: one network's growth per block
  scatters by about 1 % and its 100-block gradient ratio by a factor 2.2 (one standard deviation)
  at width 128, the geometric mean over initializations grows 1.4 % (width 128) to 4 % (width
  64) slower than predicted (16 % at width 8) and its gradient ratio is 1.3 to 1.5 times the
  prediction (22 to 40 initializations, batch 32 and 8).

  Args:
    stages: blocks per stage.
    image_size: the stem's output grid, an int ``H`` or ``(H, W)``; None: boundary-free (no zero
      padding anywhere: every tap valid, the maps are one number).
    widths: channels per stage (only the ratios matter, at stage transitions); default: equal.
    strides: the first block's stride per stage; default ``(1, 2, 2, ...)``.
    norm: ``'batch_norm'``, ``'none'`` or ``'scaled_ws'``.
    alpha: the SkipInit gain on every branch (1 without SkipInit).
    branch_convs: 3x3 convs per branch (2: the basic block; 1: ``x + conv(relu(N x))``).
    batch_size: the batch, for BatchNorm's finite-batch factor (None: infinite).
    var0: ``avg_var`` of the stem output (default: the mean-field value on N(0, 1) inputs,
      ``(2/9) mean(B 1)`` He, ``(1/9) mean(B 1)`` Scaled WS).
    sq_mean0: ``avg_sq_mean`` of the stem output.
    grad_var_out: ``grad_var`` at the last tap.
    nf_alpha: the NF-ResNet alpha (``norm='scaled_ws'``).

  Returns:
    dict of float64 arrays: ``avg_var``, ``avg_sq_mean``, ``grad_var`` (length ``sum(stages) + 1``,
    index 0 = stem, ``l + 1`` = after block ``l``) and ``res_avg_var`` (length ``sum(stages)``:
    the branch output's variance before ``alpha``).

  Example:
    >>> from jaxnorm.diagnostics import theory
    >>> mf = theory.preact_resnet_mean_field((4,), image_size=None, norm='none', var0=1.0)
    >>> (mf['avg_var'] + mf['avg_sq_mean']).round(2)   # doubles without a boundary
    array([ 1.,  2.,  4.,  8., 16.])

  References:
    Panigrahi, Chen & Kuo (2018), "Analysis on Gradient Propagation in Batch Normalized Residual
    Networks", arXiv:1812.00342 (the gradient side; this recurrence is a reconstruction).
    De & Smith (2020), "Batch Normalization Biases Residual Blocks Towards the Identity Function
    in Deep Networks", arXiv:2002.10444 (the forward side).
    Brock, De & Smith (2021), "Characterizing signal propagation to close the performance gap in
    unnormalized ResNets", arXiv:2101.08692 (NF-ResNets).
    Cho & Saul (2009), "Kernel Methods for Deep Learning", NeurIPS 2009 (the arc-cosine kernel).
    Schoenholz, Gilmer, Ganguli & Sohl-Dickstein (2017), "Deep Information Propagation",
    arXiv:1611.01232 (mean-field propagation and the gradient-independence assumption).
  """
  stages = tuple(_check_depth('stages', n) for n in stages)
  if not stages or min(stages) < 1:
    fail(_LAYER, 'stages', 'one or more stages of >= 1 block', repr(stages))
  check_choice(_LAYER, 'norm', norm, RESNET_NORMS)
  nc = _check_batch('branch_convs', branch_convs, 1)
  shape = _grid_shape(image_size)
  widths = (1,) * len(stages) if widths is None else tuple(widths)
  strides = (1,) + (2,) * (len(stages) - 1) if strides is None else tuple(strides)
  if len(widths) != len(stages) or len(strides) != len(stages):
    fail(_LAYER, 'widths', f'one width and one stride per stage ({len(stages)})',
         f'{len(widths)} widths, {len(strides)} strides')
  for w in widths:
    _check_batch('widths', w, 1)
  for st in strides:
    _check_batch('strides', st, 1)
  nf = norm == 'scaled_ws'
  bn = norm == 'batch_norm'
  conv_gain = 1.0 if nf else 2.0
  act_gain2 = NF_RELU_GAMMA ** 2 if nf else 1.0
  branch_a2 = float(alpha) ** 2 * (float(nf_alpha) ** 2 if nf else 1.0)

  # The stem: a 3x3 conv of spatially uniform, zero-mean inputs.
  _, valid, _, _ = _conv_taps(shape, 3, 1)
  prof = valid.sum(0) / 9.0
  if var0 is None:
    var0 = conv_gain * float(prof.mean())
  check_positive(_LAYER, 'var0', var0)
  check_positive(_LAYER, 'sq_mean0', sq_mean0, allow_zero=True)
  u = np.sqrt(prof) / np.sqrt(prof).mean()
  x = _State((var0 + sq_mean0) * prof / prof.mean(), sq_mean0 * np.outer(u, u), shape)

  if batch_size is not None:
    _check_batch('batch_size', batch_size, 2)

  def bn_kappa(state):
    # BatchNorm of a conv layer averages over m = batch * H * W samples per channel.
    if batch_size is None or state.shape is None:
      return 1.0
    return bn_backward_finite_batch_factor(max(4, batch_size * state.m.size))

  from jaxnorm.models.resnet import nf_betas  # the models' own bookkeeping, not a copy

  betas = nf_betas(stages, float(nf_alpha)) if nf else None
  taps_out = [x]
  res_var, caches = [], []
  c_prev = widths[0]
  for si, (n, c_out, stride) in enumerate(zip(stages, widths, strides, strict=True)):
    for bi in range(n):
      first = bi == 0
      s = stride if first else 1
      c_in = c_prev if first else c_out
      projection = first and (s != 1 or c_in != c_out)
      # p = act(N(x))
      if bn:
        z, var_x = _bn_fwd(x)
        kap_x = bn_kappa(x)
      else:
        z, var_x, kap_x = x, 1.0, 1.0
      beta2 = betas[si][bi] ** 2 if nf else 1.0
      p, rho = _relu_fwd(z, act_gain2 * beta2)
      # The branch: nc convs, N and act between them.
      h, h_rho, layers = p, rho, []
      for i in range(nc):
        taps = _conv_taps(h.shape, 3, s if i == 0 else 1)
        h = _conv_fwd(h, taps, conv_gain, h_rho if nf else None)
        layer = {'taps': taps, 'n_in': None, 'c_in': c_in if i == 0 else c_out, 'var': 1.0,
                 'kappa': 1.0}
        layers.append(layer)
        if i < nc - 1:
          if bn:
            layer['kappa'] = bn_kappa(h)
            h, layer['var'] = _bn_fwd(h)
          h, h_rho = _relu_fwd(h, act_gain2)
      res_var.append(h.avg_var)
      f = h.scaled(branch_a2)
      if projection:
        sc_taps = _conv_taps(p.shape, 1, s)
        sc = _conv_fwd(p, sc_taps, conv_gain, rho if nf else None)
      else:
        sc_taps, sc = None, x
      caches.append({'n_x': x.m.size, 'var_x': var_x, 'kappa_x': kap_x, 'beta2': beta2,
                     'layers': layers, 'sc_taps': sc_taps, 'c_in': c_in, 'c_out': c_out,
                     'sizes': [x.m.size] + [ly['taps'][0].shape[1] for ly in layers]})
      x = sc.plus(f)
      taps_out.append(x)
    c_prev = c_out

  g = np.full(x.m.size, float(grad_var_out))
  grads = [g]
  for cache in reversed(caches):
    layers, sizes = cache['layers'], cache['sizes']
    gb = branch_a2 * g
    for i in range(nc - 1, -1, -1):
      ly = layers[i]
      gb = _conv_bwd(gb, ly['taps'], sizes[i], conv_gain * cache['c_out'] / ly['c_in'])
      if i > 0:
        prev = layers[i - 1]
        gb = gb * 0.5 * act_gain2 * prev['kappa'] / prev['var']
    if cache['sc_taps'] is not None:
      gb = gb + _conv_bwd(g, cache['sc_taps'], sizes[0],
                          conv_gain * cache['c_out'] / cache['c_in'])
      skip = np.zeros(sizes[0])
    else:
      skip = g
    g = skip + gb * 0.5 * act_gain2 * cache['beta2'] * cache['kappa_x'] / cache['var_x']
    grads.append(g)
  return {'avg_var': np.asarray([t.avg_var for t in taps_out]),
          'avg_sq_mean': np.asarray([t.avg_sq_mean for t in taps_out]),
          'grad_var': np.asarray([gm.mean() for gm in grads[::-1]]),
          'res_avg_var': np.asarray(res_var)}


def _skip_alpha(skip_init, total: int) -> float:
  if skip_init is None:
    return 1.0
  if skip_init == 'inv_sqrt_depth':
    return 1.0 / math.sqrt(total)
  if isinstance(skip_init, bool) or not isinstance(skip_init, (int, float, np.floating)):
    fail(_LAYER, 'skip_init', "None, a float or 'inv_sqrt_depth'", repr(skip_init))
  return float(skip_init)


def predicted_block_curves(avg_var, avg_sq_mean, grad_var, grad_sq_mean,
                           stages, *, norm: str, skip_init=None, bgn: str = 'none',
                           kind: str = 'mlp', image_size=None, widths=None, strides=None,
                           branch_convs: int = 2, batch_size: int | None = None,
                           style: str = 'v2', nf_alpha: float = 0.2) -> dict:
  """The theory lines drawn beside a measured per-block report, or None where none applies.

  The measured series are per tap, index 0 the stem and index ``l + 1`` the skip path after block
  ``l`` (``SignalReport.series``), of a residual network with ``stages`` blocks per stage, built
  with the model keywords ``norm``, ``skip_init`` and ``bgn`` of ``jaxnorm.models``. The theory
  starts from the measured stem (``avg_var[0]``, ``avg_sq_mean[0]``) and, backwards, from the
  measured gradient at the last tap; everything in between is predicted. ``alpha`` is the
  SkipInit gain (``1 / sqrt(total blocks)`` for ``'inv_sqrt_depth'``, 1 without SkipInit).

  * ``kind='mlp'`` (the residual MLP, ``x + alpha W relu(N(x))``, and the default): forward
    :func:`residual_skip_moments` within each stage (a later stage from its measured first
    block), backward :func:`gradient_variance_recurrence`, both with BatchNorm's finite-batch
    terms when ``batch_size`` is given. ``norm='scaled_ws'`` (kept for older callers) draws the
    NF-ResNet's own bookkeeping :func:`nf_expected_variance`, with no gradient line.
  * ``kind='resnet'``: ``jaxnorm.models.ResNet(style='v2', stem='cifar')`` with basic blocks of
    ``branch_convs`` 3x3 convs, on an ``image_size`` grid (None: no boundary), ``widths`` and
    ``strides`` per stage: :func:`preact_resnet_mean_field` (zero padding, the inner
    BatchNorms, stage transitions, finite batch; ``'batch_norm'``, ``'none'``, ``'scaled_ws'``).
    Another ``style`` (post-activation 'v1', 'relu_first') or norm: None.

  BGN nodes are the identity forward, so the ``norm`` line applies; the gradient line is None for
  BGN, which rescales the gradient by design, and for norms without a theory.

  Args:
    avg_var, avg_sq_mean, grad_var, grad_sq_mean: measured series, length ``sum(stages) + 1``.
    stages: blocks per stage.
    norm: the model's ``norm``.
    skip_init: the model's ``skip_init`` (None, a float or ``'inv_sqrt_depth'``).
    bgn: the model's ``bgn`` placement.
    kind: ``'mlp'`` or ``'resnet'`` (above).
    image_size: ResNet: the input's (= the CIFAR stem's output) ``H`` or ``(H, W)``.
    widths: ResNet: channels per stage (default equal; only ratios matter).
    strides: ResNet: first-block stride per stage (default ``(1, 2, 2, ...)``).
    branch_convs: ResNet: convs per residual branch (2 for basic blocks).
    batch_size: the measured batch (BatchNorm's finite-batch terms); None: infinite.
    style: ResNet block style; only ``'v2'`` (pre-activation) has a theory.
    nf_alpha: the NF-ResNet alpha (``norm='scaled_ws'``, ResNet).

  Returns:
    ``{'avg_var': array or None, 'grad_var': array or None}``, each of the series' length.

  References:
    De & Smith (2020), "Batch Normalization Biases Residual Blocks Towards the Identity Function
    in Deep Networks", arXiv:2002.10444; Panigrahi, Chen & Kuo (2018), "Analysis on Gradient
    Propagation in Batch Normalized Residual Networks", arXiv:1812.00342; Brock, De & Smith
    (2021), "Characterizing signal propagation to close the performance gap in unnormalized
    ResNets", arXiv:2101.08692.
  """
  avg_var, avg_sq_mean = np.asarray(avg_var, np.float64), np.asarray(avg_sq_mean, np.float64)
  grad_var, grad_sq_mean = np.asarray(grad_var, np.float64), np.asarray(grad_sq_mean, np.float64)
  check_choice(_LAYER, 'kind', kind, ('mlp', 'resnet'))
  stages = tuple(stages)
  total = sum(stages)
  for arg, series in (('avg_var', avg_var), ('avg_sq_mean', avg_sq_mean),
                      ('grad_var', grad_var), ('grad_sq_mean', grad_sq_mean)):
    if series.shape != (total + 1,):
      fail(_LAYER, arg, f'a series of length sum(stages) + 1 = {total + 1}',
           f'shape {series.shape}')
  alpha = _skip_alpha(skip_init, total)
  none = {'avg_var': None, 'grad_var': None}
  if kind == 'resnet':
    if style != 'v2' or norm not in RESNET_NORMS:
      return none
    mf = preact_resnet_mean_field(
        stages, image_size=image_size, widths=widths, strides=strides, norm=norm, alpha=alpha,
        branch_convs=branch_convs, batch_size=batch_size, var0=float(avg_var[0]),
        sq_mean0=float(avg_sq_mean[0]), grad_var_out=float(grad_var[-1] + grad_sq_mean[-1]),
        nf_alpha=nf_alpha)
    # The gradient's squared channel mean is not propagated (see preact_resnet_mean_field): the
    # line is the second moment less the squared mean measured at the last tap.
    grad = None if bgn != 'none' else mf['grad_var'] - float(grad_sq_mean[-1])
    return {'avg_var': mf['avg_var'], 'grad_var': grad}
  if norm == 'scaled_ws':
    fwd = np.concatenate([[np.nan]] + [nf_expected_variance(n) for n in stages])
    return {'avg_var': fwd, 'grad_var': None}
  if norm not in RESIDUAL_NORMS:
    return none
  fwd, start = [avg_var[0]], 1
  for si, n in enumerate(stages):
    # First stage: run from the stem; later stages: from the measured first block of the stage.
    v0, s0, k = ((avg_var[0], avg_sq_mean[0], n) if si == 0
                 else (avg_var[start], avg_sq_mean[start], n - 1))
    pred = residual_skip_moments(k, norm=norm, alpha=alpha, var0=v0, sq_mean0=s0,
                                 batch_size=batch_size)
    fwd.extend(pred['avg_var'][1:] if si == 0 else pred['avg_var'])
    start += n
  fwd = np.asarray(fwd)
  if bgn != 'none':
    return {'avg_var': fwd, 'grad_var': None}
  g = gradient_variance_recurrence(
      np.where(np.isfinite(fwd), fwd, avg_var), norm=norm, alpha=alpha,
      grad_var_out=float(grad_var[-1]), grad_sq_mean_out=float(grad_sq_mean[-1]),
      batch_size=batch_size if norm == 'batch_norm' else None)
  return {'avg_var': fwd, 'grad_var': g['grad_var']}
