"""The training loop on the embedded digits set: learning, metrics, divergence handling."""

from __future__ import annotations

import os

import jax
import pytest
from tiny_cnn import TinyCNN

from jaxnorm.training import NonFiniteLossError, default_config, read_metrics, train


def _config(**overrides):
  c = default_config()
  c.total_steps, c.batch_size, c.eval_batch_size = 40, 32, 304
  c.log_every, c.eval_every, c.checkpoint_every = 10, 20, 20
  c.augment, c.progress_bar = False, False
  c.optimizer.learning_rate = 0.05
  for k, v in overrides.items():
    c[k] = v
  return c


@pytest.mark.slow
def test_loss_decreases_on_the_embedded_digits_set(tmp_path):
  summary = train(_config(), str(tmp_path), model=TinyCNN(), devices=jax.devices()[:2])
  records = read_metrics(str(tmp_path))
  assert [r['step'] for r in records] == [10, 20, 30, 40]
  assert {'train_loss', 'train_accuracy', 'learning_rate', 'examples_per_second'} <= set(
      records[0])
  assert records[-1]['train_loss'] < 0.5 * records[0]['train_loss']
  assert 'eval_accuracy' in records[1] and 'eval_accuracy' not in records[0]
  assert summary['eval_accuracy'] > 0.5  # Chance is 0.1.
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['20', '40']
  assert any(f.startswith('events.out.tfevents') for f in os.listdir(tmp_path / 'tensorboard'))


@pytest.mark.slow
def test_non_finite_loss_stops_the_run_naming_step_and_last_checkpoint(tmp_path):
  config = _config(total_steps=30, log_every=2, checkpoint_every=2, eval_every=0)
  config.optimizer.learning_rate = 1e30
  config.optimizer.weight_decay = 0.0
  with pytest.raises(NonFiniteLossError) as err:
    train(config, str(tmp_path), model=TinyCNN(use_norm=False), devices=jax.devices()[:1])
  step, last = err.value.step, err.value.last_checkpoint
  assert f'non-finite training loss at step {step}' in str(err.value)
  records = read_metrics(str(tmp_path))
  assert records[-1]['step'] == step and records[-1]['diverged'] is True
  assert records[-1]['train_loss'] is None
  assert all(r['train_loss'] is not None for r in records[:-1])
  if last is not None:
    assert last < step and os.path.isdir(tmp_path / 'checkpoints' / str(last))
    assert str(tmp_path / 'checkpoints' / str(last)) in str(err.value)
