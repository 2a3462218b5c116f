"""Side-by-side timing and memory measurement of jitted functions.

Wall-clock numbers on a shared machine drift; ratios taken from *interleaved* calls
(A, B, A, B, ...) in the same process do not drift with it. Every benchmark in this package
reports medians of interleaved calls and the ratio of each candidate to a named baseline.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax


@dataclasses.dataclass(frozen=True)
class Measurement:
  """What was measured for one candidate.

  Attributes:
    name: the candidate's label.
    median_s: median wall time of one call, in seconds, after warm-up.
    spread_s: half the inter-quartile range of the call times, in seconds.
    compile_s: time to lower and compile, in seconds.
    peak_bytes: XLA's buffer assignment of the compiled program: arguments + outputs +
      temporaries - aliased bytes (an upper bound of its peak), or None if not reported.
  """

  name: str
  median_s: float
  spread_s: float
  compile_s: float
  peak_bytes: int | None


def compile_fn(fn: Callable[..., Any], *args) -> tuple[Callable[..., Any], float, int | None]:
  """Jits, lowers and compiles ``fn`` for ``args``; returns (compiled, seconds, peak bytes)."""
  start = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  seconds = time.perf_counter() - start
  peak = None
  try:
    # XLA:CPU's `peak_memory_in_bytes` counts only live-in / live-out buffers (it is smaller than
    # `temp_size_in_bytes` for a backward pass), so use the buffer-assignment total instead:
    # arguments + outputs + temporaries - aliased (donated) bytes, an upper bound of the peak.
    stats = compiled.memory_analysis()
    peak = int(stats.temp_size_in_bytes + stats.argument_size_in_bytes
               + stats.output_size_in_bytes - stats.alias_size_in_bytes)
  except Exception:  # noqa: BLE001 - some backends do not report memory statistics.
    peak = None
  return compiled, seconds, peak


class Eager:
  """Marks a candidate that is called as it is, not jitted by the harness.

  For functions that jit internally (``jaxnorm.diagnostics.signal_propagation``) or are not JAX
  at all (a PyTorch training step). Their ``compile_s`` is the time of the first call and
  ``peak_bytes`` is None.
  """

  def __init__(self, fn: Callable[..., Any]):
    self.fn = fn

  def __call__(self, *args):
    return self.fn(*args)


def interleaved(
    candidates: Mapping[str, tuple[Callable[..., Any], tuple[Any, ...]]],
    *,
    repeats: int = 10,
    warmup: int = 2,
) -> dict[str, Measurement]:
  """Compiles each candidate, then times them in interleaved rounds.

  Args:
    candidates: name -> (function, arguments). Each function is jitted and called on its
      arguments; its outputs are blocked on. A function wrapped in ``Eager`` is called as it is.
    repeats: timed rounds; each round calls every candidate once, in a rotating order.
    warmup: untimed rounds before the timed ones (at least one is always run for ``Eager``
      candidates, whose first call is their compile time).

  Returns:
    name -> Measurement, in the order of ``candidates``.
  """
  compiled = {}
  for name, (fn, args) in candidates.items():
    if isinstance(fn, Eager):
      start = time.perf_counter()
      jax.block_until_ready(fn(*args))
      compiled[name] = (fn, time.perf_counter() - start, None, args)
    else:
      compiled[name] = (*compile_fn(fn, *args), args)
  names = list(candidates)
  times: dict[str, list[float]] = {n: [] for n in names}
  for r in range(warmup + repeats):
    order = names[r % len(names):] + names[:r % len(names)]
    for name in order:
      fn, _, _, args = compiled[name]
      start = time.perf_counter()
      jax.block_until_ready(fn(*args))
      if r >= warmup:
        times[name].append(time.perf_counter() - start)
  out = {}
  for name in names:
    ts = sorted(times[name])
    q1, q3 = ts[len(ts) // 4], ts[(3 * len(ts)) // 4]
    out[name] = Measurement(name, statistics.median(ts), (q3 - q1) / 2, compiled[name][1],
                            compiled[name][2])
  return out


@dataclasses.dataclass
class Table:
  """A benchmark table: a title, column names, rows, and what the numbers mean."""

  title: str
  columns: list[str]
  rows: list[list[Any]] = dataclasses.field(default_factory=list)
  notes: list[str] = dataclasses.field(default_factory=list)

  def to_markdown(self) -> str:
    def fmt(v):
      if isinstance(v, float):
        return f'{v:.3g}' if abs(v) < 1000 else f'{v:,.0f}'
      return str(v)

    lines = [f'### {self.title}', '', '| ' + ' | '.join(self.columns) + ' |',
             '|' + '---|' * len(self.columns)]
    lines += ['| ' + ' | '.join(fmt(v) for v in row) + ' |' for row in self.rows]
    if self.notes:
      lines += [''] + [f'- {n}' for n in self.notes]
    return '\n'.join(lines) + '\n'


def verdict(ratio: float, target: float) -> str:
  """'met' if ``ratio <= target`` else 'missed'."""
  return 'met' if ratio <= target else 'missed'


def mib(nbytes: int | None) -> str:
  """Formats a byte count in MiB ('n/a' when unknown)."""
  return 'n/a' if nbytes is None else f'{nbytes / 2**20:.1f}'
