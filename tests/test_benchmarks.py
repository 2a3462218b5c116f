"""The benchmark command: the harness, and a smoke run producing every table (no timings)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# benchmarks/ is a top-level package of the repository, not of the installed distribution.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import run as bench_run  # noqa: E402
from benchmarks.timing import Eager, Table, interleaved, verdict  # noqa: E402


def test_interleaved_reports_every_candidate_with_positive_medians():
  import jax.numpy as jnp

  x = jnp.ones((8, 8))
  res = interleaved({'a': (lambda x: x @ x, (x,)), 'b': (Eager(lambda x: x + 1), (x,))},
                    repeats=2, warmup=1)
  assert list(res) == ['a', 'b']
  assert all(m.median_s > 0 for m in res.values())
  assert res['b'].peak_bytes is None


def test_verdict_is_met_at_or_below_the_target():
  assert verdict(1.0, 1.0) == 'met'
  assert verdict(1.01, 1.0) == 'missed'


def test_unknown_section_fails_fast():
  with pytest.raises(ValueError, match='unknown section'):
    bench_run.run(['nope'], smoke=True, log=lambda s: None)


@pytest.mark.slow
def test_smoke_run_produces_every_section_table():
  logged = []
  out = bench_run.run(bench_run.SECTIONS, smoke=True, log=logged.append)
  assert list(out) == list(bench_run.SECTIONS)
  for name, tables in out.items():
    assert tables, name
    for t in tables:
      assert isinstance(t, Table)
      assert t.rows, (name, t.title)
      assert all(len(r) == len(t.columns) for r in t.rows), (name, t.title)
      # Each table is printed as it finishes (notes may be added to it afterwards).
      assert any(f'### {t.title}' in entry for entry in logged), (name, t.title)
  # Every targeted row carries a verdict.
  verdicts = {r[-1] for tables in out.values() for t in tables for r in t.rows}
  assert verdicts & {'met', 'missed', 'baseline'}
