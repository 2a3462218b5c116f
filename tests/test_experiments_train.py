"""The launcher experiments/train.py: killed, preempted and relaunched runs, bad input, quickstart.

Each launch runs in a subprocess whose ``PYTHONPATH`` puts this checkout first (so an installed
jaxnorm elsewhere is never the one tested), then ``tests/`` for the test model ``tiny_cnn:make``.
``tests/signal_launcher.py`` runs the launcher with a step callback that sends the process a
signal (or waits) after a given step, exactly as a scheduler's signal arriving then.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, 'experiments', 'train.py')
LAUNCHER = os.path.join(ROOT, 'tests', 'signal_launcher.py')
QUICKSTART = os.path.join(ROOT, 'experiments', 'configs', 'quickstart.py')
TESTS = os.path.dirname(os.path.abspath(__file__))  # holds tiny_cnn.py, the launched model

SMALL_RUN = ['--config.total_steps=12', '--config.checkpoint_every=4', '--config.log_every=2',
             '--config.eval_every=6', '--config.batch_size=32', '--config.progress_bar=False',
             '--config.model.name=tiny_cnn:make']
STEPS = [2, 4, 6, 8, 10, 12]


def _env(at_step: str | None = None):
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, TESTS]), JAX_PLATFORMS='cpu')
  env.pop('JAXNORM_TEST_AT_STEP', None)
  if at_step is not None:
    env['JAXNORM_TEST_AT_STEP'] = at_step
  env['XLA_FLAGS'] = ('--xla_force_host_platform_device_count=2 '
                      '--xla_backend_optimization_level=0')  # see conftest.py
  return env


def _launch(workdir, *overrides, at_step=None, config=QUICKSTART + ':smoke', timeout=180):
  cmd = [sys.executable, LAUNCHER if at_step else TRAIN, f'--config={config}',
         f'--workdir={workdir}', *overrides]
  return subprocess.run(cmd, env=_env(at_step), capture_output=True, text=True, timeout=timeout)


def _metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    records = [json.loads(line) for line in f]
  for r in records:
    r.pop('examples_per_second', None)  # Wall clock: the only field allowed to differ.
  return records


def _checkpoints(workdir):
  return sorted(os.listdir(os.path.join(workdir, 'checkpoints')), key=lambda s: (len(s), s))


def _errors(out):
  return [line for line in out.stderr.splitlines() if line.startswith('error:')]


def _load_quickstart():
  import importlib.util

  spec = importlib.util.spec_from_file_location('quickstart', QUICKSTART)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
  """The launcher's SMALL_RUN, uninterrupted: the reference every interrupted run must equal."""
  workdir = tmp_path_factory.mktemp('uninterrupted')
  out = _launch(workdir, *SMALL_RUN)
  assert out.returncode == 0, out.stderr
  assert [r['step'] for r in _metrics(workdir)] == STEPS
  return workdir


@pytest.mark.slow
def test_run_killed_after_checkpoint_resumes_to_identical_metrics(tmp_path, uninterrupted):
  # SIGKILL after step 6: checkpoint 4 saved, steps 5-6 logged but not saved; nothing can run.
  killed = tmp_path / 'killed'
  out = _launch(killed, *SMALL_RUN, at_step='6:SIGKILL')
  assert out.returncode == -signal.SIGKILL
  assert _checkpoints(killed) == ['4']
  assert max(r['step'] for r in _metrics(killed)) == 6

  out = _launch(killed, *SMALL_RUN)
  assert out.returncode == 0, out.stderr
  assert 'Resuming from checkpoint' in out.stdout and '(step 4)' in out.stdout
  assert _metrics(killed) == _metrics(uninterrupted)


@pytest.mark.slow
@pytest.mark.parametrize('at, signame', [(3, 'SIGTERM'), (5, 'SIGINT')])
def test_signal_saves_the_current_step_and_the_rerun_ends_as_an_uninterrupted_run(
    tmp_path, uninterrupted, at, signame):
  # Step 3 comes before the first periodic checkpoint (4): without the handler nothing would be
  # saved. Step 5 is inside a logging window (logs at 4 and 6): its partial window is saved too.
  workdir = tmp_path / 'preempted'
  signum = getattr(signal, signame)
  out = _launch(workdir, *SMALL_RUN, at_step=f'{at}:{signame}')
  assert out.returncode == 128 + signum, out.stderr
  assert 'Traceback' not in out.stderr
  stopped = [line for line in out.stderr.splitlines() if line.startswith('stopped:')]
  assert len(stopped) == 1 and f'{signame} received' in stopped[0]
  assert f'checkpoints/{at} (step {at}) saved' in stopped[0]
  assert str(at) in _checkpoints(workdir)
  assert not os.path.exists(workdir / 'lock')

  out = _launch(workdir, *SMALL_RUN)
  assert out.returncode == 0, out.stderr
  assert f'(step {at})' in out.stdout
  assert _metrics(workdir) == _metrics(uninterrupted)


@pytest.mark.slow
def test_second_launch_on_a_busy_workdir_exits_nonzero_and_records_do_not_interleave(tmp_path):
  workdir, release = tmp_path / 'busy', tmp_path / 'release'
  cmd = [sys.executable, LAUNCHER, f'--config={QUICKSTART}:smoke', f'--workdir={workdir}',
         *SMALL_RUN]
  first = subprocess.Popen(cmd, env=_env(f'2:wait:{release}'), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
  try:
    import time

    deadline = time.time() + 120
    while not (workdir / 'metrics.jsonl').exists() or not (
        workdir / 'metrics.jsonl').read_text().strip():
      assert first.poll() is None and time.time() < deadline, 'the first launch did not start'
      time.sleep(0.1)
    second = _launch(workdir, *SMALL_RUN)
    assert second.returncode == 1
    errors = _errors(second)
    assert len(errors) == 1 and 'is in use by another launch' in errors[0], second.stderr
    assert f'pid {first.pid}' in errors[0]
    assert 'Traceback' not in second.stderr
  finally:
    release.touch()
    _, stderr = first.communicate(timeout=180)
  assert first.returncode == 0, stderr
  assert [r['step'] for r in _metrics(workdir)] == STEPS


@pytest.mark.slow
def test_relaunch_with_another_config_is_refused_naming_the_fields(tmp_path):
  workdir = tmp_path / 'run'
  out = _launch(workdir, *SMALL_RUN, at_step='4:SIGTERM')
  assert out.returncode == 128 + signal.SIGTERM
  before = {name: (workdir / name).read_text() for name in ('metrics.jsonl', 'config.json')}

  for overrides, fields in [
      (['--config.optimizer.learning_rate=0.2'], ['optimizer.learning_rate']),
      (['--config.total_steps=20', '--config.seed=3'], ['seed', 'total_steps']),
  ]:
    out = _launch(workdir, *SMALL_RUN, *overrides)
    assert out.returncode == 1
    errors = _errors(out)
    assert len(errors) == 1 and 'holds a run with another config' in errors[0], out.stderr
    named = [f for f in ('optimizer.learning_rate', 'seed', 'total_steps') if f'{f}:' in errors[0]]
    assert named == fields
    assert {name: (workdir / name).read_text() for name in before} == before
    assert _checkpoints(workdir) == ['4']

  # An operational field may change (where checkpoints go, how often): the run resumes.
  out = _launch(workdir, *SMALL_RUN, '--config.keep_checkpoints=5')
  assert out.returncode == 0, out.stderr
  assert [r['step'] for r in _metrics(workdir)] == STEPS


@pytest.mark.slow
def test_rerunning_a_finished_run_prints_its_summary_and_writes_nothing(tmp_path):
  workdir = tmp_path / 'done'
  assert _launch(workdir, *SMALL_RUN).returncode == 0
  files = {p: p.read_bytes() for p in workdir.rglob('*') if p.is_file()}
  summary = json.loads((workdir / 'summary.json').read_text())
  assert summary['eval_accuracy'] is not None and summary['step'] == 12

  out = _launch(workdir, *SMALL_RUN)
  assert out.returncode == 0, out.stderr
  assert 'Run already finished' in out.stdout
  assert f"eval_accuracy={summary['eval_accuracy']:.4g}" in out.stdout
  assert {p: p.read_bytes() for p in workdir.rglob('*') if p.is_file()} == files


@pytest.mark.slow
def test_non_finite_loss_exits_3_naming_the_step(tmp_path):
  out = _launch(tmp_path / 'w', *SMALL_RUN, '--config.optimizer.learning_rate=1e30',
                '--config.optimizer.weight_decay=0.0')
  assert out.returncode == 3, out.stderr
  assert 'non-finite training loss at step' in out.stderr and 'Traceback' not in out.stderr


@pytest.mark.slow
@pytest.mark.parametrize('override, message', [
    ('--config.optimizer.name=lion', 'config.optimizer.name'),
    ('--config.total_steps=2.5', 'config.total_steps'),
    ('--config.model.name=no_such_model', 'config.model.name'),
    ('--config.totl_steps=5', 'Did you mean "total_steps"'),
    ('--config.model.skip_intt=0.0', 'Did you mean "skip_init"'),
])
def test_invalid_config_value_exits_with_one_line_naming_the_field(tmp_path, override, message):
  out = _launch(tmp_path / 'w', *SMALL_RUN, override)
  assert out.returncode == 1
  assert 'Traceback' not in out.stderr
  errors = _errors(out)
  assert len(errors) == 1 and message in errors[0], out.stderr


@pytest.mark.slow
def test_ghost_batch_that_does_not_divide_the_batch_exits_with_one_line(tmp_path):
  out = _launch(tmp_path / 'w', '--config.total_steps=4', '--config.schedule.warmup_steps=1',
                '--config.batch_size=24', '--config.model.norm=ghost_batch_norm',
                '--config.progress_bar=False')
  assert out.returncode == 1 and 'Traceback' not in out.stderr
  errors = _errors(out)
  assert len(errors) == 1 and 'ghost_batch_size' in errors[0] and '24' in errors[0], out.stderr


@pytest.mark.slow
def test_workdir_under_a_file_exits_with_one_line(tmp_path):
  (tmp_path / 'a_file').write_text('')
  out = _launch(tmp_path / 'a_file' / 'w', *SMALL_RUN)
  assert out.returncode == 1 and 'Traceback' not in out.stderr
  errors = _errors(out)
  assert len(errors) == 1 and 'cannot be created' in errors[0], out.stderr


@pytest.mark.slow
def test_missing_tfds_dataset_exits_with_instructions(tmp_path):
  out = _launch(tmp_path / 'w', *SMALL_RUN, '--config.dataset=cifar10',
                f'--config.data_dir={tmp_path / "no_data"}')
  assert out.returncode == 1 and 'Traceback' not in out.stderr
  assert 'tfds build cifar10 --file_format=array_record' in out.stderr


@pytest.mark.slow
def test_every_model_keyword_is_settable_from_the_command_line(tmp_path):
  # skip_init is a keyword of cifar_resnet: the default config holds it, so the flag parses.
  out = _launch(tmp_path / 'w', '--config.total_steps=2', '--config.schedule.warmup_steps=1',
                '--config.log_every=1', '--config.eval_every=0', '--config.progress_bar=False',
                '--config.model.norm=none', '--config.model.skip_init=0.0',
                '--config.model.width=8')
  assert out.returncode == 0, out.stderr
  model = json.loads((tmp_path / 'w' / 'config.json').read_text())['model']
  assert model['skip_init'] == 0.0 and model['norm'] == 'none' and model['width'] == 8


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
