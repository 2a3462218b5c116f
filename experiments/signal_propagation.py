r"""Signal propagation at initialization under every normalization, beside theory (`make demo`).

For a deep pre-activation ResNet (CIFAR layout, one stage) and a residual MLP, each built with every
normalization variant of ``experiments/configs/signal_propagation.py``, one forward + backward pass
at initialization measures, per residual block, the skip-path variance and squared mean (Brock et
al.'s signal propagation plots) and the variance of the gradient with respect to the skip path
(Panigrahi et al.). The theory of ``jaxnorm.diagnostics.theory.predicted_block_curves`` is drawn
dashed: linear growth with BatchNorm (De & Smith), doubling without normalization, constant with
SkipInit(0), bounded with SkipInit(1/sqrt(d)), ``1 + (j+1) alpha^2`` for NF-ResNets.

Writes ``forward.png``, ``backward.png`` and ``report.json`` under ``config.output_dir`` and prints
a table. Inputs are N(0, 1) by default (offline); ``--config.dataset=digits`` uses scikit-learn's
digits and ``--config.dataset=cifar10`` a local TFDS copy (never downloaded). With real labels the
backward pass uses the cross-entropy; without, a fixed N(0, 1) cotangent on the logits.

  python experiments/signal_propagation.py                     # the demo (about 1 min, 2 cores)
  python experiments/signal_propagation.py --config=experiments/configs/signal_propagation.py:small
  python experiments/signal_propagation.py --config.norms=batch_norm,none --config.resnet.blocks=30

A bad flag or config value exits with status 2 and one line on stderr.

References:
  Brock, De & Smith (2021), "Characterizing signal propagation to close the performance gap in
  unnormalized ResNets", arXiv:2101.08692; Panigrahi, Chen & Kuo (2018), arXiv:1812.00342;
  De & Smith (2020), "Batch Normalization Biases Residual Blocks Towards the Identity Function in
  Deep Networks", arXiv:2002.10444.
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
                      ('batch_size', c.batch_size), ('image_size', c.image_size)):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise FlagError(f'--config.{name}: expected a positive integer, got {value}')
  if c.batch_size < 2:
    raise FlagError(f'--config.batch_size: expected >= 2 (batch statistics), got {c.batch_size}')
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


def theory_curves(c, variant: str, rep, stages) -> dict:
  """``theory.predicted_block_curves`` for one variant's measured report."""
  from jaxnorm.diagnostics import theory

  kw = dict(c.variants[variant])
  return theory.predicted_block_curves(
      rep.series('avg_var'), rep.series('avg_sq_mean'), rep.series('grad_var'),
      rep.series('grad_sq_mean'), stages, norm=kw.get('norm', 'batch_norm'),
      skip_init=kw.get('skip_init'), bgn=kw.get('bgn', 'none'))


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


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  c = _CONFIG.value
  try:
    validate_config(c)
    x, labels = load_inputs(c.dataset, c.batch_size, c.image_size, c.seed)
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
  tasks = [(kind, norm) for kind in _names(c.models)
           for norm in _names(c.norms) if kind == 'resnet' or norm not in resnet_only]

  def measure(task):
    kind, norm = task
    t0 = time.time()
    model, stages = build(c, kind, norm, num_classes)
    xin = x if kind == 'resnet' else x.reshape(x.shape[0], -1)
    # Initialize inside the measurement's jitted computation: one compilation per model.
    rep = signal_propagation(model, None, xin, labels, train=True,
                             init_rng=jax.random.PRNGKey(c.seed))
    seconds = time.time() - t0
    print(f'[{time.time() - t_start:6.1f}s] {kind:6s} {norm:26s} {len(rep.blocks)} blocks '
          f'in {seconds:.1f}s', flush=True)
    return rep, stages, seconds

  # XLA compiles without holding the GIL: measuring models on as many threads as there are cores
  # divides the (compile-dominated) wall time by about that number.
  workers = max(1, min(len(tasks), c.workers or os.cpu_count() or 1))
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    measured = dict(zip(tasks, pool.map(measure, tasks), strict=True))

  results, rows = {}, []
  fwd_panels, bwd_panels = [], []
  for kind in _names(c.models):
    norms = [norm for k, norm in tasks if k == kind]
    curves_v, curves_g, th_v, th_g = {}, {}, {}, {}
    results[kind] = {}
    for norm in norms:
      rep, stages, seconds = measured[(kind, norm)]
      th = theory_curves(c, norm, rep, stages)
      var, gvar = rep.series('avg_var'), rep.series('grad_var')
      curves_v[norm], curves_g[norm] = var, gvar
      th_v[norm], th_g[norm] = th['avg_var'], th['grad_var']
      th_var = th['avg_var']
      row = {
        'model': kind, 'norm': norm, 'blocks': len(rep.blocks),
        'var_first': float(var[1]), 'var_last': float(var[-1]),
        'var_growth': _growth(var),
        'var_growth_theory': _growth(th_var) if th_var is not None else None,
        'gvar_first': float(gvar[1]), 'gvar_last': float(gvar[-1]),
        'gvar_ratio': float(gvar[1] / gvar[-1]) if gvar[-1] > 0 else None,
        'gvar_ratio_theory': (float(th['grad_var'][1] / th['grad_var'][-1])
                              if th['grad_var'] is not None else None),
        'seconds': seconds,
      }
      row = _finite_or_none(row)
      rows.append(row)
      results[kind][norm] = {
        'report': rep.to_dict(), 'summary': row,
        'theory': {k: (None if v is None else [None if not np.isfinite(e) else float(e)
                                                for e in v]) for k, v in th.items()},
      }
    title = (f'pre-activation ResNet, {c.resnet.blocks} blocks' if kind == 'resnet'
             else f'residual MLP, {c.mlp.depth} blocks')
    fwd_panels.append(dict(curves=curves_v, theory=th_v, title=title,
                           ylabel='skip-path avg channel variance'))
    bwd_panels.append(dict(curves=curves_g, theory=th_g, title=title,
                           ylabel='avg channel variance of dL/d(skip path)'))

  out = c.output_dir
  os.makedirs(out, exist_ok=True)
  inputs = 'N(0,1) inputs' if c.dataset == 'gaussian' else f'{c.dataset} batch'
  plots.save_per_block_figure(os.path.join(out, 'forward.png'), fwd_panels,
                              suptitle=f'Forward signal at init ({inputs})')
  plots.save_per_block_figure(os.path.join(out, 'backward.png'), bwd_panels,
                              suptitle=f'Backward gradient at init ({inputs})')
  meta = json.loads(c.to_json_best_effort())
  with open(os.path.join(out, 'report.json'), 'w') as f:
    json.dump({'config': meta, 'results': results, 'table': rows}, f, indent=1, allow_nan=False,
              default=lambda o: None)

  head = (f'{"model":6s} {"norm":26s} {"var[0]":>9s} {"var[L-1]":>9s} {"growth/blk":>10s} '
          f'{"theory":>8s} {"gvar[0]":>9s} {"gvar[L-1]":>9s} {"gvar0/L-1":>9s} {"theory":>9s}')
  print()
  print(head)
  print('-' * len(head))
  for r in rows:
    print(f'{r["model"]:6s} {r["norm"]:26s} {_fmt(r["var_first"]):>9s} {_fmt(r["var_last"]):>9s} '
          f'{_fmt(r["var_growth"]):>10s} {_fmt(r["var_growth_theory"]):>8s} '
          f'{_fmt(r["gvar_first"]):>9s} {_fmt(r["gvar_last"]):>9s} {_fmt(r["gvar_ratio"]):>9s} '
          f'{_fmt(r["gvar_ratio_theory"]):>9s}')
  print(f'\ngrowth/blk = (var[L-1]/var[0])^(1/(L-1)); theory from jaxnorm.diagnostics.theory '
        f'(per stage for the ResNet). Wrote {out}/forward.png, backward.png, report.json '
        f'in {time.time() - t_start:.1f}s.')
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
