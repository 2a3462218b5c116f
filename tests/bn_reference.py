"""Shared by the BatchNorm tests: input batches, a few linen training steps, a dtype-aware compare.

The same reference steps drive both the linen tests (against ``flax.linen.BatchNorm``) and the NNX
tests (against jaxnorm's linen layer), so both compare with one definition of "a training step".
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def batches(shape, n, dtype=jnp.float32, seed=0):
  """``n`` batches of N(0.5 i, 4) values: each batch shifts the mean the running stats track."""
  keys = jax.random.split(jax.random.key(seed), n)
  return [(2.0 * jax.random.normal(k, shape) + 0.5 * i).astype(dtype) for i, k in enumerate(keys)]


def nontrivial_params(shape):
  """Scale ~ 1 + 0.3 N(0, 1) and bias ~ 0.1 N(0, 1): equal for every module compared."""
  return {'scale': 1.0 + 0.3 * jax.random.normal(jax.random.key(2), shape),
          'bias': 0.1 * jax.random.normal(jax.random.key(3), shape)}


def linen_train_steps(module, params, xs, w, mask=None):
  """Runs one jitted training step per batch of a linen BatchNorm-like ``module``.

  The loss is ``sum(sin(y) * w)``. Returns ``(outs, batch_stats, y_eval)``: per step the output
  and the gradients ``(dL/dx, dL/dparams)``; the final running statistics; the eval-mode output
  on the first batch.
  """
  stats = jax.jit(functools.partial(module.init, use_running_average=False))(
    jax.random.key(1), xs[0])['batch_stats']

  @jax.jit
  def step(params, stats, x):
    def loss(x, params):
      y, upd = module.apply({'params': params, 'batch_stats': stats}, x,
                            use_running_average=False, mask=mask, mutable=['batch_stats'])
      return jnp.sum(jnp.sin(y.astype(jnp.float32)) * w), (y, upd['batch_stats'])
    (_, (y, new_stats)), grads = jax.value_and_grad(loss, (0, 1), has_aux=True)(x, params)
    return y, grads, new_stats

  outs = []
  for x in xs:
    y, grads, stats = step(params, stats, x)
    outs.append((y, grads))
  y_eval = jax.jit(functools.partial(module.apply, use_running_average=True))(
    {'params': params, 'batch_stats': stats}, xs[0])
  return outs, stats, y_eval


def assert_close(a, b, tol):
  """Leaf by leaf: equal dtypes, values within ``tol`` (bf16 leaves: within one bf16 rounding)."""
  for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
    assert u.dtype == v.dtype, (u.dtype, v.dtype)
    t = max(tol, 1e-2) if u.dtype == jnp.bfloat16 else tol
    np.testing.assert_allclose(np.asarray(u, np.float32), np.asarray(v, np.float32),
                               rtol=t, atol=t)
