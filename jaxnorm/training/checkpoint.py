"""Orbax checkpoints of a training run, with fallback past a damaged latest checkpoint.

A checkpoint at step ``s`` lives in ``<workdir>/checkpoints/<s>/`` and holds the whole
:class:`~jaxnorm.training.steps.TrainState` (params, batch_stats, optimizer state, step, RNG) plus
a JSON item ``extra`` (the data iterator's position and the partial metric window), so a resumed
run continues bit-for-bit. Orbax writes into a temporary directory and renames it when complete, so
a run killed while saving leaves no half checkpoint behind; a checkpoint damaged afterwards (files
truncated or removed) fails to restore, is reported, moved aside to ``<step>.corrupt-<time>/``
(a name Orbax does not read as a step, so nothing is deleted and the step can be saved again),
and the previous one is used.

References:
  Orbax ``CheckpointManager`` (github.com/google/orbax).
"""

from __future__ import annotations

import logging
import os
import time
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

  def move_aside(self, step: int) -> str:
    """Renames checkpoint ``step`` to ``<step>.corrupt-<time>`` (host 0); returns the new path.

    Orbax never saves a step at or below its newest one, so a damaged checkpoint left in place
    would stop every later save of that step; the renamed directory is kept for inspection.
    """
    aside = f'{self.path(step)}.corrupt-{time.strftime("%Y%m%dT%H%M%S")}'
    n = 1
    while os.path.exists(aside):
      aside = f'{self.path(step)}.corrupt-{time.strftime("%Y%m%dT%H%M%S")}-{n}'
      n += 1
    if jax.process_index() == 0:
      os.rename(self.path(step), aside)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices(f'jaxnorm-checkpoint-move-aside-{step}')
    self.manager.reload()
    return aside

  def restore(self, step: int, target: Any) -> tuple[Any, dict[str, Any]]:
    """Restores checkpoint ``step`` into the structure of ``target``; returns ``(state, extra)``.

    Raises:
      FileNotFoundError: there is no checkpoint ``step`` (the message lists the ones there are).
    """
    if step not in self.all_steps():
      raise FileNotFoundError(f'no checkpoint {self.path(step)}; checkpoints: {self.all_steps()}')
    abstract = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), target)
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), extra=ocp.args.JsonRestore()))
    return restored['state'], dict(restored['extra'])

  def restore_latest(self, target: Any) -> tuple[int, Any, dict[str, Any]] | None:
    """Restores the newest checkpoint that loads, newest first.

    Args:
      target: a state with the expected structure, shapes, dtypes and shardings (the freshly
        initialized state); restored arrays take its shardings.

    Returns:
      ``(step, state, extra)``, or ``None`` when there is no usable checkpoint. Every checkpoint
      newer than the returned one could not be restored and has been moved aside
      (:meth:`move_aside`), so saving continues at those steps.
    """
    abstract = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), target)
    for step in reversed(self.all_steps()):
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), extra=ocp.args.JsonRestore()))
        return step, restored['state'], dict(restored['extra'])
      except Exception as e:  # noqa: BLE001 -- any failure means this checkpoint is unusable.
        reason = f'{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ""}'
        aside = self.move_aside(step)
        msg = (f'checkpoint {self.path(step)} could not be restored ({reason}); moved to '
               f'{aside}; trying the previous one.')
        log.warning(msg)
        print(f'WARNING: {msg}', flush=True)
    return None

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
