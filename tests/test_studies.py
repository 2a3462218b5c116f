"""The reproduction harness (claims, resumable parts and runs) and every paper's smoke study."""

import copy
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from experiments.reproduce import PAPERS, load_config
from jaxnorm import studies
from jaxnorm.studies import harness
from jaxnorm.training import validate_config
from jaxnorm.training import workdir as workdir_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLAIM_KEYS = {'claim', 'paper_value', 'measured', 'unit', 'scale', 'verdict', 'note', 'paper'}


def test_claim_rejects_an_unknown_verdict_and_scale():
  with pytest.raises(ValueError, match='verdict'):
    studies.Claim('c', 1, 1, 'x', 'cpu', 'yes')
  with pytest.raises(ValueError, match='scale'):
    studies.Claim('c', 1, 1, 'x', 'laptop', 'reproduced')


def test_verdict_from_checks():
  assert studies.verdict_from([True, True]) == 'reproduced'
  assert studies.verdict_from([True, False]) == 'partly'
  assert studies.verdict_from([False, False]) == 'not'
  assert studies.verdict_from([]) == 'not'
  assert studies.verdict_from([True], run=False) == 'not_run'


def test_parts_are_computed_once_and_read_back_after_a_crash(tmp_path):
  calls = []

  def measure(v):
    calls.append(v)
    return {'value': np.float32(v), 'series': np.arange(3.0), 'bad': float('nan')}

  study = studies.StudyDir(str(tmp_path), 'smoke', log=lambda s: None)
  first = study.part('a/b', lambda: measure(1))
  with pytest.raises(RuntimeError):  # A study that dies after its first part...
    study.part('c', lambda: (_ for _ in ()).throw(RuntimeError('killed')))
  again = studies.StudyDir(str(tmp_path), 'smoke', log=lambda s: None)  # ...is rerun:
  assert again.part('a/b', lambda: measure(2)) == first  # the first part is read back,
  assert calls == [1]
  assert again.part('c', lambda: 3) == 3  # and the failed one computed.
  assert first == {'value': 1.0, 'series': [0.0, 1.0, 2.0], 'bad': 'nan'}
  assert np.isnan(studies.as_float(first['bad']))
  assert not os.path.exists(tmp_path / 'parts' / 'c.json.tmp')


def test_a_workdir_holds_one_scale(tmp_path):
  studies.StudyDir(str(tmp_path), 'smoke', log=lambda s: None)
  with pytest.raises(ValueError, match="scale='smoke'"):
    studies.StudyDir(str(tmp_path), 'cpu', log=lambda s: None)


def test_part_names_stay_inside_the_workdir(tmp_path):
  study = studies.StudyDir(str(tmp_path), 'smoke', log=lambda s: None)
  with pytest.raises(ValueError, match='name'):
    study.part('../escape', lambda: 1)


def test_a_diverging_run_is_a_result_and_is_not_rerun(tmp_path):
  from jaxnorm.training.config import default_config, model_config

  c = default_config()
  c.dataset, c.augment = 'digits', False
  c.model = model_config('MLP', depth=2, width=8)
  c.batch_size, c.eval_batch_size, c.total_steps = 16, 304, 6
  c.log_every = c.checkpoint_every = 3
  c.optimizer.learning_rate = 1e12  # the loss overflows within a few steps
  study = studies.StudyDir(str(tmp_path), 'smoke', log=lambda s: None)
  r = study.train('blowup', c)
  assert r['diverged'] and 1 <= r['step'] <= 6
  assert studies.StudyDir(str(tmp_path), 'smoke', log=lambda s: None).train('blowup', c) == r


def test_a_run_from_before_a_config_field_existed_is_read_back_not_retrained(tmp_path):
  from jaxnorm.training.config import default_config, model_config

  c = default_config()
  c.dataset, c.augment = 'digits', False
  c.model = model_config('MLP', depth=1, width=8)
  c.batch_size, c.eval_batch_size, c.total_steps, c.log_every = 16, 304, 2, 1
  study = studies.StudyDir(str(tmp_path), 'smoke', log=lambda s: None)
  r = study.train('run', c)
  # As an older jaxnorm wrote it: no `optimizer.decay_mask`, so another config digest.
  old = copy.deepcopy(c)
  del old.optimizer['decay_mask']
  cfg_path = tmp_path / 'runs' / 'run' / 'config.json'
  stored = json.loads(cfg_path.read_text())
  del stored['optimizer']['decay_mask']
  cfg_path.write_text(json.dumps(stored))
  (tmp_path / 'parts' / 'runs' / 'run.key').write_text(harness._digest(
      workdir_lib.config_json(old)))
  trained = []
  again = studies.StudyDir(str(tmp_path), 'smoke', log=trained.append).train('run', c)
  assert again == r and not any('training' in line for line in trained)
  # The field at another value is another run: the stored part is an error, not reused.
  c.optimizer.decay_mask = 'all'
  with pytest.raises(ValueError, match='computed under another config'):
    studies.StudyDir(str(tmp_path), 'smoke', log=lambda s: None).train('run', c)


def test_at_smoke_size_keeps_model_and_optimizer():
  from jaxnorm.studies import skipinit

  cfg = next(v for k, v in skipinit.run_configs(load_config('skipinit', 'full')).items()
             if k.startswith('imagenet/'))
  small = harness.at_smoke_size(cfg, steps=2)
  assert small.model == cfg.model and small.optimizer == cfg.optimizer
  assert small.dataset == 'synthetic' and small.synthetic.num_classes == 1000
  assert small.total_steps == 2 and cfg.total_steps == 90 * (1_281_167 // 256)


@pytest.mark.parametrize('paper', PAPERS)
def test_every_full_scale_run_config_is_valid(paper):
  """The paper's own settings exist as configs that pass validation (they are not run here)."""
  import importlib

  module = importlib.import_module(f'jaxnorm.studies.{paper}')
  configs = module.run_configs(load_config(paper, 'full'))
  assert len(configs) >= 2
  for name, cfg in configs.items():
    try:
      validate_config(cfg, num_devices=8)
    except ValueError as e:
      raise AssertionError(f'{paper} full-scale run {name}: {e}') from None
    assert cfg.dataset in ('mnist', 'cifar10', 'imagenet2012'), name


@pytest.mark.parametrize('paper', PAPERS)
def test_full_scale_models_build_at_their_input_shape(paper):
  """Every full-scale run's model traces on a batch of its data set's image shape."""
  import importlib

  import jax

  from jaxnorm.training.loop import build_model

  module = importlib.import_module(f'jaxnorm.studies.{paper}')
  seen = set()
  for name, cfg in module.run_configs(load_config(paper, 'full')).items():
    small = harness.at_smoke_size(cfg, image_size=64)
    key = (small.model.to_json(), tuple(small.synthetic.shape))
    if key in seen:
      continue
    seen.add(key)
    model = build_model(small.model, small.synthetic.num_classes)
    x = jax.ShapeDtypeStruct((2, *small.synthetic.shape), np.float32)
    out = jax.eval_shape(lambda x, m=model: m.init_with_output(jax.random.PRNGKey(0), x)[0], x)
    assert out.shape == (2, small.synthetic.num_classes), name


def test_a_full_scale_run_takes_its_first_steps_at_smoke_size(tmp_path):
  """A full-scale run config (Cabana & Lago-Fernandez's 10-layer width-512 BGN MLP on MNIST),
  unchanged but for the data: two steps through ``training.train``, finite loss."""
  from jaxnorm import training
  from jaxnorm.studies import bgn

  configs = bgn.run_configs(load_config('bgn', 'full'))
  full = configs['ladder/mnist/sigmoid/d10/bgn/lr1e-3']
  cfg = harness.at_smoke_size(full)
  assert cfg.model.to_dict() == full.model.to_dict() and cfg.model.width == 512
  assert cfg.optimizer.to_dict() == full.optimizer.to_dict()
  assert tuple(cfg.synthetic.shape) == (28, 28, 1)
  summary = training.train(cfg, str(tmp_path))
  assert summary['step'] == 2 and np.isfinite(summary['train_loss'])


@pytest.mark.slow
@pytest.mark.parametrize('paper', PAPERS)
def test_smoke_study_writes_claims_figures_and_resumes_and_its_notebook_runs(paper, tmp_path,
                                                                           capsys):
  from notebook_runner import execute_notebook

  workdir = tmp_path / f'{paper}-smoke'  # where colabs/<paper>.ipynb writes at smoke size
  t = time.time()
  claims = studies.run_study(load_config(paper, 'smoke'), str(workdir))
  seconds = time.time() - t
  out = capsys.readouterr().out
  assert 'verdict' in out and 'claims.json' in out
  written = studies.read_claims(str(workdir / 'claims.json'))
  assert len(written) == len(claims) >= 4
  for c in written:
    assert set(c) == CLAIM_KEYS, c
    assert c['verdict'] in studies.VERDICTS and c['scale'] == 'smoke' and c['paper'] == paper
  measured = [c for c in written if c['verdict'] != 'not_run']
  assert len(measured) >= 4 and all(c['measured'] is not None for c in measured)
  pngs = [f for f in os.listdir(workdir) if f.endswith('.png')]
  assert len(pngs) >= 2, pngs
  # A rerun reads every part and run back: same claims, in a fraction of the time.
  t = time.time()
  again = studies.run_study(load_config(paper, 'smoke'), str(workdir))
  assert [c.to_dict() for c in again] == [c.to_dict() for c in claims]
  assert time.time() - t < max(0.5 * seconds, 5.0)
  # The paper's notebook, top to bottom in a fresh kernel: its study reads this one back.
  notebook = execute_notebook(os.path.join(REPO, 'colabs', f'{paper}.ipynb'),
                              env={'JAXNORM_SMOKE': '1', 'JAXNORM_WORKDIR': str(tmp_path)},
                              timeout=300)
  assert os.listdir(tmp_path) == [workdir.name]
  assert studies.read_claims(str(workdir / 'claims.json')) == written
  print(f'{paper} smoke: {seconds:.1f}s; {paper}.ipynb on its workdir: {notebook:.1f}s')


def test_launcher_rejects_an_unknown_paper_and_a_missing_workdir(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  bad = subprocess.run([sys.executable, '-m', 'experiments.reproduce', '--paper=nope',
                        f'--workdir={tmp_path}'], cwd=REPO, capture_output=True, text=True,
                       env=env, timeout=120)
  assert bad.returncode == 2 and 'paper' in bad.stderr
  missing = subprocess.run([sys.executable, '-m', 'experiments.reproduce', '--paper=skipinit'],
                           cwd=REPO, capture_output=True, text=True, env=env, timeout=120)
  assert missing.returncode == 2 and '--workdir' in missing.stderr


def test_claims_json_is_strict_json(tmp_path):
  claims = [studies.Claim('x', 1.0, float('nan'), 'u', 'cpu', 'not', 'n')]
  harness.write_claims(str(tmp_path / 'c.json'), 'p', 'cpu', claims)
  with open(tmp_path / 'c.json') as f:
    data = json.loads(f.read(), parse_constant=lambda s: (_ for _ in ()).throw(ValueError(s)))
  assert data[0]['measured'] == 'nan'


def test_a_part_computed_under_another_config_is_an_error_not_a_stale_result(tmp_path):
  study = studies.StudyDir(str(tmp_path), 'smoke', log=lambda s: None)
  assert study.part('m', lambda: 1, key={'width': 8}) == 1
  assert study.part('m', lambda: 2, key={'width': 8}) == 1  # same config: read back
  with pytest.raises(ValueError, match="part 'm' was computed under another config"):
    study.part('m', lambda: 2, key={'width': 16})
