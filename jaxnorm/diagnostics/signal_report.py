"""The report of ``signal_propagation``: its types, and their series, tables and dicts.

* ``TapStats``: the statistics at one tap of jaxnorm's instrumented models (the stem, a residual
  block's skip path, an MLP layer): the block view.
* ``ModuleStats``: the statistics of one module call's output, for any model: the module view.
* ``SignalReport``: both views of one model on one batch, with the loss and the weight-gradient
  norms; ``series`` and ``module_series`` give one statistic along a view as an array,
  ``to_table`` an aligned text table, ``to_dict`` a JSON-serializable dict.

The statistics themselves are defined in ``jaxnorm.diagnostics.signal_propagation``. This module
holds plain data and host-side formatting only (numpy: nothing here is traced).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from jaxnorm.functional._checks import fail

STAT_FIELDS = ('avg_sq_mean', 'avg_var', 'grad_sq_mean', 'grad_var')


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
    if field not in STAT_FIELDS:
      fail('SignalReport.module_series', 'field', 'one of ' + ', '.join(STAT_FIELDS), repr(field))
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
      head = ['#', 'module', 'type', 'shape', *STAT_FIELDS]
      rows = [[str(i), m.name, m.module, 'x'.join(map(str, m.shape)),
               *(num(getattr(m, f)) for f in STAT_FIELDS)] for i, m in enumerate(self.modules)]
      left = 4
    else:
      names = ((['stem'] if self.stem is not None else [])
               + [f'{"block" if self.blocks else "layer"} {i}'
                  for i in range(len(self.blocks or self.layers))])
      head = ['#', 'tap', *STAT_FIELDS, 'res_avg_var']
      rows = [[str(i), n, *(num(getattr(t, f)) for f in (*STAT_FIELDS, 'res_avg_var'))]
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
