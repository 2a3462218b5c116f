"""The module view: statistics of every module call of any linen or NNX model, unmodified.

The output ``y`` of each selected submodule call is recorded and perturbed by a zero array
(``jaxnorm.diagnostics.module_taps``); differentiating the loss with respect to those
perturbations gives the exact ``dL/dy``. This module holds:

* ``module_result``: the traced reduction of the recorded outputs and their gradients to one
  ``ModuleResult`` (per-call statistics as arrays; the calls themselves static), used by both
  passes (the linen pass in ``jaxnorm.diagnostics._block_view`` applies it when the module view
  is asked for);
* ``measure_nnx`` and ``run_nnx``: the jitted forward + backward pass of a ``flax.nnx`` model
  (module view only: NNX models have no block taps);
* ``module_stats`` and ``call_order``: the host-side conversion to ``ModuleStats`` and the
  ordering of the weight-gradient norms by the first call of their module.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxnorm.diagnostics._pass_common import (
  LAYER,
  call_kwargs,
  check_output,
  guard,
  leaf_norms,
  metrics,
  probe_loss,
)
from jaxnorm.diagnostics.module_taps import ModuleCall, ModuleTaps
from jaxnorm.diagnostics.signal_report import STAT_FIELDS, ModuleStats
from jaxnorm.functional._checks import fail


@functools.partial(jax.tree_util.register_dataclass, data_fields=list(STAT_FIELDS),
                   meta_fields=['calls', 'unresolved'])
@dataclasses.dataclass(frozen=True)
class ModuleResult:
  """Per-module statistics (arrays, one entry per call) and the calls (static, cached by jit)."""

  avg_sq_mean: jax.Array
  avg_var: jax.Array
  grad_sq_mean: jax.Array
  grad_var: jax.Array
  calls: tuple[ModuleCall, ...]
  unresolved: tuple[str, ...]


def module_result(outputs, grads, calls, unresolved) -> ModuleResult:
  """The statistics of each recorded output and of its gradient, stacked in call order."""

  def stacked(arrays):
    if not arrays:
      return jnp.zeros((0,), jnp.float32), jnp.zeros((0,), jnp.float32)
    ms = [metrics(a) for a in arrays]
    return jnp.stack([m[0] for m in ms]), jnp.stack([m[1] for m in ms])

  sq, var = stacked(outputs)
  gsq, gvar = stacked(grads)
  return ModuleResult(sq, var, gsq, gvar, tuple(calls), tuple(unresolved))


@functools.partial(jax.jit, static_argnames=('graphdef', 'train', 'probe_seed', 'modules',
                                             'apply_kwargs'))
def measure_nnx(graphdef, params, rest, x, labels, *, train: bool, probe_seed: int, modules,
                apply_kwargs: tuple) -> dict[str, Any]:
  """The jitted forward + backward pass of ``signal_propagation`` for a ``flax.nnx`` model.

  The model is rebuilt inside the traced function (``nnx.merge``), set to training or evaluation
  mode, and called with its submodules' ``__call__`` tapped; its state changes (BatchNorm running
  statistics, RNG counters) stay inside the computation.
  """
  if modules is False:
    fail(LAYER, 'modules', 'None, True, module classes or a predicate for an NNX model (it has '
         'no block taps)', False)

  def run(p, perts, expected):
    # Rebuild the Variables in the current trace (merge reuses the State's Variable objects, and
    # NNX refuses to update a Variable from a trace other than its own).
    p, r = jax.tree.map(lambda a: a, (p, rest))
    m = nnx.merge(graphdef, p, r)
    m.train() if train else m.eval()
    kw = call_kwargs(type(m).__call__, apply_kwargs, train)
    taps = ModuleTaps(LAYER, modules, perts, expected)
    with taps.nnx(m):
      y = m(x, **kw)
    return y, taps

  found: dict[str, ModuleTaps] = {}

  def discover(p):
    y, found['taps'] = run(p, None, None)
    return y

  out_shape = guard(lambda: jax.eval_shape(discover, params), 'model(x)', x)
  calls, unresolved = tuple(found['taps'].calls), tuple(found['taps'].unresolved)
  if not calls:
    fail(LAYER, 'model', 'an NNX model with a submodule whose output is one floating array of '
         'rank >= 2', f'{type(nnx.merge(graphdef, params, rest)).__name__} with none')
  check_output(out_shape, labels)

  def loss_fn(p, mp):
    y, taps = run(p, mp, calls)
    return probe_loss(y, labels, probe_seed), taps.outputs

  (loss, outputs), (g_params, g_modules) = jax.value_and_grad(loss_fn, argnums=(0, 1),
                                                              has_aux=True)(
    params, [jnp.zeros(c.shape, c.dtype) for c in calls])
  return {'loss': loss, 'weight_grad_norms': leaf_norms(g_params),
          'modules': module_result(outputs, g_modules, calls, unresolved)}


def run_nnx(model, variables, x, labels, **static) -> dict[str, Any]:
  """Splits an NNX model into (graphdef, params, rest) and runs ``measure_nnx`` (host result).

  ``variables``: None (the model's own state) or an ``nnx.State`` to use instead (checked by the
  caller).
  """
  if variables is not None:
    graphdef, _ = nnx.split(model)
    model = nnx.merge(graphdef, variables)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  return jax.device_get(measure_nnx(graphdef, params, rest, x, labels, **static))


def module_stats(res: dict[str, Any]) -> tuple[list[ModuleStats], list[str]]:
  """The module view of a pass's host result: one ``ModuleStats`` per call, unresolved paths."""
  if 'modules' not in res:
    return [], []
  r = res['modules']
  mods = [ModuleStats(path=c.path, module=c.module, shape=c.shape, call=c.call,
                      **{f: float(getattr(r, f)[i]) for f in STAT_FIELDS})
          for i, c in enumerate(r.calls)]
  return mods, list(r.unresolved)


def call_order(norms: dict[str, float], mods: list[ModuleStats]) -> dict[str, float]:
  """Weight-gradient norms ordered by the first call of their module (names alone sort
  'Dense_0' before 'stem_conv'); parameters of unrecorded modules keep their order, last."""
  first: dict[str, int] = {}
  for i, m in enumerate(mods):
    first.setdefault(m.path, i)

  def rank(name: str) -> int:
    parts = name.split('/')
    for k in range(len(parts) - 1, 0, -1):
      i = first.get('/'.join(parts[:k]))
      if i is not None:
        return i
    return len(mods)

  return dict(sorted(norms.items(), key=lambda kv: rank(kv[0])))
