r"""Reproduce a paper: ``python -m experiments.reproduce --paper=KEY --scale=S --workdir=D``.

``KEY`` is one of ``PAPERS`` (its study config is ``experiments/configs/<KEY>.py``); ``S`` is

- ``smoke``: seconds (it runs in the test suite; the numbers only show that the study runs);
- ``cpu``: minutes on 2 CPU cores, the numbers ``REPRODUCTION.md`` reports;
- ``full``: the paper's own setting (GPU/TPU, real data sets under ``TFDS_DATA_DIR``).

The study writes its figures (PNG), ``D/claims.json`` (one object per claim: ``claim``,
``paper_value``, ``measured``, ``unit``, ``scale``, ``verdict``, ``note``) and prints the table.
Every measurement and training run is kept in ``D``: kill the study (Ctrl-C, SIGTERM) and run the
same command again to resume. Exit status: 0 done, 1 a data set or working directory error, 2 a bad
flag, 128 + signal number when stopped by a signal.

  python -m experiments.reproduce --paper=skipinit --scale=cpu --workdir=results/skipinit
"""

from __future__ import annotations

import importlib.util
import os
import sys

from absl import app, flags, logging

PAPERS = ('panigrahi', 'skipinit', 'bgn', 'bjorck', 'pws')
SCALES = ('smoke', 'cpu', 'full')
CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configs')

_PAPER = flags.DEFINE_enum('paper', None, PAPERS, 'Which paper to reproduce.')
_SCALE = flags.DEFINE_enum('scale', 'smoke', SCALES, 'Study scale.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where the study writes (rerun to resume).')


def load_config(paper: str, scale: str):
  """The study config of ``paper`` at ``scale`` (``experiments/configs/<paper>.py``)."""
  if paper not in PAPERS:
    raise ValueError(f'reproduce: argument `paper` expected one of {", ".join(PAPERS)}, got '
                     f'{paper!r}.')
  path = os.path.join(CONFIG_DIR, f'{paper}.py')
  spec = importlib.util.spec_from_file_location(f'jaxnorm_study_config_{paper}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(scale)


def _compile_fast() -> None:
  """XLA:CPU without LLVM's machine-code optimization (unless ``XLA_FLAGS`` sets the level): a
  smoke study compiles far more than it runs, and this halves its wall time on two cores (e.g.
  bjorck 50 s -> 25 s). Set before JAX starts its backend. The other scales keep XLA's default."""
  flags = os.environ.get('XLA_FLAGS', '')
  if '--xla_backend_optimization_level' not in flags:
    os.environ['XLA_FLAGS'] = (flags + ' --xla_backend_optimization_level=0').strip()


def _use_compilation_cache(workdir: str) -> None:
  """Keeps XLA's compiled programs in ``<workdir>/xla_cache`` (unless ``JAX_COMPILATION_CACHE_DIR``
  names another place): a study compiles the same model's init and steps in several runs and
  measurements, and a resumed study finds them all compiled."""
  import jax

  if not os.environ.get('JAX_COMPILATION_CACHE_DIR'):
    jax.config.update('jax_compilation_cache_dir', os.path.join(os.path.abspath(workdir),
                                                                'xla_cache'))
  if not os.environ.get('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'):
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.2)


def main(argv) -> int:
  if len(argv) > 1:
    print(f'reproduce: unexpected arguments {argv[1:]}', file=sys.stderr)
    return 2
  if _PAPER.value is None or not _WORKDIR.value:
    print('reproduce: --paper and --workdir are required (e.g. --paper=skipinit '
          '--workdir=results/skipinit)', file=sys.stderr)
    return 2
  logging.set_verbosity(logging.WARNING)  # Orbax logs every checkpoint at INFO.
  if _SCALE.value == 'smoke':
    _compile_fast()
  _use_compilation_cache(_WORKDIR.value)
  from jaxnorm import training
  from jaxnorm.studies import run_study

  config = load_config(_PAPER.value, _SCALE.value)
  try:
    run_study(config, _WORKDIR.value)
  except training.Preempted as e:
    print(f'reproduce: {e}', file=sys.stderr)
    return 128 + e.signum
  except (training.DatasetNotFoundError, training.WorkdirError, training.WorkdirLockedError,
          training.ConfigMismatchError, training.ConfigError) as e:
    print(f'reproduce: {str(e).splitlines()[0]}', file=sys.stderr)
    return 1
  except ValueError as e:
    if 'argument `workdir`' in str(e):
      print(f'reproduce: {e}', file=sys.stderr)
      return 1
    raise
  return 0


def _parse(argv):
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    print(f'reproduce: {e}', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  app.run(lambda argv: sys.exit(main(argv)), flags_parser=_parse)
