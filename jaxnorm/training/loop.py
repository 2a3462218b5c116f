"""The training loop: data -> jitted data-parallel steps -> metrics, evaluation, checkpoints.

``train(config, workdir)`` resumes from the newest usable checkpoint in ``workdir`` when there is
one. Everything that decides the numbers (parameters, statistics, optimizer state, step, RNG, the
data iterator's position and the partially accumulated metric window) is checkpointed, so a run
stopped after a checkpoint and restarted writes exactly the same ``metrics.jsonl`` as an
uninterrupted run (up to the wall-clock field ``examples_per_second``).

Workdir layout: ``config.json``, ``metrics.jsonl``, ``summary.json`` (at the end),
``checkpoints/<step>/``, ``tensorboard/``, ``lock`` (while a launch runs). A workdir belongs to one
run (:mod:`jaxnorm.training.workdir`): a second launch while one runs, or a launch with another
config once the run has made progress, is refused; a launch on a finished run returns its summary
and writes nothing.

Checkpoints are saved every ``checkpoint_every`` steps, at ``total_steps``, and when the process
receives SIGTERM or SIGINT (what Colab, preemptible TPU VMs and cluster schedulers send): the
signal is noted, the current step finishes, a checkpoint of that step is saved and
:class:`Preempted` is raised; running again resumes there. A second signal stops at once
(``KeyboardInterrupt``). Handlers are installed only when ``train`` runs in the main thread. On
several hosts the hosts agree on stopping at the next logging, evaluation or checkpoint step.

The record of step ``s`` in ``metrics.jsonl`` logs ``learning_rate = schedule(s - 1)``: the rate
the ``s``-th update used (optax counts updates from 0), and ``train_loss``, ``train_accuracy`` the
means over the steps since the previous record.

A non-finite training loss stops the run: the step is recorded in ``metrics.jsonl``
(``diverged: true``) and :class:`NonFiniteLossError` names the step and the last good checkpoint.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os
import re
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxnorm.training import config as config_lib
from jaxnorm.training import data as data_lib
from jaxnorm.training import optim, steps
from jaxnorm.training import workdir as workdir_lib
from jaxnorm.training.checkpoint import Checkpointer
from jaxnorm.training.metrics import EventWriter, JsonlWriter, Progress


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


class Preempted(RuntimeError):
  """SIGTERM or SIGINT stopped the run after saving a checkpoint of the current step.

  Attributes:
    signum: the signal number (``signal.SIGTERM`` or ``signal.SIGINT``).
    step: the step the run stopped at (its checkpoint resumes there; 0: nothing to save).
    checkpoint: path of that checkpoint (``None`` when no step had been taken).
  """

  def __init__(self, signum: int, step: int, checkpoint: str | None):
    self.signum, self.step, self.checkpoint = signum, step, checkpoint
    name = signal.Signals(signum).name
    where = (f'checkpoint {checkpoint} (step {step}) saved' if checkpoint is not None
             else 'no step taken yet, nothing to save')
    super().__init__(f'{name} received: {where}; run the same command again to resume.')


class _StopRequest:
  """Notes SIGTERM / SIGINT while installed; a second signal raises KeyboardInterrupt."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.signum: int | None = None
    self._previous: dict[int, Any] = {}

  def _handle(self, signum, frame):
    del frame
    if self.signum is not None:
      self.uninstall()
      raise KeyboardInterrupt(f'second signal ({signal.Signals(signum).name}): stopping now')
    self.signum = signum
    print(f'{signal.Signals(signum).name} received: saving a checkpoint at the end of this '
          'step, then stopping.', flush=True)

  def install(self) -> None:
    if threading.current_thread() is not threading.main_thread():
      return  # Python delivers signals to the main thread only.
    for s in self.SIGNALS:
      self._previous[s] = signal.signal(s, self._handle)

  def uninstall(self) -> None:
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    self._previous = {}

  def requested(self, at_event: bool) -> bool:
    """Whether to stop now: this host's flag, or on several hosts, any host's at an event step."""
    if jax.process_count() == 1:
      return self.signum is not None
    if not at_event:
      return False
    from jax.experimental import multihost_utils

    flags = multihost_utils.process_allgather(np.int32(self.signum or 0))
    agreed = int(np.max(flags))
    if agreed and self.signum is None:
      self.signum = agreed
    return bool(agreed)


def build_model(model_config: ml_collections.ConfigDict, num_classes: int):
  """Builds the model of a ``model`` config: ``factory(**keywords, num_classes=num_classes)``.

  ``model.name`` is a factory in ``jaxnorm.models`` (e.g. ``'cifar_resnet'``) or, for models
  outside jaxnorm, ``'package.module:factory'``; every other ``model.*`` field is a keyword
  argument (see :func:`jaxnorm.training.config.model_config`). A field equal to the factory's own
  default is left to the factory, so its defaults apply unchanged (e.g. ``regularized=True`` still
  turns on conv biases when ``conv_bias`` keeps its default ``None``).
  """
  name = model_config.name
  factory = config_lib.resolve_factory(name)
  defaults = config_lib.factory_keywords(name)
  kwargs = {}
  for k, v in model_config.items():
    d = defaults.get(k, inspect.Parameter.empty)
    if k != 'name' and not (type(v) is type(d) and v == d):
      kwargs[k] = v
  try:
    return factory(**kwargs, num_classes=num_classes)
  except (TypeError, ValueError) as e:
    raise config_lib.ConfigError(
        'model', f'arguments accepted by {name} ({str(e).splitlines()[0]})', dict(kwargs)
    ) from None


def _model_error(e: Exception, config) -> Exception | None:
  """A jaxnorm layer's argument error (raised when the model first runs) as a ConfigError."""
  first = str(e).splitlines()[0] if str(e) else ''
  found = re.search(r'argument `(\w+)` expected', first)
  if found is None:
    return None
  field = found.group(1)
  if field in config.model:
    expected = first.split(' expected ', 1)[-1].rsplit(', got ', 1)[0]
    return config_lib.ConfigError(f'model.{field}', expected, config.model[field])
  where = 'model.norm' if 'norm' in config.model else 'model.name'
  return config_lib.ConfigError(
      where, f'a model that accepts batch_size={config.batch_size} ({first})',
      config.model[where.split('.')[1]])


@contextlib.contextmanager
def _model_errors_as_config_errors(config):
  """Re-raises a jaxnorm layer's argument error as a ConfigError naming the model field.

  jaxnorm layers check their arguments when first called ("<layer>: argument `x` expected ...,
  got ..."), i.e. at init and when the train step is first traced; other errors pass unchanged.
  """
  try:
    yield
  except (TypeError, ValueError) as e:
    error = _model_error(e, config)
    if error is None:
      raise
    raise error from None


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


def train(config: ml_collections.ConfigDict, workdir: str, *, model=None, devices=None,
          step_callback: Callable[[int], None] | None = None) -> dict[str, Any]:
  """Trains (or resumes training) as ``config`` says, writing everything to ``workdir``.

  Args:
    config: a training config (see :mod:`jaxnorm.training.config`).
    workdir: output directory; a previous run's checkpoints there are resumed.
    model: a Flax linen module to use instead of building ``config.model``.
    devices: devices of the data-parallel mesh (default: all).
    step_callback: called with the step number after each step's logging, evaluation and
      checkpointing (for tests and instrumentation; a signal received meanwhile is handled when
      it returns).

  Returns:
    A summary: final ``step``, ``train_loss``, ``train_accuracy``, ``eval_loss``,
    ``eval_accuracy`` and ``examples_per_second`` (steady state, after the first logged window);
    for a run that had already finished, its ``summary.json`` (nothing is written).

  Raises:
    ConfigError: an invalid config value.
    DatasetNotFoundError: the data set is not available locally.
    WorkdirError: the workdir cannot be created or written.
    WorkdirLockedError: another launch is running in the workdir.
    ConfigMismatchError: the workdir holds a run with another config.
    NonFiniteLossError: the loss became NaN/inf (recorded in metrics.jsonl first).
    Preempted: SIGTERM or SIGINT; the current step was checkpointed.
  """
  mesh = steps.make_mesh(devices)
  config_lib.validate_config(config, num_devices=mesh.size)
  primary = jax.process_index() == 0
  workdir = workdir_lib.prepare(workdir)
  lock = workdir_lib.Lock(workdir) if primary else None
  if lock is not None:
    lock.acquire()
  try:
    workdir_lib.check_config(workdir, config)
    done = workdir_lib.finished_summary(workdir, config.total_steps)
    if done is not None:
      print(f'Run already finished: {os.path.join(workdir, "summary.json")} (step '
            f'{done["step"]}); nothing to do.', flush=True)
      return done
    if primary:
      workdir_lib.write_config(workdir, config)
    return _train(config, workdir, mesh, primary, model, step_callback)
  finally:
    if lock is not None:
      lock.release()


def _train(config, workdir, mesh, primary, model, step_callback) -> dict[str, Any]:
  stop = _StopRequest()
  stop.install()  # Before the slow set-up: a signal during it stops cleanly too.
  try:
    summary = _run(config, workdir, mesh, primary, model, step_callback, stop)
  finally:
    stop.uninstall()
  if stop.signum is not None:
    # The signal came during the last step: the run is complete and saved, but whoever called
    # train() asked to stop (a study must not start its next run), so it still hears of it.
    raise Preempted(stop.signum, summary['step'],
                    os.path.join(workdir, 'checkpoints', str(summary['step'])))
  return summary


def _run(config, workdir, mesh, primary, model, step_callback, stop) -> dict[str, Any]:
  train_ds, test_ds = _load(config, 'train'), _load(config, 'test')
  if config.batch_size > len(train_ds):
    raise config_lib.ConfigError('batch_size', f'at most the training set size {len(train_ds)}',
                                 config.batch_size)
  if model is None:
    model = build_model(config.model, train_ds.num_classes)
  total = config.total_steps
  schedule = optim.schedule_from_config(config)
  tx = optim.optimizer_from_config(config.optimizer, schedule)
  iterator = data_lib.BatchIterator(train_ds, config.batch_size, seed=config.seed,
                                    train=config.augment)
  # Initialize on the first training batch (real data: data-dependent initializations such as
  # PWSConv(init_alpha=True) need it), also when resuming, so the state's structure never varies.
  init_batch = steps.shard_batch(iterator.batch(0), mesh)['image']
  with _model_errors_as_config_errors(config):
    state = steps.create_train_state(model, tx, init_batch, config.seed, mesh)

  ckpt = Checkpointer(os.path.join(workdir, 'checkpoints'),
                      max_to_keep=config.keep_checkpoints, async_save=config.async_checkpoints)
  events = progress = None
  try:
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
    jsonl = JsonlWriter(os.path.join(workdir, 'metrics.jsonl'),
                        resume_step=step if restored is not None else None) if primary else None
    summary: dict[str, Any] = {}
    for record in jsonl.records if jsonl is not None else ():
      summary.update(record)
    if primary and step < total:
      events = EventWriter(os.path.join(workdir, 'tensorboard'))
    compute_dtype = jnp.dtype(config.compute_dtype)
    train_step = steps.make_train_step(model, tx, mesh, label_smoothing=config.label_smoothing,
                                       compute_dtype=compute_dtype)
    eval_step = steps.make_eval_step(model, mesh, compute_dtype=compute_dtype)
    progress = Progress(total, initial=step, enabled=config.progress_bar and primary)
    if stop.requested(at_event=True):  # A signal during set-up: nothing new to save.
      raise Preempted(stop.signum, step, ckpt.path(last_ckpt) if last_ckpt else None)

    pending: list[tuple[int, dict[str, jax.Array]]] = []
    grad_norm = None

    def drain():
      """Adds the pending per-step metrics to the window (one host sync for all of them)."""
      nonlocal pending, grad_norm
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

    # Throughput counts training time only (not evaluation, checkpointing or logging).
    t_mark, train_seconds, steps_since, n_windows, rates, shown = (
        time.perf_counter(), 0.0, 0, 0, [], step)
    first = True
    while step < total:
      batch = steps.shard_batch(next(iterator), mesh)
      # The first call traces the model on a training batch: report its argument errors.
      with _model_errors_as_config_errors(config) if first else contextlib.nullcontext():
        state, metrics = train_step(state, batch)
      first = False
      step += 1
      steps_since += 1
      pending.append((step, metrics))
      is_log = step % config.log_every == 0 or step == total
      is_eval = (config.eval_every and step % config.eval_every == 0) or step == total
      is_ckpt = step % config.checkpoint_every == 0 or step == total
      is_event = is_log or is_eval or is_ckpt
      if is_event:
        drain()
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
          progress.update(step - shown, loss=record['train_loss'],
                          acc=record['train_accuracy'], ex_per_s=rate)
          shown = step
          record['examples_per_second'] = rate
        if is_eval:
          record.update(step=step, **evaluate(eval_step, state, test_ds,
                                              config.eval_batch_size, mesh))
        if record:
          if primary:
            jsonl.write(record)
            events.scalars(step, {k: v for k, v in record.items() if k != 'step'})
          summary.update(record)
        if is_ckpt:
          ckpt.save(step, state, {'data': iterator.get_state(), 'window': window})
          last_ckpt = step
        t_mark = time.perf_counter()
      if step_callback is not None:
        step_callback(step)
      if step < total and stop.requested(at_event=is_event):
        drain()
        if last_ckpt != step:
          ckpt.save(step, state, {'data': iterator.get_state(), 'window': window})
          last_ckpt = step
        ckpt.wait()
        raise Preempted(stop.signum, step, ckpt.path(step))
  finally:
    if progress is not None:
      progress.close()
    if events is not None:
      events.close()
    ckpt.close()
  summary['step'] = step
  summary['examples_per_second'] = float(np.median(rates)) if rates else summary.get(
      'examples_per_second')
  if primary:
    workdir_lib.write_summary(workdir, summary)
  return summary
