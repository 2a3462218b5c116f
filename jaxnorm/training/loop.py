"""The training loop: data -> jitted data-parallel steps -> metrics, evaluation, checkpoints.

``train(config, workdir)`` resumes from the newest usable checkpoint in ``workdir`` when there is
one. Everything that decides the numbers (parameters, statistics, optimizer state, step, RNG, the
data iterator's position and the partially accumulated metric window) is checkpointed, so a run
killed after a checkpoint and restarted writes exactly the same ``metrics.jsonl`` as an
uninterrupted run (up to the wall-clock field ``examples_per_second``).

Workdir layout: ``config.json``, ``metrics.jsonl``, ``checkpoints/<step>/``, ``tensorboard/``.

A non-finite training loss stops the run: the step is recorded in ``metrics.jsonl``
(``diverged: true``) and :class:`NonFiniteLossError` names the step and the last good checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxnorm.training import config as config_lib
from jaxnorm.training import data as data_lib
from jaxnorm.training import optim, steps
from jaxnorm.training.checkpoint import Checkpointer
from jaxnorm.training.metrics import EventWriter, JsonlWriter, Progress

# Fault injection for the kill-and-resume test: after this step (and its logging and
# checkpointing), the process stops making progress until it is killed.
HANG_ENV = 'JAXNORM_FAULT_HANG_AT_STEP'


class NonFiniteLossError(RuntimeError):
  """The training loss became NaN or infinite.

  Attributes:
    step: the first step whose loss was not finite.
    last_checkpoint: step of the last good checkpoint (``None`` if there is none).
  """

  def __init__(self, step: int, last_checkpoint: int | None, checkpoint_path: str):
    self.step, self.last_checkpoint = step, last_checkpoint
    super().__init__(f'non-finite training loss at step {step}; last good checkpoint: '
                     f'{checkpoint_path} (step {last_checkpoint}).')


def build_model(model_config: ml_collections.ConfigDict, num_classes: int):
  """Builds the model of a ``model`` config: ``factory(**fields, num_classes=num_classes)``.

  ``model.name`` is a factory in ``jaxnorm.models`` (e.g. ``'cifar_resnet'``) or, for models
  outside jaxnorm, ``'package.module:factory'``; every other ``model.*`` field is a keyword
  argument.
  """
  import importlib

  name = model_config.name
  kwargs = {k: v for k, v in model_config.items() if k != 'name'}
  expected = "a factory in jaxnorm.models or 'package.module:factory'"
  try:
    if ':' in name:
      module_name, attr = name.split(':', 1)
      factory = getattr(importlib.import_module(module_name), attr, None)
    else:
      factory = getattr(importlib.import_module('jaxnorm.models'), name, None)
  except ImportError:
    factory = None
  if factory is None or not callable(factory):
    raise config_lib.ConfigError('model.name', expected, name)
  try:
    return factory(**kwargs, num_classes=num_classes)
  except (TypeError, ValueError) as e:
    raise config_lib.ConfigError(
        'model', f'arguments accepted by {name} ({str(e).splitlines()[0]})', dict(kwargs)
    ) from None


def _load(config, split):
  return data_lib.load_dataset(
      config.dataset, split, data_dir=config.data_dir or None, image_size=config.image_size,
      synthetic_shape=tuple(config.synthetic.shape),
      synthetic_num_classes=config.synthetic.num_classes,
      synthetic_num_examples=config.synthetic.num_examples, seed=config.seed)


def evaluate(eval_step, state, dataset, batch_size: int, mesh) -> dict[str, float]:
  """Mean loss and accuracy of ``state`` over every example of ``dataset``."""
  totals = None
  for batch in data_lib.eval_batches(dataset, batch_size):
    sums = eval_step(state, steps.shard_batch(batch, mesh))
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = jax.device_get(totals)
  return {'eval_loss': float(totals['loss_sum'] / totals['count']),
          'eval_accuracy': float(totals['correct'] / totals['count'])}


def train(config: ml_collections.ConfigDict, workdir: str, *, model=None,
          devices=None) -> dict[str, Any]:
  """Trains (or resumes training) as ``config`` says, writing everything to ``workdir``.

  Args:
    config: a training config (see :mod:`jaxnorm.training.config`).
    workdir: output directory; a previous run's checkpoints there are resumed.
    model: a Flax linen module to use instead of building ``config.model``.
    devices: devices of the data-parallel mesh (default: all).

  Returns:
    A summary: final ``step``, ``train_loss``, ``train_accuracy``, ``eval_loss``,
    ``eval_accuracy`` and ``examples_per_second`` (steady state, after the first logged window).

  Raises:
    ConfigError: an invalid config value.
    DatasetNotFoundError: the data set is not available locally.
    NonFiniteLossError: the loss became NaN/inf (recorded in metrics.jsonl first).
  """
  mesh = steps.make_mesh(devices)
  config_lib.validate_config(config, num_devices=mesh.size)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(config.to_json_best_effort(indent=2))

  train_ds, test_ds = _load(config, 'train'), _load(config, 'test')
  if config.batch_size > len(train_ds):
    raise config_lib.ConfigError('batch_size', f'at most the training set size {len(train_ds)}',
                                 config.batch_size)
  if model is None:
    model = build_model(config.model, train_ds.num_classes)
  total = config.total_steps
  schedule = optim.make_schedule(
      config.optimizer.learning_rate, total, schedule=config.schedule.name,
      warmup_steps=config.schedule.warmup_steps,
      step_boundaries=tuple(config.schedule.step_boundaries),
      step_decay=config.schedule.step_decay)
  o = config.optimizer
  tx = optim.make_optimizer(o.name, schedule, momentum=o.momentum, nesterov=o.nesterov,
                            weight_decay=o.weight_decay, b1=o.b1, b2=o.b2, eps=o.eps,
                            agc_clip=o.agc_clip)
  iterator = data_lib.BatchIterator(train_ds, config.batch_size, seed=config.seed,
                                    train=config.augment)
  example = np.zeros((config.batch_size, *train_ds.image_shape), np.float32)
  try:
    state = steps.create_train_state(model, tx, example, config.seed, mesh)
  except (TypeError, ValueError) as e:
    # jaxnorm layers check their arguments when first called: report a rejected model field
    # ("<layer>: argument `x` expected ..., got ...") as a config error naming it.
    found = re.search(r'argument `(\w+)` expected', str(e))
    if found is None:
      raise
    field = found.group(1)
    raise config_lib.ConfigError(
        f'model.{field}' if field in config.model else 'model',
        str(e).splitlines()[0].split(' expected ', 1)[-1].rsplit(', got ', 1)[0],
        config.model.get(field, str(e).splitlines()[0])) from None

  ckpt = Checkpointer(os.path.join(workdir, 'checkpoints'),
                      max_to_keep=config.keep_checkpoints, async_save=config.async_checkpoints)
  window = {'loss': 0.0, 'accuracy': 0.0, 'count': 0}
  restored = ckpt.restore_latest(state)
  last_ckpt = None
  if restored is not None:
    last_ckpt, state, extra = restored
    iterator.set_state(extra['data'])
    window = extra['window']
    print(f'Resuming from checkpoint {ckpt.path(last_ckpt)} (step {last_ckpt}).', flush=True)
  step = int(jax.device_get(state.step))
  # Only host 0 writes metrics (every host computes the same global values).
  primary = jax.process_index() == 0
  jsonl = JsonlWriter(os.path.join(workdir, 'metrics.jsonl'),
                      resume_step=step if restored is not None else None) if primary else None
  events = EventWriter(os.path.join(workdir, 'tensorboard')) if primary else None
  compute_dtype = jnp.dtype(config.compute_dtype)
  train_step = steps.make_train_step(model, tx, mesh, label_smoothing=config.label_smoothing,
                                     compute_dtype=compute_dtype)
  eval_step = steps.make_eval_step(model, mesh, compute_dtype=compute_dtype)
  progress = Progress(total, initial=step, enabled=config.progress_bar and primary)
  hang_at = int(os.environ.get(HANG_ENV, '-1'))

  summary: dict[str, Any] = {'step': step}
  pending: list[tuple[int, dict[str, jax.Array]]] = []
  # Throughput counts training time only (not evaluation, checkpointing or logging).
  t_mark, train_seconds, steps_since, n_windows, rates, shown = (
      time.perf_counter(), 0.0, 0, 0, [], step)
  try:
    while step < total:
      batch = steps.shard_batch(next(iterator), mesh)
      state, metrics = train_step(state, batch)
      step += 1
      steps_since += 1
      pending.append((step, metrics))
      is_log = step % config.log_every == 0 or step == total
      is_eval = (config.eval_every and step % config.eval_every == 0) or step == total
      is_ckpt = step % config.checkpoint_every == 0 or step == total
      if not (is_log or is_eval or is_ckpt):
        continue
      # Fetch the pending per-step metrics (one host sync per event, not per step).
      for s, m in jax.device_get(pending):
        if not math.isfinite(float(m['loss'])):
          if jsonl is not None:
            jsonl.write({'step': s, 'train_loss': float(m['loss']), 'diverged': True,
                         'learning_rate': float(schedule(s - 1)), 'last_good_checkpoint':
                         last_ckpt})
          raise NonFiniteLossError(s, last_ckpt, ckpt.path(last_ckpt))
        window['loss'] += float(m['loss'])
        window['accuracy'] += float(m['accuracy'])
        window['count'] += 1
        grad_norm = float(m['grad_norm'])
      pending = []
      train_seconds += time.perf_counter() - t_mark
      record: dict[str, Any] = {}
      if is_log:
        rate = steps_since * config.batch_size / train_seconds
        train_seconds, steps_since = 0.0, 0
        n_windows += 1
        if n_windows > 1:  # The first window includes compilation.
          rates.append(rate)
        record.update(step=step, train_loss=window['loss'] / window['count'],
                      train_accuracy=window['accuracy'] / window['count'],
                      learning_rate=float(schedule(step - 1)), grad_norm=grad_norm)
        window = {'loss': 0.0, 'accuracy': 0.0, 'count': 0}
        progress.update(step - shown, loss=record['train_loss'], acc=record['train_accuracy'],
                        ex_per_s=rate)
        shown = step
        record['examples_per_second'] = rate
      if is_eval:
        record.update(step=step, **evaluate(eval_step, state, test_ds, config.eval_batch_size,
                                            mesh))
      if record:
        if primary:
          jsonl.write(record)
          events.scalars(step, {k: v for k, v in record.items() if k != 'step'})
        summary.update(record)
      if is_ckpt:
        ckpt.save(step, state, {'data': iterator.get_state(), 'window': window})
        last_ckpt = step
      t_mark = time.perf_counter()
      if step == hang_at:
        ckpt.wait()
        while True:
          time.sleep(1)
  finally:
    progress.close()
    if events is not None:
      events.close()
    ckpt.close()
  summary['step'] = step
  summary['examples_per_second'] = float(np.median(rates)) if rates else summary.get(
      'examples_per_second')
  if primary:
    with open(os.path.join(workdir, 'summary.json'), 'w') as f:
      json.dump(summary, f, indent=2)
  return summary
