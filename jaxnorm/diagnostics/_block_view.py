"""The block view, and the jitted pass of linen models that computes it.

jaxnorm's instrumented models (``jaxnorm.models``) declare their taps: ``perturb`` and ``sow`` of
the stem output, of each residual block's skip path (and ``sow`` of its branch before the gain),
of each hidden layer of a plain MLP (see ``jaxnorm.models.taps``). This module holds:

* ``measure``: the one jitted forward + backward pass of a linen model, module-level and keyed on
  the model (``jaxnorm.diagnostics._jit_keys``), so an equal model with arrays of the same shapes
  reuses the compiled computation. It finds the model's perturbations in an abstract first pass,
  differentiates the loss with respect to them, and adds the module view
  (``jaxnorm.diagnostics._module_view``) in the same pass when asked for, or by default for a
  model without taps; ``run_linen`` calls it and brings the result to the host;
* ``group_metrics`` and ``tap_metrics``: the traced reductions of the taps, one vectorized
  reduction per run of equally shaped blocks (a stage), so the traced graph grows with the number
  of stages, not of blocks;
* ``tap_stats``: the host-side conversion to ``TapStats`` (stem, blocks, layers).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxnorm.diagnostics._jit_keys import static_model, unwrap
from jaxnorm.diagnostics._module_view import module_result
from jaxnorm.diagnostics._pass_common import (
  LAYER,
  REBUILT,
  call_kwargs,
  check_output,
  guard,
  leaf_norms,
  metrics,
  probe_loss,
)
from jaxnorm.diagnostics.module_taps import ModuleTaps
from jaxnorm.diagnostics.signal_report import TapStats
from jaxnorm.functional._checks import fail
from jaxnorm.models.taps import block_tap_groups


def group_metrics(groups) -> tuple[jax.Array, jax.Array]:
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
  per_run = [jax.vmap(metrics)(jnp.concatenate(r) if len(r) > 1 else r[0]) for r in runs]
  return (jnp.concatenate([m[0] for m in per_run]),
          jnp.concatenate([m[1] for m in per_run]))


def tap_metrics(inter, g_perts) -> dict[str, Any]:
  """The block view, traced: per tap name, the statistics of the activations and gradients.

  Args:
    inter: the sown 'intermediates' of the model.
    g_perts: the gradient of the loss with respect to the 'perturbations'.

  Returns:
    ``{name: {'avg_sq_mean', 'avg_var', 'grad_sq_mean', 'grad_var'}}`` for each of 'stem', 'skip'
    and 'layer' the model taps (arrays, one entry per tap in network order), and 'branch': the
    ``avg_var`` of each residual branch before its gain, when the model sows them.
  """
  out = {}
  for name in ('stem', 'skip', 'layer'):
    acts, grads = block_tap_groups(inter, name), block_tap_groups(g_perts, name)
    if not acts:
      continue
    if [len(a) for a in acts] != [len(g) for g in grads]:
      raise ValueError(f'{LAYER}: tap {name!r}: {sum(len(a) for a in acts)} sown activations '
                       f'but {sum(len(g) for g in grads)} perturbation gradients; sow and perturb '
                       'every tap.')
    sq, var = group_metrics(acts)
    gsq, gvar = group_metrics(grads)
    out[name] = {'avg_sq_mean': sq, 'avg_var': var, 'grad_sq_mean': gsq, 'grad_var': gvar}
  branches = block_tap_groups(inter, 'branch')
  if branches:
    out['branch'] = group_metrics(branches)[1]
  return out


@functools.partial(jax.jit, static_argnames=('model', 'train', 'probe_seed', 'initialize',
                                             'modules', 'apply_kwargs'))
def measure(model: nn.Module, base_arg, x, labels, rng, *, train: bool, probe_seed: int,
            initialize: bool, modules=None, apply_kwargs: tuple = ()) -> dict[str, Any]:
  """The jitted forward + backward pass of ``signal_propagation`` (linen).

  Module-level and keyed on the (hashable, compared by value) model, so calling
  ``signal_propagation`` again on a model equal to one seen before, with arrays of the same
  shapes, reuses the compiled computation. An unhashable model comes wrapped (``_ByValue``,
  ``_ByIdentity``: see ``jaxnorm.diagnostics._jit_keys``).
  """
  model = unwrap(model)
  rngs = {'dropout': rng} if rng is not None else {}
  kw = call_kwargs(type(model).__call__, apply_kwargs, train)
  what = f'model.apply(variables, x{"".join(f", {k}={v!r}" for k, v in kw.items())})'

  def get_base(b):
    if initialize:
      init_kw = dict(kw, train=False) if 'train' in kw else kw
      v = guard(lambda: model.init(b, x, **init_kw), 'model.init(rng, x)', x)
      return {k: c for k, c in v.items() if k not in REBUILT}
    return b

  base = get_base(base_arg)
  state_cols = [k for k in base if k != 'params'] if train else []
  found: dict[str, ModuleTaps] = {}

  def discover(b):
    taps = ModuleTaps(LAYER, modules) if modules is not False else None
    with taps.linen() if taps is not None else contextlib.nullcontext():
      out = model.apply(b, x, **kw, mutable=['perturbations', *state_cols], rngs=rngs)
    found['taps'] = taps
    return out

  out_shape, shapes = guard(lambda: jax.eval_shape(discover, base), what, x)
  perts = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes.get('perturbations', {}))
  has_taps = bool(jax.tree.leaves(perts))
  # The module view: asked for, or by default for a model without jaxnorm's taps.
  want = modules is not False and (modules is not None or not has_taps)
  if not has_taps and not want:
    fail(LAYER, 'model', "a model that calls perturb('stem'|'skip'|'layer', ...) "
         '(see jaxnorm.models instrumentation), or `modules` other than False',
         f'{type(model).__name__} with no perturbations')
  calls = tuple(found['taps'].calls) if want else ()
  unresolved = tuple(found['taps'].unresolved) if want else ()
  if not has_taps and not calls:
    fail(LAYER, 'model', 'a submodule whose output is one floating array of rank >= 2 (or '
         "jaxnorm's perturb taps)", f'{type(model).__name__} with none'
         + (f' outside lifted transforms (unresolved: {", ".join(unresolved)})'
            if unresolved else ''))
  check_output(out_shape, labels)
  module_perts = [jnp.zeros(c.shape, c.dtype) for c in calls]
  params = base['params']
  rest = {k: v for k, v in base.items() if k != 'params'}

  def loss_fn(p, pt, mp):
    v = dict(rest, params=p, perturbations=pt) if has_taps else dict(rest, params=p)
    taps = ModuleTaps(LAYER, modules, mp, calls) if want else None
    with taps.linen() if taps is not None else contextlib.nullcontext():
      logits, mut = model.apply(v, x, **kw, mutable=['intermediates', *state_cols], rngs=rngs)
    return (probe_loss(logits, labels, probe_seed),
            (mut.get('intermediates', {}), taps.outputs if taps is not None else []))

  (loss, (inter, outputs)), (g_params, g_perts, g_modules) = jax.value_and_grad(
    loss_fn, argnums=(0, 1, 2), has_aux=True)(params, perts, module_perts)
  out = {'loss': loss, 'weight_grad_norms': leaf_norms(g_params), **tap_metrics(inter, g_perts)}
  if want:
    out['modules'] = module_result(outputs, g_modules, calls, unresolved)
  return out


def run_linen(model: nn.Module, base_arg, x, labels, rng, **static) -> dict[str, Any]:
  """Runs ``measure`` on a linen model (jit key: ``static_model``); the result on the host."""
  return jax.device_get(measure(static_model(model), base_arg, x, labels, rng, **static))


def tap_stats(res: dict[str, Any]) -> tuple[TapStats | None, list[TapStats], list[TapStats]]:
  """The block view of a pass's host result: the stem (or None), the blocks and the MLP layers."""

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
      fail(LAYER, 'model', "one 'branch' tap per 'skip' tap", f'{len(branch)} and {n}')
    blocks = [stats(res['skip'], i, None if branch is None else float(branch[i]))
              for i in range(n)]
  layers = ([stats(res['layer'], i) for i in range(len(res['layer']['avg_var']))]
            if 'layer' in res else [])
  return stem, blocks, layers
