"""Checkpoints: exact round trip, fallback past a damaged latest checkpoint."""

from __future__ import annotations

import os

import jax
import numpy as np
import optax

from jaxnorm.training import steps
from jaxnorm.training.checkpoint import Checkpointer


def _state(value):
  mesh = steps.make_mesh(jax.devices()[:1])
  params = {'w': np.full((3, 2), value, np.float32)}
  tx = optax.sgd(0.1, momentum=0.9)
  state = steps.TrainState(step=np.int32(value), params=params,
                           batch_stats={'mean': np.arange(2, dtype=np.float32) * value},
                           opt_state=tx.init(params), rng=jax.random.PRNGKey(int(value)))
  return jax.device_put(state, steps.replicated(mesh))


def _save_steps_1_and_2(directory):
  ckpt = Checkpointer(str(directory))
  for s in (1, 2):
    ckpt.save(s, _state(float(s)), {'data': {'step': s}})
  ckpt.close()


def _truncate_array_store(checkpoint_dir):
  """Damages a checkpoint: truncates every file of its array store."""
  for root, _, files in os.walk(checkpoint_dir / 'state'):
    for name in files:
      open(os.path.join(root, name), 'wb').close()


def test_round_trip_restores_state_and_extra_exactly(tmp_path):
  ckpt = Checkpointer(str(tmp_path))
  ckpt.save(3, _state(3.0), {'data': {'step': 3}, 'window': {'loss': 0.1 + 0.2}})
  ckpt.wait()
  step, state, extra = ckpt.restore_latest(_state(0.0))
  ckpt.close()
  assert step == 3 and extra == {'data': {'step': 3}, 'window': {'loss': 0.1 + 0.2}}
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(_state(3.0)), strict=True):
    np.testing.assert_array_equal(a, b)


def test_no_checkpoint_returns_none(tmp_path):
  assert Checkpointer(str(tmp_path)).restore_latest(_state(0.0)) is None


def test_damaged_latest_checkpoint_is_reported_and_the_previous_one_used(tmp_path, capsys):
  _save_steps_1_and_2(tmp_path)
  _truncate_array_store(tmp_path / '2')
  # A save killed midway leaves only Orbax's temporary directory: it is not a checkpoint.
  os.makedirs(tmp_path / '3.orbax-checkpoint-tmp-1234567' / 'state')
  step, state, extra = Checkpointer(str(tmp_path)).restore_latest(_state(0.0))
  assert step == 1 and extra['data'] == {'step': 1}
  np.testing.assert_array_equal(state.params['w'], np.full((3, 2), 1.0))
  assert 'could not be restored' in capsys.readouterr().out


def test_damaged_checkpoint_is_moved_aside_so_its_step_is_saved_again(tmp_path, capsys):
  _save_steps_1_and_2(tmp_path)
  _truncate_array_store(tmp_path / '2')
  ckpt = Checkpointer(str(tmp_path))
  step, _, _ = ckpt.restore_latest(_state(0.0))
  assert step == 1
  aside = [n for n in os.listdir(tmp_path) if n.startswith('2.corrupt-')]
  assert len(aside) == 1 and f'moved to {tmp_path / aside[0]}' in capsys.readouterr().out
  # Orbax skips a step at or below its newest one: with the damaged 2 left in place this save
  # would be a silent no-op.
  ckpt.save(2, _state(20.0), {'data': {'step': 2}})
  ckpt.close()
  step, state, extra = Checkpointer(str(tmp_path)).restore_latest(_state(0.0))
  assert step == 2 and extra['data'] == {'step': 2}
  np.testing.assert_array_equal(state.params['w'], np.full((3, 2), 20.0))


def test_restore_a_given_step_and_a_missing_one(tmp_path):
  import jax.numpy as jnp
  import pytest

  from jaxnorm.training import Checkpointer

  ckpt = Checkpointer(str(tmp_path), max_to_keep=3)
  for step in (1, 2):
    ckpt.save(step, {'w': jnp.full((3,), float(step))}, {'step': step})
  ckpt.wait()
  state, extra = ckpt.restore(1, {'w': jnp.zeros((3,))})
  assert float(state['w'][0]) == 1.0 and extra == {'step': 1}
  with pytest.raises(FileNotFoundError, match=r'checkpoints: \[1, 2\]'):
    ckpt.restore(7, {'w': jnp.zeros((3,))})
  ckpt.close()
