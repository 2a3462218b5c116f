"""Orbax checkpoints of a training run, with fallback past a damaged latest checkpoint.

A checkpoint at step ``s`` lives in ``<workdir>/checkpoints/<s>/`` and holds the whole
:class:`~jaxnorm.training.steps.TrainState` (params, batch_stats, optimizer state, step, RNG) plus
a JSON item ``extra`` (the data iterator's position and the partial metric window), so a resumed
run continues bit-for-bit. Orbax writes into a temporary directory and renames it when complete, so
a run killed while saving leaves no half checkpoint behind; a checkpoint damaged afterwards (files
truncated or removed) fails to restore, is reported, and the previous one is used.

References:
  Orbax ``CheckpointManager`` (github.com/google/orbax).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class Checkpointer:
  """Saves and restores ``(TrainState, extra JSON)`` pairs under ``directory``.

  Args:
    directory: checkpoint directory (created if needed).
    max_to_keep: how many recent checkpoints to keep (at least 2, so a fallback exists).
    async_save: write in a background thread (returns before the files are on disk).
  """

  def __init__(self, directory: str, *, max_to_keep: int = 3, async_save: bool = False):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max(max_to_keep, 2), enable_async_checkpointing=async_save,
        create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def save(self, step: int, state: Any, extra: dict[str, Any]) -> None:
    """Saves ``state`` and ``extra`` as checkpoint ``step``."""
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), extra=ocp.args.JsonSave(extra)))

  def wait(self) -> None:
    """Blocks until any asynchronous save has finished."""
    self.manager.wait_until_finished()

  def all_steps(self) -> list[int]:
    self.manager.reload()
    return sorted(self.manager.all_steps())

  def path(self, step: int | None) -> str:
    return 'none' if step is None else os.path.join(self.directory, str(step))

  def restore_latest(self, target: Any) -> tuple[int, Any, dict[str, Any]] | None:
    """Restores the newest checkpoint that loads, newest first.

    Args:
      target: a state with the expected structure, shapes, dtypes and shardings (the freshly
        initialized state); restored arrays take its shardings.

    Returns:
      ``(step, state, extra)``, or ``None`` when there is no usable checkpoint.
    """
    abstract = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), target)
    for step in reversed(self.all_steps()):
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), extra=ocp.args.JsonRestore()))
        return step, restored['state'], dict(restored['extra'])
      except Exception as e:  # noqa: BLE001 -- any failure means this checkpoint is unusable.
        msg = (f'checkpoint {self.path(step)} could not be restored ({type(e).__name__}: '
               f'{str(e).splitlines()[0][:200] if str(e) else ""}); trying the previous one.')
        log.warning(msg)
        print(f'WARNING: {msg}', flush=True)
    return None

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
