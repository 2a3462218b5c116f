"""Forward and backward signal propagation of any instrumented model, in one jitted pass.

A model following jaxnorm's instrumentation contract (``jaxnorm.models``) exposes, without
changing its outputs:

* the stem output: ``perturb('stem', x)`` and ``sow('intermediates', 'stem', x)``;
* per residual block: ``sow('intermediates', 'branch', f)`` (the residual branch before its
  gain) and the skip path after the block: ``perturb('skip', out)``,
  ``sow('intermediates', 'skip', out)``;
* per hidden layer of a plain MLP: ``perturb('layer', h)``, ``sow('intermediates', 'layer', h)``.

``signal_propagation`` runs one forward and one backward pass and reduces every tap to the
signal-propagation statistics of Brock et al. (papers.md §0): for the activation ``avg_sq_mean`` and
``avg_var`` (mean over channels of the batch squared mean / batch variance), for the residual branch
``res_avg_var``, and for the gradient of the loss with respect to the tap (read exactly through the
``'perturbations'`` collection) ``grad_sq_mean`` and ``grad_var``, defined the same way.

References:
  Brock, De & Smith 2021a (SPPs; deepmind nfnets ``base.signal_metrics``), papers.md §0;
  De & Smith 2020 (papers.md §3); Panigrahi et al. 2018 (per-block gradient variance, §1);
  Cabana & Lago-Fernandez 2021 (per-layer gradient norms, §2).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxnorm.functional._checks import check_floating, check_rank, fail
from jaxnorm.functional.signal_metrics import signal_metrics
from jaxnorm.models.stacking import SCANNED, unstack_blocks
from jaxnorm.models.taps import block_tap_groups

_LAYER = 'signal_propagation'
PROBE_SEED = 0
_NUM = re.compile(r'(\d+)')


def _metrics(x) -> tuple[jax.Array, jax.Array]:
  """(avg_sq_mean, avg_var) over all axes but the last (channels), float32, two-pass."""
  m = signal_metrics(x)
  return m.avg_sq_mean, m.avg_var


@dataclasses.dataclass(frozen=True)
class TapStats:
  """Statistics at one tap point (the stem, a residual block's output, or an MLP layer).

  Attributes:
    avg_sq_mean: mean over channels of the squared batch mean of the activation.
    avg_var: mean over channels of the batch (population) variance of the activation.
    grad_sq_mean: the same squared mean, of dL/d(activation).
    grad_var: the same variance, of dL/d(activation).
    res_avg_var: ``avg_var`` of the residual branch before its gain (blocks only, else None).
  """

  avg_sq_mean: float
  avg_var: float
  grad_sq_mean: float
  grad_var: float
  res_avg_var: float | None = None


@dataclasses.dataclass(frozen=True)
class SignalReport:
  """Per-tap forward and backward statistics of one model on one batch.

  Attributes:
    stem: statistics after the stem (None if the model has no stem tap).
    blocks: one entry per residual block, in network order (skip path after the block).
    layers: one entry per hidden layer of a plain MLP ('layer' taps), in order.
    weight_grad_norms: L2 norm of dL/dparam per parameter, keyed 'module/.../name' in network
      order (scan-stacked parameters are split per block).
    loss: the loss value used for the backward pass.
    probe: how the backward pass was seeded ('labels: softmax cross-entropy' or the Gaussian
      logit cotangent).
  """

  stem: TapStats | None
  blocks: list[TapStats]
  layers: list[TapStats]
  weight_grad_norms: dict[str, float]
  loss: float
  probe: str

  @property
  def taps(self) -> list[TapStats]:
    """The stem (if any) followed by the blocks (or the MLP layers when there are no blocks)."""
    rest = self.blocks if self.blocks else self.layers
    return ([self.stem] if self.stem is not None else []) + list(rest)

  def series(self, field: str) -> np.ndarray:
    """``field`` along ``taps`` as a float64 array (NaN where undefined, e.g. the stem's
    ``res_avg_var``)."""
    if field not in {f.name for f in dataclasses.fields(TapStats)}:
      fail('SignalReport.series', 'field',
           'one of ' + ', '.join(f.name for f in dataclasses.fields(TapStats)), repr(field))
    vals = [getattr(t, field) for t in self.taps]
    return np.array([np.nan if v is None else v for v in vals], np.float64)

  def to_dict(self) -> dict[str, Any]:
    """A JSON-serializable dict (non-finite numbers become None)."""

    def clean(v):
      if isinstance(v, float):
        return v if math.isfinite(v) else None
      if isinstance(v, dict):
        return {k: clean(x) for k, x in v.items()}
      if isinstance(v, list):
        return [clean(x) for x in v]
      return v

    return clean(dataclasses.asdict(self))


def _natural_key(path: str) -> list:
  return [int(t) if t.isdigit() else t for t in _NUM.split(path)]


def _leaf_norms(grads) -> dict[str, jax.Array]:
  """L2 norm of every gradient leaf; scan-stacked leaves get one norm per block (shape (n,))."""

  def norm(path, leaf):
    stacked = any(getattr(k, 'key', None) == SCANNED for k in path)
    axes = tuple(range(1 if stacked else 0, leaf.ndim))
    return jnp.sqrt(jnp.sum(jnp.square(leaf.astype(jnp.float32)), axis=axes))

  return jax.tree_util.tree_map_with_path(norm, grads)


def _named_norms(norms) -> dict[str, float]:
  """The per-leaf norm tree (host arrays) as {'module/.../name': norm}, per block, in order."""
  flat = jax.tree_util.tree_flatten_with_path(unstack_blocks(norms))[0]
  out = {'/'.join(str(getattr(k, 'key', getattr(k, 'idx', k))) for k in path): float(leaf)
         for path, leaf in flat}
  return dict(sorted(out.items(), key=lambda kv: _natural_key(kv[0])))


def _group_metrics(groups) -> tuple[jax.Array, jax.Array]:
  """(avg_sq_mean, avg_var) per block of tap groups with a leading block axis, concatenated.

  Consecutive groups of equal shape are joined and reduced by one vectorized reduction (a whole
  stage at once): the traced graph grows with the number of stages, not of blocks, and equal
  activations give bit-equal statistics wherever they sit.
  """
  runs: list[list[jax.Array]] = []
  for g in groups:
    if runs and runs[-1][0].shape[1:] == g.shape[1:] and runs[-1][0].dtype == g.dtype:
      runs[-1].append(g)
    else:
      runs.append([g])
  per_run = [jax.vmap(_metrics)(jnp.concatenate(r) if len(r) > 1 else r[0]) for r in runs]
  return (jnp.concatenate([m[0] for m in per_run]),
          jnp.concatenate([m[1] for m in per_run]))


def gaussian_logit_probe(shape, seed: int = PROBE_SEED) -> jax.Array:
  """The fixed backward probe used without labels: ``N(0, 1)`` entries from ``PRNGKey(seed)``.

  The loss is then ``L = mean_b <probe_b, logits_b>``, so ``dL/dlogits = probe / batch``, the
  scale of a batch-mean loss.

  Args:
    shape: the logits' shape ``(batch, classes)``.
    seed: PRNG seed (default 0).

  Returns:
    float32 array of that shape.
  """
  return jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32)


_REBUILT = ('intermediates', 'perturbations')


@functools.partial(jax.jit, static_argnames=('model', 'train', 'probe_seed', 'initialize'))
def _measure(model: nn.Module, base_arg, x, labels, rng, *, train: bool, probe_seed: int,
             initialize: bool) -> dict[str, Any]:
  """The jitted forward + backward pass of ``signal_propagation``.

  Module-level and keyed on the (hashable, compared by value) model, so calling
  ``signal_propagation`` again on a model equal to one seen before, with arrays of the same
  shapes, reuses the compiled computation.
  """
  rngs = {'dropout': rng} if rng is not None else {}

  def get_base(b):
    if initialize:
      v = model.init(b, x, train=False)
      return {k: c for k, c in v.items() if k not in _REBUILT}
    return b

  base = get_base(base_arg)
  state_cols = [k for k in base if k != 'params'] if train else []
  _, shapes = jax.eval_shape(
    lambda b: model.apply(b, x, train=train, mutable=['perturbations', *state_cols], rngs=rngs),
    base)
  perts = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes.get('perturbations', {}))
  if not jax.tree.leaves(perts):
    fail(_LAYER, 'model', "a model that calls perturb('stem'|'skip'|'layer', ...) "
         '(see jaxnorm.models instrumentation)', f'{type(model).__name__} with no perturbations')
  params = base['params']
  rest = {k: v for k, v in base.items() if k != 'params'}

  def loss_fn(p, pt):
    v = dict(rest, params=p, perturbations=pt)
    logits, mut = model.apply(v, x, train=train, mutable=['intermediates', *state_cols],
                              rngs=rngs)
    logits = logits.astype(jnp.float32)
    if labels is None:
      probe = gaussian_logit_probe(logits.shape, probe_seed)
      loss = jnp.sum(probe * logits) / logits.shape[0]
    else:
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, mut['intermediates']

  (loss, inter), (g_params, g_perts) = jax.value_and_grad(
    loss_fn, argnums=(0, 1), has_aux=True)(params, perts)
  out = {'loss': loss, 'weight_grad_norms': _leaf_norms(g_params)}
  for name in ('stem', 'skip', 'layer'):
    acts, grads = block_tap_groups(inter, name), block_tap_groups(g_perts, name)
    if not acts:
      continue
    if [len(a) for a in acts] != [len(g) for g in grads]:
      raise ValueError(f'{_LAYER}: tap {name!r}: {sum(len(a) for a in acts)} sown activations '
                       f'but {sum(len(g) for g in grads)} perturbation gradients; sow and perturb '
                       'every tap.')
    sq, var = _group_metrics(acts)
    gsq, gvar = _group_metrics(grads)
    out[name] = {'avg_sq_mean': sq, 'avg_var': var, 'grad_sq_mean': gsq, 'grad_var': gvar}
  branches = block_tap_groups(inter, 'branch')
  if branches:
    out['branch'] = _group_metrics(branches)[1]
  return out


def signal_propagation(model: nn.Module, variables: Mapping[str, Any] | None, x, labels=None, *,
                       train: bool = True, rng: jax.Array | None = None,
                       probe_seed: int = PROBE_SEED,
                       init_rng: jax.Array | None = None) -> SignalReport:
  """Forward and backward signal-propagation statistics of ``model`` on batch ``x``.

  One jitted forward + backward pass. The loss is the mean softmax cross-entropy of the logits
  against integer ``labels``; without labels it is ``mean_b <probe_b, logits_b>`` with a fixed
  ``N(0, 1)`` probe drawn from ``PRNGKey(probe_seed)`` (see ``gaussian_logit_probe``), so the
  backward pass starts from a known isotropic cotangent. Gradients at the taps come from the
  ``'perturbations'`` collection (exact intermediate gradients). In training mode BatchNorm uses
  batch statistics; the updated running statistics are discarded (``variables`` is not changed).

  Args:
    model: a Flax linen module called as ``model.apply(variables, x, train=train, mutable=...)``
      that follows the instrumentation contract (module docstring).
    variables: its variables (``params`` and e.g. ``batch_stats``); any 'intermediates' or
      'perturbations' in them are ignored and rebuilt for this batch. None: initialize the model
      with ``model.init(init_rng, x, train=False)`` inside the same jitted computation (one
      compilation instead of two, for measurements at initialization).
    x: input batch, floating point, batch first.
    labels: optional integer class labels ``(batch,)``.
    train: call the model in training mode (batch statistics).
    rng: optional PRNG key, passed as the 'dropout' rng.
    probe_seed: seed of the Gaussian logit probe (used without labels).
    init_rng: PRNG key for the initialization when ``variables`` is None.

  Returns:
    A ``SignalReport``.

  Raises:
    ValueError: when the model records no taps (not instrumented), or on bad shapes.

  References:
    Brock et al. 2021a SPPs (papers.md §0); Panigrahi et al. 2018 (§1); De & Smith 2020 (§3).
  """
  check_floating(_LAYER, 'x', x)
  if jnp.ndim(x) < 2:
    fail(_LAYER, 'x', 'a batch of rank >= 2 (batch first)', f'shape {jnp.shape(x)}')
  if labels is not None:
    check_rank(_LAYER, 'labels', labels, (1,))
    if not jnp.issubdtype(jnp.result_type(labels), jnp.integer):
      fail(_LAYER, 'labels', 'integer class labels', f'dtype {jnp.result_type(labels)}', TypeError)
    if jnp.shape(labels)[0] != jnp.shape(x)[0]:
      fail(_LAYER, 'labels', f'{jnp.shape(x)[0]} labels (one per example)',
           f'{jnp.shape(labels)[0]}')
  if variables is None:
    if init_rng is None:
      fail(_LAYER, 'init_rng', 'a PRNG key when `variables` is None', None)
    base_arg = init_rng
  else:
    if 'params' not in variables:
      fail(_LAYER, 'variables', "a variable dict with a 'params' collection", list(variables))
    base_arg = {k: v for k, v in variables.items() if k not in _REBUILT}
  res = jax.device_get(_measure(model, base_arg, x, labels, rng, train=train,
                                probe_seed=probe_seed, initialize=variables is None))

  def stats(d, i, res_var=None):
    return TapStats(avg_sq_mean=float(d['avg_sq_mean'][i]), avg_var=float(d['avg_var'][i]),
                    grad_sq_mean=float(d['grad_sq_mean'][i]), grad_var=float(d['grad_var'][i]),
                    res_avg_var=res_var)

  stem = stats(res['stem'], 0) if 'stem' in res else None
  blocks = []
  if 'skip' in res:
    n = len(res['skip']['avg_var'])
    branch = res.get('branch')
    if branch is not None and len(branch) != n:
      fail(_LAYER, 'model', "one 'branch' tap per 'skip' tap", f'{len(branch)} and {n}')
    blocks = [stats(res['skip'], i, None if branch is None else float(branch[i]))
              for i in range(n)]
  layers = ([stats(res['layer'], i) for i in range(len(res['layer']['avg_var']))]
            if 'layer' in res else [])
  probe = ('labels: softmax cross-entropy, batch mean' if labels is not None else
           f'no labels: L = mean_b <probe_b, logits_b>, probe ~ N(0, 1) from PRNGKey({probe_seed})')
  return SignalReport(stem=stem, blocks=blocks, layers=layers,
                      weight_grad_norms=_named_norms(res['weight_grad_norms']),
                      loss=float(res['loss']), probe=probe)
