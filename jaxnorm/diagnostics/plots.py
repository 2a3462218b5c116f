"""Matplotlib figures of per-block signal propagation: one line per normalization, theory dashed.

Draws on ``matplotlib.figure.Figure`` objects, not pyplot, so it needs no display and leaves the
active backend alone (a notebook keeps its inline plots); writes PNG files.

References:
  Brock, De & Smith (2021), "Characterizing signal propagation to close the performance gap in
  unnormalized ResNets", arXiv:2101.08692 (signal propagation plots).
  De & Smith (2020), "Batch Normalization Biases Residual Blocks Towards the Identity Function in
  Deep Networks", arXiv:2002.10444 (the skip-path variance of BatchNorm ResNets).
  Panigrahi, Chen & Kuo (2018), "Analysis on Gradient Propagation in Batch Normalized Residual
  Networks", arXiv:1812.00342 (per-block gradient variance).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from jaxnorm.functional._checks import fail

_LAYER = 'jaxnorm.diagnostics.plots'


def plot_per_block(ax, curves: Mapping[str, Sequence[float]],
                   theory: Mapping[str, Sequence[float]] | None = None, *, title: str = '',
                   ylabel: str = '', xlabel: str = 'block (0 = stem)', logy: bool = True,
                   colors: Mapping[str, str] | None = None,
                   bands: Mapping[str, tuple[Sequence[float], Sequence[float]]] | None = None,
                   markers: Mapping[str, str] | None = None) -> None:
  """Draws one solid line per normalization and its theory curve dashed, in the same colour.

  Args:
    ax: a matplotlib Axes.
    curves: normalization name -> per-block values (index 0 = stem).
    theory: normalization name -> predicted per-block values (same indexing); optional; a None
      value draws nothing.
    title: panel title.
    ylabel: y-axis label.
    xlabel: x-axis label.
    logy: log-scale y axis (non-positive values are masked); False: linear.
    colors: normalization name -> colour (keeps colours equal across panels); default: the
      matplotlib colour cycle in the order of ``curves``.
    bands: normalization name -> ``(low, high)`` per-block values shaded in the line's colour
      (e.g. the spread over initializations); optional.
    markers: normalization name -> a matplotlib marker drawn on about 12 points of its line, to
      tell apart lines that coincide (e.g. an identity-forward variant on its base); optional.

  References:
    Brock, De & Smith (2021), "Characterizing signal propagation to close the performance gap in
    unnormalized ResNets", arXiv:2101.08692 (signal propagation plots).
  """
  theory = theory or {}
  cycle = matplotlib.rcParams['axes.prop_cycle'].by_key()['color']
  for i, (name, ys) in enumerate(curves.items()):
    color = (colors or {}).get(name, cycle[i % len(cycle)])
    ys = np.asarray(ys, np.float64)
    if logy:
      ys = np.where(ys > 0, ys, np.nan)
    marker = (markers or {}).get(name)
    # Measured: wide and light, so that a theory line lying on it stays visible on top.
    ax.plot(np.arange(len(ys)), ys, '-', color=color, lw=1.2 if marker else 2.6,
            alpha=0.9 if marker else 0.5, label=name, marker=marker,
            markevery=max(1, len(ys) // 12), markersize=4, fillstyle='none')
    if bands and bands.get(name) is not None:
      lo, hi = (np.asarray(b, np.float64) for b in bands[name])
      if logy:
        lo, hi = np.where(lo > 0, lo, np.nan), np.where(hi > 0, hi, np.nan)
      ax.fill_between(np.arange(len(lo)), lo, hi, color=color, alpha=0.15, lw=0)
    if name in theory and theory[name] is not None:
      th = np.asarray(theory[name], np.float64)
      if logy:
        th = np.where(th > 0, th, np.nan)
      ax.plot(np.arange(len(th)), th, '--', color=color, lw=1.2)
  if logy:
    ax.set_yscale('log')
  ax.set_title(title, fontsize=10)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.grid(True, which='major', alpha=0.3)


def save_per_block_figure(path: str, panels: Sequence[Mapping], *, ncols: int = 2,
                          suptitle: str = '') -> str:
  """Saves a grid of ``plot_per_block`` panels as a PNG and returns its path.

  Args:
    path: output file (its directory is created).
    panels: one mapping per panel with keys ``curves``, and optionally ``theory``, ``title``,
      ``ylabel``, ``logy`` (default True), ``bands``, ``markers`` (see ``plot_per_block``):
      e.g. one panel per family of curves, each on the y scale that separates them.
    ncols: panels per row.
    suptitle: figure title; a note "dashed: theory" is appended.

  Returns:
    ``path``.

  References:
    Brock, De & Smith (2021), "Characterizing signal propagation to close the performance gap in
    unnormalized ResNets", arXiv:2101.08692 (signal propagation plots).
  """
  if not panels:
    fail(_LAYER, 'panels', 'at least one panel', panels)
  n = len(panels)
  ncols = min(ncols, n)
  nrows = -(-n // ncols)
  fig = Figure(figsize=(5.2 * ncols, 3.8 * nrows))
  axes = fig.subplots(nrows, ncols, squeeze=False)
  # One colour per normalization across all panels, in order of first appearance.
  names = list(dict.fromkeys(name for panel in panels for name in panel['curves']))
  cycle = matplotlib.rcParams['axes.prop_cycle'].by_key()['color']
  colors = {name: cycle[i % len(cycle)] for i, name in enumerate(names)}
  for ax, panel in zip(axes.flat, panels, strict=False):
    plot_per_block(ax, panel['curves'], panel.get('theory'), title=panel.get('title', ''),
                   ylabel=panel.get('ylabel', ''), logy=panel.get('logy', True), colors=colors,
                   bands=panel.get('bands'), markers=panel.get('markers'))
  for ax in list(axes.flat)[n:]:
    ax.set_visible(False)
  seen = {}
  for ax in list(axes.flat)[:n]:
    for h, label in zip(*ax.get_legend_handles_labels(), strict=True):
      seen.setdefault(label, h)
  handles, labels = list(seen.values()), list(seen)
  fig.legend(handles, labels, loc='lower center', ncol=min(len(labels), 7), fontsize=8,
             frameon=False)
  fig.suptitle((suptitle + '   ' if suptitle else '') + '(solid: measured, dashed: theory)',
               fontsize=11)
  fig.tight_layout(rect=(0, 0.06, 1, 0.95))
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=110)
  return path
