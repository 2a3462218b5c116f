"""Per-module taps of any Flax model: record, and perturb, every submodule's output in call order.

``signal_propagation`` reads jaxnorm's own models through the taps they declare (``sow`` and
``perturb`` calls, see ``jaxnorm.models.taps``). A model written without them (a ResNet in the
style of Flax's examples, a transformer block, an ``nnx`` network) is read here instead, without
changing it: the ``__call__`` of each selected submodule is intercepted while the model runs
(``flax.linen.intercept_methods`` for linen; for ``flax.nnx``, the classes' ``__call__`` are wrapped
for the duration of the call, as ``nnx.capture`` does), and each selected output ``y_k`` is

* recorded (returned to the caller, in the order the outputs are produced: a module after the
  modules it calls, so a block follows its own layers), and
* optionally replaced by ``y_k + e_k`` with a caller-supplied zero array ``e_k``.

Differentiating a loss ``L`` with respect to the perturbations ``e = (e_1, ..., e_n)`` at
``e = 0`` then gives the exact intermediate gradients ``dL/dy_k``, the same trick as Flax's
``Module.perturb``, without any ``perturb`` call in the model.

A module called several times (shared weights) gets one entry per call, numbered by ``call``.
Modules that run inside a Flax lifted transform (``nn.scan``, ``nn.remat``, ``nn.vmap``,
``nnx.scan``, ...) produce their outputs in an inner trace, which cannot be returned from the outer
function: they are listed as unresolved and not measured (the modules around the transform are).

References:
  Brock, De & Smith (2021), "Characterizing signal propagation to close the performance gap in
  unnormalized ResNets", arXiv:2101.08692 (the per-layer statistics this module feeds).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx
from flax.core.tracers import current_trace

from jaxnorm.functional._checks import fail

Selector = Callable[[str, Any], bool]


@dataclasses.dataclass(frozen=True)
class ModuleCall:
  """One recorded module call (static information only).

  Attributes:
    path: the module's path from the root, '/'-joined ('BasicBlock_0/Conv_1', 'layers/0').
    call: 0 for the module's first recorded call, 1 for its second (shared modules), ...
    module: the module's class name.
    shape: the output's shape.
    dtype: the output's dtype name.
  """

  path: str
  call: int
  module: str
  shape: tuple[int, ...]
  dtype: str


def eligible(y) -> bool:
  """True when ``y`` is one floating-point array of rank >= 2 (batch first, channels last)."""
  return isinstance(y, jax.Array) and jnp.issubdtype(y.dtype, jnp.floating) and y.ndim >= 2


def _describe(y) -> str:
  if isinstance(y, jax.Array):
    return f'an array of dtype {y.dtype} and shape {tuple(y.shape)}'
  return f'a {type(y).__name__}'


def check_modules(layer: str, modules) -> Any:
  """Validates a ``modules`` selection and returns it in hashable form (lists become tuples).

  Accepted: ``None`` or ``True`` (every submodule whose output is one floating array of rank >= 2),
  ``False`` (none), a module class or a tuple / list of classes (instances of any of them), or a
  predicate ``select(path: str, module) -> bool``.
  """
  if modules is None or isinstance(modules, bool):
    return modules
  if isinstance(modules, type):
    modules = (modules,)
  if isinstance(modules, (list, tuple)):
    if not modules or not all(isinstance(c, type) for c in modules):
      fail(layer, 'modules', 'None, a bool, module classes or a predicate (path, module) -> bool',
           repr(modules), TypeError)
    return tuple(modules)
  if callable(modules):
    return modules
  fail(layer, 'modules', 'None, a bool, module classes or a predicate (path, module) -> bool',
       repr(modules), TypeError)


def _selector(modules) -> tuple[Selector, bool]:
  """(select, explicit): explicit selections must give eligible outputs, the default skips."""
  if modules is None or modules is True:
    return (lambda path, module: True), False
  if modules is False:
    return (lambda path, module: False), False
  if isinstance(modules, tuple):
    return (lambda path, module: isinstance(module, modules)), True
  return modules, True


def accepts_argument(fn, name: str) -> bool:
  """True when ``fn`` (a method, module class's ``__call__``, ...) has a parameter ``name``."""
  try:
    params = inspect.signature(fn).parameters
  except (TypeError, ValueError):
    return False
  p = params.get(name)
  return p is not None and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)


class ModuleTaps:
  """Records (and optionally perturbs) selected submodule outputs during one traced call.

  Build it inside the function being traced (it remembers the trace it was built in, and skips
  module calls that run in an inner trace), then run the model under ``linen()`` or
  ``nnx(module)``.

  With ``perturbations = (e_1, ..., e_n)`` the ``k``-th recorded output becomes ``y_k + e_k``, so
  ``dL/de_k`` at ``e = 0`` is ``dL/dy_k``. A typical use, inside one traced function::

    taps = ModuleTaps('f', modules=None)             # discovery (e.g. under jax.eval_shape)
    with taps.linen():
      model.apply(variables, x)
    calls = taps.calls

    def loss(e):                                     # then: gradients w.r.t. every output
      taps = ModuleTaps('f', None, perturbations=e, expected=calls)
      with taps.linen():
        y = model.apply(variables, x)
      return jnp.sum(y), taps.outputs

    grads, outputs = jax.grad(loss, has_aux=True)([jnp.zeros(c.shape, c.dtype) for c in calls])

  Args:
    layer: the calling function's name (for error messages).
    modules: the selection, as accepted by ``check_modules``.
    perturbations: one array per expected call, added to that call's output; None: record only.
    expected: the calls of a previous (discovery) pass; the calls must repeat exactly.

  Attributes:
    calls: ``ModuleCall`` per recorded output, in the order the outputs were produced.
    outputs: the recorded outputs (after adding the perturbation, when given), same order.
    unresolved: paths of selected modules that ran inside a lifted transform (not recorded).
  """

  def __init__(self, layer: str, modules=None, perturbations: Sequence[jax.Array] | None = None,
               expected: Sequence[ModuleCall] | None = None):
    self.layer = layer
    self.select, self.explicit = _selector(modules)
    self.perturbations = perturbations
    self.expected = expected
    self.calls: list[ModuleCall] = []
    self.outputs: list[jax.Array] = []
    self.unresolved: list[str] = []
    self._counts: dict[str, int] = {}
    self._trace = current_trace()

  def tap(self, path: str, module, y):
    """Records ``y`` (the output of ``module`` at ``path``) and returns it, perturbed if asked."""
    if not self.select(path, module):
      return y
    if current_trace() != self._trace:
      if (self.explicit or eligible(y)) and path not in self.unresolved:
        self.unresolved.append(path)
      return y
    if not eligible(y):
      if self.explicit:
        fail(self.layer, 'modules', 'selected modules whose output is one floating-point array '
             'of rank >= 2 (batch first, channels last)',
             f'{path} ({type(module).__name__}) returning {_describe(y)}')
      return y
    call = self._counts.get(path, 0)
    self._counts[path] = call + 1
    rec = ModuleCall(path, call, type(module).__name__, tuple(y.shape), jnp.dtype(y.dtype).name)
    i = len(self.calls)
    if self.expected is not None and (i >= len(self.expected) or self.expected[i] != rec):
      raise RuntimeError(f'{self.layer}: module call {i} ({rec}) differs from the discovery '
                         f'pass ({self.expected[i] if i < len(self.expected) else "no call"}); '
                         'the model must call its modules in the same order on every call.')
    if self.perturbations is not None:
      y = y + self.perturbations[i].astype(y.dtype)
    self.calls.append(rec)
    self.outputs.append(y)
    return y

  def _intercept(self, next_fun, args, kwargs, context):
    y = next_fun(*args, **kwargs)
    module = context.module
    if context.method_name != '__call__' or module.scope is None:
      return y
    path = module.path
    if not path:  # the top-level model itself
      return y
    return self.tap('/'.join(str(p) for p in path), module, y)

  @contextlib.contextmanager
  def linen(self) -> Iterator[None]:
    """Context: tap the ``__call__`` of every linen submodule called inside (an interceptor)."""
    with nn.intercept_methods(self._intercept):
      yield

  @contextlib.contextmanager
  def nnx(self, root: nnx.Module) -> Iterator[None]:
    """Context: tap the ``__call__`` of every ``nnx.Module`` reachable from ``root`` (not ``root``).

    The classes defining those ``__call__`` are patched for the duration of the context (and
    restored after it), as ``nnx.capture`` does; calls on instances outside ``root``'s graph pass
    through unchanged. Not thread-safe for other threads calling the same classes meanwhile.
    """
    paths: dict[int, str] = {}
    for path, m in nnx.iter_modules(root):
      if path:
        paths.setdefault(id(m), '/'.join(str(p) for p in path))
    owners: dict[type, Any] = {}
    for m in nnx.iter_modules(root):
      for cls in type(m[1]).__mro__:
        if '__call__' in cls.__dict__:
          owners.setdefault(cls, cls.__dict__['__call__'])
          break
    active: set[int] = set()

    def wrap(orig):
      @functools.wraps(orig)
      def wrapper(module, *args, **kwargs):
        key = id(module)
        if key not in paths or key in active:  # a super().__call__ inside a tapped call
          return orig(module, *args, **kwargs)
        active.add(key)
        try:
          y = orig(module, *args, **kwargs)
        finally:
          active.discard(key)
        return self.tap(paths[key], module, y)

      return wrapper

    try:
      for cls, orig in owners.items():
        cls.__call__ = wrap(orig)
      yield
    finally:
      for cls, orig in owners.items():
        cls.__call__ = orig
