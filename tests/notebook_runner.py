"""Runs a Jupyter notebook top to bottom in a fresh kernel (nbclient + ipykernel).

``execute_notebook(path, env=...)`` starts a new IPython kernel (a subprocess of this Python
interpreter) in the notebook's directory, executes every code cell in order and returns the
seconds it took; the first cell that raises fails with the cell's source and the kernel's
traceback. The notebook file is not changed (``output_path`` writes the executed copy elsewhere).

Also a command line, for timing the notebooks by hand::

  JAXNORM_SMOKE=1 python tests/notebook_runner.py [--out=DIR] colabs/*.ipynb

(``--out=DIR`` writes each executed notebook, outputs included, to ``DIR``.)
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping

# XLA:CPU's LLVM optimization level 0 roughly halves compile time (see tests/conftest.py); the
# notebooks compile far more than they run. One CPU device, as on a laptop or Colab's CPU runtime:
# the suite's 8 simulated devices (conftest.py) make the small training runs slower.
KERNEL_XLA_FLAGS = '--xla_backend_optimization_level=0'


class NotebookError(AssertionError):
  """A notebook cell raised (or the notebook ran past its timeout)."""


def kernel_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
  """The environment of the kernel: this process's, on CPU, one device, then ``env`` on top.

  ``MPLBACKEND`` is dropped so that the kernel uses its inline backend (figures are outputs).
  """
  out = {k: v for k, v in os.environ.items() if k != 'MPLBACKEND'}
  out.update(JAX_PLATFORMS='cpu', XLA_FLAGS=KERNEL_XLA_FLAGS, PYTHONUNBUFFERED='1')
  out.update(env or {})
  return out


def execute_notebook(path: str, env: Mapping[str, str] | None = None, timeout: float = 600.0,
                     cwd: str | None = None, output_path: str | None = None) -> float:
  """Executes the notebook at ``path`` in a fresh kernel; returns the wall-clock seconds.

  Args:
    path: the ``.ipynb`` file.
    env: environment variables for the kernel, over :func:`kernel_env`'s defaults (e.g.
      ``{'JAXNORM_SMOKE': '1', 'JAXNORM_WORKDIR': tmp}``).
    timeout: seconds the whole notebook may take (each cell gets what is left of it).
    cwd: the kernel's working directory (default: the notebook's directory, as in Jupyter).
    output_path: where to write the executed notebook, with its outputs (default: nowhere).

  Returns:
    Seconds from starting the kernel to the end of the last cell.

  Raises:
    NotebookError: a cell raised, or the notebook ran past ``timeout``.
  """
  import nbformat
  from nbclient import NotebookClient
  from nbclient.exceptions import CellExecutionError, CellTimeoutError

  nb = nbformat.read(path, as_version=4)
  name = os.path.basename(path)
  start = time.monotonic()
  deadline = start + timeout

  def remaining(cell) -> int:
    del cell
    return max(1, int(deadline - time.monotonic()))

  client = NotebookClient(
      nb, timeout=int(timeout), timeout_func=remaining, kernel_name='python3',
      allow_errors=False, record_timing=False,
      resources={'metadata': {'path': cwd or os.path.dirname(os.path.abspath(path))}})
  try:
    client.execute(env=kernel_env(env))
  except CellTimeoutError as e:
    raise NotebookError(f'{name}: ran past its timeout of {timeout:.0f}s\n{e}') from None
  except CellExecutionError as e:
    raise NotebookError(f'{name}: a cell failed\n{e}') from None
  finally:
    if output_path:
      nbformat.write(nb, output_path)
  return time.monotonic() - start


def main(argv: list[str]) -> int:
  out = None
  if argv and argv[0].startswith('--out='):
    out, argv = argv[0][len('--out='):], argv[1:]
    os.makedirs(out, exist_ok=True)
  failed = 0
  for path in argv:
    executed = os.path.join(out, os.path.basename(path)) if out else None
    try:
      print(f'{path}: {execute_notebook(path, output_path=executed):.1f}s', flush=True)
    except NotebookError as e:
      failed += 1
      print(e, file=sys.stderr, flush=True)
  return 1 if failed else 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
