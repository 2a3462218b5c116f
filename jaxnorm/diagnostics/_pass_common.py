"""What both passes of ``signal_propagation`` share: the loss, the reductions, the error context.

* ``probe_loss``: the loss differentiated by every pass, the batch-mean softmax cross-entropy
  against integer labels or, without labels, the Gaussian logit probe ``gaussian_logit_probe``.
* ``metrics``: the signal-propagation statistics of one activation (``avg_sq_mean``, ``avg_var``,
  channels last).
* ``leaf_norms`` (traced) and ``named_norms`` (on the host): the weight-gradient norms, per
  parameter, split per block for scan-stacked parameters, in network order.
* ``guard``, ``check_output`` and ``call_kwargs``: running the user's model and checking its
  output, with errors that name ``signal_propagation`` and the call that failed.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxnorm.diagnostics.module_taps import accepts_argument
from jaxnorm.functional._checks import fail
from jaxnorm.functional._signal_metrics import signal_metrics
from jaxnorm.models.stacking import SCANNED, unstack_blocks

LAYER = 'signal_propagation'
PROBE_SEED = 0
# Collections ``signal_propagation`` rebuilds for each batch (ignored in the given variables).
REBUILT = ('intermediates', 'perturbations')
_NUM = re.compile(r'(\d+)')


def metrics(x) -> tuple[jax.Array, jax.Array]:
  """(avg_sq_mean, avg_var) over all axes but the last (channels), float32, two-pass."""
  m = signal_metrics(x)
  return m.avg_sq_mean, m.avg_var


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


def probe_loss(logits, labels, probe_seed: int) -> jax.Array:
  """Softmax cross-entropy against ``labels`` (batch mean), or the Gaussian-probe loss."""
  logits = logits.astype(jnp.float32)
  if labels is None:
    probe = gaussian_logit_probe(logits.shape, probe_seed)
    return jnp.sum(probe * logits) / logits.shape[0]
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _natural_key(path: str) -> list:
  return [int(t) if t.isdigit() else t for t in _NUM.split(path)]


def leaf_norms(grads) -> dict[str, jax.Array]:
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


def named_norms(norms) -> dict[str, float]:
  """The per-leaf norm tree (host arrays) as {'module/.../name': norm}, per block, in order."""
  flat = jax.tree_util.tree_flatten_with_path(unstack_blocks(norms))[0]
  out = {'/'.join(n for n in map(_key_name, path) if n is not None): float(leaf)
         for path, leaf in flat}
  return dict(sorted(out.items(), key=lambda kv: _natural_key(kv[0])))


def guard(fn: Callable[[], Any], what: str, x):
  """Runs ``fn`` (the model's call); a failure is re-raised naming this function and argument."""
  try:
    return fn()
  except Exception as e:  # re-raised with context, chained
    if str(e).startswith(f'{LAYER}:'):
      raise
    exc = type(e) if type(e) in (ValueError, TypeError) else ValueError
    raise exc(f'{LAYER}: argument `model` expected a model that runs as {what} on `x` of shape '
              f'{tuple(jnp.shape(x))} and dtype {jnp.result_type(x)}, got '
              f'{type(e).__name__}: {e}') from e


def check_output(out, labels) -> None:
  """The model's output must be one floating array, ``(batch, classes)`` when labels are given."""
  if not (isinstance(out, jax.ShapeDtypeStruct) and jnp.issubdtype(out.dtype, jnp.floating)
          and out.ndim >= 1):
    got = (f'an array of dtype {out.dtype} and shape {out.shape}'
           if isinstance(out, jax.ShapeDtypeStruct) else
           f'a {type(out).__name__} ({jax.tree.structure(out)})')
    fail(LAYER, 'model', 'a model whose output is one floating-point array (the logits, batch '
         'first)', got)
  if labels is not None and (out.ndim != 2 or out.shape[0] != jnp.shape(labels)[0]):
    fail(LAYER, 'labels', 'integer labels for a model output of shape (batch, classes)',
         f'{jnp.shape(labels)[0]} labels for an output of shape {out.shape}')


def call_kwargs(fn, apply_kwargs, train: bool) -> dict[str, Any]:
  """``apply_kwargs``, plus ``train=train`` when the model's ``__call__`` has a ``train``."""
  kw = dict(apply_kwargs)
  if accepts_argument(fn, 'train'):
    kw['train'] = train
  return kw

