"""Section 5: ``jaxnorm.diagnostics.signal_propagation`` vs one training step of the same model.

Both on ``jaxnorm.models.cifar_resnet(20)`` with the same parameters and batch. The diagnostic is
timed as a user calls it (it builds and jits its own forward + backward pass and copies the
statistics to the host); the training step is the usual jitted SGD step. Target: <= 3x.

References: Brock, De & Smith (2021), arXiv:2101.08692 (signal propagation plots).
"""

from __future__ import annotations

from benchmarks.common import (
  Sizes,
  cifar_batch,
  init_variables,
  new_table,
  ratio_rows,
  train_step_candidate,
)
from benchmarks.timing import Eager, Table, interleaved
from jaxnorm.diagnostics.signal_propagation import signal_propagation
from jaxnorm.models import cifar_resnet

TARGET = 3.0


def run(sizes: Sizes) -> list[Table]:
  """The section-5 table."""
  x, y = cifar_batch(sizes.batch, sizes.image)
  model = cifar_resnet(sizes.resnet20, width=sizes.width)
  variables = init_variables(model, x)
  res = interleaved({
    'ResNet-20 SGD step (jitted)': train_step_candidate(model, x, y, variables),
    'signal_propagation (as called)': (Eager(
      lambda v, x, y: signal_propagation(model, v, x, y).loss), (variables, x, y)),
  }, repeats=sizes.repeats, warmup=sizes.warmup)
  table = new_table(f'5. signal_propagation vs one training step (ResNet-20, batch {sizes.batch})',
                    sizes, [
    'x baseline = one signal_propagation call / one jitted SGD step of the same model; target '
    f'<= {TARGET:.0f}x.',
    'signal_propagation compiles its forward + backward pass once per (model, shapes) and '
    'reuses it; a call also converts the per-block statistics to Python floats on the host. '
    'Its compile s column is the first call.',
  ], memory=False)
  table.rows += ratio_rows(res, 'ResNet-20 SGD step (jitted)', TARGET, memory=False)
  return [table]
