"""The Colab notebooks (colabs/*.ipynb): committed without outputs, small, and runnable.

Every notebook is executed top to bottom in a fresh kernel at its smoke size
(``JAXNORM_SMOKE=1``, writing into a temporary ``JAXNORM_WORKDIR``); the first cell that raises
fails the test. See ``tests/notebook_runner.py``. The quickstart runs here; each paper's notebook
runs in ``tests/test_studies.py`` after that paper's smoke study, on its workdir.
"""

import copy
import glob
import json
import os
import subprocess
import sys

import pytest
from notebook_runner import execute_notebook

from experiments.reproduce import PAPERS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLABS = os.path.join(REPO, 'colabs')
NAMES = ('quickstart', *PAPERS)
MAX_BYTES = 30_000
COLAB_URL = 'https://colab.research.google.com/github/jaxnorm/jaxnorm/blob/main/colabs/{}.ipynb'

sys.path.insert(0, COLABS)
import strip_outputs  # noqa: E402


def _path(name: str) -> str:
  return os.path.join(COLABS, f'{name}.ipynb')


def _load(name: str) -> dict:
  with open(_path(name), encoding='utf-8') as f:
    return json.load(f)


def _source(cell) -> str:
  s = cell['source']
  return s if isinstance(s, str) else ''.join(s)


def test_there_is_a_quickstart_and_one_notebook_per_paper():
  found = {os.path.basename(p)[:-len('.ipynb')] for p in glob.glob(os.path.join(COLABS, '*.ipynb'))}
  assert found == set(NAMES)


@pytest.mark.parametrize('name', NAMES)
def test_notebook_is_committed_without_outputs_and_small(name):
  import nbformat

  assert os.path.getsize(_path(name)) < MAX_BYTES
  nb = _load(name)
  nbformat.validate(nbformat.from_dict(copy.deepcopy(nb)))
  assert 'widgets' not in nb['metadata']
  for cell in nb['cells']:
    if cell['cell_type'] == 'code':
      assert cell['outputs'] == [] and cell['execution_count'] is None, _source(cell)[:80]
      assert 'execution' not in cell['metadata']
  # Byte for byte as the strip tool writes it: `python colabs/strip_outputs.py` was run.
  assert not strip_outputs.strip_file(_path(name), check=True)


@pytest.mark.parametrize('name', NAMES)
def test_notebook_opens_in_colab_and_reads_its_parameters_from_the_environment(name):
  nb = _load(name)
  first = _source(nb['cells'][0])
  assert first.startswith('# ') and COLAB_URL.format(name) in first
  code = [_source(c) for c in nb['cells'] if c['cell_type'] == 'code']
  assert "'google.colab' in sys.modules" in code[0]  # the guarded install cell comes first
  params = [c for c in nb['cells'] if 'parameters' in c['metadata'].get('tags', [])]
  assert len(params) == 1
  assert 'JAXNORM_SMOKE' in _source(params[0]) and 'JAXNORM_WORKDIR' in _source(params[0])
  # Magics would not run outside IPython: the notebooks are plain Python.
  assert not any(line.lstrip().startswith(('%', '!')) for c in code for line in c.splitlines())
  if name != 'quickstart':
    assert f"load_config('{name}', SCALE)" in '\n'.join(code)
    assert 'run_study(' in '\n'.join(code) and 'claims_markdown(' in '\n'.join(code)


def test_readme_links_every_notebook_with_a_colab_badge():
  with open(os.path.join(REPO, 'README.md'), encoding='utf-8') as f:
    readme = f.read()
  assert 'https://colab.research.google.com/assets/colab-badge.svg' in readme
  for name in NAMES:
    assert f'({COLAB_URL.format(name)})' in readme, name


def test_strip_outputs_removes_outputs_counts_and_widget_state(tmp_path):
  nb = _load('quickstart')
  dirty = copy.deepcopy(nb)
  dirty['metadata']['widgets'] = {'application/vnd.jupyter.widget-state+json': {'state': {}}}
  for i, cell in enumerate(c for c in dirty['cells'] if c['cell_type'] == 'code'):
    cell['execution_count'] = i + 1
    cell['outputs'] = [{'output_type': 'stream', 'name': 'stdout', 'text': ['hello\n']}]
    cell['metadata']['execution'] = {'iopub.execute_input': '2026-01-01T00:00:00'}
    cell['metadata']['colab'] = {'base_uri': 'https://localhost:8080/', 'height': 120}
    cell['metadata']['outputId'] = 'abc'
  path = tmp_path / 'dirty.ipynb'
  path.write_text(json.dumps(dirty, indent=2), encoding='utf-8')
  check = [sys.executable, os.path.join(COLABS, 'strip_outputs.py'), '--check', str(path)]
  assert subprocess.run(check, capture_output=True).returncode == 1
  subprocess.run([sys.executable, os.path.join(COLABS, 'strip_outputs.py'), str(path)],
                 check=True, capture_output=True)
  assert json.loads(path.read_text(encoding='utf-8')) == nb
  assert path.read_text(encoding='utf-8') == open(_path('quickstart'), encoding='utf-8').read()
  assert subprocess.run(check, capture_output=True).returncode == 0


@pytest.mark.slow
def test_the_quickstart_runs_top_to_bottom_at_smoke_size(tmp_path):
  # Each paper's notebook runs in tests/test_studies.py, on the workdir of that paper's smoke
  # study (so the study is not computed twice).
  seconds = execute_notebook(_path('quickstart'), env={'JAXNORM_SMOKE': '1',
                                                       'JAXNORM_WORKDIR': str(tmp_path)},
                             timeout=300)
  run = tmp_path / 'quickstart-smoke'
  assert {'signal_propagation.png', 'training.png'} <= set(os.listdir(run))
  assert any(os.path.exists(os.path.join(d, 'summary.json')) for d in glob.glob(str(run / '*')))
  print(f'quickstart.ipynb smoke: {seconds:.1f}s')
