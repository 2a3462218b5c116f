"""The training loop on the embedded digits set: learning, metrics, schedule, checkpoints, init."""

from __future__ import annotations

import math
import os
import warnings

import flax.linen as nn
import jax
import numpy as np
import pytest
from tiny_cnn import TinyCNN

from jaxnorm.linen import PWSConv
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


def _cosine_with_warmup(step, peak, warmup, total):
  """The schedule's closed form (``make_schedule`` docstring), written independently of optax."""
  if step < warmup:
    return peak * step / warmup
  t = min((step - warmup) / (total - warmup), 1.0)
  return peak * 0.5 * (1.0 + math.cos(math.pi * t))


@pytest.mark.slow
def test_logged_learning_rate_is_the_rate_of_the_steps_update_and_last_step_is_checkpointed(
    tmp_path):
  # total_steps 10 is no multiple of checkpoint_every 4: the last step must still be saved.
  config = _config(total_steps=10, log_every=1, eval_every=0, checkpoint_every=4)
  config.keep_checkpoints = 5
  config.schedule.name, config.schedule.warmup_steps = 'cosine', 3
  train(config, str(tmp_path), model=TinyCNN(), devices=jax.devices()[:1])
  records = read_metrics(str(tmp_path))
  assert [r['step'] for r in records] == list(range(1, 11))
  lr = config.optimizer.learning_rate
  for r in records:  # The record of step s: the s-th update, which optax counts as s - 1.
    expected = _cosine_with_warmup(r['step'] - 1, lr, 3, 10)
    assert r['learning_rate'] == pytest.approx(expected, rel=1e-6, abs=1e-12), r['step']
  assert sorted(os.listdir(tmp_path / 'checkpoints'), key=int) == ['4', '8', '10']


@pytest.mark.slow
def test_corrupt_newest_checkpoint_is_moved_aside_and_the_run_saves_that_step_again(tmp_path):
  config = _config(total_steps=12, log_every=4, eval_every=0, checkpoint_every=4)

  def crash_after_9(step):
    if step == 9:
      raise RuntimeError('simulated crash')

  with pytest.raises(RuntimeError, match='simulated crash'):
    train(config, str(tmp_path), model=TinyCNN(), devices=jax.devices()[:1],
          step_callback=crash_after_9)
  assert sorted(os.listdir(tmp_path / 'checkpoints'), key=int) == ['4', '8']
  for root, _, files in os.walk(tmp_path / 'checkpoints' / '8' / 'state'):
    for name in files:
      open(os.path.join(root, name), 'wb').close()
  train(config, str(tmp_path), model=TinyCNN(), devices=jax.devices()[:1])
  names = os.listdir(tmp_path / 'checkpoints')
  assert sorted(n for n in names if n.isdigit()) == ['12', '4', '8']
  assert len([n for n in names if n.startswith('8.corrupt-')]) == 1
  assert [r['step'] for r in read_metrics(str(tmp_path))] == [4, 8, 12]


class _PWSNet(nn.Module):
  """PWSConv with the data-dependent alpha init -> Dense: it must see real data at init."""

  @nn.compact
  def __call__(self, x, train=False):
    del train
    x = PWSConv(8, (3, 3), init_alpha=True, gamma=1e-3, name='conv')(x)
    return nn.Dense(10)(nn.relu(x).reshape(x.shape[0], -1))


@pytest.mark.slow
def test_data_dependent_init_sees_the_first_training_batch(tmp_path):
  config = _config(total_steps=2, log_every=1, eval_every=0, checkpoint_every=2)
  config.optimizer.learning_rate = 1e-9  # Alpha stays at its init value to float rounding.
  config.optimizer.weight_decay = 0.0
  model = _PWSNet()
  with warnings.catch_warnings():
    warnings.simplefilter('error')  # The all-zeros fallback would warn.
    train(config, str(tmp_path), model=model, devices=jax.devices()[:1])
  import orbax.checkpoint as ocp

  from jaxnorm.training import load_dataset
  from jaxnorm.training.data import BatchIterator

  ds = load_dataset(config.dataset, 'train')
  first = BatchIterator(ds, config.batch_size, seed=config.seed, train=config.augment).batch(0)
  with ocp.CheckpointManager(str(tmp_path / 'checkpoints')) as manager:
    restored = manager.restore(2, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  conv = restored['state']['params']['conv']
  alpha = np.asarray(conv['alpha'])
  # The official init: alpha = sqrt(2 / var(output)), the output on the init batch with alpha 1
  # and no bias, torch's unbiased var over the whole tensor.
  unit = {'kernel': conv['kernel'], 'alpha': np.ones(8, np.float32), 'bias': np.zeros(8)}
  out = PWSConv(8, (3, 3), gamma=1e-3).apply({'params': unit}, first['image'])
  expected = math.sqrt(2.0 / np.var(np.asarray(out, np.float64), ddof=1))
  assert np.all(np.isfinite(alpha)) and not np.allclose(alpha, 1.0)
  np.testing.assert_allclose(alpha, expected, rtol=1e-5)


def test_first_signal_is_noted_and_a_second_one_stops_at_once():
  import signal
  import threading

  from jaxnorm.training.loop import _StopRequest

  if threading.current_thread() is not threading.main_thread():
    pytest.skip('signal handlers can only be installed in the main thread')
  stop = _StopRequest()
  previous = signal.getsignal(signal.SIGTERM)
  stop.install()
  try:
    assert not stop.requested(at_event=False)
    os.kill(os.getpid(), signal.SIGTERM)
    assert stop.requested(at_event=False) and stop.signum == signal.SIGTERM
    with pytest.raises(KeyboardInterrupt, match='second signal'):
      os.kill(os.getpid(), signal.SIGINT)
  finally:
    stop.uninstall()
  assert signal.getsignal(signal.SIGTERM) is previous


def test_a_signal_in_the_last_step_still_reaches_the_caller_after_the_run_is_saved(tmp_path):
  """The run completes and is saved, and train() raises Preempted (a study stops, not continues)."""
  import signal
  import threading

  from jaxnorm.training import Preempted

  if threading.current_thread() is not threading.main_thread():
    pytest.skip('signal handlers can only be installed in the main thread')
  c = _config(total_steps=4, checkpoint_every=4, log_every=2)
  previous = signal.getsignal(signal.SIGTERM)

  def at_step(step):
    if step == 4:
      os.kill(os.getpid(), signal.SIGTERM)

  with pytest.raises(Preempted) as e:
    train(c, str(tmp_path), step_callback=at_step)
  assert e.value.signum == signal.SIGTERM and e.value.step == 4
  assert signal.getsignal(signal.SIGTERM) is previous
  assert os.path.exists(tmp_path / 'summary.json')
  assert train(c, str(tmp_path))['step'] == 4  # rerun: already finished, nothing trained


@pytest.mark.parametrize('mask', ['all', 'all_but_alpha'])
def test_the_configs_decay_mask_is_the_one_training_applies(tmp_path, mask):
  # One plain SGD step (no momentum) from the same init: w1 = w0 - lr * (g + wd * w0) for a
  # decayed parameter, w0 - lr * g otherwise. So a BatchNorm scale (1 at init), decayed by 'all'
  # and 'all_but_alpha' but not by 'kernels', ends lr * wd lower; a kernel ends the same.
  from jaxnorm.studies.harness import load_states
  from jaxnorm.training.config import model_config

  lr, wd = 0.1, 0.5
  finals = {}
  for name in ('kernels', mask):
    c = _config(total_steps=1, log_every=1, eval_every=0, checkpoint_every=1)
    c.model = model_config('MLP', depth=1, width=8, norm='batch_norm')
    c.optimizer.momentum, c.optimizer.weight_decay, c.optimizer.learning_rate = 0.0, wd, lr
    c.schedule.name = 'constant'
    c.optimizer.decay_mask = name
    train(c, str(tmp_path / name))
    _, (state,) = load_states(c, str(tmp_path / name), [1])
    finals[name] = jax.device_get(state.params['layer_0'])
  np.testing.assert_allclose(finals[mask]['norm']['scale'],
                             finals['kernels']['norm']['scale'] - lr * wd, rtol=0, atol=1e-6)
  np.testing.assert_array_equal(finals[mask]['dense']['kernel'],
                                finals['kernels']['dense']['kernel'])
