"""Optimizers and learning-rate schedules built from a config.

- ``sgd``: heavy-ball momentum or Nesterov; weight decay is coupled L2 (``g + wd * w`` before the
  momentum buffer), as in the ResNet recipes of the papers.
- ``adam``: AdamW (decoupled weight decay, ``w <- w - lr * (adam(g) + wd * w)``).
- Which parameters weight decay touches is the ``decay_mask`` choice (``DECAY_MASKS``;
  ``optimizer.decay_mask`` in a training config): ``'kernels'`` (the default) is
  :func:`jaxnorm.models.decay_mask` (the package's one mask: kernels yes; gains, biases, PWS
  alphas and normalization scales no); ``'all'`` decays every parameter, as a plain
  ``torch.optim.SGD(model.parameters(), weight_decay=wd)`` does; ``'all_but_alpha'`` decays every
  parameter but PWS's ``alpha``, the parameter groups of the official PWS code (its ``alpha`` is
  in a group with weight decay 0; kernels, biases and GroupNorm affines get the decay). A callable
  ``params -> bool tree`` is also accepted.
- Optional adaptive gradient clipping (``optax.adaptive_grad_clip``, unit-wise ratio
  ``||g|| / max(||w||, 1e-3) <= clip``), applied to the raw gradient first.
- Schedules: linear warmup, then cosine decay to 0, step decay (multiply by ``step_decay`` at the
  given fractions of training), or constant.

References:
  Loshchilov & Hutter (2017), 'SGDR: Stochastic Gradient Descent with Warm Restarts',
  arXiv:1608.03983 (cosine schedule).
  Loshchilov & Hutter (2019), 'Decoupled Weight Decay Regularization', arXiv:1711.05101 (AdamW).
  Goyal, Dollar, Girshick, Noordhuis, Wesolowski, Kyrola, Tulloch, Jia & He (2017), 'Accurate,
  Large Minibatch SGD: Training ImageNet in 1 Hour', arXiv:1706.02677 (linear warmup, step decay).
  Brock, De, Smith & Simonyan (2021), 'High-Performance Large-Scale Image Recognition Without
  Normalization', arXiv:2102.06171 (adaptive gradient clipping).
  Szegedy, Vanhoucke, Ioffe, Shlens & Wojna (2016), 'Rethinking the Inception Architecture for
  Computer Vision', arXiv:1512.00567 (label smoothing, in steps.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import optax

from jaxnorm import models
from jaxnorm.functional._checks import check_choice

OPTIMIZERS = ('sgd', 'adam')
SCHEDULES = ('cosine', 'step', 'constant')
DECAY_MASKS = ('kernels', 'all', 'all_but_alpha')


def _decay_all(params):
  """Every leaf decays (a mask, not ``mask=None``, so the optimizer state keeps its structure)."""
  return jax.tree.map(lambda _: True, params)


def _decay_all_but_alpha(params):
  """Every leaf but those named 'alpha' (PWS's per-channel gain) decays."""

  def keep(path, _):
    last = path[-1]
    return str(getattr(last, 'key', getattr(last, 'name', last))) != 'alpha'

  return jax.tree_util.tree_map_with_path(keep, params)


def resolve_decay_mask(decay_mask: str | Callable[[Any], Any] | None) -> Callable[[Any], Any]:
  """The mask function (``params -> bool tree``, True = decayed) of a ``decay_mask`` choice.

  Args:
    decay_mask: None or ``'kernels'`` (:func:`jaxnorm.models.decay_mask`: kernels only),
      ``'all'`` (every parameter), ``'all_but_alpha'`` (every parameter but PWS's ``alpha``, the
      official PWS parameter groups), or a callable returned as is.

  Returns:
    A function for ``optax.add_decayed_weights(mask=...)``. Every choice is a function (never
    ``mask=None``), so the optimizer state has the same structure whichever is chosen and a
    checkpoint restores under any of them.

  Raises:
    ValueError: naming the argument, for an unknown name.

  References:
    Liu, Ge, Li & Gui (2021), 'Delving into Variance Transmission and Normalization: Shift of
    Average Gradient Makes the Network Collapse', arXiv:2103.11590 (official code: alpha in its
    own parameter group with weight decay 0, every other parameter decayed).
  """
  if decay_mask is None:
    return models.decay_mask
  if callable(decay_mask):
    return decay_mask
  check_choice('make_optimizer', 'decay_mask', decay_mask, DECAY_MASKS)
  return {'kernels': models.decay_mask, 'all': _decay_all,
          'all_but_alpha': _decay_all_but_alpha}[decay_mask]


def make_schedule(learning_rate: float, total_steps: int, *, schedule: str = 'cosine',
                  warmup_steps: int = 0, step_boundaries: Sequence[float] = (0.5, 0.75),
                  step_decay: float = 0.1) -> optax.Schedule:
  """Learning rate as a function of the step.

  Args:
    learning_rate: peak learning rate (reached at the end of warmup).
    total_steps: length of training.
    schedule: ``'cosine'`` (``lr * (1 + cos(pi * t)) / 2`` after warmup), ``'step'`` (multiply by
      ``step_decay`` at each boundary) or ``'constant'``.
    warmup_steps: linear warmup from 0 over this many steps.
    step_boundaries: fractions of ``total_steps`` where the step schedule decays.
    step_decay: factor applied at each boundary.

  Returns:
    An optax schedule.

  References:
    Loshchilov & Hutter (2017), 'SGDR: Stochastic Gradient Descent with Warm Restarts',
    arXiv:1608.03983; Goyal et al. (2017), 'Accurate, Large Minibatch SGD: Training ImageNet in 1
    Hour', arXiv:1706.02677.
  """
  check_choice('make_schedule', 'schedule', schedule, SCHEDULES)
  decay_steps = max(total_steps - warmup_steps, 1)
  if schedule == 'cosine':
    main = optax.cosine_decay_schedule(learning_rate, decay_steps)
  elif schedule == 'step':
    boundaries = {max(int(f * total_steps) - warmup_steps, 1): step_decay
                  for f in step_boundaries}
    main = optax.piecewise_constant_schedule(learning_rate, boundaries)
  else:
    main = optax.constant_schedule(learning_rate)
  if warmup_steps <= 0:
    return main
  warmup = optax.linear_schedule(0.0, learning_rate, warmup_steps)
  return optax.join_schedules([warmup, main], [warmup_steps])


def make_optimizer(name: str, schedule: optax.Schedule, *, momentum: float = 0.9,
                   nesterov: bool = False, weight_decay: float = 0.0, b1: float = 0.9,
                   b2: float = 0.999, eps: float = 1e-8, agc_clip: float = 0.0,
                   decay_mask: str | Callable[[Any], Any] | None = None,
                   ) -> optax.GradientTransformation:
  """The optax optimizer for a training run.

  Args:
    name: ``'sgd'`` or ``'adam'``.
    schedule: learning-rate schedule.
    momentum: SGD momentum (0 for plain SGD).
    nesterov: Nesterov momentum for SGD.
    weight_decay: decay coefficient (0 disables it).
    b1: Adam first-moment decay.
    b2: Adam second-moment decay.
    eps: Adam epsilon.
    agc_clip: adaptive gradient clipping threshold (0 disables it).
    decay_mask: which parameters weight decay touches: None / ``'kernels'`` (default,
      :func:`jaxnorm.models.decay_mask`: kernels yes; biases, scales, gains, alphas no),
      ``'all'``, ``'all_but_alpha'`` (see :func:`resolve_decay_mask`), or a function
      ``params -> bool pytree``.

  Returns:
    An ``optax.GradientTransformation``.

  References:
    Loshchilov & Hutter (2019), 'Decoupled Weight Decay Regularization', arXiv:1711.05101;
    Brock, De, Smith & Simonyan (2021), 'High-Performance Large-Scale Image Recognition Without
    Normalization', arXiv:2102.06171.
  """
  check_choice('make_optimizer', 'name', name, OPTIMIZERS)
  mask = resolve_decay_mask(decay_mask)
  parts = []
  if agc_clip > 0:
    parts.append(optax.adaptive_grad_clip(agc_clip))
  if name == 'sgd':
    if weight_decay > 0:
      parts.append(optax.add_decayed_weights(weight_decay, mask=mask))
    parts.append(optax.sgd(schedule, momentum=momentum or None, nesterov=nesterov))
  else:
    parts.append(optax.scale_by_adam(b1=b1, b2=b2, eps=eps))
    if weight_decay > 0:
      parts.append(optax.add_decayed_weights(weight_decay, mask=mask))
    parts.append(optax.scale_by_learning_rate(schedule))
  return optax.chain(*parts)


def schedule_from_config(config: Any) -> optax.Schedule:
  """:func:`make_schedule` for a training config (``optimizer.learning_rate``, ``total_steps``
  and the ``schedule`` section)."""
  s = config.schedule
  return make_schedule(config.optimizer.learning_rate, config.total_steps, schedule=s.name,
                       warmup_steps=s.warmup_steps, step_boundaries=tuple(s.step_boundaries),
                       step_decay=s.step_decay)


def optimizer_from_config(optimizer: Any, schedule: optax.Schedule,
                          ) -> optax.GradientTransformation:
  """:func:`make_optimizer` for a config's ``optimizer`` section (``config.optimizer``).

  Reads ``name``, ``momentum``, ``nesterov``, ``weight_decay``, ``b1``, ``b2``, ``eps``,
  ``agc_clip`` and ``decay_mask`` (``'kernels'`` when the section has none: a config written
  before the field existed).

  Args:
    optimizer: the ``optimizer`` section of a training config.
    schedule: learning-rate schedule.

  Returns:
    An ``optax.GradientTransformation``.
  """
  o = optimizer
  mask = o.get('decay_mask', 'kernels') if hasattr(o, 'get') else 'kernels'
  return make_optimizer(o.name, schedule, momentum=o.momentum, nesterov=o.nesterov,
                        weight_decay=o.weight_decay, b1=o.b1, b2=o.b2, eps=o.eps,
                        agc_clip=o.agc_clip, decay_mask=mask)
