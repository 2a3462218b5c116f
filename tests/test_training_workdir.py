"""A workdir belongs to one run: the lock, the config check, unusable directories."""

from __future__ import annotations

import builtins
import errno
import json
import os
import socket
import subprocess
import sys

import pytest

from jaxnorm.training import default_config
from jaxnorm.training import workdir as workdir_lib
from jaxnorm.training.workdir import (
    ConfigMismatchError,
    Lock,
    WorkdirError,
    WorkdirLockedError,
)


def _dead_pid() -> int:
  proc = subprocess.Popen([sys.executable, '-c', 'pass'])
  proc.wait()
  return proc.pid


def _write_lock(workdir, **record):
  with open(os.path.join(workdir, 'lock'), 'w') as f:
    json.dump(record, f)


def test_second_lock_on_the_same_workdir_is_refused_naming_the_holder(tmp_path):
  with Lock(str(tmp_path)):
    with pytest.raises(WorkdirLockedError, match=f'pid {os.getpid()} on host'):
      Lock(str(tmp_path)).acquire()
  assert not (tmp_path / 'lock').exists()  # Released on exit.
  with Lock(str(tmp_path)):  # And free again.
    pass


def test_lock_of_a_process_that_is_gone_is_taken_over_with_a_message(tmp_path, capsys):
  pid = _dead_pid()
  _write_lock(tmp_path, host=socket.gethostname(), pid=pid, start_time='1', since='then')
  with Lock(str(tmp_path)) as lock:
    assert json.loads((tmp_path / 'lock').read_text()) == lock.record
  assert f'Taking over the stale lock {tmp_path / "lock"} of pid {pid}' in capsys.readouterr().out


def test_lock_of_a_reused_pid_is_stale(tmp_path):
  # This process is alive, but the lock records another start time: its pid was reused.
  _write_lock(tmp_path, host=socket.gethostname(), pid=os.getpid(), start_time='-1', since='x')
  with Lock(str(tmp_path)):
    pass


def test_lock_from_another_host_is_never_taken_over(tmp_path):
  _write_lock(tmp_path, host='another-host.example', pid=_dead_pid(), start_time='1', since='x')
  with pytest.raises(WorkdirLockedError, match='on host another-host.example'):
    Lock(str(tmp_path)).acquire()
  assert json.loads((tmp_path / 'lock').read_text())['host'] == 'another-host.example'


def test_workdir_under_a_file_is_one_line_error(tmp_path):
  (tmp_path / 'f').write_text('')
  with pytest.raises(WorkdirError) as err:
    workdir_lib.prepare(str(tmp_path / 'f' / 'w'))
  assert 'cannot be created' in str(err.value) and '\n' not in str(err.value)


def test_read_only_workdir_is_one_line_error(tmp_path, monkeypatch):
  # Tests run as root in CI, where chmod cannot make a directory read-only: refuse the write
  # the way a read-only mount does.
  real_open = builtins.open

  def read_only_open(path, mode='r', *args, **kwargs):
    if str(path).startswith(str(tmp_path)) and any(c in mode for c in 'wax+'):
      raise PermissionError(errno.EROFS, 'Read-only file system', str(path))
    return real_open(path, mode, *args, **kwargs)

  monkeypatch.setattr(builtins, 'open', read_only_open)
  with pytest.raises(WorkdirError) as err:
    workdir_lib.prepare(str(tmp_path))
  assert 'is not writable (Read-only file system' in str(err.value)
  assert '\n' not in str(err.value)


def _with_progress(tmp_path, config):
  workdir_lib.write_config(str(tmp_path), config)
  (tmp_path / 'metrics.jsonl').write_text('{"step": 1}\n')


def test_config_check_names_every_differing_field_and_ignores_operational_ones(tmp_path):
  old = default_config()
  _with_progress(tmp_path, old)
  new = default_config()
  new.total_steps, new.optimizer.learning_rate = old.total_steps + 1, 0.5
  new.checkpoint_every, new.data_dir = 7, '/elsewhere'  # Operational: allowed to change.
  with pytest.raises(ConfigMismatchError) as err:
    workdir_lib.check_config(str(tmp_path), new)
  assert err.value.fields == ['optimizer.learning_rate', 'total_steps']
  assert f'total_steps: run {old.total_steps}, now {old.total_steps + 1}' in str(err.value)
  new.total_steps, new.optimizer.learning_rate = old.total_steps, old.optimizer.learning_rate
  workdir_lib.check_config(str(tmp_path), new)  # Only operational fields differ.


def test_a_field_added_after_the_run_was_written_matches_only_at_its_default(tmp_path):
  # A run written before `model.norm_last_blocks` and `schedule.step_decay` existed.
  old = default_config()
  _with_progress(tmp_path, old)
  stored = json.loads((tmp_path / 'config.json').read_text())
  del stored['model']['norm_last_blocks'], stored['schedule']['step_decay']
  (tmp_path / 'config.json').write_text(json.dumps(stored))
  workdir_lib.check_config(str(tmp_path), default_config())  # resumes: both at their default
  new = default_config()
  new.model.norm_last_blocks, new.schedule.step_decay = 3, 0.5
  with pytest.raises(ConfigMismatchError) as err:
    workdir_lib.check_config(str(tmp_path), new)
  assert err.value.fields == ['model.norm_last_blocks', 'schedule.step_decay']
  assert 'run absent, now 3' in str(err.value)
  # A field the new config lacks (removed since) is still a mismatch.
  stored['model']['retired_option'] = 1
  (tmp_path / 'config.json').write_text(json.dumps(stored))
  with pytest.raises(ConfigMismatchError, match='model.retired_option'):
    workdir_lib.check_config(str(tmp_path), default_config())


def test_config_of_a_workdir_without_progress_is_replaced(tmp_path):
  workdir_lib.write_config(str(tmp_path), default_config())  # A launch that failed early.
  new = default_config()
  new.seed = 5
  workdir_lib.check_config(str(tmp_path), new)


def test_finished_summary_only_for_a_run_that_reached_total_steps(tmp_path):
  workdir_lib.write_summary(str(tmp_path), {'step': 10, 'eval_accuracy': 0.9})
  assert workdir_lib.finished_summary(str(tmp_path), 10) == {'step': 10, 'eval_accuracy': 0.9}
  assert workdir_lib.finished_summary(str(tmp_path), 20) is None
