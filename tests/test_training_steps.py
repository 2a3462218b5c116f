"""Train/eval steps: data parallelism equals one device, label smoothing, bf16 compute."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from tiny_cnn import TinyCNN

from jaxnorm.training import steps


def _tiny_cnn():
  return TinyCNN(num_classes=5, features=4)


def _batch(n=16, seed=0):
  rng = np.random.default_rng(seed)
  return {'image': rng.standard_normal((n, 6, 6, 2)).astype(np.float32),
          'label': rng.integers(0, 5, size=n).astype(np.int32)}


def _run(devices, batch, num_steps=2, compute_dtype=jnp.float32):
  mesh = steps.make_mesh(devices)
  tx = optax.sgd(0.1, momentum=0.9)
  model = _tiny_cnn()
  state = steps.create_train_state(model, tx, batch['image'], 0, mesh)
  train_step = steps.make_train_step(model, tx, mesh, compute_dtype=compute_dtype)
  metrics = []
  for _ in range(num_steps):
    state, m = train_step(state, steps.shard_batch(batch, mesh))
    metrics.append(jax.device_get(m))
  return jax.device_get(state), metrics


@pytest.mark.slow
def test_step_on_8_devices_equals_step_on_1_device():
  assert jax.device_count() == 8
  batch = _batch()
  one, m1 = _run(jax.devices()[:1], batch)
  eight, m8 = _run(jax.devices(), batch)
  for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(eight), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  for a, b in zip(m1, m8, strict=True):
    np.testing.assert_allclose(a['loss'], b['loss'], rtol=1e-6)
  # BatchNorm statistics are global: the running mean after one step from zero init equals
  # (1 - momentum) * batch mean of the conv output over the whole global batch.
  mesh = steps.make_mesh(jax.devices())
  state = steps.create_train_state(_tiny_cnn(), optax.sgd(0.1), batch['image'], 0, mesh)
  conv = nn.Conv(4, (3, 3))
  y = conv.apply({'params': jax.device_get(state.params)['Conv_0']}, batch['image'])
  new, _ = steps.make_train_step(_tiny_cnn(), optax.sgd(0.1), mesh)(
      state, steps.shard_batch(batch, mesh))
  np.testing.assert_allclose(new.batch_stats['BatchNorm_0']['mean'],
                             0.1 * np.asarray(y).mean((0, 1, 2)), rtol=1e-4, atol=1e-6)


def test_cross_entropy_with_label_smoothing_matches_numpy():
  rng = np.random.default_rng(0)
  logits = rng.standard_normal((7, 4)).astype(np.float32)
  labels = rng.integers(0, 4, size=7)
  s = 0.2
  target = np.full((7, 4), s / 4)
  target[np.arange(7), labels] += 1 - s
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  want = -(target * logp).sum(-1)
  got = steps.cross_entropy(jnp.asarray(logits), jnp.asarray(labels), s)
  np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.slow
def test_bf16_compute_keeps_float32_params_and_statistics_and_tracks_float32():
  batch = _batch()
  f32, m32 = _run(jax.devices()[:1], batch, num_steps=1)
  bf16, m16 = _run(jax.devices()[:1], batch, num_steps=1, compute_dtype=jnp.bfloat16)
  dtypes = {x.dtype for x in jax.tree.leaves((bf16.params, bf16.batch_stats))}
  assert dtypes == {np.dtype(np.float32)}
  # Same step up to bf16 rounding (8 bits of mantissa).
  np.testing.assert_allclose(m16[0]['loss'], m32[0]['loss'], rtol=3e-2)
  np.testing.assert_allclose(bf16.batch_stats['BatchNorm_0']['var'],
                             f32.batch_stats['BatchNorm_0']['var'], rtol=5e-2, atol=1e-3)


@pytest.mark.slow
def test_eval_step_counts_only_unmasked_examples():
  mesh = steps.make_mesh(jax.devices())
  batch = _batch(16)
  model = _tiny_cnn()
  state = steps.create_train_state(model, optax.sgd(0.1), batch['image'], 0, mesh)
  mask = np.zeros(16, np.float32)
  mask[:5] = 1
  sums = jax.device_get(steps.make_eval_step(model, mesh)(
      state, steps.shard_batch({**batch, 'mask': mask}, mesh)))
  variables = jax.device_get({'params': state.params, 'batch_stats': state.batch_stats})
  logits = np.asarray(model.apply(variables, batch['image'], train=False))[:5]
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  labels = batch['label'][:5]
  assert sums['count'] == 5
  np.testing.assert_allclose(sums['loss_sum'], -logp[np.arange(5), labels].sum(), rtol=1e-5)
  assert sums['correct'] == (logits.argmax(-1) == labels).sum()
