"""Metric sinks of a training run: ``metrics.jsonl``, TensorBoard event files, a progress bar.

TensorBoard: :class:`EventWriter` writes scalar event files with ``tensorboardX``, which needs
neither TensorFlow nor PyTorch (``flax.metrics.tensorboard`` needs TensorFlow).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any

# ----------------------------------------------------------------------------------------------
# metrics.jsonl


def _json_value(v: Any):
  v = float(v) if hasattr(v, 'dtype') or isinstance(v, float) else v
  if isinstance(v, float) and not math.isfinite(v):
    return None  # JSON has no NaN/Inf; a `diverged` record says what happened.
  return v


class JsonlWriter:
  """Appends one JSON object per logged step to ``<workdir>/metrics.jsonl``.

  Args:
    path: file path.
    resume_step: when resuming from a checkpoint at this step, records of later steps (written
      after that checkpoint by the interrupted run) are dropped, so the file ends up exactly as an
      uninterrupted run would have written it. ``None`` starts a new file.
  """

  def __init__(self, path: str, resume_step: int | None = None):
    self.path = path
    keep = []
    self.records: list[dict[str, Any]] = []  # The records kept from the interrupted run.
    if resume_step is not None and os.path.exists(path):
      with open(path) as f:
        for line in f:
          try:
            record = json.loads(line)
          except json.JSONDecodeError:
            continue  # A line cut by a kill.
          if record.get('step', 0) <= resume_step:
            keep.append(line if line.endswith('\n') else line + '\n')
            self.records.append(record)
    with open(path, 'w') as f:
      f.writelines(keep)

  def write(self, record: dict[str, Any]) -> None:
    clean = {k: _json_value(v) for k, v in record.items()}
    with open(self.path, 'a') as f:
      f.write(json.dumps(clean) + '\n')


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  """The records of ``<workdir>/metrics.jsonl``."""
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f if line.strip()]


# ----------------------------------------------------------------------------------------------
# TensorBoard event files.


class EventWriter:
  """Writes scalar summaries to a TensorBoard event file in ``logdir`` (tensorboardX).

  ``tensorboardX`` writes the event-file format (TFRecord-framed ``Event`` protocol buffers)
  without TensorFlow or PyTorch; view the files with ``tensorboard --logdir <workdir>/tensorboard``.

  Args:
    logdir: directory (created if needed).
  """

  def __init__(self, logdir: str):
    from tensorboardX import SummaryWriter

    os.makedirs(logdir, exist_ok=True)
    self.logdir = logdir
    self._writer = SummaryWriter(logdir=logdir, flush_secs=10)

  def scalars(self, step: int, values: dict[str, float]) -> None:
    """Writes ``values`` (``None`` entries skipped) at ``step`` and flushes."""
    now = time.time()
    for tag, value in values.items():
      if value is not None:
        self._writer.add_scalar(tag, float(value), global_step=step, walltime=now)
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()


# ----------------------------------------------------------------------------------------------
# Progress bar.


class Progress:
  """A tqdm bar over the steps with loss, accuracy and examples/second.

  Args:
    total: total steps.
    initial: first step (when resuming).
    enabled: show it (off for tests and non-interactive runs if wished).
  """

  def __init__(self, total: int, initial: int = 0, enabled: bool = True):
    self.bar = None
    if enabled:
      from tqdm.auto import tqdm

      self.bar = tqdm(total=total, initial=initial, unit='step', file=sys.stderr,
                      dynamic_ncols=True)

  def update(self, n: int, **postfix) -> None:
    if self.bar is not None:
      self.bar.set_postfix({k: f'{v:.4g}' for k, v in postfix.items()}, refresh=False)
      self.bar.update(n)

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()
