r"""Signal propagation at initialization under every normalization, beside theory (`make demo`).

For a deep pre-activation ResNet (CIFAR layout, 3 stages) and a residual MLP, each built with every
normalization of the five papers, one forward + backward pass at initialization measures, per
residual block, the skip-path variance and squared mean (Brock et al.'s SPPs) and the variance of
the gradient with respect to the skip path (Panigrahi et al.). Theory (jaxnorm.diagnostics.theory)
is drawn dashed: linear growth with BatchNorm (De & Smith), doubling without normalization,
constant with SkipInit(0), bounded by e with SkipInit(1/sqrt(d)), 1 + (j+1) alpha^2 for NF-ResNets.

Writes ``forward.png``, ``backward.png`` and ``report.json`` under ``--output_dir`` and prints a
table. Inputs are N(0, 1) by default (offline); ``--dataset=digits`` uses scikit-learn's digits and
``--dataset=cifar10`` a local TFDS copy (never downloaded). With real labels the backward pass uses
the cross-entropy; without, a fixed N(0, 1) cotangent on the logits.

  python experiments/signal_propagation.py                       # the demo (< 3 min on 2 cores)
  python experiments/signal_propagation.py --small               # a few seconds per model
  python experiments/signal_propagation.py --norms=batch_norm,none --resnet_blocks=30

References: papers.md §0, §1 (Panigrahi), §2 (BGN), §3 (De & Smith), §5 (PWS), §5b (NF-ResNets).
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import os
import sys
import time

from absl import app, flags, logging

NORMS = ('batch_norm', 'none', 'skip_init_0', 'skip_init_inv_sqrt_depth', 'pws', 'scaled_ws',
         'bgn')
# PWS and scaled WS standardize conv kernels; the residual MLP has none: they are ResNet only.
MLP_NORMS = ('batch_norm', 'none', 'skip_init_0', 'skip_init_inv_sqrt_depth', 'bgn')
DATASETS = ('gaussian', 'digits', 'cifar10')

FLAGS = flags.FLAGS
flags.DEFINE_list('norms', list(NORMS), 'Normalizations to compare: ' + ', '.join(NORMS) + '.')
flags.DEFINE_list('models', ['resnet', 'mlp'], "Models: 'resnet' and/or 'mlp'.")
flags.DEFINE_integer('resnet_blocks', 100,
                     'Residual blocks of the pre-activation ResNet (one stage of basic blocks, '
                     'CIFAR stem; one stage keeps the compile small and the theory free of '
                     'stage transitions).')
flags.DEFINE_integer('resnet_width', 8, 'Channels of the ResNet (16 in He et al.).')
flags.DEFINE_integer('mlp_depth', 100, 'Residual blocks of the residual MLP (without normalization '
                     'the variance doubles per block: beyond ~120 blocks float32 overflows).')
flags.DEFINE_integer('mlp_width', 128, 'Width of the residual MLP.')
flags.DEFINE_integer('batch_size', 32, 'Examples in the batch.')
flags.DEFINE_integer('image_size', 8, 'Side of the N(0, 1) images (gaussian inputs only).')
flags.DEFINE_string('dataset', 'gaussian', 'Inputs: ' + ', '.join(DATASETS) + '.')
flags.DEFINE_string('output_dir', 'results/signal_propagation', 'Where figures and JSON go.')
flags.DEFINE_integer('seed', 0, 'Seed of the parameters and of the Gaussian inputs.')
flags.DEFINE_integer('workers', 0, 'Models measured concurrently (0: one per CPU core).')
flags.DEFINE_bool('small', False, 'Tiny models (for tests): 6 ResNet blocks, MLP depth 12.')


class FlagError(ValueError):
  """A bad flag value: reported as one line, exit code 2."""


def validate_flags() -> None:
  """Checks every flag; raises FlagError with a one-line message."""
  for n in FLAGS.norms:
    if n not in NORMS:
      raise FlagError(f'--norms: unknown normalization {n!r}; expected some of {", ".join(NORMS)}')
  if not FLAGS.norms:
    raise FlagError('--norms: expected at least one normalization')
  for m in FLAGS.models:
    if m not in ('resnet', 'mlp'):
      raise FlagError(f"--models: unknown model {m!r}; expected 'resnet' and/or 'mlp'")
  for name in ('resnet_blocks', 'resnet_width', 'mlp_depth', 'mlp_width', 'batch_size',
               'image_size'):
    value = getattr(FLAGS, name)
    if value is None or value < 1:
      raise FlagError(f'--{name}: expected a positive integer, got {value}')
  if FLAGS.batch_size < 2:
    raise FlagError(f'--batch_size: expected >= 2 (batch statistics), got {FLAGS.batch_size}')
  if FLAGS.workers < 0:
    raise FlagError(f'--workers: expected >= 0 (0: one per CPU core), got {FLAGS.workers}')
  if FLAGS.dataset not in DATASETS:
    raise FlagError(f'--dataset: expected one of {", ".join(DATASETS)}, got {FLAGS.dataset!r}')


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


def model_kwargs(norm: str) -> dict:
  """The models' (norm, skip_init, bgn) for one of NORMS."""
  return {
    'batch_norm': dict(norm='batch_norm'),
    'none': dict(norm='none'),
    'skip_init_0': dict(norm='none', skip_init=0.0),
    'skip_init_inv_sqrt_depth': dict(norm='none', skip_init='inv_sqrt_depth'),
    'pws': dict(norm='pws'),
    'scaled_ws': dict(norm='scaled_ws'),
    'bgn': dict(norm='none', bgn='block'),
  }[norm]


def build(kind: str, norm: str, num_classes: int):
  from jaxnorm import models

  kw = model_kwargs(norm)
  if kind == 'resnet':
    n, w = FLAGS.resnet_blocks, FLAGS.resnet_width
    return models.ResNet(stage_sizes=(n,), widths=(w,), strides=(1,), stem_width=w, stem='cifar',
                         style='v2', scan=True, num_classes=num_classes, **kw), (n,)
  return models.ResidualMLP(FLAGS.mlp_depth, FLAGS.mlp_width, num_classes=num_classes, scan=True,
                            **kw), (FLAGS.mlp_depth,)


def theory_curves(norm: str, rep, stages) -> dict:
  """Predicted per-tap avg_var and grad_var (index 0 = stem), or None where no theory applies.

  Within each stage the MLP-analogue recursion of ``theory.residual_skip_moments`` runs from the
  measured skip-path moments at the stage's first block (a stage transition changes the width and
  resets the statistics); the NF-ResNet prediction uses ``1 + (j + 1) alpha^2`` directly.
  """
  import numpy as np

  from jaxnorm.diagnostics import theory

  total = sum(stages)
  alpha = {'skip_init_0': 0.0, 'skip_init_inv_sqrt_depth': 1 / math.sqrt(total)}.get(norm, 1.0)
  rnorm = {'batch_norm': 'batch_norm', 'none': 'none', 'skip_init_0': 'none',
           'skip_init_inv_sqrt_depth': 'none', 'bgn': 'none'}.get(norm)
  var, sq = rep.series('avg_var'), rep.series('avg_sq_mean')
  if norm == 'scaled_ws':
    fwd = np.concatenate([[np.nan]] + [theory.nf_expected_variance(n) for n in stages])
  elif rnorm is None:
    return {'avg_var': None, 'grad_var': None}
  else:
    fwd = [var[0]]
    start = 1
    for si, n in enumerate(stages):
      # First stage: run from the stem; later stages: from the measured first block of the stage.
      v0, s0, k = (var[0], sq[0], n) if si == 0 else (var[start], sq[start], n - 1)
      pred = theory.residual_skip_moments(k, norm=rnorm, alpha=alpha, var0=v0, sq_mean0=s0)
      fwd.extend(pred['avg_var'][1:] if si == 0 else pred['avg_var'])
      start += n
    fwd = np.asarray(fwd)
  grad = None
  if norm != 'bgn' and rnorm is not None:
    g = theory.gradient_variance_recurrence(
      np.where(np.isfinite(fwd), fwd, var), norm=rnorm, alpha=alpha,
      grad_var_out=rep.series('grad_var')[-1], grad_sq_mean_out=rep.series('grad_sq_mean')[-1])
    grad = g['grad_var']
  return {'avg_var': fwd, 'grad_var': grad}


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
  try:
    validate_flags()
    if FLAGS.small:
      FLAGS.resnet_blocks = min(FLAGS.resnet_blocks, 6)
      FLAGS.resnet_width = min(FLAGS.resnet_width, 4)
      FLAGS.mlp_depth = min(FLAGS.mlp_depth, 12)
      FLAGS.mlp_width = min(FLAGS.mlp_width, 32)
      FLAGS.batch_size = min(FLAGS.batch_size, 16)
    x, labels = load_inputs(FLAGS.dataset, FLAGS.batch_size, FLAGS.image_size, FLAGS.seed)
  except FlagError as e:
    print(f'signal_propagation: {e}', file=sys.stderr)
    return 2

  import jax
  import numpy as np

  from jaxnorm.diagnostics import plots
  from jaxnorm.diagnostics.signal_propagation import signal_propagation

  t_start = time.time()
  num_classes = 10
  tasks = [(kind, norm) for kind in FLAGS.models
           for norm in FLAGS.norms if kind == 'resnet' or norm in MLP_NORMS]

  def measure(task):
    kind, norm = task
    t0 = time.time()
    model, stages = build(kind, norm, num_classes)
    xin = x if kind == 'resnet' else x.reshape(x.shape[0], -1)
    # Initialize inside the measurement's jitted computation: one compilation per model.
    rep = signal_propagation(model, None, xin, labels, train=True,
                             init_rng=jax.random.PRNGKey(FLAGS.seed))
    seconds = time.time() - t0
    print(f'[{time.time() - t_start:6.1f}s] {kind:6s} {norm:26s} {len(rep.blocks)} blocks '
          f'in {seconds:.1f}s', flush=True)
    return rep, stages, seconds

  # XLA compiles without holding the GIL: measuring models on as many threads as there are cores
  # divides the (compile-dominated) wall time by about that number.
  workers = max(1, min(len(tasks), FLAGS.workers or os.cpu_count() or 1))
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    measured = dict(zip(tasks, pool.map(measure, tasks), strict=True))

  results, rows = {}, []
  fwd_panels, bwd_panels = [], []
  for kind in FLAGS.models:
    norms = [norm for k, norm in tasks if k == kind]
    curves_v, curves_g, th_v, th_g = {}, {}, {}, {}
    results[kind] = {}
    for norm in norms:
      rep, stages, seconds = measured[(kind, norm)]
      th = theory_curves(norm, rep, stages)
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
    title = (f'pre-activation ResNet, {FLAGS.resnet_blocks} blocks' if kind == 'resnet'
             else f'residual MLP, {FLAGS.mlp_depth} blocks')
    fwd_panels.append(dict(curves=curves_v, theory=th_v, title=title,
                           ylabel='skip-path avg channel variance'))
    bwd_panels.append(dict(curves=curves_g, theory=th_g, title=title,
                           ylabel='avg channel variance of dL/d(skip path)'))

  out = FLAGS.output_dir
  os.makedirs(out, exist_ok=True)
  inputs = 'N(0,1) inputs' if FLAGS.dataset == 'gaussian' else f'{FLAGS.dataset} batch'
  plots.save_per_block_figure(os.path.join(out, 'forward.png'), fwd_panels,
                              suptitle=f'Forward signal at init ({inputs})')
  plots.save_per_block_figure(os.path.join(out, 'backward.png'), bwd_panels,
                              suptitle=f'Backward gradient at init ({inputs})')
  meta = {k: getattr(FLAGS, k) for k in ('norms', 'models', 'resnet_blocks',
                                         'resnet_width', 'mlp_depth', 'mlp_width', 'batch_size',
                                         'image_size', 'dataset', 'seed')}
  with open(os.path.join(out, 'report.json'), 'w') as f:
    json.dump({'flags': meta, 'results': results, 'table': rows}, f, indent=1, allow_nan=False,
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


if __name__ == '__main__':
  app.run(lambda argv: sys.exit(main(argv)))
