"""Strips outputs from notebooks, so that they are committed as source only.

  python colabs/strip_outputs.py            # every colabs/*.ipynb, rewritten in place
  python colabs/strip_outputs.py --check    # exit 1, naming them, if any has outputs
  python colabs/strip_outputs.py a.ipynb    # given notebooks only

For each code cell: no outputs, ``execution_count`` None, and no output-related cell metadata
(``execution`` timings, ``collapsed``, ``scrolled``, Colab's ``outputId``); for the notebook: no
``widgets`` metadata (the state of progress bars and other widgets). Everything else (sources,
cell ids, tags, the ``colab`` and ``accelerator`` settings) is kept. The file is written as
Jupyter writes it (JSON, indent 1, sorted keys), so a stripped notebook is rewritten unchanged.
Only the standard library is used.
"""

from __future__ import annotations

import glob
import json
import os
import sys

# Cell metadata that records a run, not the source.
RUN_METADATA = ('execution', 'collapsed', 'scrolled', 'outputId', 'executionInfo')
NOTEBOOK_RUN_METADATA = ('widgets',)


def strip(nb: dict) -> dict:
  """``nb`` (a notebook as parsed JSON) without outputs, execution counts and widget state."""
  for key in NOTEBOOK_RUN_METADATA:
    nb.get('metadata', {}).pop(key, None)
  for cell in nb.get('cells', []):
    meta = cell.get('metadata', {})
    for key in RUN_METADATA:
      meta.pop(key, None)
    colab = meta.get('colab')
    if isinstance(colab, dict):  # Colab keeps the size of the last output here.
      for key in ('base_uri', 'height', 'width'):
        colab.pop(key, None)
      if not colab:
        meta.pop('colab')
    if cell.get('cell_type') == 'code':
      cell['outputs'] = []
      cell['execution_count'] = None
  return nb


def dumps(nb: dict) -> str:
  """``nb`` as Jupyter writes it."""
  return json.dumps(nb, sort_keys=True, indent=1, ensure_ascii=False) + '\n'


def strip_file(path: str, *, check: bool = False) -> bool:
  """Strips ``path`` in place (or, with ``check``, only reports); True if it had to change."""
  with open(path, encoding='utf-8') as f:
    text = f.read()
  new = dumps(strip(json.loads(text)))
  if new == text:
    return False
  if not check:
    with open(path, 'w', encoding='utf-8') as f:
      f.write(new)
  return True


def main(argv: list[str]) -> int:
  check = '--check' in argv
  paths = [a for a in argv if a != '--check']
  if not paths:
    paths = sorted(glob.glob(os.path.join(os.path.dirname(os.path.abspath(__file__)), '*.ipynb')))
  changed = [p for p in paths if strip_file(p, check=check)]
  for p in changed:
    print(f'{"has outputs" if check else "stripped"}: {p}')
  return 1 if check and changed else 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
