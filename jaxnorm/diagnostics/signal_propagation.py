"""Forward and backward signal propagation of any Flax model, in one jitted pass.

Two views, chosen by what the model exposes.

**Block view (jaxnorm's models).** A model following jaxnorm's instrumentation contract
(``jaxnorm.models``) exposes, without changing its outputs:

* the stem output: ``perturb('stem', x)`` and ``sow('intermediates', 'stem', x)``;
* per residual block: ``sow('intermediates', 'branch', f)`` (the residual branch before its
  gain) and the skip path after the block: ``perturb('skip', out)``,
  ``sow('intermediates', 'skip', out)``;
* per hidden layer of a plain MLP: ``perturb('layer', h)``, ``sow('intermediates', 'layer', h)``.

**Module view (any model, unmodified).** For a linen or ``flax.nnx`` model without those taps (a
ResNet written like Flax's examples, a transformer block), the output of every submodule's
``__call__`` is intercepted (``flax.linen.intercept_methods``; see
``jaxnorm.diagnostics.module_taps``): a first, abstract pass (``jax.eval_shape``) finds the module
outputs in call order, then the loss is differentiated with respect to a zero perturbation added to
each of them, which gives the exact ``dL/dy`` of every module output ``y``. The block view of a
jaxnorm model can be complemented with the module view by passing ``modules=True``.

Every activation ``y`` (a tap or a module output, channels on the last axis, any rank >= 2) is
reduced to the signal-propagation statistics of Brock, De & Smith (2021), per channel ``c`` over
all other axes (batch and spatial)::

    mu_c        = mean_{n,h,w} y[n, h, w, c]
    avg_sq_mean = mean_c mu_c^2
    avg_var     = mean_c mean_{n,h,w} (y[n, h, w, c] - mu_c)^2

and the same two numbers of the gradient ``g = dL/dy`` give ``grad_sq_mean`` and ``grad_var``; for a
residual block, ``res_avg_var`` is ``avg_var`` of the branch before its gain.

References:
  Brock, De & Smith (2021), "Characterizing signal propagation to close the performance gap in
  unnormalized ResNets", arXiv:2101.08692 (signal propagation plots; deepmind-research
  ``nfnets/base.py`` ``signal_metrics``).
  De & Smith (2020), "Batch Normalization Biases Residual Blocks Towards the Identity Function in
  Deep Networks", arXiv:2002.10444 (the skip-path variance of BatchNorm ResNets).
  Panigrahi, Chen & Kuo (2018), arXiv:1812.00342 (per-block gradient variance).
  Cabana & Lago-Fernandez (2021), "Backward Gradient Normalization in Deep Neural Networks",
  arXiv:2106.09475 (per-layer gradient norms).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxnorm.diagnostics.module_taps import ModuleCall, ModuleTaps, accepts_argument, check_modules
from jaxnorm.functional._checks import check_floating, check_rank, fail
from jaxnorm.functional.signal_metrics import signal_metrics
from jaxnorm.models.stacking import SCANNED, unstack_blocks
from jaxnorm.models.taps import block_tap_groups

_LAYER = 'signal_propagation'
PROBE_SEED = 0
_NUM = re.compile(r'(\d+)')
_STAT_FIELDS = ('avg_sq_mean', 'avg_var', 'grad_sq_mean', 'grad_var')


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
class ModuleStats:
  """Statistics of one module call's output ``y`` and of ``dL/dy`` (the module view).

  The channel statistics are those of ``TapStats`` (channels last, statistics over every other
  axis): ``avg_sq_mean = mean_c mu_c^2``, ``avg_var = mean_c var_c``, of ``y`` and of ``dL/dy``.

  Attributes:
    path: the module's path from the model, '/'-joined ('BasicBlock_0/Conv_1'; for NNX the
      attribute path, 'blocks/0/linear').
    module: the module's class name ('Conv', 'BatchNorm', 'BasicBlock', ...).
    shape: the output's shape.
    avg_sq_mean: mean over channels of the squared mean of the output.
    avg_var: mean over channels of the (population) variance of the output.
    grad_sq_mean: the same squared mean, of dL/d(output).
    grad_var: the same variance, of dL/d(output).
    call: 0 for a module's first call, 1 for its second (shared modules), ...
  """

  path: str
  module: str
  shape: tuple[int, ...]
  avg_sq_mean: float
  avg_var: float
  grad_sq_mean: float
  grad_var: float
  call: int = 0

  @property
  def name(self) -> str:
    """``path``, with ``[call]`` appended for a module's second and later calls."""
    return self.path if self.call == 0 else f'{self.path}[{self.call}]'


@dataclasses.dataclass(frozen=True)
class SignalReport:
  """Per-tap (block view) and per-module (module view) statistics of one model on one batch.

  Attributes:
    stem: statistics after the stem (None if the model has no stem tap).
    blocks: one entry per residual block, in network order (skip path after the block).
    layers: one entry per hidden layer of a plain MLP ('layer' taps), in order.
    weight_grad_norms: L2 norm of dL/dparam per parameter, keyed 'module/.../name' in network
      order (scan-stacked parameters are split per block).
    loss: the loss value used for the backward pass.
    probe: how the backward pass was seeded ('labels: softmax cross-entropy' or the Gaussian
      logit cotangent).
    modules: the module view: one entry per recorded module call, in the order the outputs were
      produced (a module after the modules it calls); empty for a jaxnorm model unless asked for
      (``signal_propagation(..., modules=True)``).
    unresolved_modules: paths of selected modules that ran inside a Flax lifted transform
      (``nn.scan``, ``nn.remat``, ...) and so could not be measured one by one.
  """

  stem: TapStats | None
  blocks: list[TapStats]
  layers: list[TapStats]
  weight_grad_norms: dict[str, float]
  loss: float
  probe: str
  modules: list[ModuleStats] = dataclasses.field(default_factory=list)
  unresolved_modules: list[str] = dataclasses.field(default_factory=list)

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

  def module_series(self, field: str) -> np.ndarray:
    """``field`` ('avg_var', 'grad_var', ...) along ``modules`` as a float64 array."""
    if field not in _STAT_FIELDS:
      fail('SignalReport.module_series', 'field', 'one of ' + ', '.join(_STAT_FIELDS), repr(field))
    return np.array([getattr(m, field) for m in self.modules], np.float64)

  def module(self, path: str, call: int = 0) -> ModuleStats:
    """The ``ModuleStats`` of the module at ``path`` (its ``call``-th call)."""
    for m in self.modules:
      if m.path == path and m.call == call:
        return m
    fail('SignalReport.module', 'path', 'the path of a measured module (see `modules`)',
         f'{path!r} (call {call})', KeyError)

  def to_table(self, view: str | None = None, *, digits: int = 4) -> str:
    """The report as an aligned text table, one row per module (or per tap).

    Args:
      view: 'modules' (one row per module call), 'taps' (stem, blocks or layers), or None: the
        module view when there is one, else the taps.
      digits: significant digits of the statistics.

    Returns:
      The table, a header line with the loss and the probe first.
    """
    if view is None:
      view = 'modules' if self.modules else 'taps'
    if view not in ('modules', 'taps'):
      fail('SignalReport.to_table', 'view', "'modules', 'taps' or None", repr(view))
    num = lambda v: '-' if v is None else f'{v:.{digits}g}'
    if view == 'modules':
      head = ['#', 'module', 'type', 'shape', *_STAT_FIELDS]
      rows = [[str(i), m.name, m.module, 'x'.join(map(str, m.shape)),
               *(num(getattr(m, f)) for f in _STAT_FIELDS)] for i, m in enumerate(self.modules)]
      left = 4
    else:
      names = ((['stem'] if self.stem is not None else [])
               + [f'{"block" if self.blocks else "layer"} {i}'
                  for i in range(len(self.blocks or self.layers))])
      head = ['#', 'tap', *_STAT_FIELDS, 'res_avg_var']
      rows = [[str(i), n, *(num(getattr(t, f)) for f in (*_STAT_FIELDS, 'res_avg_var'))]
              for i, (n, t) in enumerate(zip(names, self.taps, strict=True))]
      left = 2
    widths = [max(len(r[j]) for r in [head, *rows]) for j in range(len(head))]
    fmt = lambda r: '  '.join(c.ljust(w) if 0 < j < left else c.rjust(w)
                              for j, (c, w) in enumerate(zip(r, widths, strict=True))).rstrip()
    lines = [f'loss {self.loss:.6g} ({self.probe})', fmt(head), *(fmt(r) for r in rows)]
    if view == 'modules' and self.unresolved_modules:
      lines.append('not measured (inside a lifted transform): '
                   + ', '.join(self.unresolved_modules))
    return '\n'.join(lines)

  def to_dict(self) -> dict[str, Any]:
    """A JSON-serializable dict (non-finite numbers become None)."""

    def clean(v):
      if isinstance(v, float):
        return v if math.isfinite(v) else None
      if isinstance(v, dict):
        return {k: clean(x) for k, x in v.items()}
      if isinstance(v, (list, tuple)):
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


def _key_name(k) -> str | None:
  """A path entry's name (dict key, sequence index); None for an attribute (nnx ``.value``)."""
  if isinstance(k, jax.tree_util.GetAttrKey):
    return None
  return str(getattr(k, 'key', getattr(k, 'idx', k)))


def _named_norms(norms) -> dict[str, float]:
  """The per-leaf norm tree (host arrays) as {'module/.../name': norm}, per block, in order."""
  flat = jax.tree_util.tree_flatten_with_path(unstack_blocks(norms))[0]
  out = {'/'.join(n for n in map(_key_name, path) if n is not None): float(leaf)
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
  scale of a batch-mean loss. For a model whose output is not ``(batch, classes)`` (a
  transformer block's ``(batch, length, features)``) the probe has the output's shape and the
  loss is the same batch mean of ``<probe_b, y_b>`` summed over the other axes.

  Args:
    shape: the logits' shape ``(batch, classes)`` (the output's shape in general).
    seed: PRNG seed (default 0).

  Returns:
    float32 array of that shape.
  """
  return jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32)


def _probe_loss(logits, labels, probe_seed: int) -> jax.Array:
  """Softmax cross-entropy against ``labels`` (batch mean), or the Gaussian-probe loss."""
  logits = logits.astype(jnp.float32)
  if labels is None:
    probe = gaussian_logit_probe(logits.shape, probe_seed)
    return jnp.sum(probe * logits) / logits.shape[0]
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


_REBUILT = ('intermediates', 'perturbations')


# --- jit keys for models that are not hashable ----------------------------------------------------


class _Unfreezable(Exception):
  pass


def _freeze(obj, depth: int = 0):
  """A hashable value equal for equal configurations: lists become tuples, modules field tuples.

  Raises ``_Unfreezable`` for anything unhashable it does not know (an array field, ...).
  """
  if depth > 64:
    raise _Unfreezable
  rec = functools.partial(_freeze, depth=depth + 1)
  if isinstance(obj, nn.Module):
    return ('module', type(obj), tuple((f.name, rec(getattr(obj, f.name)))
                                       for f in dataclasses.fields(obj) if f.name != 'parent'))
  if isinstance(obj, (list, tuple)):
    return (type(obj), tuple(rec(v) for v in obj))
  if isinstance(obj, dict):
    return (type(obj), tuple((rec(k), rec(v)) for k, v in obj.items()))
  if isinstance(obj, (set, frozenset)):
    return (type(obj), frozenset(rec(v) for v in obj))
  if isinstance(obj, functools.partial):
    return ('partial', rec(obj.func), rec(obj.args), rec(obj.keywords))
  try:
    hash(obj)
  except TypeError:
    raise _Unfreezable from None
  return obj


class _ByValue:
  """A static jit argument standing for an unhashable model, equal when the configs are equal."""

  def __init__(self, model, key):
    self.model, self.key = model, key

  def __hash__(self):
    return hash(self.key)

  def __eq__(self, other):
    return isinstance(other, _ByValue) and self.key == other.key


class _ByIdentity:
  """A static jit argument for a model that cannot even be frozen: equal only to itself.

  The jit cache holds this wrapper, hence the model: its ``id`` cannot be reused while cached.
  """

  def __init__(self, model):
    self.model = model

  def __hash__(self):
    return id(self.model)

  def __eq__(self, other):
    return isinstance(other, _ByIdentity) and self.model is other.model


def _static_model(model):
  """``model`` itself when hashable (jaxnorm's models), else a hashable stand-in for jit."""
  try:
    hash(model)
    return model
  except TypeError:
    pass
  try:
    return _ByValue(model, _freeze(model))
  except _Unfreezable:
    return _ByIdentity(model)


def _unwrap(model):
  return model.model if isinstance(model, (_ByValue, _ByIdentity)) else model


# --- the jitted passes ----------------------------------------------------------------------------


@functools.partial(jax.tree_util.register_dataclass, data_fields=list(_STAT_FIELDS),
                   meta_fields=['calls', 'unresolved'])
@dataclasses.dataclass(frozen=True)
class _ModuleResult:
  """Per-module statistics (arrays, one entry per call) and the calls (static, cached by jit)."""

  avg_sq_mean: jax.Array
  avg_var: jax.Array
  grad_sq_mean: jax.Array
  grad_var: jax.Array
  calls: tuple[ModuleCall, ...]
  unresolved: tuple[str, ...]


def _module_result(outputs, grads, calls, unresolved) -> _ModuleResult:
  def stacked(arrays):
    if not arrays:
      return jnp.zeros((0,), jnp.float32), jnp.zeros((0,), jnp.float32)
    ms = [_metrics(a) for a in arrays]
    return jnp.stack([m[0] for m in ms]), jnp.stack([m[1] for m in ms])

  sq, var = stacked(outputs)
  gsq, gvar = stacked(grads)
  return _ModuleResult(sq, var, gsq, gvar, tuple(calls), tuple(unresolved))


def _guard(fn: Callable[[], Any], what: str, x):
  """Runs ``fn`` (the model's call); a failure is re-raised naming this function and argument."""
  try:
    return fn()
  except Exception as e:  # re-raised with context, chained
    if str(e).startswith(f'{_LAYER}:'):
      raise
    exc = type(e) if type(e) in (ValueError, TypeError) else ValueError
    raise exc(f'{_LAYER}: argument `model` expected a model that runs as {what} on `x` of shape '
              f'{tuple(jnp.shape(x))} and dtype {jnp.result_type(x)}, got '
              f'{type(e).__name__}: {e}') from e


def _check_output(out, labels) -> None:
  """The model's output must be one floating array, ``(batch, classes)`` when labels are given."""
  if not (isinstance(out, jax.ShapeDtypeStruct) and jnp.issubdtype(out.dtype, jnp.floating)
          and out.ndim >= 1):
    got = (f'an array of dtype {out.dtype} and shape {out.shape}'
           if isinstance(out, jax.ShapeDtypeStruct) else
           f'a {type(out).__name__} ({jax.tree.structure(out)})')
    fail(_LAYER, 'model', 'a model whose output is one floating-point array (the logits, batch '
         'first)', got)
  if labels is not None and (out.ndim != 2 or out.shape[0] != jnp.shape(labels)[0]):
    fail(_LAYER, 'labels', 'integer labels for a model output of shape (batch, classes)',
         f'{jnp.shape(labels)[0]} labels for an output of shape {out.shape}')


def _call_kwargs(fn, apply_kwargs, train: bool) -> dict[str, Any]:
  """``apply_kwargs``, plus ``train=train`` when the model's ``__call__`` has a ``train``."""
  kw = dict(apply_kwargs)
  if accepts_argument(fn, 'train'):
    kw['train'] = train
  return kw


@functools.partial(jax.jit, static_argnames=('model', 'train', 'probe_seed', 'initialize',
                                             'modules', 'apply_kwargs'))
def _measure(model: nn.Module, base_arg, x, labels, rng, *, train: bool, probe_seed: int,
             initialize: bool, modules=None, apply_kwargs: tuple = ()) -> dict[str, Any]:
  """The jitted forward + backward pass of ``signal_propagation`` (linen).

  Module-level and keyed on the (hashable, compared by value) model, so calling
  ``signal_propagation`` again on a model equal to one seen before, with arrays of the same
  shapes, reuses the compiled computation. An unhashable model comes wrapped (``_ByValue``).
  """
  model = _unwrap(model)
  rngs = {'dropout': rng} if rng is not None else {}
  kw = _call_kwargs(type(model).__call__, apply_kwargs, train)
  what = f'model.apply(variables, x{"".join(f", {k}={v!r}" for k, v in kw.items())})'

  def get_base(b):
    if initialize:
      init_kw = dict(kw, train=False) if 'train' in kw else kw
      v = _guard(lambda: model.init(b, x, **init_kw), 'model.init(rng, x)', x)
      return {k: c for k, c in v.items() if k not in _REBUILT}
    return b

  base = get_base(base_arg)
  state_cols = [k for k in base if k != 'params'] if train else []
  found: dict[str, ModuleTaps] = {}

  def discover(b):
    taps = ModuleTaps(_LAYER, modules) if modules is not False else None
    with taps.linen() if taps is not None else contextlib.nullcontext():
      out = model.apply(b, x, **kw, mutable=['perturbations', *state_cols], rngs=rngs)
    found['taps'] = taps
    return out

  out_shape, shapes = _guard(lambda: jax.eval_shape(discover, base), what, x)
  perts = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes.get('perturbations', {}))
  has_taps = bool(jax.tree.leaves(perts))
  # The module view: asked for, or by default for a model without jaxnorm's taps.
  want = modules is not False and (modules is not None or not has_taps)
  if not has_taps and not want:
    fail(_LAYER, 'model', "a model that calls perturb('stem'|'skip'|'layer', ...) "
         '(see jaxnorm.models instrumentation), or `modules` other than False',
         f'{type(model).__name__} with no perturbations')
  calls = tuple(found['taps'].calls) if want else ()
  unresolved = tuple(found['taps'].unresolved) if want else ()
  if not has_taps and not calls:
    fail(_LAYER, 'model', 'a submodule whose output is one floating array of rank >= 2 (or '
         "jaxnorm's perturb taps)", f'{type(model).__name__} with none'
         + (f' outside lifted transforms (unresolved: {", ".join(unresolved)})'
            if unresolved else ''))
  _check_output(out_shape, labels)
  module_perts = [jnp.zeros(c.shape, c.dtype) for c in calls]
  params = base['params']
  rest = {k: v for k, v in base.items() if k != 'params'}

  def loss_fn(p, pt, mp):
    v = dict(rest, params=p, perturbations=pt) if has_taps else dict(rest, params=p)
    taps = ModuleTaps(_LAYER, modules, mp, calls) if want else None
    with taps.linen() if taps is not None else contextlib.nullcontext():
      logits, mut = model.apply(v, x, **kw, mutable=['intermediates', *state_cols], rngs=rngs)
    return (_probe_loss(logits, labels, probe_seed),
            (mut.get('intermediates', {}), taps.outputs if taps is not None else []))

  (loss, (inter, outputs)), (g_params, g_perts, g_modules) = jax.value_and_grad(
    loss_fn, argnums=(0, 1, 2), has_aux=True)(params, perts, module_perts)
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
  if want:
    out['modules'] = _module_result(outputs, g_modules, calls, unresolved)
  return out


@functools.partial(jax.jit, static_argnames=('graphdef', 'train', 'probe_seed', 'modules',
                                             'apply_kwargs'))
def _measure_nnx(graphdef, params, rest, x, labels, *, train: bool, probe_seed: int, modules,
                 apply_kwargs: tuple) -> dict[str, Any]:
  """The jitted forward + backward pass of ``signal_propagation`` for a ``flax.nnx`` model.

  The model is rebuilt inside the traced function (``nnx.merge``), set to training or evaluation
  mode, and called with its submodules' ``__call__`` tapped; its state changes (BatchNorm running
  statistics, RNG counters) stay inside the computation.
  """
  if modules is False:
    fail(_LAYER, 'modules', 'None, True, module classes or a predicate for an NNX model (it has '
         'no block taps)', False)

  def run(p, perts, expected):
    # Rebuild the Variables in the current trace (merge reuses the State's Variable objects, and
    # NNX refuses to update a Variable from a trace other than its own).
    p, r = jax.tree.map(lambda a: a, (p, rest))
    m = nnx.merge(graphdef, p, r)
    m.train() if train else m.eval()
    kw = _call_kwargs(type(m).__call__, apply_kwargs, train)
    taps = ModuleTaps(_LAYER, modules, perts, expected)
    with taps.nnx(m):
      y = m(x, **kw)
    return y, taps

  found: dict[str, ModuleTaps] = {}

  def discover(p):
    y, found['taps'] = run(p, None, None)
    return y

  out_shape = _guard(lambda: jax.eval_shape(discover, params), 'model(x)', x)
  calls, unresolved = tuple(found['taps'].calls), tuple(found['taps'].unresolved)
  if not calls:
    fail(_LAYER, 'model', 'an NNX model with a submodule whose output is one floating array of '
         'rank >= 2', f'{type(nnx.merge(graphdef, params, rest)).__name__} with none')
  _check_output(out_shape, labels)

  def loss_fn(p, mp):
    y, taps = run(p, mp, calls)
    return _probe_loss(y, labels, probe_seed), taps.outputs

  (loss, outputs), (g_params, g_modules) = jax.value_and_grad(loss_fn, argnums=(0, 1),
                                                              has_aux=True)(
    params, [jnp.zeros(c.shape, c.dtype) for c in calls])
  return {'loss': loss, 'weight_grad_norms': _leaf_norms(g_params),
          'modules': _module_result(outputs, g_modules, calls, unresolved)}


def _check_apply_kwargs(apply_kwargs) -> tuple:
  if apply_kwargs is None:
    return ()
  if not isinstance(apply_kwargs, Mapping) or not all(isinstance(k, str) for k in apply_kwargs):
    fail(_LAYER, 'apply_kwargs', 'a mapping of keyword-argument names to values',
         repr(apply_kwargs), TypeError)
  reserved = {'train', 'mutable', 'rngs', 'method', 'capture_intermediates'} & set(apply_kwargs)
  if reserved:
    fail(_LAYER, 'apply_kwargs', 'no `train` (use the `train` argument), `mutable`, `rngs`, '
         '`method` or `capture_intermediates`', sorted(reserved))
  items = tuple(sorted(apply_kwargs.items()))
  try:
    hash(items)
  except TypeError:
    fail(_LAYER, 'apply_kwargs', 'hashable (static) values such as bools and numbers; pass arrays '
         'through the model instead', repr(apply_kwargs), TypeError)
  return items


def signal_propagation(model: nn.Module | nnx.Module, variables: Mapping[str, Any] | None, x,
                       labels=None, *, train: bool = True, rng: jax.Array | None = None,
                       probe_seed: int = PROBE_SEED, init_rng: jax.Array | None = None,
                       modules=None, apply_kwargs: Mapping[str, Any] | None = None
                       ) -> SignalReport:
  """Forward and backward signal-propagation statistics of ``model`` on batch ``x``.

  One jitted forward + backward pass. The loss is the mean softmax cross-entropy of the logits
  against integer ``labels``; without labels it is ``mean_b <probe_b, logits_b>`` with a fixed
  ``N(0, 1)`` probe drawn from ``PRNGKey(probe_seed)`` (see ``gaussian_logit_probe``), so the
  backward pass starts from a known isotropic cotangent. In training mode BatchNorm uses batch
  statistics; the updated running statistics are discarded (``variables`` is not changed).

  Two views (module docstring): the *block view* of jaxnorm's instrumented models (``stem``,
  ``blocks``, ``layers``), read through their ``'perturbations'`` taps; and the *module view*
  (``modules``) of any linen or NNX model, unmodified: the output ``y`` of every selected
  submodule call, and ``dL/dy`` read exactly by differentiating with respect to a zero
  perturbation added to ``y`` (``jaxnorm.diagnostics.module_taps``). Statistics are per channel
  (last axis) over all other axes, averaged over channels: ``avg_sq_mean = mean_c mu_c^2``,
  ``avg_var = mean_c var_c`` of ``y``, and ``grad_sq_mean``, ``grad_var`` the same of ``dL/dy``
  (Brock, De & Smith 2021). ``report.to_table()`` prints either view.

  The computation is compiled once per (model, shapes, options): a hashable model (jaxnorm's) is
  the jit key itself; an unhashable one (a list field, as in Flax's ResNet examples) is keyed on a
  frozen copy of its configuration, so an equal model reuses the compiled pass as well.

  Args:
    model: a Flax linen module, called as ``model.apply(variables, x, train=train, mutable=...)``
      (``train`` is passed only when its ``__call__`` has a ``train`` parameter), or an
      ``nnx.Module``, called as ``model(x)`` after ``model.train()`` (``train=True``) or
      ``model.eval()`` on a copy inside the computation (the model itself is not changed).
    variables: linen: its variables (``params`` and e.g. ``batch_stats``); any 'intermediates' or
      'perturbations' in them are ignored and rebuilt for this batch. None: initialize the model
      with ``model.init(init_rng, x, train=False)`` inside the same jitted computation (one
      compilation instead of two, for measurements at initialization). NNX: None (the model's own
      state) or an ``nnx.State`` to use instead.
    x: input batch, floating point, batch first.
    labels: optional integer class labels ``(batch,)``, for a model returning ``(batch, classes)``.
    train: call the model in training mode (batch statistics).
    rng: optional PRNG key, passed as the 'dropout' rng (linen only; an NNX model draws from its
      own ``nnx.Rngs``).
    probe_seed: seed of the Gaussian logit probe (used without labels).
    init_rng: PRNG key for the initialization when ``variables`` is None (linen).
    modules: which module calls the module view measures. None (default): every submodule (not
      the model itself) whose output is one floating array of rank >= 2, for a model without
      jaxnorm's taps; none for a jaxnorm model. True: those, for any model. False: none (the
      block view only). A module class or a tuple of classes: instances of those. A predicate
      ``select(path, module) -> bool`` (``path`` as in ``ModuleStats.path``; pass the same
      function object again to reuse the compiled pass). Explicitly selected modules must return
      one floating array of rank >= 2. Modules running inside a lifted transform (``nn.scan``,
      ``nn.remat``, ...) are listed in ``unresolved_modules`` instead.
    apply_kwargs: further static keyword arguments of the model's call (e.g.
      ``{'deterministic': True}`` for a model without a ``train`` argument).

  Returns:
    A ``SignalReport``.

  Raises:
    ValueError: when there is nothing to measure (no taps, no eligible module), when the model's
      call fails (the message names the call and chains the error), or on bad shapes.
    TypeError: on a non-floating ``x``, non-integer ``labels`` or a bad ``modules``.

  References:
    Brock, De & Smith (2021), "Characterizing signal propagation to close the performance gap in
    unnormalized ResNets", arXiv:2101.08692; Panigrahi, Chen & Kuo (2018), arXiv:1812.00342;
    De & Smith (2020), arXiv:2002.10444.
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
  modules = check_modules(_LAYER, modules)
  kwargs = _check_apply_kwargs(apply_kwargs)
  if isinstance(model, nnx.Module):
    res = _run_nnx(model, variables, x, labels, rng, init_rng, train=train,
                   probe_seed=probe_seed, modules=modules, apply_kwargs=kwargs)
  else:
    if not isinstance(model, nn.Module):
      fail(_LAYER, 'model', 'a flax.linen.Module or a flax.nnx.Module', type(model).__name__,
           TypeError)
    if variables is None:
      if init_rng is None:
        fail(_LAYER, 'init_rng', 'a PRNG key when `variables` is None', None)
      base_arg = init_rng
    else:
      if not isinstance(variables, Mapping) or 'params' not in variables:
        fail(_LAYER, 'variables', "a variable dict with a 'params' collection",
             list(variables) if isinstance(variables, Mapping) else type(variables).__name__)
      base_arg = {k: v for k, v in variables.items() if k not in _REBUILT}
    res = jax.device_get(_measure(_static_model(model), base_arg, x, labels, rng, train=train,
                                  probe_seed=probe_seed, initialize=variables is None,
                                  modules=modules, apply_kwargs=kwargs))

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
  mods, unresolved = [], []
  if 'modules' in res:
    r = res['modules']
    mods = [ModuleStats(path=c.path, module=c.module, shape=c.shape, call=c.call,
                        **{f: float(getattr(r, f)[i]) for f in _STAT_FIELDS})
            for i, c in enumerate(r.calls)]
    unresolved = list(r.unresolved)
  probe = ('labels: softmax cross-entropy, batch mean' if labels is not None else
           f'no labels: L = mean_b <probe_b, logits_b>, probe ~ N(0, 1) from PRNGKey({probe_seed})')
  norms = _named_norms(res['weight_grad_norms'])
  if mods and stem is None and not blocks and not layers:
    norms = _call_order(norms, mods)
  return SignalReport(stem=stem, blocks=blocks, layers=layers, weight_grad_norms=norms,
                      loss=float(res['loss']), probe=probe, modules=mods,
                      unresolved_modules=unresolved)


def _call_order(norms: dict[str, float], mods: list[ModuleStats]) -> dict[str, float]:
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


def _run_nnx(model, variables, x, labels, rng, init_rng, **static) -> dict[str, Any]:
  """Splits an NNX model into (graphdef, params, rest) and runs ``_measure_nnx``."""
  if rng is not None:
    fail(_LAYER, 'rng', 'None for an NNX model (it draws from its own nnx.Rngs)', 'a key')
  if init_rng is not None:
    fail(_LAYER, 'init_rng', 'None for an NNX model (it is initialized when constructed)',
         'a key')
  if variables is not None:
    if not isinstance(variables, nnx.State):
      fail(_LAYER, 'variables', 'None or an nnx.State for an NNX model',
           type(variables).__name__, TypeError)
    graphdef, _ = nnx.split(model)
    model = nnx.merge(graphdef, variables)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  return jax.device_get(_measure_nnx(graphdef, params, rest, x, labels, **static))
