r"""Signal propagation at initialization under every normalization, beside theory (`make demo`).

For a deep pre-activation ResNet (CIFAR layout, one stage) and a residual MLP, each built with every
normalization variant of ``experiments/configs/signal_propagation.py``, one forward + backward pass
at initialization measures, per residual block, the skip-path variance and squared mean (Brock et
al.'s signal propagation plots) and the variance of the gradient with respect to the skip path
(Panigrahi et al.), at ``config.seeds`` initializations whose per-block geometric mean is shown.
The theory of ``jaxnorm.diagnostics.theory.predicted_block_curves`` is drawn dashed: for the
ResNet the mean field of the blocks as built (two 3x3 convs per branch, zero padding on the 8x8
grid, the inner BatchNorm, the batch), for the MLP its one-layer recurrences with BatchNorm's
finite-batch terms. Each figure has one row per model and one panel per family: normalized
(linear growth), downscaled branches (SkipInit and NF-ResNets: flat or slow growth) and
unnormalized (geometric growth; log axis).

Writes ``forward.png``, ``backward.png`` and ``report.json`` under ``config.output_dir`` and prints
a table with the theory's agreement: a line agrees when the measured growth per block is within
3 % of the theory's and the first/last gradient-variance ratio within a factor 1.5. Inputs are
N(0, 1) by default (offline); ``--config.dataset=digits`` uses scikit-learn's digits and
``--config.dataset=cifar10`` a local TFDS copy (never downloaded). With real labels the backward
pass uses the cross-entropy; without, a fixed N(0, 1) cotangent on the logits.

  python experiments/signal_propagation.py                     # the demo (2 CPU cores)
  python experiments/signal_propagation.py --config=experiments/configs/signal_propagation.py:small
  python experiments/signal_propagation.py --config.norms=batch_norm,none --config.resnet.blocks=30

A bad flag or config value exits with status 2 and one line on stderr.

References:
  Brock, De & Smith (2021), "Characterizing signal propagation to close the performance gap in
  unnormalized ResNets", arXiv:2101.08692; Panigrahi, Chen & Kuo (2018), "Analysis on Gradient
  Propagation in Batch Normalized Residual Networks", arXiv:1812.00342; De & Smith (2020), "Batch
  Normalization Biases Residual Blocks Towards the Identity Function in Deep Networks",
  arXiv:2002.10444.
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import os
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

CONFIG_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configs',
                           'signal_propagation.py')
# No default here: ml_collections would parse the --config.* overrides while this module is
# imported, outside parse_flags' error handling. parse_flags adds --config=CONFIG_FILE instead.
_CONFIG = config_flags.DEFINE_config_file(
    'config', None, f'Study config file (path[:arg]); default {CONFIG_FILE}.', lock_config=True)


DATASETS = ('gaussian', 'digits', 'cifar10')
# A theory line agrees with the measurement when the growth per block is within GROWTH_TOL
# (relative) and the first/last gradient-variance ratio within a factor RATIO_TOL.
GROWTH_TOL = 0.03
RATIO_TOL = 1.5
# Panels of the figures, one per family of variants: (title, log y forward, log y backward).
# Normalized activations grow linearly, downscaled unnormalized branches (SkipInit, NF-ResNets'
# alpha) stay flat or grow slowly, unnormalized ones grow geometrically.
FAMILIES = (('normalized', False, True), ('downscaled branches', False, True),
            ('unnormalized', True, True))


class FlagError(ValueError):
  """A bad flag or config value: reported as one line, exit code 2."""


def _names(value: str) -> list[str]:
  return [v.strip() for v in str(value).split(',') if v.strip()]


def validate_config(c) -> None:
  """Checks every field; raises FlagError with a one-line message naming it."""
  variants = list(c.variants)
  if not _names(c.norms):
    raise FlagError('--config.norms: expected at least one normalization')
  for n in _names(c.norms):
    if n not in variants:
      raise FlagError(f'--config.norms: unknown normalization {n!r}; expected some of '
                      f'{", ".join(variants)}')
  for m in _names(c.models):
    if m not in ('resnet', 'mlp'):
      raise FlagError(f"--config.models: unknown model {m!r}; expected 'resnet' and/or 'mlp'")
  for name, value in (('resnet.blocks', c.resnet.blocks), ('resnet.width', c.resnet.width),
                      ('mlp.depth', c.mlp.depth), ('mlp.width', c.mlp.width),
                      ('batch_size', c.batch_size), ('image_size', c.image_size),
                      ('seeds', c.seeds)):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise FlagError(f'--config.{name}: expected a positive integer, got {value}')
  if c.batch_size < 2:
    raise FlagError(f'--config.batch_size: expected >= 2 (batch statistics), got {c.batch_size}')
  rb = c.resnet.batch_size
  if isinstance(rb, bool) or not isinstance(rb, int) or rb == 1 or rb < 0:
    raise FlagError(f'--config.resnet.batch_size: expected 0 (= batch_size) or an integer >= 2, '
                    f'got {rb}')
  if c.workers < 0:
    raise FlagError(f'--config.workers: expected >= 0 (0: one per CPU core), got {c.workers}')
  if c.dataset not in DATASETS:
    raise FlagError(f'--config.dataset: expected one of {", ".join(DATASETS)}, got '
                    f'{c.dataset!r}')


def load_inputs(dataset: str, batch: int, image_size: int, seed: int):
  """Returns (images NHWC float32, labels or None)."""
  import numpy as np

  if dataset == 'gaussian':
    rng = np.random.default_rng(seed)
    return rng.standard_normal((batch, image_size, image_size, 3)).astype(np.float32), None
  from jaxnorm.training.data import DatasetNotFoundError, load_dataset
  try:
    ds = load_dataset(dataset, 'train')
  except DatasetNotFoundError as e:
    raise FlagError(f'--dataset={dataset}: {str(e).splitlines()[0]}') from None
  if batch > len(ds):
    raise FlagError(f'--batch_size: {dataset} has only {len(ds)} training examples')
  idx = np.random.default_rng(seed).permutation(len(ds))[:batch]
  images, labels = ds.get(idx, np.random.default_rng(seed), train=False)
  # Standardize the batch per channel so every model starts from a unit-variance input.
  images = (images - images.mean((0, 1, 2))) / (images.std((0, 1, 2)) + 1e-6)
  return images.astype(np.float32), labels


def batch_size(c, kind: str) -> int:
  """The batch of ``kind``: ``resnet.batch_size`` (0: ``batch_size``) or ``batch_size``."""
  return (c.resnet.batch_size or c.batch_size) if kind == 'resnet' else c.batch_size


def build(c, kind: str, variant: str, num_classes: int):
  """The model of one variant, and its blocks per stage."""
  from jaxnorm import models

  kw = dict(c.variants[variant])
  if kind == 'resnet':
    n, w = c.resnet.blocks, c.resnet.width
    return models.ResNet(stage_sizes=(n,), widths=(w,), strides=(1,), stem_width=w, stem='cifar',
                         style='v2', scan=True, num_classes=num_classes, **kw), (n,)
  return models.ResidualMLP(c.mlp.depth, c.mlp.width, num_classes=num_classes, scan=True,
                            **kw), (c.mlp.depth,)


def theory_curves(c, variant: str, series: dict, stages, kind: str, image_shape) -> dict:
  """``theory.predicted_block_curves`` for one variant's (seed-averaged) measured series."""
  from jaxnorm.diagnostics import theory

  kw = dict(c.variants[variant])
  model = (dict(kind='resnet', image_size=tuple(image_shape), widths=(c.resnet.width,),
                strides=(1,), branch_convs=2) if kind == 'resnet' else dict(kind='mlp'))
  return theory.predicted_block_curves(
      series['avg_var'], series['avg_sq_mean'], series['grad_var'], series['grad_sq_mean'],
      stages, norm=kw.get('norm', 'batch_norm'), skip_init=kw.get('skip_init'),
      bgn=kw.get('bgn', 'none'), batch_size=batch_size(c, kind), **model)


STATS = ('avg_var', 'avg_sq_mean', 'grad_var', 'grad_sq_mean')


def average_series(reps) -> dict:
  """Per-block mean over initializations: geometric for the variances, arithmetic for the
  squared means (which may be 0). Also ``*_lo`` / ``*_hi``: the per-block min and max."""
  import numpy as np

  out = {}
  for stat in STATS:
    a = np.stack([np.asarray(r.series(stat), np.float64) for r in reps])
    if stat in ('avg_var', 'grad_var') and np.all(a > 0) and np.all(np.isfinite(a)):
      out[stat] = np.exp(np.log(a).mean(0))
    else:
      out[stat] = a.mean(0)
    out[stat + '_lo'], out[stat + '_hi'] = a.min(0), a.max(0)
  return out


def family(c, variant: str) -> int:
  """Index into ``FAMILIES``: SkipInit and NF-ResNet variants (a downscaled branch), the other
  unnormalized ones ('none', 'pws': weights standardized, activations not), the rest."""
  kw = dict(c.variants[variant])
  norm = kw.get('norm', 'batch_norm')
  if kw.get('skip_init') is not None or norm == 'scaled_ws':
    return 1
  return 2 if norm in ('none', 'pws') else 0


def agreement(row: dict) -> bool | None:
  """Whether the row's theory lines agree (see GROWTH_TOL, RATIO_TOL); None without a line."""
  checks = []
  if row.get('var_growth_theory') is not None and row.get('var_growth') is not None:
    checks.append(abs(row['var_growth'] / row['var_growth_theory'] - 1) <= GROWTH_TOL)
  if row.get('gvar_ratio_theory') is not None and row.get('gvar_ratio') is not None:
    f = row['gvar_ratio'] / row['gvar_ratio_theory']
    checks.append(1 / RATIO_TOL <= f <= RATIO_TOL)
  return all(checks) if checks else None


def _growth(series):
  """Geometric-mean growth per block from the first to the last block: (last/first)^(1/(L-1))."""
  s = series[1:]
  if len(s) < 2 or not (s[0] > 0 and s[-1] > 0) or not math.isfinite(s[-1] / s[0]):
    return float('nan')
  return (s[-1] / s[0]) ** (1 / (len(s) - 1))


def _finite_or_none(row: dict) -> dict:
  """The row with non-finite floats replaced by None (strict JSON)."""
  return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}


def _fmt(v):
  if v is None or not math.isfinite(v):
    return '-'
  return f'{v:.3g}' if 1e-3 <= abs(v) < 1e4 or v == 0 else f'{v:.2e}'


def _row(kind: str, norm: str, series: dict, th: dict, reps, seconds: float) -> dict:
  """The table row of one model: measured (seed mean) and theory, per-seed spread, agreement."""
  var, gvar = series['avg_var'], series['grad_var']
  th_var, th_g = th['avg_var'], th['grad_var']
  per_seed_growth = [_growth(r.series('avg_var')) for r in reps]
  per_seed_ratio = [float(r.series('grad_var')[1] / r.series('grad_var')[-1])
                    if r.series('grad_var')[-1] > 0 else float('nan') for r in reps]
  row = {
    'model': kind, 'norm': norm, 'blocks': len(reps[0].blocks), 'seeds': len(reps),
    'var_first': float(var[1]), 'var_last': float(var[-1]),
    'var_growth': _growth(var),
    'var_growth_theory': _growth(th_var) if th_var is not None else None,
    'gvar_first': float(gvar[1]), 'gvar_last': float(gvar[-1]),
    'gvar_ratio': float(gvar[1] / gvar[-1]) if gvar[-1] > 0 else None,
    'gvar_ratio_theory': float(th_g[1] / th_g[-1]) if th_g is not None else None,
    'var_growth_seed_min': min(per_seed_growth), 'var_growth_seed_max': max(per_seed_growth),
    'gvar_ratio_seed_min': min(per_seed_ratio), 'gvar_ratio_seed_max': max(per_seed_ratio),
    'seconds': seconds,
  }
  row = _finite_or_none(row)
  row['theory_agrees'] = agreement(row)
  return row


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  c = _CONFIG.value
  kinds = _names(c.models)
  try:
    validate_config(c)
    # One input batch per (model, initialization): the seeds average over both.
    inputs = {(kind, s): load_inputs(c.dataset, batch_size(c, kind), c.image_size, c.seed + s)
              for kind in kinds for s in range(c.seeds)}
  except FlagError as e:
    print(f'signal_propagation: {e}', file=sys.stderr)
    return 2

  import jax
  import numpy as np

  from jaxnorm.diagnostics import plots
  from jaxnorm.diagnostics.signal_propagation import signal_propagation

  t_start = time.time()
  num_classes = 10
  resnet_only = set(_names(c.resnet_only))
  tasks = [(kind, norm) for kind in kinds
           for norm in _names(c.norms) if kind == 'resnet' or norm not in resnet_only]

  def measure(task):
    kind, norm = task
    t0 = time.time()
    model, stages = build(c, kind, norm, num_classes)
    reps = []
    for s in range(c.seeds):
      x, labels = inputs[(kind, s)]
      xin = x if kind == 'resnet' else x.reshape(x.shape[0], -1)
      # Initialize inside the measurement's jitted computation: one compilation per model, reused
      # by every seed.
      reps.append(signal_propagation(model, None, xin, labels, train=True,
                                     init_rng=jax.random.PRNGKey(c.seed + s)))
    seconds = time.time() - t0
    print(f'[{time.time() - t_start:6.1f}s] {kind:6s} {norm:26s} {len(reps[0].blocks)} blocks '
          f'x {c.seeds} seeds in {seconds:.1f}s', flush=True)
    return reps, stages, seconds

  # XLA compiles without holding the GIL: measuring models on as many threads as there are cores
  # divides the (compile-dominated) wall time by about that number.
  workers = max(1, min(len(tasks), c.workers or os.cpu_count() or 1))
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    measured = dict(zip(tasks, pool.map(measure, tasks), strict=True))

  def as_list(v):
    return None if v is None else [None if not np.isfinite(e) else float(e) for e in v]

  results, rows = {}, []
  fwd_panels, bwd_panels = [], []
  for kind in kinds:
    norms = [norm for k, norm in tasks if k == kind]
    fams = [dict(fwd=({}, {}, {}), bwd=({}, {}, {})) for _ in FAMILIES]
    results[kind] = {}
    for norm in norms:
      reps, stages, seconds = measured[(kind, norm)]
      series = average_series(reps)
      th = theory_curves(c, norm, series, stages, kind, inputs[(kind, 0)][0].shape[1:3])
      fam = fams[family(c, norm)]
      for key, stat in (('fwd', 'avg_var'), ('bwd', 'grad_var')):
        curves, theory_lines, bands = fam[key]
        curves[norm], theory_lines[norm] = series[stat], th[stat]
        if len(reps) > 1:
          bands[norm] = (series[stat + '_lo'], series[stat + '_hi'])
      row = _row(kind, norm, series, th, reps, seconds)
      rows.append(row)
      results[kind][norm] = {
        'report': reps[0].to_dict(), 'summary': row,
        'series': {k: as_list(v) for k, v in series.items()},
        'per_seed': [{'var_growth': _growth(r.series('avg_var')),
                      'gvar_ratio': float(r.series('grad_var')[1] / r.series('grad_var')[-1])}
                     for r in reps],
        'theory': {k: as_list(v) for k, v in th.items()},
      }
      results[kind][norm]['per_seed'] = [_finite_or_none(d)
                                         for d in results[kind][norm]['per_seed']]
    name = (f'ResNet ({c.resnet.blocks} blocks, width {c.resnet.width})' if kind == 'resnet'
            else f'residual MLP ({c.mlp.depth} blocks, width {c.mlp.width})')
    for (title, log_fwd, log_bwd), fam in zip(FAMILIES, fams, strict=True):
      if not fam['fwd'][0]:
        continue
      for panels, key, logy, ylabel in (
          (fwd_panels, 'fwd', log_fwd, 'skip-path avg channel variance'),
          (bwd_panels, 'bwd', log_bwd, 'avg channel variance of dL/d(skip path)')):
        curves, theory_lines, bands = fam[key]
        # BGN is the identity forward: its line lies on its base norm's; markers tell them apart.
        markers = {n: 'o' for n in curves if dict(c.variants[n]).get('bgn', 'none') != 'none'}
        panels.append(dict(curves=curves, theory=theory_lines, bands=bands, logy=logy,
                           markers=markers, title=f'{name}: {title}', ylabel=ylabel))

  lines = [r for r in rows if r['theory_agrees'] is not None]
  disagree = [f'{r["model"]} {r["norm"]}' for r in lines if not r['theory_agrees']]
  agree = {'growth_rel_tol': GROWTH_TOL, 'ratio_factor_tol': RATIO_TOL, 'models': len(lines),
           'agree': len(lines) - len(disagree), 'disagree': disagree,
           'all_agree': not disagree}

  out = c.output_dir
  os.makedirs(out, exist_ok=True)
  source = 'N(0,1) inputs' if c.dataset == 'gaussian' else f'{c.dataset} batches'
  seeds = f', geometric mean of {c.seeds} initializations' if c.seeds > 1 else ''
  ncols = max(1, min(len(FAMILIES), len(fwd_panels)))
  plots.save_per_block_figure(os.path.join(out, 'forward.png'), fwd_panels, ncols=ncols,
                              suptitle=f'Forward signal at init ({source}{seeds})')
  plots.save_per_block_figure(os.path.join(out, 'backward.png'), bwd_panels, ncols=ncols,
                              suptitle=f'Backward gradient at init ({source}{seeds})')
  meta = json.loads(c.to_json_best_effort())
  with open(os.path.join(out, 'report.json'), 'w') as f:
    json.dump({'config': meta, 'results': results, 'table': rows, 'theory_agreement': agree}, f,
              indent=1, allow_nan=False, default=lambda o: None)

  head = (f'{"model":6s} {"norm":26s} {"var[0]":>9s} {"var[L-1]":>9s} {"growth/blk":>10s} '
          f'{"theory":>8s} {"gvar[0]":>9s} {"gvar[L-1]":>9s} {"gvar0/L-1":>9s} {"theory":>9s} '
          f'{"meas/th":>7s} {"agrees":>6s}')
  print()
  print(head)
  print('-' * len(head))
  for r in rows:
    factor = (r['gvar_ratio'] / r['gvar_ratio_theory']
              if r['gvar_ratio_theory'] and r['gvar_ratio'] is not None else None)
    ok = {None: '-', True: 'yes', False: 'NO'}[r['theory_agrees']]
    print(f'{r["model"]:6s} {r["norm"]:26s} {_fmt(r["var_first"]):>9s} {_fmt(r["var_last"]):>9s} '
          f'{_fmt(r["var_growth"]):>10s} {_fmt(r["var_growth_theory"]):>8s} '
          f'{_fmt(r["gvar_first"]):>9s} {_fmt(r["gvar_last"]):>9s} {_fmt(r["gvar_ratio"]):>9s} '
          f'{_fmt(r["gvar_ratio_theory"]):>9s} {_fmt(factor):>7s} {ok:>6s}')
  print(f'\ngrowth/blk = (var[L-1]/var[0])^(1/(L-1)), measured: per-block geometric mean over '
        f'{c.seeds} initialization(s); theory: jaxnorm.diagnostics.theory.predicted_block_curves. '
        f'Theory agreement (growth within {GROWTH_TOL:.0%}, first/last ratio within x{RATIO_TOL}): '
        f'{agree["agree"]} of {agree["models"]} models' +
        (f'; not: {", ".join(disagree)}' if disagree else '') +
        f'. Wrote {out}/forward.png, backward.png, report.json in {time.time() - t_start:.1f}s.')
  return 0


def parse_flags(argv):
  """Parses flags; a bad flag or config field exits with status 2 and one line."""
  if not any(a == '--config' or a.startswith('--config=') for a in argv[1:]):
    argv = [argv[0], f'--config={CONFIG_FILE}', *argv[1:]]
  try:
    return flags.FLAGS(argv)
  except (flags.Error, KeyError, AttributeError, TypeError, ValueError) as e:
    from jaxnorm.training.config import flag_error_line

    print(f'signal_propagation: {flag_error_line(e)}', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  app.run(lambda argv: sys.exit(main(argv)), flags_parser=parse_flags)
