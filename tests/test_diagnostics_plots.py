"""Per-block figures: a PNG with one solid line per normalization and dashed theory."""

from __future__ import annotations

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from jaxnorm.diagnostics import plots  # noqa: E402


def test_plot_per_block_draws_measured_solid_and_theory_dashed_in_the_same_colour():
  fig, ax = plt.subplots()
  plots.plot_per_block(ax, {'bn': [1, 2, 3], 'none': [1, 2, 4]}, {'bn': [1, 2, 3]},
                       colors={'bn': 'red'})
  lines = ax.get_lines()
  assert [ln.get_linestyle() for ln in lines] == ['-', '--', '-']
  assert lines[0].get_color() == lines[1].get_color() == 'red'
  assert ax.get_yscale() == 'log'
  plt.close(fig)


def test_save_per_block_figure_writes_a_png(tmp_path):
  path = plots.save_per_block_figure(
    str(tmp_path / 'sub' / 'f.png'),
    [dict(curves={'a': np.arange(1, 5)}, theory={'a': np.arange(1, 5) * 1.1}, title='x'),
     dict(curves={'b': [1.0, 0.0, 2.0]}, logy=True)])
  with open(path, 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  with pytest.raises(ValueError, match='panels'):
    plots.save_per_block_figure(str(tmp_path / 'g.png'), [])


def test_panels_carry_their_scale_bands_and_markers():
  fig, ax = plt.subplots()
  plots.plot_per_block(ax, {'a': [1.0, 2.0, 3.0], 'b': [1.0, 2.0, 3.0]}, {'a': None}, logy=False,
                       bands={'a': ([0.5, 1.5, 2.5], [1.5, 2.5, 3.5])}, markers={'b': 'o'})
  assert ax.get_yscale() == 'linear'
  lines = ax.get_lines()
  assert len(lines) == 2 and lines[1].get_marker() == 'o'  # no theory line for a None entry
  assert len(ax.collections) == 1                         # the shaded band of 'a'
  plt.close(fig)
