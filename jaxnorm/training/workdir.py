"""A workdir belongs to one run: its lock file, its config, its finished state.

- :func:`prepare` creates the directory; a path under a file or a directory that cannot be written
  raises :class:`WorkdirError` with a one-line message.
- :class:`Lock` is ``<workdir>/lock``: a JSON file naming the host, pid and process start time of
  the launch that holds the workdir. A second launch raises :class:`WorkdirLockedError`. A lock left
  by a launch that no longer runs (same host, pid not alive, or alive but started at another time:
  a reused pid) is stale: it is taken over, with a log line. A lock from another host cannot be
  checked and is never taken over: delete the file by hand if that run is gone.
- :func:`check_config`: once a run has made progress in a workdir (metrics, checkpoints or a
  summary), a launch whose config differs from the run's ``config.json`` raises
  :class:`ConfigMismatchError` naming every differing field. No field that changes the numbers
  may change (``total_steps`` included: the learning-rate schedule is a function of it, so a
  longer run is a different run); only :data:`OPERATIONAL_FIELDS` may (they change where data is
  read and how checkpoints are kept and shown, never a logged value).
- :func:`finished_summary`: the ``summary.json`` of a run that ended, or ``None``.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from typing import Any

log = logging.getLogger(__name__)

LOCK_FILE = 'lock'
# Fields a relaunch may change: none of them changes a number the run computes or logs.
OPERATIONAL_FIELDS = ('data_dir', 'progress_bar', 'async_checkpoints', 'keep_checkpoints',
                      'checkpoint_every')


class WorkdirError(RuntimeError):
  """The workdir cannot be used (not a directory, not writable); the message is one line."""


class WorkdirLockedError(RuntimeError):
  """Another live launch holds the workdir."""


class ConfigMismatchError(ValueError):
  """The workdir holds a run with another config.

  Attributes:
    fields: the differing fields (dotted names).
  """

  def __init__(self, workdir: str, diffs: dict[str, tuple[Any, Any]]):
    self.fields = list(diffs)
    shown = '; '.join(f'{k}: run {_show(a)}, now {_show(b)}' for k, (a, b) in diffs.items())
    super().__init__(
        f'{workdir} holds a run with another config ({shown}). A workdir belongs to one run: '
        f'relaunch with the run\'s values to resume it, or use a new --workdir.')


_ABSENT = object()


def _show(v) -> str:
  return 'absent' if v is _ABSENT else json.dumps(v)


def _one_line(e: OSError) -> str:
  text = e.strerror or str(e)
  where = e.filename if e.filename is not None else ''
  return f'{text}: {where}' if where else text


def prepare(workdir: str) -> str:
  """Creates ``workdir`` if needed and checks that it is a writable directory.

  Returns:
    The absolute path.

  Raises:
    WorkdirError: one line naming the path and the reason.
  """
  path = os.path.abspath(workdir)
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise WorkdirError(f'workdir {path} cannot be created ({_one_line(e)}).') from None
  if not os.path.isdir(path):
    raise WorkdirError(f'workdir {path} is not a directory.')
  probe = os.path.join(path, f'.write-test-{socket.gethostname()}-{os.getpid()}')
  try:
    with open(probe, 'w') as f:
      f.write('')
    os.remove(probe)
  except OSError as e:
    raise WorkdirError(f'workdir {path} is not writable ({_one_line(e)}).') from None
  return path


# ----------------------------------------------------------------------------------------------
# Lock.


def _start_time(pid: int) -> str | None:
  """The process's start time in clock ticks since boot (Linux ``/proc``), or None."""
  try:
    with open(f'/proc/{pid}/stat') as f:
      stat = f.read()
  except OSError:
    return None
  # Field 22; the command name (field 2) may hold spaces, so split after its closing paren.
  return stat.rsplit(')', 1)[1].split()[19]


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True  # Exists, owned by another user.
  return True


class Lock:
  """``<workdir>/lock``, held for the lifetime of one launch.

  Args:
    workdir: the (existing) workdir.
  """

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, LOCK_FILE)
    self.record = {'host': socket.gethostname(), 'pid': os.getpid(),
                   'start_time': _start_time(os.getpid()),
                   'since': time.strftime('%Y-%m-%dT%H:%M:%S%z')}
    self.held = False

  def _create(self) -> bool:
    """Writes the lock atomically (complete or absent); False if one exists."""
    tmp = f'{self.path}.{self.record["host"]}.{self.record["pid"]}.tmp'
    with open(tmp, 'w') as f:
      json.dump(self.record, f)
    try:
      os.link(tmp, self.path)  # Fails if the lock exists; never leaves a half-written lock.
      return True
    except FileExistsError:
      return False
    finally:
      os.remove(tmp)

  def _read(self) -> dict[str, Any] | None:
    try:
      with open(self.path) as f:
        return json.load(f)
    except FileNotFoundError:
      return None
    except (OSError, ValueError):
      return {}

  def _stale(self, holder: dict[str, Any]) -> bool:
    if holder.get('host') != self.record['host'] or not isinstance(holder.get('pid'), int):
      return False
    pid = holder['pid']
    if not _alive(pid):
      return True
    started = _start_time(pid)
    return started is not None and holder.get('start_time') not in (None, started)

  def acquire(self) -> None:
    """Takes the lock, taking over a stale one.

    Raises:
      WorkdirLockedError: a live launch (or one on another host) holds it.
    """
    for _ in range(3):
      try:
        if self._create():
          self.held = True
          return
      except OSError as e:
        raise WorkdirError(f'cannot write the lock file {self.path} ({_one_line(e)}).') from None
      holder = self._read()
      if holder is None:
        continue  # Released meanwhile: try again.
      if not self._stale(holder):
        who = (f'pid {holder.get("pid")} on host {holder.get("host")} since '
               f'{holder.get("since")}') if holder else 'an unreadable lock'
        raise WorkdirLockedError(
            f'workdir {os.path.dirname(self.path)} is in use by another launch ({who}); wait for '
            f'it to end, or, if it is gone, delete {self.path}.')
      # Stale: move it aside under a unique name, then check that it was the stale one (another
      # launch may have taken it over in between).
      aside = f'{self.path}.stale-{self.record["host"]}-{self.record["pid"]}'
      try:
        os.rename(self.path, aside)
      except FileNotFoundError:
        continue
      with open(aside) as f:
        moved = f.read()
      if moved.strip() and json.loads(moved) != holder:
        os.rename(aside, self.path)  # Someone else's fresh lock: put it back.
        continue
      os.remove(aside)
      msg = (f'Taking over the stale lock {self.path} of pid {holder["pid"]} on host '
             f'{holder["host"]} (since {holder.get("since")}): that process is gone.')
      log.warning(msg)
      print(f'WARNING: {msg}', flush=True)
    raise WorkdirLockedError(f'workdir {os.path.dirname(self.path)}: could not take the lock '
                             f'{self.path} (other launches keep taking it).')

  def release(self) -> None:
    """Removes the lock if this launch holds it."""
    if self.held and self._read() == self.record:
      os.remove(self.path)
    self.held = False

  def __enter__(self) -> Lock:
    self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()


# ----------------------------------------------------------------------------------------------
# Config and finished state.


def _flatten(d: dict[str, Any], prefix: str = '') -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out


def config_json(config) -> str:
  """The config as ``config.json`` holds it."""
  return config.to_json_best_effort(indent=2)


def has_progress(workdir: str) -> bool:
  """Whether a run has left results in ``workdir`` (metrics, checkpoints, a summary)."""
  metrics = os.path.join(workdir, 'metrics.jsonl')
  if os.path.exists(metrics) and os.path.getsize(metrics) > 0:
    return True
  if os.path.exists(os.path.join(workdir, 'summary.json')):
    return True
  ckpt = os.path.join(workdir, 'checkpoints')
  return os.path.isdir(ckpt) and any(name.isdigit() for name in os.listdir(ckpt))


def check_config(workdir: str, config) -> None:
  """Raises :class:`ConfigMismatchError` if ``workdir`` holds a run with another config.

  A workdir without progress (no metrics, checkpoints or summary) holds no run yet: its
  ``config.json`` (e.g. from a launch that failed before its first step) is replaced. A field the
  stored config lacks (written by an older jaxnorm, before the field existed) matches when the
  new config gives it its default, the value that reproduces the old behaviour; any other value
  is a mismatch.
  """
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path) or not has_progress(workdir):
    return
  with open(path) as f:
    try:
      stored = _flatten(json.load(f))
    except ValueError:
      stored = {}
  new = _flatten(json.loads(config_json(config)))
  defaults = _defaults(stored.get('model.name'))
  diffs = {}
  for key in sorted(set(stored) | set(new)):
    if key in OPERATIONAL_FIELDS:
      continue
    a, b = stored.get(key, _ABSENT), new.get(key, _ABSENT)
    if a is _ABSENT and key in defaults and b == defaults[key]:
      continue  # a field added after the run was written, at its default
    if a != b:
      diffs[key] = (a, b)
  if diffs:
    raise ConfigMismatchError(workdir, diffs)


def _defaults(model_name) -> dict[str, Any]:
  """Every field's default, flattened: ``default_config()`` with ``model_name``'s keywords."""
  from jaxnorm.training.config import ConfigError, default_config, model_config

  c = default_config()
  if isinstance(model_name, str):
    try:
      c.model = model_config(model_name)
    except (ConfigError, ImportError, AttributeError, ValueError):
      pass
  return _flatten(json.loads(config_json(c)))


def write_config(workdir: str, config) -> None:
  _write_atomic(os.path.join(workdir, 'config.json'), config_json(config))


def finished_summary(workdir: str, total_steps: int) -> dict[str, Any] | None:
  """The run's ``summary.json`` if the run reached ``total_steps``, else None."""
  try:
    with open(os.path.join(workdir, 'summary.json')) as f:
      summary = json.load(f)
  except (OSError, ValueError):
    return None
  return summary if isinstance(summary, dict) and summary.get('step') == total_steps else None


def write_summary(workdir: str, summary: dict[str, Any]) -> None:
  _write_atomic(os.path.join(workdir, 'summary.json'), json.dumps(summary, indent=2))


def _write_atomic(path: str, text: str) -> None:
  tmp = f'{path}.tmp-{os.getpid()}'
  with open(tmp, 'w') as f:
    f.write(text)
  os.replace(tmp, path)
