"""Section 4: compile time and step time vs depth (ResNet-20 / 110 / 1202, scanned and unrolled).

``jaxnorm.models.cifar_resnet(depth, scan=...)``: ``scan=True`` runs the identical blocks of each
stage under ``nn.scan`` (compile time flat in depth), ``scan=False`` unrolls them. Both paths use
the same parameters (initialised once in the scanned layout and converted with
``unstack_blocks``). The default path is ``scan=None`` (``jaxnorm.models.stacking.default_scan``).
Targets: depth-1202 compile <= 2x depth-20 compile with scan; the default path's step within 1.1x
of the fastest path at every depth that compiles.

The unrolled ResNet-1202 is not attempted: an unrolled depth-998 ResNet did not finish compiling
in 25 minutes (20 GB) on this machine.

See BENCHMARKS.md, section 4.
"""

from __future__ import annotations

from benchmarks.common import Sizes, cifar_batch, emit, init_variables, train_step_candidate
from benchmarks.timing import Table, interleaved, verdict
from jaxnorm.models import cifar_resnet, unstack_blocks
from jaxnorm.models.stacking import default_scan

COMPILE_TARGET = 2.0
STEP_TARGET = 1.1
UNROLLED_LIMIT = 110  # deepest unrolled network attempted


def run(sizes: Sizes) -> list[Table]:
  """The section-4 table."""
  depths = (8, 20) if sizes.smoke else (20, 110, 1202)
  batch = sizes.batch if sizes.smoke else 16
  x, y = cifar_batch(batch, sizes.image)
  default = default_scan()
  table = Table(
    title=f'4. Compile time and step time vs depth (CIFAR ResNet, batch {batch})',
    columns=['depth', 'path', 'default', 'median step s', 'x fastest path', 'compile s',
             f'compile x depth-{depths[0]} scanned', 'target'],
    notes=[f'default path on this backend: scan={default} (jaxnorm.models.stacking.default_scan).',
           'compile s = trace + lower + XLA compile of the jitted SGD step (init excluded).',
           f'Targets: depth-{depths[-1]} scanned compile <= {COMPILE_TARGET:.0f}x depth-'
           f'{depths[0]} scanned compile; default path step <= {STEP_TARGET}x the fastest path '
           'at every depth that compiles.',
           f'Unrolled depth > {UNROLLED_LIMIT} not attempted (unrolled depth 998 did not compile '
           'in 25 min here); batch 16 keeps the depth-1202 step to seconds.'])
  if sizes.smoke:
    table.notes.insert(0, 'SMOKE sizes; numbers are meaningless')
  base_compile = None
  for depth in depths:
    scanned_vars = init_variables(cifar_resnet(depth, width=sizes.width, scan=True), x)
    cands = {'scan': train_step_candidate(cifar_resnet(depth, width=sizes.width, scan=True),
                                          x, y, scanned_vars)}
    if depth <= UNROLLED_LIMIT:
      cands['unrolled'] = train_step_candidate(cifar_resnet(depth, width=sizes.width, scan=False),
                                               x, y, unstack_blocks(scanned_vars))
    res = interleaved(cands, repeats=max(sizes.repeats - 1, 1), warmup=sizes.warmup)
    fastest = min(m.median_s for m in res.values())
    if base_compile is None:
      base_compile = res['scan'].compile_s
    for path, m in res.items():
      is_default = (path == 'scan') == default
      ratio = m.median_s / fastest
      c_ratio = m.compile_s / base_compile
      verdicts = []
      if is_default:
        verdicts.append(f'step {verdict(ratio, STEP_TARGET)}')
      if path == 'scan' and depth == depths[-1]:
        verdicts.append(f'compile {verdict(c_ratio, COMPILE_TARGET)}')
      table.rows.append([depth, path, 'yes' if is_default else '', m.median_s, ratio,
                         m.compile_s, c_ratio, ', '.join(verdicts)])
    if default is False and 'unrolled' not in res:
      table.rows.append([depth, 'unrolled', 'yes', 'not attempted', '', '', '',
                         'step missed (default path does not compile at this depth)'])
    emit(table)  # partial table after every depth (the last one is complete)
  return [table]
