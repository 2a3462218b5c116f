"""The launcher experiments/train.py: kill-and-resume equality, bad config errors, quickstart."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, 'experiments', 'train.py')
QUICKSTART = os.path.join(ROOT, 'experiments', 'configs', 'quickstart.py')

TESTS = os.path.dirname(os.path.abspath(__file__))  # holds tiny_cnn.py, the launched model

SMALL_RUN = ['--config.total_steps=12', '--config.checkpoint_every=4', '--config.log_every=2',
             '--config.eval_every=6', '--config.batch_size=32', '--config.progress_bar=False',
             '--config.model.name=tiny_cnn:make']


def _env(**extra):
  env = dict(os.environ, PYTHONPATH=TESTS, JAX_PLATFORMS='cpu', **extra)
  env['XLA_FLAGS'] = ('--xla_force_host_platform_device_count=2 '
                      '--xla_backend_optimization_level=0')  # see conftest.py
  return env


def _cmd(workdir, *overrides, config=QUICKSTART + ':smoke'):
  return [sys.executable, TRAIN, f'--config={config}', f'--workdir={workdir}', *overrides]


def _metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    records = [json.loads(line) for line in f]
  for r in records:
    r.pop('examples_per_second', None)  # Wall clock: the only field allowed to differ.
  return records


def _reference_run(workdir):
  """The uninterrupted run, in this process, on the same 2 devices the launcher runs on."""
  import jax

  from jaxnorm.training import train

  config = _load_quickstart().get_config('smoke')
  for flag in SMALL_RUN:
    key, value = flag[len('--config.'):].split('=')
    target = config
    *parents, leaf = key.split('.')
    for part in parents:
      target = target[part]
    target[leaf] = type(target[leaf])(value == 'True' if value in ('True', 'False') else value)
  import tiny_cnn

  train(config, str(workdir), devices=jax.devices()[:2], model=tiny_cnn.make(10))


@pytest.mark.slow
def test_run_killed_after_checkpoint_resumes_to_identical_metrics(tmp_path):
  env = _env()
  full, killed = tmp_path / 'full', tmp_path / 'killed'
  _reference_run(full)

  # Stop making progress after step 6 (checkpoint at 4; steps 5-6 logged but not saved), SIGKILL.
  proc = subprocess.Popen(_cmd(killed, *SMALL_RUN), env=_env(
      JAXNORM_FAULT_HANG_AT_STEP='6'), stdout=subprocess.DEVNULL,
      stderr=subprocess.DEVNULL)
  deadline = time.time() + 120
  while time.time() < deadline:
    path = killed / 'metrics.jsonl'
    if path.exists() and any(json.loads(x).get('step') == 6 and 'eval_accuracy' in x
                             for x in path.read_text().splitlines()):
      break
    assert proc.poll() is None, 'the run ended before it could be killed'
    time.sleep(0.2)
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  assert sorted(os.listdir(killed / 'checkpoints')) == ['4']
  assert max(r['step'] for r in _metrics(killed)) == 6

  out = subprocess.run(_cmd(killed, *SMALL_RUN), env=env, check=True, capture_output=True,
                       text=True, timeout=120)
  assert 'Resuming from checkpoint' in out.stdout and '(step 4)' in out.stdout
  assert _metrics(killed) == _metrics(full)
  assert [r['step'] for r in _metrics(full)] == [2, 4, 6, 8, 10, 12]


@pytest.mark.slow
@pytest.mark.parametrize('override, field', [
    ('--config.optimizer.name=lion', 'config.optimizer.name'),
    ('--config.total_steps=2.5', 'config.total_steps'),
    ('--config.model.name=no_such_model', 'config.model.name'),
])
def test_invalid_config_value_exits_with_one_line_naming_the_field(tmp_path, override, field):
  out = subprocess.run(_cmd(tmp_path / 'w', *SMALL_RUN, override), env=_env(),
                       capture_output=True, text=True, timeout=120)
  assert out.returncode != 0
  assert 'Traceback' not in out.stderr
  errors = [line for line in out.stderr.splitlines() if line.startswith('error:')]
  assert len(errors) == 1 and field in errors[0], out.stderr


@pytest.mark.slow
def test_missing_tfds_dataset_exits_with_instructions(tmp_path):
  out = subprocess.run(
      _cmd(tmp_path / 'w', *SMALL_RUN, '--config.dataset=cifar10',
           f'--config.data_dir={tmp_path / "no_data"}'),
      env=_env(), capture_output=True, text=True, timeout=120)
  assert out.returncode == 1 and 'Traceback' not in out.stderr
  assert 'tfds build cifar10 --file_format=array_record' in out.stderr


def _load_quickstart():
  import importlib.util

  spec = importlib.util.spec_from_file_location('quickstart', QUICKSTART)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.slow
def test_quickstart_model_beats_chance_by_far_within_a_third_of_the_smoke_run(tmp_path):
  import jax

  from jaxnorm.training import train

  config = _load_quickstart().get_config('smoke')
  # A third of the smoke run keeps this test short; the full smoke run is in the README numbers.
  config.progress_bar, config.total_steps, config.eval_every = False, 40, 0
  summary = train(config, str(tmp_path), devices=jax.devices()[:1])
  assert summary['step'] == config.total_steps
  assert summary['eval_accuracy'] > 0.5  # 10 classes: chance is 0.1.


def test_quickstart_config_is_valid_and_rejects_unknown_args():
  from jaxnorm.training import validate_config

  quickstart = _load_quickstart()
  for arg in ('', 'smoke'):
    validate_config(quickstart.get_config(arg), num_devices=8)
  with pytest.raises(ValueError, match="expected '' or 'smoke'"):
    quickstart.get_config('large')
