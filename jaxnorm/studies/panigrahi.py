"""Panigrahi, Chen & Kuo (2018): gradient variance across BatchNorm residual blocks.

The study of ``experiments/configs/panigrahi.py`` (``python -m experiments.reproduce
--paper=panigrahi``). The paper's claim (its abstract; the text is not public): BatchNorm and the
skip connection together keep the variance of the gradient within a bounded range across residual
blocks, so it neither vanishes nor explodes; the same analysis favours shallower, wider ResNets
over deeper, thinner ones. Measured here:

- at initialization, the first/last-block ratio of ``Var(dL/dx_l)`` against depth: polynomial
  (``~L^p``) with BN + skip, exponential without normalization and in plain BN nets without skips,
  beside ``jaxnorm.diagnostics.theory``;
- the same ratio during training on real data, from the run's checkpoints;
- test accuracy of ResNets of equal parameter count, shallow-wide to deep-thin.

References:
  Panigrahi, Chen & Kuo (2018), "Analysis on Gradient Propagation in Batch Normalized Residual
  Networks", arXiv:1812.00342.
  Yang, Pennington, Rao, Sohl-Dickstein & Schoenholz (2019), "A Mean Field Theory of Batch
  Normalization", arXiv:1902.08129 (the plain BN network's pi/(pi-1) per layer).
"""

from __future__ import annotations

import copy
import math

import numpy as np

from jaxnorm.studies.harness import Claim, StudyDir, as_float, fixed_batch, verdict_from


def _ratio(series) -> float:
  """First/last-block ratio of a per-tap series (index 0 = stem, so index 1 = first block)."""
  s = np.asarray(series, np.float64)
  return float(s[1] / s[-1]) if s[-1] > 0 else float('inf')


# -- Part 1: at initialization, against depth -----------------------------------------------------

def _models(c, depth: int) -> dict:
  from jaxnorm import models

  i = c.init
  resnet = dict(stage_sizes=(depth,), widths=(i.width,), strides=(1,), stem_width=i.width,
                stem='cifar', style='v2')
  return {
      'resnet_bn_skip': models.ResNet(norm='batch_norm', **resnet),
      'resnet_none_skip': models.ResNet(norm='none', **resnet),
      'mlp_bn_skip': models.ResidualMLP(depth, i.mlp_width, norm='batch_norm'),
      'mlp_bn_plain': models.MLP(depth, i.mlp_width, norm='batch_norm'),
  }


def _init_measure(c, depth: int) -> dict:
  """Per-block forward and gradient statistics at init of every model of ``_models``."""
  import jax

  from jaxnorm.diagnostics.signal_propagation import signal_propagation

  i = c.init
  rng = np.random.default_rng(c.seed)
  x = rng.standard_normal((i.batch_size, i.image_size, i.image_size, 3)).astype(np.float32)
  out = {}
  for name, model in _models(c, depth).items():
    xin = x if name.startswith('resnet') else x.reshape(x.shape[0], -1)
    rep = signal_propagation(model, None, xin, init_rng=jax.random.PRNGKey(c.seed))
    out[name] = {k: rep.series(k).tolist()
                 for k in ('avg_var', 'avg_sq_mean', 'grad_var', 'grad_sq_mean')}
  return out


def _with_theory(c, depth: int, name: str, row: dict) -> dict:
  """``row`` plus its ``ratio``, and the theory's ``theory`` / ``ratio_theory`` (None: none)."""
  from jaxnorm.diagnostics import theory

  g = np.asarray(row['grad_var'], np.float64)
  row = dict(row, ratio=_ratio(g))
  if name.endswith('plain'):
    # Plain net: one tap per layer; theory pi/(pi-1) per layer (Yang et al. 2019).
    k = theory.plain_bn_gradient_growth()
    row['theory'] = (g[-1] * k ** np.arange(len(g) - 1, -1, -1.0)).tolist()
  else:
    kind = 'resnet' if name.startswith('resnet') else 'mlp'
    th = theory.predicted_block_curves(
        row['avg_var'], row['avg_sq_mean'], g, row['grad_sq_mean'], (depth,),
        norm='batch_norm' if '_bn_' in name else 'none', **_theory_keywords(c, kind))
    row['theory'] = None if th['grad_var'] is None else np.asarray(th['grad_var']).tolist()
  row['ratio_theory'] = None if row['theory'] is None else _ratio(row['theory'])
  return row


def _theory_keywords(c, kind: str) -> dict:
  """What the theory needs to know of the measured network beyond its norm and depth."""
  import inspect

  from jaxnorm.diagnostics import theory

  known = inspect.signature(theory.predicted_block_curves).parameters
  kw = {'kind': kind, 'batch_size': c.init.batch_size,
        'image_size': c.init.image_size if kind == 'resnet' else None}
  return {k: v for k, v in kw.items() if k in known and v is not None}


def _init_part(c, study: StudyDir) -> dict:
  out = {}
  for d in c.init.depths:
    m = study.part(f'init/depth{d}', lambda d=d: _init_measure(c, d),
                   key=[c.init.to_dict(), c.seed, d])
    out[str(d)] = {name: _with_theory(c, d, name, row) for name, row in m.items()}
  return out


def fit_growth(depths, ratios) -> dict[str, float]:
  """Fits ``log ratio`` against ``log L`` (polynomial) and against ``L`` (exponential).

  Returns:
    ``{'power': p, 'power_r2': ..., 'rate': per-block factor exp(slope), 'rate_r2': ...}``.
  """
  d = np.asarray(depths, np.float64)
  y = np.log(np.asarray(ratios, np.float64))

  def fit(x):
    a, b = np.polyfit(x, y, 1)
    resid = y - (a * x + b)
    tot = np.sum((y - y.mean()) ** 2)
    return float(a), float(1 - np.sum(resid ** 2) / tot) if tot > 0 else 1.0

  p, p_r2 = fit(np.log(d))
  r, r_r2 = fit(d)
  return {'power': p, 'power_r2': p_r2, 'rate': math.exp(r), 'rate_r2': r_r2}


def _init_claims(c, study: StudyDir, m: dict) -> list[Claim]:
  from jaxnorm.studies.figures import save_panels

  depths = [int(d) for d in m]
  deepest = str(max(depths))
  names = {'resnet_bn_skip': 'ResNet, BN + skip', 'resnet_none_skip': 'ResNet, no norm + skip',
           'mlp_bn_skip': 'residual MLP, BN + skip', 'mlp_bn_plain': 'plain MLP, BN, no skip'}
  lines = []
  for key, label in names.items():
    g = m[deepest][key]['grad_var']
    x = np.arange(len(g))
    lines.append(dict(x=x, y=np.asarray(g) / g[-1], label=label, style='-'))
    if m[deepest][key].get('theory'):
      th = np.asarray(m[deepest][key]['theory'], np.float64)
      lines.append(dict(x=x, y=th / th[-1], label=label, style='--', legend=False))
  ratio_lines = []
  for key, label in names.items():
    ratio_lines.append(dict(x=depths, y=[m[str(d)][key]['ratio'] for d in depths], label=label,
                            style='o-'))
    th = [m[str(d)][key].get('ratio_theory') for d in depths]
    if all(t is not None for t in th):
      ratio_lines.append(dict(x=depths, y=th, label=label, style='--', legend=False))
  save_panels(study.figure('panigrahi_init'), [
      dict(title=f'Var(dL/dx_l) / Var at the last block, {deepest} blocks', xlabel='block l',
           ylabel='relative gradient variance', logy=True, lines=lines),
      dict(title='first/last-block gradient-variance ratio vs depth', xlabel='blocks L',
           ylabel='ratio', logx=True, logy=True, lines=ratio_lines)],
      suptitle='Gradient variance at initialization (solid: measured, dashed: theory)')

  scale = study.scale
  ratios = {k: [m[str(d)][k]['ratio'] for d in depths] for k in names}
  bn = fit_growth(depths, ratios['resnet_bn_skip'])
  bn_mlp = fit_growth(depths, ratios['mlp_bn_skip'])
  none = fit_growth(depths, ratios['resnet_none_skip'])
  plain = fit_growth(depths, ratios['mlp_bn_plain'])
  th = {k: m[deepest][k].get('ratio_theory') for k in names}
  agree = {k: (as_float(m[deepest][k]['ratio']) / th[k]) if th[k] else float('nan') for k in names}
  none_per_block = agree['resnet_none_skip'] ** (1 / (int(deepest) - 1))
  claims = [
      Claim(claim='With BN + skip the gradient variance grows polynomially in depth: the '
                  'first/last-block ratio fits L^p (exponent p, ResNet / residual MLP)',
            paper_value='bounded ("confined to a certain range"); polynomial L^p, p = '
                        'pi/(pi-1) ~ 1.47 for one-layer branches (derivation in the docs)',
            measured=f'{bn["power"]:.2f} / {bn_mlp["power"]:.2f}', unit='exponent p',
            scale=scale,
            verdict=verdict_from([bn['power_r2'] > 0.95 and bn['power'] < 3,
                                  bn_mlp['power_r2'] > 0.95 and bn_mlp['power'] < 3]),
            note=f'depths {depths}; R^2 of the power-law fit {bn["power_r2"]:.3f} / '
                 f'{bn_mlp["power_r2"]:.3f}; ratio at {deepest} blocks '
                 f'{ratios["resnet_bn_skip"][-1]:.3g} (ResNet), {ratios["mlp_bn_skip"][-1]:.3g} '
                 '(MLP). Figure panigrahi_init.png.'),
      Claim(claim='Without normalization the gradient variance grows exponentially: a constant '
                  'factor per block (ResNet, no norm + skip)',
            paper_value='exponential (about 2 per block with He init)',
            measured=round(none['rate'], 3), unit='factor per block', scale=scale,
            verdict=verdict_from([none['rate_r2'] > 0.95, none['rate'] > 1.3]),
            note=f'R^2 of the exponential fit {none["rate_r2"]:.3f}; ratio at {deepest} blocks '
                 f'{ratios["resnet_none_skip"][-1]:.3g}.'),
      Claim(claim='A plain BN network without skips explodes too: pi/(pi-1) per layer',
            paper_value=f'{math.pi / (math.pi - 1):.3f} per layer (Yang et al. 2019)',
            measured=round(plain['rate'], 3), unit='factor per layer', scale=scale,
            verdict=verdict_from([plain['rate_r2'] > 0.95,
                                  abs(plain['rate'] / (math.pi / (math.pi - 1)) - 1) < 0.05]),
            note=f'R^2 {plain["rate_r2"]:.3f}; plain MLP of width {c.init.mlp_width}.'),
      Claim(claim='jaxnorm.diagnostics.theory predicts the measurement: first/last ratio at '
                  f'{deepest} blocks with BN (measured / theory, ResNet / MLP) and growth per '
                  'block without normalization (ResNet)',
            paper_value='within 1.5x (BN ratio), within 3% (growth per block)',
            measured=f'{agree["resnet_bn_skip"]:.2f} / {agree["mlp_bn_skip"]:.2f}; '
                     f'{none_per_block:.3f}',
            unit='measured / theory', scale=scale,
            verdict=verdict_from([1 / 1.5 <= agree[k] <= 1.5 for k in
                                  ('resnet_bn_skip', 'mlp_bn_skip')]
                                 + [abs(none_per_block - 1) <= 0.03]),
            note='theory from the measured stem statistics and last-block gradient (the mean '
                 'field of the blocks as built for the ResNet); one initialization of a width-'
                 f'{c.init.width} ResNet, whereas the demo (width 128, 8 initializations) is '
                 'where the theory is tested to these tolerances: a single narrow network '
                 'scatters by about x2 in this ratio.'),
  ]
  return claims


# -- Part 2: during training ----------------------------------------------------------------------

def _run_config(c, variant: str):
  from jaxnorm.training.config import model_config

  tr = c.training
  kw = dict(tr.variants[variant])
  name = kw.pop('name')
  t = copy.deepcopy(c.train)
  t.model = model_config(name, depth=tr.depth, width=tr.width, **kw)
  t.optimizer.learning_rate = float(tr.learning_rates.get(variant, c.train.optimizer.learning_rate))
  t.total_steps = tr.steps
  t.checkpoint_every = max(1, tr.steps // tr.checkpoints)
  t.keep_checkpoints = tr.checkpoints + 1
  t.log_every = min(t.log_every, tr.steps)
  t.seed = c.seed
  return t


def _grad_ratio_of(model, state, batch) -> dict:
  from jaxnorm.diagnostics.signal_propagation import signal_propagation

  rep = signal_propagation(model, state.variables, batch['image'], batch['label'])
  g = rep.series('grad_var')
  return {'grad_var': g.tolist(), 'ratio': _ratio(g)}


def _training_part(c, study: StudyDir) -> dict:
  from jaxnorm.training.workdir import config_json

  out = {}
  for variant in c.training.variants:
    cfg = _run_config(c, variant)
    summary = study.train(f'training/{variant}', cfg)

    def measure(cfg=cfg, summary=summary, variant=variant):
      batch = fixed_batch(cfg.dataset, cfg.data_dir or None, 256, 1)
      model, states = study.run_states(cfg, summary)
      rows = [dict(step=step, **_grad_ratio_of(model, state, batch))
              for step, state in states]
      return {'checkpoints': rows, 'summary': summary}

    out[variant] = study.part(f'training/{variant}/gradients', measure,
                              key=config_json(cfg))
  return out


def _training_claims(c, study: StudyDir, m: dict) -> list[Claim]:
  from jaxnorm.studies.figures import save_panels

  lines = [dict(x=[r['step'] for r in v['checkpoints']],
                y=[as_float(r['ratio']) for r in v['checkpoints']], label=k, style='o-')
           for k, v in m.items()]
  per_block = []
  if 'bn_skip' in m:
    for r in m['bn_skip']['checkpoints']:
      g = np.asarray(r['grad_var'], np.float64)
      per_block.append(dict(x=np.arange(len(g)), y=g, label=f'step {r["step"]}', style='-'))
  save_panels(study.figure('panigrahi_training'), [
      dict(title='first/last-block gradient-variance ratio during training', xlabel='step',
           ylabel='ratio', logy=True, lines=lines),
      dict(title=f'BN + skip: Var(dL/dx_l) per block ({c.training.depth} blocks)',
           xlabel='block l', ylabel='gradient variance', logy=True, lines=per_block)],
      suptitle=f'Gradient variance during training on {c.train.dataset}')
  claims = []
  if 'bn_skip' in m:
    r = [as_float(x['ratio']) for x in m['bn_skip']['checkpoints']]
    spread = max(r) / min(r)
    s = m['bn_skip']['summary']
    claims.append(Claim(
        claim='During training the BN + skip network keeps its first/last-block gradient-'
              'variance ratio within a bounded range (max / min over checkpoints)',
        paper_value='confined to a certain range while training',
        measured=round(spread, 2), unit='max/min of the ratio over checkpoints', scale=study.scale,
        verdict=verdict_from([spread < 10, max(r) < 100]),
        note=f'residual MLP, {c.training.depth} blocks, width {c.training.width}; ratios '
             + ', '.join(f'{v:.3g}' for v in r) + f'; final test accuracy '
             f'{100 * np.nan_to_num(as_float(s.get("eval_accuracy"))):.1f}%. Figure '
             'panigrahi_training.png.'))
  def ratios(k, *, trained):
    return [as_float(x['ratio']) for x in m[k]['checkpoints'] if (x['step'] > 0) == trained]

  if 'bn_skip' in m and 'none_skip' in m:
    s = m['none_skip']['summary']
    init_none, init_bn = ratios('none_skip', trained=False)[0], ratios('bn_skip', trained=False)[0]
    claims.append(Claim(
        claim=f'Without normalization the {c.training.depth}-block residual net starts with an '
              'exploded gradient-variance ratio and does not train',
        paper_value='exponential in depth without BN',
        measured=f'{init_none:.3g} vs {init_bn:.3g}', unit='first/last ratio at init (none vs BN)',
        scale=study.scale,
        verdict=verdict_from([init_none > 100 * init_bn, s['diverged'] or
                              as_float(s.get('eval_accuracy')) < 0.5]),
        note=f'lr {c.training.learning_rates.get("none_skip")}: ' + (
            f'the loss became non-finite at step {s["step"]}' if s['diverged'] else
            f'test accuracy {100 * as_float(s["eval_accuracy"]):.1f}%') + '.'))
  if 'bn_skip' in m and 'bn_plain' in m:
    init_plain, init_bn = ratios('bn_plain', trained=False)[0], ratios('bn_skip', trained=False)[0]
    trained_plain, trained_bn = max(ratios('bn_plain', trained=True) or [float('nan')]), max(
        ratios('bn_skip', trained=True) or [float('nan')])
    claims.append(Claim(
        claim='Without the skip path a BN net explodes too: its first/last gradient-variance ratio '
              'is orders of magnitude above the residual net\'s, at init and during training',
        paper_value='BN and the skip work together; a plain BN net grows by pi/(pi-1) per layer',
        measured=f'{init_plain:.3g} vs {init_bn:.3g} at init; {trained_plain:.3g} vs '
                 f'{trained_bn:.3g} trained',
        unit='ratio (plain vs residual)', scale=study.scale,
        verdict=verdict_from([init_plain > 100 * init_bn, trained_plain > 100 * trained_bn]),
        note='during training: max over the checkpoints after step 0. The plain net\'s ratio '
             'falls to ' + ', '.join(f'{v:.3g}' for v in ratios('bn_plain', trained=True))
             + ' once training starts: trained BN scales re-balance the layers, so at this depth '
             'and scale the explosion is a property of the initialization; test accuracy '
             f'{100 * as_float(m["bn_plain"]["summary"].get("eval_accuracy")):.1f}% (plain) vs '
             f'{100 * as_float(m["bn_skip"]["summary"].get("eval_accuracy")):.1f}% (residual).'))
  return claims


# -- Part 3: depth versus width at a fixed parameter budget ---------------------------------------

def _depth_width_config(c, n: int, w: int):
  from jaxnorm.training.config import model_config

  dw = c.depth_width
  t = copy.deepcopy(c.train)
  t.model = model_config('cifar_resnet', depth=6 * n + 2, width=w, norm='batch_norm')
  t.optimizer.learning_rate = dw.learning_rate
  t.batch_size = dw.batch_size
  t.total_steps = dw.steps
  t.checkpoint_every = dw.steps
  t.log_every = min(t.log_every, dw.steps)
  t.seed = c.seed
  return t


def _depth_width_part(c, study: StudyDir) -> dict:
  import jax

  from jaxnorm.training.loop import build_model

  out = {}
  for n, w in c.depth_width.shapes:
    t = _depth_width_config(c, n, w)
    model = build_model(t.model, 10)
    shapes = jax.eval_shape(lambda m=model: m.init(jax.random.PRNGKey(0),
                                                   np.zeros((2, 8, 8, 1), np.float32)))
    params = int(sum(np.prod(a.shape) for a in jax.tree.leaves(shapes['params'])))
    out[f'{n}x{w}'] = dict(study.train(f'depth_width/n{n}_w{w}', t), blocks=3 * n, width=w,
                           params=params)
  return out


def _depth_width_claims(c, study: StudyDir, m: dict) -> list[Claim]:
  from jaxnorm.studies.figures import save_panels

  rows = sorted(m.values(), key=lambda r: r['blocks'])
  accs = [np.nan_to_num(as_float(r['eval_accuracy'])) for r in rows]
  save_panels(study.figure('panigrahi_depth_width'), [dict(
      title='ResNets of about equal parameter count', xlabel='residual blocks (width shrinks)',
      ylabel='test accuracy', logx=True,
      lines=[dict(x=[r['blocks'] for r in rows], y=accs, label='BN ResNet', style='o-')])],
      ncols=1, suptitle='Depth versus width')
  if len(rows) < 2:
    return []
  return [Claim(
      claim='At a fixed parameter budget, a shallower, wider ResNet learns better than a deeper, '
            'thinner one (test accuracy, shallowest minus deepest)',
      paper_value='"shallower yet wider resnets have stronger learning performance" (abstract)',
      measured=round(100 * (accs[0] - accs[-1]), 2), unit='accuracy points', scale=study.scale,
      verdict=verdict_from([accs[0] >= accs[-1], accs[0] == max(accs)]),
      note=', '.join(f'{r["blocks"]} blocks x width {r["width"]} ({r["params"] / 1e3:.0f}k '
                     f'params): {100 * a:.1f}%' for r, a in zip(rows, accs, strict=True))
           + f'; same lr {c.depth_width.learning_rate} and {c.depth_width.steps} steps for all. '
           'Figure panigrahi_depth_width.png.')]


def run_configs(c) -> dict:
  """Every training run of the study at ``c.scale``, by run name."""
  out = {f'training/{v}': _run_config(c, v) for v in c.training.variants}
  out.update({f'depth_width/n{n}_w{w}': _depth_width_config(c, n, w)
              for n, w in c.depth_width.shapes})
  return out


def run(c, study: StudyDir) -> list[Claim]:
  """The Panigrahi et al. study; returns its claims."""
  claims = _init_claims(c, study, _init_part(c, study))
  claims += _training_claims(c, study, _training_part(c, study))
  claims += _depth_width_claims(c, study, _depth_width_part(c, study))
  return claims
