"""Bjorck et al.'s measurements: relative-loss sweeps, channel statistics by depth, logit gradients.

References:
  Bjorck, Gomes, Selman & Weinberger (2018), "Understanding Batch Normalization",
  arXiv:1806.02375.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxnorm.functional._checks import check_positive, fail
from jaxnorm.models.taps import block_taps

_LAYER = 'jaxnorm.diagnostics.sweeps'


def relative_loss_sweep(loss_fn: Callable[[Any, Any], jax.Array], params, batches: Sequence[Any],
                        step_sizes=None, *, num: int = 17, lo: float = 1e-5,
                        hi: float = 1e-1) -> tuple[np.ndarray, np.ndarray]:
  """``L_B(theta - eta grad L_B(theta)) / L_B(theta)`` over a log grid of step sizes eta.

  For each fixed batch ``B`` the gradient is taken once at ``theta``; the loss along the step is
  evaluated for all step sizes at once (``jax.vmap`` over eta) on the same batch. Bjorck et al. call
  a step "divergent" when the ratio exceeds 1e3 (see ``divergence_step_size``).

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar`` (close over anything else, e.g. batch_stats).
    params: the parameters theta (any pytree).
    batches: the fixed mini-batches (Bjorck et al. use batches 1, 4 and 7 of training).
    step_sizes: the eta grid; default ``num`` log-spaced values in ``[lo, hi]`` (1e-5 .. 1e-1).
    num: grid size when ``step_sizes`` is None.
    lo: smallest step when ``step_sizes`` is None.
    hi: largest step when ``step_sizes`` is None.

  Returns:
    ``(step_sizes (S,), ratios (len(batches), S))`` as numpy float64 arrays (inf/NaN kept).

  References:
    Bjorck, Gomes, Selman & Weinberger (2018), "Understanding Batch Normalization",
    arXiv:1806.02375 (the relative loss of one gradient step).
  """
  if not batches:
    fail(_LAYER, 'batches', 'at least one batch', batches)
  if step_sizes is None:
    check_positive(_LAYER, 'lo', lo)
    if not hi > lo:
      fail(_LAYER, 'hi', f'a value above lo={lo}', hi)
    step_sizes = np.logspace(np.log10(lo), np.log10(hi), num)
  etas = jnp.asarray(step_sizes, jnp.float32)
  if etas.ndim != 1 or etas.size == 0:
    fail(_LAYER, 'step_sizes', 'a non-empty 1-D sequence', np.shape(step_sizes))

  @jax.jit
  def sweep(params, batch):
    loss0, grads = jax.value_and_grad(loss_fn)(params, batch)

    def moved(eta):
      p = jax.tree.map(lambda w, g: w - eta * g.astype(w.dtype), params, grads)
      return loss_fn(p, batch)

    return jax.vmap(moved)(etas) / loss0

  ratios = np.stack([np.asarray(sweep(params, b), np.float64) for b in batches])
  return np.asarray(step_sizes, np.float64), ratios


def divergence_step_size(step_sizes, ratios, threshold: float = 1e3) -> float:
  """Smallest step size whose relative loss exceeds ``threshold`` (or is not finite) on any batch.

  Args:
    step_sizes: ``(S,)`` increasing grid.
    ratios: ``(B, S)`` or ``(S,)`` relative losses.
    threshold: divergence threshold (1e3, as read from a third-party summary of Bjorck et al.).

  Returns:
    The step size, or ``inf`` if no step diverges.

  References:
    Bjorck, Gomes, Selman & Weinberger (2018), "Understanding Batch Normalization",
    arXiv:1806.02375 (the learning rates at which training diverges).
  """
  r = np.atleast_2d(np.asarray(ratios, np.float64))
  bad = np.any(~np.isfinite(r) | (r > threshold), axis=0)
  return float(np.asarray(step_sizes)[bad][0]) if bad.any() else float('inf')


def classification_loss_fn(model: nn.Module, variables: Mapping[str, Any], *,
                           train: bool = True) -> Callable[[Any, Any], jax.Array]:
  """``loss_fn(params, (x, labels))``: mean softmax cross-entropy of ``model`` (state discarded).

  Args:
    model: a Flax module called as ``model.apply(variables, x, train=train, mutable=...)``.
    variables: the non-param collections (e.g. batch_stats) are taken from here.
    train: training mode (batch statistics).

  Returns:
    A loss function for ``relative_loss_sweep``.

  References:
    Bjorck, Gomes, Selman & Weinberger (2018), "Understanding Batch Normalization",
    arXiv:1806.02375.
  """
  rest = {k: v for k, v in variables.items()
          if k not in ('params', 'intermediates', 'perturbations')}
  mutable = (list(rest) or False) if train else False

  def loss_fn(params, batch):
    x, labels = batch
    out = model.apply({**rest, 'params': params}, x, train=train, mutable=mutable)
    logits = out[0] if mutable else out
    return optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), labels).mean()

  return loss_fn


@dataclasses.dataclass(frozen=True)
class ChannelStats:
  """Per-channel batch means and standard deviations at each tap, in network order.

  Attributes:
    means: one numpy array ``(C,)`` per tap.
    stds: one numpy array ``(C,)`` per tap.
  """

  means: list[np.ndarray]
  stds: list[np.ndarray]

  def log10_summary(self) -> dict[str, np.ndarray]:
    """Mean and std over channels of log10|mean| and log10(std), per tap (Bjorck's Fig.)."""
    lm = [np.log10(np.abs(m) + 1e-30) for m in self.means]
    ls = [np.log10(s + 1e-30) for s in self.stds]
    return {'log10_abs_mean': np.array([v.mean() for v in lm]),
            'log10_abs_mean_spread': np.array([v.std() for v in lm]),
            'log10_std': np.array([v.mean() for v in ls]),
            'log10_std_spread': np.array([v.std() for v in ls])}


def channel_stats_by_depth(model: nn.Module, variables: Mapping[str, Any], x, *,
                           train: bool = True, tap: str = 'skip') -> ChannelStats:
  """Per-channel batch mean and std of every ``tap`` activation (stem first when present).

  Args:
    model: an instrumented model (see ``jaxnorm.diagnostics.signal_propagation``).
    variables: its variables.
    x: input batch.
    train: training mode.
    tap: 'skip' (residual blocks) or 'layer' (plain MLP).

  Returns:
    ``ChannelStats``.

  References:
    Bjorck, Gomes, Selman & Weinberger (2018), "Understanding Batch Normalization",
    arXiv:1806.02375 (channel means and standard deviations against depth).
  """
  base = {k: v for k, v in variables.items() if k not in ('intermediates', 'perturbations')}
  state = [k for k in base if k != 'params'] if train else []

  @jax.jit
  def run(v, x):
    _, mut = model.apply(v, x, train=train, mutable=['intermediates', *state])
    inter = mut['intermediates']
    acts = block_taps(inter, 'stem') + block_taps(inter, tap)
    axes = lambda a: tuple(range(a.ndim - 1))
    return ([jnp.mean(a.astype(jnp.float32), axes(a)) for a in acts],
            [jnp.std(a.astype(jnp.float32), axes(a)) for a in acts])

  means, stds = jax.device_get(run(base, x))
  if not means:
    fail(_LAYER, 'model', f"a model that sows '{tap}' intermediates", type(model).__name__)
  return ChannelStats([np.asarray(m) for m in means], [np.asarray(s) for s in stds])


def logit_gradient_map(model: nn.Module, variables: Mapping[str, Any], x, labels, *,
                       train: bool = True) -> dict[str, Any]:
  """``dL/dlogits`` of the mean cross-entropy (``(softmax - onehot) / B``) and its dominance.

  Bjorck et al. show that without BN one class column carries large same-sign gradients for all
  images (the network predicts one class everywhere at init). ``dominant_column_fraction`` is the
  fraction of the squared gradient norm in the largest column (1/classes when spread evenly);
  ``majority_prediction_fraction`` the fraction of images predicted as the most common class.

  Args:
    model: a classifier.
    variables: its variables.
    x: input batch.
    labels: integer labels ``(B,)``.
    train: training mode.

  Returns:
    dict with ``grad`` (numpy ``(B, classes)``), ``dominant_column``, ``dominant_column_fraction``
    and ``majority_prediction_fraction``.

  References:
    Bjorck, Gomes, Selman & Weinberger (2018), "Understanding Batch Normalization",
    arXiv:1806.02375 (the heat map of output-layer gradients).
  """
  base = {k: v for k, v in variables.items() if k not in ('intermediates', 'perturbations')}
  state = ([k for k in base if k != 'params'] or False) if train else False
  out = model.apply(base, x, train=train, mutable=state)
  logits = (out[0] if state else out).astype(jnp.float32)
  grad = np.asarray(jax.grad(
    lambda z: optax.softmax_cross_entropy_with_integer_labels(z, labels).mean())(logits))
  col = (grad ** 2).sum(0)
  preds = np.asarray(jnp.argmax(logits, -1))
  return {'grad': grad, 'dominant_column': int(col.argmax()),
          'dominant_column_fraction': float(col.max() / col.sum()),
          'majority_prediction_fraction': float(np.bincount(preds).max() / len(preds))}
