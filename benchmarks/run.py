"""``python -m benchmarks.run [--smoke] [--only=section,...] [--json=PATH] [--markdown=PATH]``.

Runs the six sections of the benchmark issue and prints every table as Markdown:

  batch_norm, bgn, weight_standardization, depth, diagnostics, pytorch_resnet

``--smoke`` runs every section at toy sizes with one timed round (the test suite runs it so the
benchmarks cannot rot; its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import platform
import sys
import time

import jax

from benchmarks import common
from benchmarks.common import FULL, SMOKE
from benchmarks.timing import Table

SECTIONS = ('batch_norm', 'bgn', 'weight_standardization', 'depth', 'diagnostics',
            'pytorch_resnet')


def machine() -> str:
  """A one-line description of the machine and the library versions."""
  cpu = platform.processor() or platform.machine()
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          cpu = line.split(':', 1)[1].strip()
          break
  except OSError:
    pass
  import flax  # noqa: PLC0415
  import jaxlib  # noqa: PLC0415
  versions = f'jax {jax.__version__}, jaxlib {jaxlib.__version__}, flax {flax.__version__}'
  try:
    import torch  # noqa: PLC0415
    versions += f', torch {torch.__version__}'
  except ImportError:
    pass
  return (f'{cpu}, {os.cpu_count()} cores, backend {jax.default_backend()} '
          f'({jax.device_count()} devices); Python {platform.python_version()}; {versions}; '
          f'XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}')


def run(sections=SECTIONS, smoke: bool = False, log=print) -> dict[str, list[Table]]:
  """Runs the named sections; returns section -> tables (also logged as Markdown as they finish)."""
  sizes = SMOKE if smoke else FULL
  common._EMIT[0] = log
  out = {}
  for name in sections:
    if name not in SECTIONS:
      raise ValueError(f'benchmarks.run: unknown section {name!r}; expected one of {SECTIONS}')
    start = time.perf_counter()
    tables = importlib.import_module(f'benchmarks.{name}').run(sizes)
    log(f'<!-- section {name}: {time.perf_counter() - start:.1f} s -->')
    for t in tables:
      # Unlogged tables, and tables logged early (partial) that got rows since.
      if common._EMITTED.get(id(t)) != t.to_markdown():
        log(t.to_markdown())
    out[name] = tables
  return out


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--smoke', action='store_true', help='toy sizes, one timed round')
  parser.add_argument('--only', default=','.join(SECTIONS),
                      help='comma-separated sections: ' + ', '.join(SECTIONS))
  parser.add_argument('--json', default=None, help='also write every table as JSON here')
  args = parser.parse_args(argv)
  print(f'Machine: {machine()}\n', flush=True)
  sections = [s for s in args.only.split(',') if s]
  tables = run(sections, smoke=args.smoke, log=lambda s: print(s, flush=True))
  if args.json:
    with open(args.json, 'w') as f:
      json.dump({'machine': machine(), 'smoke': args.smoke,
                 'sections': {k: [dataclasses.asdict(t) for t in v] for k, v in tables.items()}},
                f, indent=1, default=str)
  return 0


if __name__ == '__main__':
  sys.exit(main())
