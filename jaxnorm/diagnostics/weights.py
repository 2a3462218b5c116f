"""Statistics of weights and weight gradients: the PWS paper's "shift" of the average weight.

The *all-ones component* of a filter ``W_o`` (its ``n`` entries, ``n`` the fan-in) is its
projection on the unit all-ones direction, ``<W_o, 1> / sqrt(n) = sqrt(n) mean(W_o)``. Applied to a
kernel it is the filter mean that offsets the layer's output on a positive-mean (post-ReLU) input;
applied to the kernel's gradient it is the *average gradient* whose accumulation makes the filter
means drift. Weight standardization (WS, PWS, Scaled WS) centres every filter, so both are zero:
the standardized kernel has zero filter means, and the gradient with respect to the raw kernel is
projected off the all-ones direction.

- :func:`shift_statistic`: ``Var_o(n mean(W_o))``, the paper's shift.
- :func:`all_ones_component`, :func:`all_ones_fraction`: per filter, the component and its share of
  the filter's norm (the cosine between ``W_o`` and the all-ones direction).
- :func:`effective_kernels`: the kernel each conv layer of a model applies (the standardized one
  for WS / Scaled WS / PWS convs, the raw one for a plain conv), one entry per layer.
- :func:`filter_mean_statistics`: per conv layer, the shift of the effective and of the raw kernel
  and the all-ones share of the raw kernel's gradient on a batch.

References:
  Liu, Ge, Li & Gui (2021), "Delving into Variance Transmission and Normalization: Shift of
  Average Gradient Makes the Network Collapse", AAAI 2021, arXiv:2103.11590 (the shift
  diagnostic); the authors' TensorFlow code, lyxzzz/PWSConv_backup ``tf_layer.py``,
  ``wn_conv.__cal_shift``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxnorm.functional._checks import check_floating, fail

_LAYER = 'shift_statistic'
# The hook of jaxnorm's conv layers (``jaxnorm.linen.Conv``, ``WSConv``, ``ScaledWSConv``,
# ``PWSConv``) that maps the raw kernel to the kernel the convolution applies.
_HOOK = '_transform_kernel'


def _filters(layer: str, kernel) -> jax.Array:
  """``kernel`` (rank >= 2, output channels last) as float32 ``(n, Cout)``, after checks."""
  check_floating(layer, 'kernel', kernel)
  if jnp.ndim(kernel) < 2:
    fail(layer, 'kernel', 'a kernel of rank >= 2 with output channels last (HWIO, IO)',
         f'shape {jnp.shape(kernel)}')
  k = jnp.asarray(kernel, jnp.float32)
  return jnp.reshape(k, (-1, k.shape[-1]))


def shift_statistic(kernel: jax.Array) -> jax.Array:
  """``Var_o(n * mean(W_o))``: spread over output channels of each filter's summed mean.

  For a kernel with output channels on the last axis (conv HWIO, or dense ``(in, out)``), with
  ``n = prod(kernel.shape[:-1])`` the fan-in and ``mean(W_o)`` the mean of filter ``o``. A
  post-ReLU input with mean ``m > 0`` gives output channel ``o`` the offset ``n mean(W_o) m``, so
  this statistic times ``m^2`` is the variance those offsets add. Weight standardization (WS, PWS,
  scaled WS) makes every filter mean zero, so it is exactly 0 (up to rounding) for their kernels.
  Applied to a kernel's gradient it is the spread of the average gradient over the filters.

  Args:
    kernel: floating array of rank >= 2, output channels last.

  Returns:
    float32 scalar (population variance over the output channels).

  References:
    Liu, Ge, Li & Gui (2021), "Delving into Variance Transmission and Normalization: Shift of
    Average Gradient Makes the Network Collapse", AAAI 2021, arXiv:2103.11590; their TensorFlow
    ``__cal_shift``: ``shift = Var_o(n * mean(W_o))``.
  """
  k = _filters(_LAYER, kernel)
  n = k.shape[0]
  return jnp.var(n * jnp.mean(k, axis=0))


def all_ones_component(kernel: jax.Array) -> jax.Array:
  r"""Each filter's projection on the unit all-ones direction, ``<W_o, 1> / sqrt(n)``.

  .. math::

    a_o = \frac{1}{\sqrt n} \sum_i W_{i,o} = \sqrt n \, \bar W_o ,

  over the ``n = prod(kernel.shape[:-1])`` entries of filter ``o``. So
  ``shift_statistic(W) = n Var_o(a_o)``, and ``W_o - a_o 1 / sqrt(n)`` is the filter with its mean
  removed. For a kernel gradient ``dL/dW`` it is the average gradient of each filter (times
  ``sqrt(n)``), which is 0 for the raw kernel of a weight-standardized conv.

  Args:
    kernel: floating array of rank >= 2, output channels last (a kernel or its gradient).

  Returns:
    float32 array ``(Cout,)``.

  References:
    Liu, Ge, Li & Gui (2021), "Delving into Variance Transmission and Normalization: Shift of
    Average Gradient Makes the Network Collapse", AAAI 2021, arXiv:2103.11590 (the average
    gradient).
  """
  k = _filters('all_ones_component', kernel)
  return jnp.sum(k, axis=0) / math.sqrt(k.shape[0])


def all_ones_fraction(kernel: jax.Array) -> jax.Array:
  r"""Each filter's share along the all-ones direction, ``|<W_o, 1>| / (sqrt(n) ||W_o||)``.

  .. math::

    f_o = \frac{|\sum_i W_{i,o}|}{\sqrt n \, \lVert W_o \rVert_2} \in [0, 1],

  the absolute cosine between filter ``o`` and the all-ones vector: 1 for a constant filter, 0
  for a zero-mean one, about ``sqrt(2 / (pi n))`` for a random filter. Scale-free, so it compares
  the average gradient of layers and training steps whose gradients differ in size.

  Args:
    kernel: floating array of rank >= 2, output channels last (a kernel or its gradient).

  Returns:
    float32 array ``(Cout,)``; 0 for an all-zero filter.

  References:
    Liu, Ge, Li & Gui (2021), "Delving into Variance Transmission and Normalization: Shift of
    Average Gradient Makes the Network Collapse", AAAI 2021, arXiv:2103.11590.
  """
  k = _filters('all_ones_fraction', kernel)
  comp = jnp.abs(jnp.sum(k, axis=0)) / math.sqrt(k.shape[0])
  norm = jnp.linalg.norm(k, axis=0)
  return jnp.where(norm > 0, comp / jnp.where(norm > 0, norm, 1.0), 0.0)


def _kernel_rank(module: nn.Module) -> int:
  size = getattr(module, 'kernel_size', None)
  return (1 if isinstance(size, int) else len(size)) + 2


def _capture(model: nn.Module, variables: Mapping[str, Any], args, kwargs):
  """``({path: effective kernel, possibly stacked}, {path: kernel rank})`` of one model call."""
  ranks: dict[tuple[str, ...], int] = {}

  def want(module, method_name):
    if method_name != _HOOK:
      return False
    ranks[tuple(module.path)] = _kernel_rank(module)
    return True

  kwargs = dict(kwargs)
  mutable = kwargs.pop('mutable', False)
  if mutable is True:
    mutable_list = True
  else:
    mutable_list = ['intermediates', *([mutable] if isinstance(mutable, str) else
                                       list(mutable or ()))]
  _, state = model.apply(variables, *args, capture_intermediates=want, mutable=mutable_list,
                         **kwargs)
  flat = jax.tree_util.tree_flatten_with_path(
      state.get('intermediates', {}), is_leaf=lambda x: isinstance(x, tuple))[0]
  out = {}
  for path, calls in flat:
    names = tuple(getattr(p, 'key', str(p)) for p in path)
    if names and names[-1] == _HOOK and isinstance(calls, tuple) and calls:
      out[names[:-1]] = calls[0]
  return out, ranks


def _split(path: tuple[str, ...], array, rank: int) -> dict[str, jax.Array]:
  """One entry per layer: an ``nn.scan``-stacked kernel split along its leading axes."""
  name = '/'.join(path)
  lead = array.shape[:array.ndim - rank]
  if not lead:
    return {name: array}
  flat = jnp.reshape(array, (-1, *array.shape[len(lead):]))
  return {f'{name}[{i}]': flat[i] for i in range(flat.shape[0])}


def effective_kernels(model: nn.Module, variables: Mapping[str, Any], *args,
                      **kwargs) -> dict[str, jax.Array]:
  """The kernel each conv layer of ``model`` applies, one entry per layer.

  The model is called as ``model.apply(variables, *args, **kwargs)`` and the output of each conv
  layer's kernel transform is recorded: for jaxnorm's ``WSConv``, ``ScaledWSConv`` and ``PWSConv``
  the standardized kernel (e.g. ``sqrt(2 / fan) alpha_o (W_o - mu_o) / sqrt(sigma_o^2 + gamma)``
  for PWS), for its plain ``Conv`` the raw kernel. Other libraries' layers (``flax.linen.Conv``)
  apply their ``kernel`` parameter as it is: read it from ``variables['params']``.

  Args:
    model: a Flax linen model built from jaxnorm's conv layers (any of ``jaxnorm.models``).
    variables: its variables.
    *args: the call's positional arguments (the input batch).
    **kwargs: the call's keyword arguments (e.g. ``train=False``; a ``mutable`` list is kept).

  Returns:
    ``{layer name: kernel}``: the name is the layer's module path joined by '/', with ``[i]``
    appended for the ``i``-th layer of an ``nn.scan`` stack (scanned blocks), so that each entry
    is one layer's kernel, of the raw kernel's per-layer shape (HWIO).

  References:
    Liu, Ge, Li & Gui (2021), "Delving into Variance Transmission and Normalization: Shift of
    Average Gradient Makes the Network Collapse", AAAI 2021, arXiv:2103.11590 (the shift of the
    kernel the conv applies).
  """
  captured, ranks = _capture(model, variables, args, kwargs)
  if not captured:
    fail('effective_kernels', 'model', "a model with jaxnorm conv layers (jaxnorm.linen.Conv, "
         "WSConv, ScaledWSConv, PWSConv)", f'{type(model).__name__} (no conv layer was called)')
  out = {}
  for path, kernel in captured.items():
    out.update(_split(path, kernel, ranks.get(path, kernel.ndim)))
  return out


def _raw_kernel(params, path: tuple[str, ...]):
  node = params
  for p in (*path, 'kernel'):
    node = node[p]
  return node


_STAT_FNS: dict[Any, Any] = {}


def filter_mean_statistics(model: nn.Module, variables: Mapping[str, Any], images, labels, *,
                           train: bool = True) -> dict[str, dict[str, float]]:
  r"""Per conv layer: the shift of the kernel it applies and the average gradient of its raw kernel.

  With ``W`` the layer's raw kernel (the parameter the optimizer updates), ``\hat W`` the kernel the
  conv applies (:func:`effective_kernels`), ``n`` the fan-in and ``g = dL/dW`` the gradient of the
  mean softmax cross-entropy of ``model`` on ``(images, labels)``:

  - ``shift``: ``Var_o(n mean(\hat W_o))`` (:func:`shift_statistic`), the offsets' variance per
    unit squared input mean;
  - ``raw_shift``: the same for ``W``;
  - ``grad_all_ones``: the root mean square over filters of ``|<g_o, 1>| / (sqrt(n) ||g_o||)``
    (:func:`all_ones_fraction`): the share of the gradient along the all-ones direction;
  - ``grad_shift``: ``Var_o(n mean(g_o))``, the spread of the average gradient over filters;
  - ``fan_in``: ``n``.

  For a plain conv ``\hat W = W`` and, on post-ReLU inputs, ``g`` has a common component in every
  filter; for a weight-standardized conv (WS, Scaled WS, PWS) ``shift`` and ``grad_all_ones``
  are 0 up to float32 rounding, since ``\hat W_o`` is centred and ``g_o`` is the gradient through
  the centring, projected off the all-ones direction.

  Args:
    model: a linen model built from jaxnorm's conv layers, called as
      ``model.apply(variables, images, train=train, mutable=...)``.
    variables: its variables (``params`` and any state, e.g. ``batch_stats``).
    images: a batch of inputs.
    labels: integer labels of the batch.
    train: training mode (batch statistics) for the loss and its gradient.

  Returns:
    ``{layer name (as in effective_kernels): {'shift', 'raw_shift', 'grad_all_ones',
    'grad_shift', 'fan_in'}}`` as Python floats.

  References:
    Liu, Ge, Li & Gui (2021), "Delving into Variance Transmission and Normalization: Shift of
    Average Gradient Makes the Network Collapse", AAAI 2021, arXiv:2103.11590.
  """
  from jaxnorm.diagnostics.sweeps import classification_loss_fn

  key = (model, bool(train))
  try:
    fn = _STAT_FNS.get(key)
  except TypeError:  # an unhashable model
    fn = None
  if fn is None:
    def stats(variables, images, labels):
      rest = {k: v for k, v in variables.items() if k not in ('params', 'intermediates')}
      captured, ranks = _capture(model, variables, (images,),
                                 {'train': train, 'mutable': list(rest) if train else False})
      loss_fn = classification_loss_fn(model, variables, train=train)
      grads = jax.grad(loss_fn)(variables['params'], (images, labels))
      out = {}
      for path, eff in captured.items():
        rank = ranks.get(path, eff.ndim)
        for name, e in _split(path, eff, rank).items():
          out[name] = {'eff': e}
        for name, w in _split(path, _raw_kernel(variables['params'], path), rank).items():
          out[name]['raw'] = w
        for name, g in _split(path, _raw_kernel(grads, path), rank).items():
          out[name]['grad'] = g
      return {name: {'shift': shift_statistic(d['eff']), 'raw_shift': shift_statistic(d['raw']),
                     'grad_all_ones': jnp.sqrt(jnp.mean(all_ones_fraction(d['grad']) ** 2)),
                     'grad_shift': shift_statistic(d['grad']),
                     'fan_in': jnp.asarray(math.prod(d['eff'].shape[:-1]), jnp.float32)}
              for name, d in out.items()}

    fn = jax.jit(stats)
    try:
      _STAT_FNS[key] = fn
    except TypeError:  # an unhashable model: compiled again on every call
      pass
  res = jax.device_get(fn(dict(variables), jnp.asarray(images), jnp.asarray(labels)))
  return {name: {k: float(np.asarray(v)) for k, v in d.items()} for name, d in res.items()}
