"""Small matplotlib helpers for the studies' figures (PNG files; ``Figure`` objects, not pyplot).

A figure is a grid of panels; a panel is a dict with ``title``, ``xlabel``, ``ylabel``, optional
``logx`` / ``logy`` and ``lines``: a list of ``{'x', 'y', 'label', 'style', 'color'}`` (``style`` a
matplotlib format such as ``'-'``, ``'--'`` or ``'o-'``; lines with the same label share a colour).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import matplotlib
import numpy as np
from matplotlib.figure import Figure


def save_panels(path: str, panels: Sequence[Mapping], *, ncols: int = 2, suptitle: str = '',
                width: float = 4.8, height: float = 3.5) -> str:
  """Draws ``panels`` on a grid and saves it to ``path`` (PNG, 100 dpi); returns ``path``."""
  n = len(panels)
  ncols = max(1, min(ncols, n))
  nrows = -(-n // ncols)
  fig = Figure(figsize=(width * ncols, height * nrows))
  axes = fig.subplots(nrows, ncols, squeeze=False)
  cycle = matplotlib.rcParams['axes.prop_cycle'].by_key()['color']
  labels = list(dict.fromkeys(
      line.get('label', '') for p in panels for line in p.get('lines', ())
      if line.get('label')))
  colors = {name: cycle[i % len(cycle)] for i, name in enumerate(labels)}
  for ax, panel in zip(axes.flat, panels, strict=False):
    for line in panel.get('lines', ()):
      x = np.asarray(line['x'], np.float64)
      y = np.asarray(line['y'], np.float64)
      if panel.get('logy'):
        y = np.where(y > 0, y, np.nan)
      label = line.get('label')
      ax.plot(x, y, line.get('style', '-'), color=line.get('color', colors.get(label, 'k')),
              lw=line.get('lw', 1.5), ms=4, label=label if line.get('legend', True) else None,
              alpha=line.get('alpha', 1.0))
    for h in panel.get('hlines', ()):
      ax.axhline(h['y'], color=h.get('color', 'gray'), ls=h.get('style', ':'), lw=1,
                 label=h.get('label'))
    if panel.get('logx'):
      ax.set_xscale('log', base=panel.get('logx_base', 10))
    if panel.get('logy'):
      ax.set_yscale('log')
    ax.set_title(panel.get('title', ''), fontsize=9)
    ax.set_xlabel(panel.get('xlabel', ''), fontsize=8)
    ax.set_ylabel(panel.get('ylabel', ''), fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(True, alpha=0.3)
    if any(line.get('label') for line in panel.get('lines', ())):
      ax.legend(fontsize=6.5, frameon=False)
  for ax in list(axes.flat)[n:]:
    ax.set_visible(False)
  if suptitle:
    fig.suptitle(suptitle, fontsize=10)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=100)
  return path
