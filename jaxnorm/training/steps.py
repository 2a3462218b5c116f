"""Training state, loss, and the jitted, data-parallel train and eval steps.

Data parallelism uses ``jax.sharding``: a 1-D ``Mesh`` over all devices with axis ``'data'``; the
batch is sharded along its leading axis and the training state is replicated. Under ``jit`` every
reduction over the batch is global, so BatchNorm statistics are computed over the whole global
batch (identical to one device holding all of it), and gradients are averaged over it. Ghost
BatchNorm keeps per-group statistics because it reshapes the batch into groups itself.

Multi-host: call ``jax.distributed.initialize()`` (no arguments on Cloud TPU; coordinator address,
process count and id elsewhere) before anything else touches JAX; each host then feeds its slice of
the global batch (``BatchIterator`` does this) and :func:`shard_batch` assembles the global array
with ``jax.make_array_from_process_local_data``.

bf16: with ``compute_dtype=bfloat16`` the float parameters and the inputs are cast to bf16 inside
the step; gradients flow back to the float32 master parameters, BatchNorm statistics stay float32
(Flax reduces in float32), logits are cast back to float32 for the loss.

References:
  Goyal et al. 2017 (large-batch data-parallel SGD); Szegedy et al. 2016 (label smoothing:
  targets ``(1 - s) * onehot + s / K``); Micikevicius et al. 2018 (float32 master weights).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

Pytree = Any


@flax.struct.dataclass
class TrainState:
  """Everything a step changes; a plain pytree (checkpointed as a whole).

  Attributes:
    step: number of optimizer steps taken (int32 scalar).
    params: float32 parameters.
    batch_stats: BatchNorm running statistics (empty dict for models without them).
    opt_state: optax state.
    rng: PRNG key (uint32 (2,)) folded with the step for stochastic layers (``'dropout'``).
  """

  step: jax.Array
  params: Pytree
  batch_stats: Pytree
  opt_state: Pytree
  rng: jax.Array

  @property
  def variables(self) -> dict[str, Pytree]:
    """The model's variables for ``model.apply``: ``params``, and ``batch_stats`` when any."""
    if self.batch_stats:
      return {'params': self.params, 'batch_stats': self.batch_stats}
    return {'params': self.params}


def make_mesh(devices=None) -> Mesh:
  """A 1-D mesh with axis ``'data'`` over ``devices`` (default: all devices of all hosts)."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), ('data',))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec('data'))


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Host-local numpy batch -> global ``jax.Array`` sharded along the batch axis."""
  sharding = batch_sharded(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def create_train_state(model, tx: optax.GradientTransformation, example_input,
                       seed: int, mesh: Mesh) -> TrainState:
  """Initializes the model and optimizer, replicated over ``mesh``.

  Args:
    model: a Flax linen module called as ``model.apply(variables, x, train=bool)``.
    tx: the optimizer.
    example_input: a real input batch: its shape sets the parameter shapes and its values feed
      data-dependent initializations (``PWSConv(init_alpha=True)`` sets its gain from the
      statistics of its output on this batch; on zeros that gain would be infinite). A numpy
      array (the whole batch) or a ``jax.Array`` sharded over ``mesh`` (:func:`shard_batch`).
    seed: initialization seed.
    mesh: device mesh; the state is replicated on it.

  Returns:
    The initial :class:`TrainState`.
  """
  init_rng, state_rng = jax.random.split(jax.random.PRNGKey(seed))

  def init(x):
    variables = model.init({'params': init_rng, 'dropout': init_rng}, x, train=False)
    params = variables['params']
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get('batch_stats', {}),
                      opt_state=tx.init(params), rng=state_rng)

  x = example_input
  if not isinstance(x, jax.Array):
    x = np.asarray(x, np.float32)
    x = jax.device_put(x, batch_sharded(mesh) if x.shape[0] % mesh.size == 0
                       else replicated(mesh))
  return jax.jit(init, out_shardings=replicated(mesh))(x.astype(jnp.float32))


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0):
  """Per-example softmax cross-entropy with optional label smoothing (float32)."""
  num_classes = logits.shape[-1]
  targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), label_smoothing) \
      if label_smoothing > 0 else jax.nn.one_hot(labels, num_classes)
  return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def _cast_floats(tree, dtype):
  return jax.tree.map(
      lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


def make_train_step(model, tx: optax.GradientTransformation, mesh: Mesh, *,
                    label_smoothing: float = 0.0, compute_dtype=jnp.float32) -> Callable:
  """The jitted ``train_step(state, batch) -> (state, metrics)``.

  Args:
    model: Flax linen module.
    tx: optimizer.
    mesh: device mesh (batch sharded over ``'data'``, state replicated).
    label_smoothing: label smoothing coefficient.
    compute_dtype: dtype of the forward/backward computation (``float32`` or ``bfloat16``).

  Returns:
    A jitted function. ``metrics`` holds float32 scalars ``loss`` (mean cross-entropy of the
    global batch, with smoothing), ``accuracy`` and ``grad_norm`` (global L2 norm).
  """
  compute_dtype = jnp.dtype(compute_dtype)

  def step(state: TrainState, batch):
    rng = jax.random.fold_in(state.rng, state.step)
    x = batch['image'].astype(compute_dtype)

    def loss_fn(params):
      p = _cast_floats(params, compute_dtype) if compute_dtype != jnp.float32 else params
      variables = {'params': p, 'batch_stats': state.batch_stats}
      logits, updates = model.apply(variables, x, train=True, mutable=['batch_stats'],
                                    rngs={'dropout': rng})
      logits = logits.astype(jnp.float32)
      loss = cross_entropy(logits, batch['label'], label_smoothing).mean()
      return loss, (logits, updates.get('batch_stats', state.batch_stats))

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == batch['label'])
    metrics = {'loss': loss, 'accuracy': accuracy.astype(jnp.float32),
               'grad_norm': optax.tree.norm(grads)}
    new_state = state.replace(step=state.step + 1, params=params,
                              batch_stats=_cast_floats(batch_stats, jnp.float32),
                              opt_state=opt_state)
    return new_state, metrics

  rep, data = replicated(mesh), batch_sharded(mesh)
  return jax.jit(step, in_shardings=(rep, data), out_shardings=(rep, rep), donate_argnums=0)


def make_eval_step(model, mesh: Mesh, *, compute_dtype=jnp.float32) -> Callable:
  """The jitted ``eval_step(state, batch) -> sums``, batch with a 0/1 ``mask``.

  Returns:
    A jitted function returning float32 scalars ``loss_sum`` (unsmoothed cross-entropy),
    ``correct`` and ``count`` summed over the real (mask = 1) examples.
  """
  compute_dtype = jnp.dtype(compute_dtype)

  def step(state: TrainState, batch):
    p = _cast_floats(state.params, compute_dtype) if compute_dtype != jnp.float32 \
        else state.params
    variables = {'params': p, 'batch_stats': state.batch_stats}
    logits = model.apply(variables, batch['image'].astype(compute_dtype), train=False)
    logits = logits.astype(jnp.float32)
    mask = batch['mask']
    loss = cross_entropy(logits, batch['label'])
    correct = (jnp.argmax(logits, -1) == batch['label']).astype(jnp.float32)
    return {'loss_sum': jnp.sum(loss * mask), 'correct': jnp.sum(correct * mask),
            'count': jnp.sum(mask)}

  rep, data = replicated(mesh), batch_sharded(mesh)
  return jax.jit(step, in_shardings=(rep, data), out_shardings=rep)
