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

This module holds the entry point, ``signal_propagation``, and the checks of its arguments; the
rest lives in

* ``jaxnorm.diagnostics.signal_report``: the report types ``SignalReport``, ``TapStats`` and
  ``ModuleStats`` (re-exported here), and their series, tables and dicts;
* ``jaxnorm.diagnostics._block_view``: the block view, and the jitted pass of linen models;
* ``jaxnorm.diagnostics._module_view``: the module view, and the jitted pass of NNX models;
* ``jaxnorm.diagnostics._pass_common``: the loss and its Gaussian probe, the reductions and the
  error context both passes share;
* ``jaxnorm.diagnostics._jit_keys``: the jit keys of linen models that are not hashable.

References:
  Brock, De & Smith (2021), "Characterizing signal propagation to close the performance gap in
  unnormalized ResNets", arXiv:2101.08692 (signal propagation plots; deepmind-research
  ``nfnets/base.py`` ``signal_metrics``).
  De & Smith (2020), "Batch Normalization Biases Residual Blocks Towards the Identity Function in
  Deep Networks", arXiv:2002.10444 (the skip-path variance of BatchNorm ResNets).
  Panigrahi, Chen & Kuo (2018), "Analysis on Gradient Propagation in Batch Normalized Residual
  Networks", arXiv:1812.00342 (per-block gradient variance).
  Cabana & Lago-Fernandez (2021), "Backward Gradient Normalization in Deep Neural Networks",
  arXiv:2106.09475 (per-layer gradient norms).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

# The jitted linen pass, under its former name here (tests read its compilation cache).
from jaxnorm.diagnostics._block_view import measure as _measure  # noqa: F401
from jaxnorm.diagnostics._block_view import run_linen, tap_stats
from jaxnorm.diagnostics._module_view import call_order, module_stats, run_nnx
from jaxnorm.diagnostics._pass_common import LAYER as _LAYER
from jaxnorm.diagnostics._pass_common import PROBE_SEED as PROBE_SEED
from jaxnorm.diagnostics._pass_common import REBUILT as _REBUILT
from jaxnorm.diagnostics._pass_common import gaussian_logit_probe as gaussian_logit_probe
from jaxnorm.diagnostics._pass_common import named_norms
from jaxnorm.diagnostics.module_taps import check_modules
from jaxnorm.diagnostics.signal_report import ModuleStats as ModuleStats
from jaxnorm.diagnostics.signal_report import SignalReport as SignalReport
from jaxnorm.diagnostics.signal_report import TapStats as TapStats
from jaxnorm.functional._checks import check_floating, check_rank, fail


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
  static = dict(train=train, probe_seed=probe_seed, modules=modules, apply_kwargs=kwargs)
  if isinstance(model, nnx.Module):
    if rng is not None:
      fail(_LAYER, 'rng', 'None for an NNX model (it draws from its own nnx.Rngs)', 'a key')
    if init_rng is not None:
      fail(_LAYER, 'init_rng', 'None for an NNX model (it is initialized when constructed)',
           'a key')
    if variables is not None and not isinstance(variables, nnx.State):
      fail(_LAYER, 'variables', 'None or an nnx.State for an NNX model',
           type(variables).__name__, TypeError)
    res = run_nnx(model, variables, x, labels, **static)
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
    res = run_linen(model, base_arg, x, labels, rng, initialize=variables is None, **static)

  stem, blocks, layers = tap_stats(res)
  mods, unresolved = module_stats(res)
  probe = ('labels: softmax cross-entropy, batch mean' if labels is not None else
           f'no labels: L = mean_b <probe_b, logits_b>, probe ~ N(0, 1) from PRNGKey({probe_seed})')
  norms = named_norms(res['weight_grad_norms'])
  if mods and stem is None and not blocks and not layers:
    norms = call_order(norms, mods)
  return SignalReport(stem=stem, blocks=blocks, layers=layers, weight_grad_norms=norms,
                      loss=float(res['loss']), probe=probe, modules=mods,
                      unresolved_modules=unresolved)
