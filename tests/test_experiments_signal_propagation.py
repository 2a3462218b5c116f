"""The `make demo` launcher: config validation (one line, exit 2) and a fast end-to-end run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, 'experiments', 'signal_propagation.py')
SMALL = '--config=' + os.path.join(ROOT, 'experiments', 'configs', 'signal_propagation.py:small')


def _run(*args, timeout=600):
  env = dict(os.environ, JAX_PLATFORMS='cpu', MPLBACKEND='Agg', PYTHONPATH=ROOT)
  env['XLA_FLAGS'] = '--xla_backend_optimization_level=0'  # one device; see conftest.py
  return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True,
                        timeout=timeout, env=env, cwd=ROOT)


@pytest.mark.slow
@pytest.mark.parametrize('args,needle', [
  (['--config.norms=batch_norm,layer_norm'], "unknown normalization 'layer_norm'"),
  (['--config.mlp.depth=-3'], '--config.mlp.depth'),
  (['--config.resnet.blocks=-1'], '--config.resnet.blocks'),
  (['--config.dataset=imagenet'], '--config.dataset'),
  (['--config.mlp.dpth=3'], 'Did you mean "depth"'),
  (['--config.seeds=0'], '--config.seeds'),
])
def test_bad_config_exits_with_one_line_error(args, needle, tmp_path):
  proc = _run(*args, f'--config.output_dir={tmp_path}', timeout=120)
  assert proc.returncode == 2
  lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
  assert len(lines) == 1 and needle in lines[0], proc.stderr
  assert 'Traceback' not in proc.stderr
  assert not os.listdir(tmp_path)


@pytest.mark.slow
def test_small_run_writes_both_figures_and_the_json_report(tmp_path):
  proc = _run(SMALL, '--config.norms=batch_norm,none,skip_init_0,scaled_ws',
              '--config.models=resnet,mlp', f'--config.output_dir={tmp_path}')
  assert proc.returncode == 0, proc.stderr[-2000:]
  for name in ('forward.png', 'backward.png'):
    with open(tmp_path / name, 'rb') as f:
      assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  report = json.loads((tmp_path / 'report.json').read_text())
  table = {(r['model'], r['norm']): r for r in report['table']}
  # scaled_ws is ResNet-only; the residual MLP runs the other three.
  resnet = {('resnet', n) for n in ('batch_norm', 'none', 'skip_init_0', 'scaled_ws')}
  mlp = {('mlp', n) for n in ('batch_norm', 'none', 'skip_init_0')}
  assert set(table) == resnet | mlp
  # The papers' claims at init, read from the report: SkipInit(0) exactly flat, no-norm growing
  # faster than BN, one progress line per model and the table printed.
  for kind in ('resnet', 'mlp'):
    assert table[kind, 'skip_init_0']['var_growth'] == 1.0
    assert table[kind, 'skip_init_0']['gvar_ratio'] == 1.0
    assert table[kind, 'none']['var_growth'] > table[kind, 'batch_norm']['var_growth']
  assert proc.stdout.count(' seeds in ') == 7
  assert 'growth/blk' in proc.stdout and 'Theory agreement' in proc.stdout
  # Two initializations per model: their per-block geometric mean is what is shown and compared.
  bn = report['results']['resnet']['batch_norm']
  assert len(bn['per_seed']) == 2 and bn['summary']['seeds'] == 2
  lo, hi, mean = (np.asarray(bn['series'][k]) for k in ('avg_var_lo', 'avg_var_hi', 'avg_var'))
  assert np.all(lo <= mean + 1e-9) and np.all(mean <= hi + 1e-9)
  # The agreement summary covers every drawn line, row by row and in total.
  agree = report['theory_agreement']
  lines = [r for r in report['table'] if r['theory_agrees'] is not None]
  assert agree['models'] == len(lines) and agree['agree'] + len(agree['disagree']) == len(lines)
  assert table['resnet', 'skip_init_0']['theory_agrees'] is True
  assert table['resnet', 'batch_norm']['gvar_ratio_theory'] is not None
  assert table['resnet', 'scaled_ws']['gvar_ratio_theory'] is not None  # NF-ResNet mean field
