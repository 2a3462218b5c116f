r"""Liu, Ge, Li & Gui (2021): the shift of the average gradient; Parametric Weight Standardization.

The study of ``experiments/configs/pws.py`` (``python -m experiments.reproduce --paper=pws``).
The paper's mechanism: the input of most convolutions comes out of a ReLU and has a positive mean
``m``, so every entry of a filter's gradient shares a common component (the *average gradient*),
the filter means drift, and output channel ``o`` gets an offset ``n mean(W_o) m`` whose spread
over channels adds ``m^2 Var_o(n mean(W_o))`` (the *shift*) to the layer's output variance, until
the network collapses. PWS standardizes each filter in the forward pass,

.. math::

   \hat W_o = \sqrt{2 / \mathrm{fan}}\; \alpha_o\, \frac{W_o - \mu_o}{\sqrt{\sigma_o^2 + \gamma}},

so the kernel the conv applies has zero filter means and the gradient of the raw kernel has no
all-ones component; activations are not normalized, so a sample's output does not depend on its
batch. Measured here:

- final test accuracy of the PWS ResNet with PWS, BatchNorm, GroupNorm, WS + GroupNorm and Scaled
  WS, beside the paper's CIFAR-10 ResNet-34 and ImageNet ResNet-50 numbers;
- test accuracy against the batch size at a fixed number of epochs (PWS, BatchNorm, GroupNorm),
  and the batch-independence of a sample's output;
- during training at a high learning rate, per conv layer, the shift of the kernel the conv
  applies and the share of the raw kernel's gradient along the all-ones direction, for a network
  without normalization and for PWS (``jaxnorm.diagnostics.filter_mean_statistics``);
- at initialization, PWS's per-filter sum of squares ``(2 n / fan) alpha^2 sigma^2 / (sigma^2 +
  gamma)`` across layer widths, gammas and fan modes, and test accuracy across gamma and fan mode.

References:
  Liu, Ge, Li & Gui (2021), "Delving into Variance Transmission and Normalization: Shift of Average
  Gradient Makes the Network Collapse", AAAI 2021, arXiv:2103.11590; official code
  github.com/lyxzzz/PWSConv (the ResNets, the CIFAR-10 and ImageNet recipes and numbers).
  Qiao, Wang, Liu, Shen & Yuille (2019), "Micro-Batch Training with Batch-Channel Normalization and
  Weight Standardization", arXiv:1903.10520 (WS).
  Brock, De & Smith (2021), "Characterizing signal propagation to close the performance gap in
  unnormalized ResNets", arXiv:2101.08692 (Scaled WS).
"""

from __future__ import annotations

import copy

import numpy as np

from jaxnorm.studies.harness import Claim, StudyDir, as_float, fixed_batch, verdict_from

PAPER_ARXIV = 'arXiv:2103.11590'
# The paper's top-1 accuracies (%), from the official code's README.
CIFAR_TABLE = {'group_norm': 94.2, 'batch_norm': 95.3, 'pws': 95.1}  # CIFAR-10 ResNet-34
IMAGENET_TABLE = {'batch_norm': 76.4, 'pws': 76.0, 'group_norm': 75.7}  # ImageNet ResNet-50
LABELS = {'pws': 'PWS', 'batch_norm': 'BN', 'group_norm': 'GN', 'ws': 'WS+GN',
          'scaled_ws': 'Scaled WS', 'none': 'no norm'}
GROWS = 10.0  # the plain net's shift "grows" when its largest value in training is 10x its init


def names(value) -> list[str]:
  """A comma-separated string (or a sequence) as a list of names."""
  if isinstance(value, str):
    return [v.strip() for v in value.split(',') if v.strip()]
  return list(value)


def _steps(c, epochs: float, batch_size: int) -> int:
  from jaxnorm.studies.harness import train_size

  return max(1, int(round(epochs * train_size(c.train) / batch_size)))


def run_config(c, variant: str, *, epochs: float | None = None, steps: int | None = None,
               batch_size: int | None = None, learning_rate: float | None = None,
               schedule: str | None = None, checkpoints: int | None = None,
               seed: int | None = None, **model_overrides):
  """The training config of one run: ``c.train`` with the PWS ResNet of ``variant``.

  Args:
    c: the study config.
    variant: a key of ``c.variants``.
    epochs: the run's length in epochs (or ``steps``).
    steps: the run's length in steps.
    batch_size: default ``c.train.batch_size``.
    learning_rate: default ``c.train.optimizer.learning_rate``.
    schedule: default ``c.train.schedule.name``.
    checkpoints: evenly spaced checkpoints to keep (default: ``c.train``'s checkpointing).
    seed: default ``c.seed``.
    **model_overrides: ``pws_net`` keywords on top of ``c.model`` and the variant's.
  """
  from jaxnorm.training.config import model_config

  t = copy.deepcopy(c.train)
  kw = {k: v for k, v in c.model.items() if k != 'name'}
  kw.update(dict(c.variants[variant]))
  kw.update(model_overrides)
  t.model = model_config(c.model.name, **kw)
  t.seed = c.seed if seed is None else int(seed)
  if batch_size is not None:
    t.batch_size = int(batch_size)
  if learning_rate is not None:
    t.optimizer.learning_rate = float(learning_rate)
  if schedule is not None:
    t.schedule.name = schedule
  t.total_steps = int(steps) if steps is not None else _steps(c, epochs, t.batch_size)
  if checkpoints is not None:
    t.checkpoint_every = max(1, t.total_steps // checkpoints)
    t.keep_checkpoints = checkpoints + 1
  t.checkpoint_every = min(t.checkpoint_every, t.total_steps)
  t.log_every = min(t.log_every, t.total_steps)
  return t


def _acc(summary) -> float:
  """A run's final test accuracy (nan when it diverged)."""
  if summary is None or summary.get('diverged'):
    return float('nan')
  return as_float(summary.get('eval_accuracy'))


def _pct(v: float) -> str:
  return 'diverged' if not np.isfinite(v) else f'{100 * v:.1f}'


# -- Part 1: accuracy of each normalization --------------------------------------------------------

def _accuracy_name(variant: str, seed: int) -> str:
  return f'accuracy/{variant}' + (f'/seed{seed}' if seed else '')


def _accuracy_configs(c) -> dict:
  return {(v, int(s)): run_config(c, v, epochs=c.accuracy.epochs, seed=s)
          for v in names(c.accuracy.variants) for s in c.accuracy.seeds}


def _accuracy(c, study: StudyDir) -> dict:
  """``{variant: [summary per seed]}``."""
  res: dict = {}
  for (v, s), cfg in _accuracy_configs(c).items():
    res.setdefault(v, []).append(study.train(_accuracy_name(v, s), cfg))
  return res


def _mean_acc(summaries) -> float:
  """Mean final test accuracy over seeds (nan if any diverged)."""
  return float(np.mean([_acc(s) for s in summaries]))


def _accuracy_claims(c, study: StudyDir, res: dict) -> list[Claim]:
  acc = {v: _mean_acc(s) for v, s in res.items()}
  per_seed = '; '.join(f'{LABELS[v]} ' + ' / '.join(_pct(_acc(x)) for x in s)
                       for v, s in res.items())
  seeds = len(c.accuracy.seeds)
  full = study.scale == 'full'
  tol = c.accuracy.tolerance
  where = ('CIFAR-10, ResNet-34' if full else
           f'{c.train.dataset}, {len(c.model.stage_sizes)}-stage PWS ResNet of width '
           f'{c.model.width}, {c.accuracy.epochs:g} epochs')
  measured = ' / '.join(f'{LABELS[v]} {_pct(a)}' for v, a in acc.items())
  checks = []
  if 'pws' in acc and 'batch_norm' in acc:
    checks.append(100 * (acc['batch_norm'] - acc['pws']) <= tol)
  if 'pws' in acc and 'group_norm' in acc:
    checks.append(100 * (acc['pws'] - acc['group_norm']) >= -tol)
  if full:
    checks += [abs(100 * acc[v] - p) <= tol for v, p in CIFAR_TABLE.items() if v in acc]
  claims = [Claim(
      claim='Without normalizing activations, PWS matches BatchNorm and is at least as good as '
            'GroupNorm on the PWS ResNet (final test accuracy)',
      paper_value='CIFAR-10 ResNet-34: GN 94.2 / BN 95.3 / PWS 95.1 (official code README)',
      measured=measured, unit=f'% test accuracy ({where}; mean of {seeds} seed'
                              f'{"s" if seeds > 1 else ""})', scale=study.scale,
      verdict=verdict_from(checks),
      note=f'"matches": within {tol:g} points of BN, and not more than {tol:g} below GN. Per seed '
           f'({", ".join(str(x) for x in c.accuracy.seeds)}): {per_seed}. '
           + ('' if full else f'{c.train.dataset} (297 test images: one image is 0.34 points) is a '
              'small stand-in for CIFAR-10, on which every normalization trains well, so the '
              'differences are small; the CIFAR-10 recipe is the full scale. ')
           + 'WS+GN and Scaled WS are the weight-standardization relatives. Figure '
             'pws_accuracy.png.')]
  return claims


# -- Part 2: batch size ----------------------------------------------------------------------------

def _batch_configs(c) -> dict:
  b = c.batch
  lr0 = c.train.optimizer.learning_rate
  return {(v, bs): run_config(c, v, epochs=b.epochs, batch_size=bs,
                              learning_rate=lr0 * bs / b.reference_batch)
          for v in names(b.variants) for bs in b.batch_sizes}


def _batch(c, study: StudyDir) -> dict:
  res: dict = {}
  for (v, bs), cfg in _batch_configs(c).items():
    res.setdefault(v, {})[str(bs)] = study.train(f'batch/{v}/b{bs}', cfg)
  return res


def _independence(c) -> dict:
  """``max |f(x_i alone) - f(x_i in its batch)| / max |f|`` at init, per normalization."""
  import jax
  import jax.numpy as jnp

  from jaxnorm.training import BatchIterator, load_dataset
  from jaxnorm.training.loop import build_model

  ds = load_dataset(c.train.dataset, 'train', data_dir=c.train.data_dir or None)
  x = jnp.asarray(BatchIterator(ds, c.batch.probe_batch, seed=1, train=False).batch(0)['image'])
  out = {}
  for v in names(c.batch.variants):
    cfg = run_config(c, v, steps=1)
    model = build_model(cfg.model, ds.num_classes)

    def ratio(x, model=model):
      variables = model.init(jax.random.PRNGKey(c.seed), x)
      mutable = [k for k in variables if k != 'params']

      def logits(xs):
        y = model.apply(variables, xs, train=True, mutable=mutable or False)
        return y[0] if mutable else y

      together = logits(x)
      alone = jax.vmap(lambda xi: logits(xi[None])[0])(x)  # each sample as a batch of one
      return jnp.max(jnp.abs(alone - together)) / jnp.max(jnp.abs(together))

    out[v] = float(jax.jit(ratio)(x))
  return out


def _batch_claims(c, study: StudyDir, res: dict, independence: dict) -> tuple[list[Claim], list]:
  sizes = [int(s) for s in c.batch.batch_sizes]
  acc = {v: [_acc(res[v][str(s)]) for s in sizes] for v in res}
  lines = [dict(x=sizes, y=[np.nan_to_num(a) for a in acc[v]], label=LABELS[v], style='o-')
           for v in acc]
  tol = c.batch.tolerance
  # What the smallest batch loses against the best batch size of the same method. (The largest
  # batch sizes take few steps at a fixed epoch budget, which costs every method alike.)
  drop = {v: 100 * (np.nanmax(a) - a[0]) if np.isfinite(a[0]) else float('inf')
          for v, a in acc.items()}
  tail = {v: 100 * (np.nanmax(a) - a[-1]) for v, a in acc.items()}
  return [
      Claim(claim='At small batch PWS and GroupNorm keep their accuracy while BatchNorm loses it '
                  '(best test accuracy over the batch sizes minus the accuracy at the smallest '
                  'batch, fixed epochs)',
            paper_value='PWS is "robust to mini-batch size" (abstract); BN needs large batches',
            measured=' / '.join(f'{LABELS[v]} {drop[v]:.1f}' for v in drop),
            unit=f'accuracy points lost at batch {sizes[0]}', scale=study.scale,
            verdict=verdict_from([
                drop.get('pws', np.inf) <= tol,
                drop.get('group_norm', 0.0) <= tol,
                drop.get('batch_norm', -np.inf) > max(drop.get('pws', np.inf),
                                                      drop.get('group_norm', 0.0)) + tol]),
            note=f'{c.batch.epochs:g} epochs at every batch size, learning rate '
                 f'{c.train.optimizer.learning_rate:g} x batch / {c.batch.reference_batch}; per '
                 'batch size ' + ', '.join(f'{s}' for s in sizes) + ': ' + '; '.join(
                     f'{LABELS[v]} ' + ' / '.join(_pct(x) for x in a) for v, a in acc.items())
                 + f' %. Tolerance {tol:g} points. At the largest batch ({sizes[-1]}, '
                 f'{_steps(c, c.batch.epochs, sizes[-1])} steps) the methods lose '
                 + ' / '.join(f'{tail[v]:.1f}' for v in tail) + ' points against their best '
                 '(the short run, not the normalization). Figure pws_accuracy.png.'),
      Claim(claim='A sample\'s output under PWS (or GroupNorm) does not depend on the rest of its '
                  'batch; under BatchNorm in training mode it does',
            paper_value='PWS standardizes weights only and "does not change the output of a '
                        'conv layer" (abstract): no batch statistics',
            measured=' / '.join(f'{LABELS[v]} {independence[v]:.2g}' for v in independence),
            unit='max |logits alone - logits in batch| / max |logits|', scale=study.scale,
            verdict=verdict_from([independence.get('pws', 1.0) < 1e-5]
                                 + ([independence['batch_norm'] > 1e-2]
                                    if 'batch_norm' in independence else [])),
            note=f'at initialization, a batch of {c.batch.probe_batch} training images, training '
                 'mode; each sample alone vs in the batch.'),
  ], lines


# -- Part 3: the shift of the average gradient during training ------------------------------------

def _shift_configs(c) -> dict:
  s = c.shift
  return {(v, float(lr)): run_config(c, v, steps=s.steps, learning_rate=lr, schedule=s.schedule,
                                     checkpoints=s.checkpoints)
          for v, lr in s.runs}


def _shift_measure(c, study: StudyDir, cfg, summary) -> dict:
  """Per checkpoint (None = init): every conv layer's filter-mean statistics on a fixed batch."""
  from jaxnorm.diagnostics.weights import filter_mean_statistics

  batch = fixed_batch(cfg.dataset, cfg.data_dir or None, c.shift.measure_batch, 1)
  model, states = study.run_states(cfg, summary)
  rows = []
  layers = None
  for step, state in states:
    stats = filter_mean_statistics(model, state.variables, batch['image'], batch['label'])
    layers = layers or sorted(stats)
    rows.append({'step': 0 if step is None else step,
                 **{k: [stats[name][k] for name in layers]
                    for k in ('shift', 'raw_shift', 'grad_all_ones', 'grad_shift')}})
  return {'layers': layers, 'checkpoints': rows, 'summary': summary}


def _shift(c, study: StudyDir) -> dict:
  from jaxnorm.training.workdir import config_json

  out = {}
  for (v, lr), cfg in _shift_configs(c).items():
    name = f'shift/{v}/lr{lr:g}'
    summary = study.train(name, cfg)
    out[f'{v}@{lr:g}'] = study.part(
        f'{name}/statistics', lambda cfg=cfg, s=summary: _shift_measure(c, study, cfg, s),
        key=[config_json(cfg), c.shift.measure_batch])
  return out


def _median(values) -> float:
  v = np.asarray([as_float(x) for x in values], np.float64)
  return float(np.median(v)) if v.size else float('nan')


def _shift_claims(c, study: StudyDir, m: dict) -> tuple[list[Claim], list]:
  panels_shift, panels_grad = [], []
  for key, d in m.items():
    v, lr = key.split('@')
    steps = [r['step'] for r in d['checkpoints']]
    label = f'{LABELS[v]}, lr {lr}'
    panels_shift.append(dict(x=steps, y=[max(_median(r['shift']), 1e-30)
                                          for r in d['checkpoints']], label=label, style='o-'))
    panels_grad.append(dict(x=steps, y=[max(_median(r['grad_all_ones']), 1e-30)
                                         for r in d['checkpoints']], label=label, style='o-'))
  plain = {k: d for k, d in m.items() if k.startswith('none@')}
  pws = {k: d for k, d in m.items() if k.startswith('pws@')}
  claims = []
  scale = study.scale
  if plain:
    # The highest learning rate of the net without normalization.
    key = max(plain, key=lambda k: float(k.split('@')[1]))
    rows = plain[key]['checkpoints']
    init = _median(rows[0]['shift'])
    peak = max(_median(r['shift']) for r in rows)
    growth = peak / init if init > 0 else float('inf')
    g0 = _median(rows[0]['grad_all_ones'])
    peak_step = max(rows, key=lambda r: _median(r['shift']))['step']
    dead = next((r['step'] for r in rows if max(as_float(x) for x in r['grad_all_ones']) == 0),
                None)
    s = plain[key]['summary']
    others = {k: max(_median(r['shift']) for r in d['checkpoints'])
              / max(_median(d['checkpoints'][0]['shift']), 1e-30)
              for k, d in plain.items() if k != key}
    claims.append(Claim(
        claim='Without normalization, the shift Var_o(n mean(W_o)) of the conv kernels grows '
              'during training at a high learning rate (peak / initial, median over layers), '
              'fed by a large average gradient, and the network collapses',
        paper_value='the shift of the average gradient grows and makes the network collapse',
        measured=round(growth, 1), unit=f'peak / initial shift (lr {key.split("@")[1]})',
        scale=scale,
        verdict=verdict_from([growth >= GROWS]),
        note=f'median over the {len(plain[key]["layers"])} conv layers: {init:.3g} at init, '
             f'peak {peak:.3g} at step {peak_step}; at init {g0:.2f} of the raw gradient (RMS over '
             'filters) lies along the all-ones direction. '
             + ('' if dead is None else
                f'From step {dead} on every conv kernel\'s gradient is exactly 0 (no signal passes '
                'the ReLUs: the network has collapsed). ')
             + 'Final test accuracy '
             + ('diverged' if s['diverged'] else f'{100 * as_float(s["eval_accuracy"]):.1f}%')
             + '. ' + ''.join(
                 f'At lr {k.split("@")[1]}: the shift grows {g:.1f}x, final accuracy '
                 f'{_pct(_acc(plain[k]["summary"]))}%. ' for k, g in others.items())
             + f'Constant learning rate, {c.shift.steps} steps; figure pws_shift.png.'))
  if pws and plain:
    key = max(pws, key=lambda k: float(k.split('@')[1]))
    rows = pws[key]['checkpoints']
    shift_max = max(max(as_float(x) for x in r['shift']) for r in rows)
    grad_max = max(max(as_float(x) for x in r['grad_all_ones']) for r in rows)
    plain_rows = next(iter(plain.values()))['checkpoints']
    plain_shift0 = min(as_float(x) for x in plain_rows[0]['shift'])
    plain_grad0 = _median(plain_rows[0]['grad_all_ones'])
    raw = [_median(r['raw_shift']) for r in rows]
    s = pws[key]['summary']
    claims.append(Claim(
        claim='Under PWS the kernel each conv applies has zero filter means and the raw kernel\'s '
              'gradient no all-ones component, at every step (max over layers and checkpoints: '
              'shift of the applied kernel / all-ones share of the gradient)',
        paper_value='0 (exact): PWS centres every filter and projects the average gradient out',
        measured=f'{shift_max:.2g} / {grad_max:.2g}',
        unit=f'shift / gradient share (lr {key.split("@")[1]})', scale=scale,
        verdict=verdict_from([shift_max < 1e-8 * max(plain_shift0, 1e-30) or shift_max < 1e-9,
                              grad_max < 1e-5]),
        note=f'float32 rounding level; the network without normalization has, at init, a shift '
             f'of at least {plain_shift0:.3g} in every layer and {plain_grad0:.2f} of its gradient '
             'along the all-ones direction. The raw PWS kernel keeps the filter means it was '
             'initialized with (median shift ' + ' -> '.join(f'{x:.3g}' for x in (raw[0], raw[-1]))
             + '; only weight decay moves them). Final test accuracy '
             + ('diverged' if s['diverged'] else f'{100 * as_float(s["eval_accuracy"]):.1f}%')
             + '.'))
  return claims, [panels_shift, panels_grad]


# -- Part 4: PWS's per-filter gain at initialization, across gamma and width -----------------------

def _gain_measure(c) -> dict:
  """Per (shape, mode, gamma): the measured per-filter sum of squares beside the formula."""
  import jax
  import jax.numpy as jnp

  import jaxnorm.linen as jnl
  from jaxnorm.diagnostics.weights import effective_kernels

  rows = []
  for cin, cout in c.gain.shapes:
    x = jnp.ones((1, 3, 3, cin), jnp.float32)
    for mode in c.gain.modes:
      base = jnl.PWSConv(cout, (3, 3), mode=mode, padding='VALID')
      params = base.init(jax.random.PRNGKey(c.seed), x)['params']
      w = np.asarray(params['kernel'], np.float64).reshape(-1, cout)
      alpha = np.asarray(params['alpha'], np.float64)
      n = w.shape[0]
      fan = 9 * (cin if mode == 'fan_in' else cout)
      sigma2 = w.var(0)
      for gamma in c.gain.gammas:
        conv = jnl.PWSConv(cout, (3, 3), mode=mode, gamma=float(gamma), padding='VALID')
        (k,) = effective_kernels(conv, {'params': params}, x).values()
        measured = (np.asarray(k, np.float64).reshape(-1, cout) ** 2).sum(0)
        formula = (2.0 * n / fan) * alpha ** 2 * sigma2 / (sigma2 + gamma)
        he = (2.0 * n / fan) * (2.0 / fan) / (2.0 / fan + gamma)  # at sigma^2 = 2 / fan
        rows.append({'cin': cin, 'cout': cout, 'mode': mode, 'gamma': float(gamma),
                     'fan_in': n, 'measured': float(measured.mean()),
                     'formula': float(formula.mean()), 'he_expected': float(he),
                     'max_rel_err': float(np.max(np.abs(measured / formula - 1)))})
  return {'rows': rows}


def _gain_claims(c, study: StudyDir, m: dict) -> tuple[list[Claim], list]:
  rows = m['rows']
  err = max(r['max_rel_err'] for r in rows)
  square = [r for r in rows if r['cin'] == r['cout'] and r['mode'] == 'fan_in']
  lines = []
  for gamma in c.gain.gammas:
    rs = sorted((r for r in square if r['gamma'] == gamma), key=lambda r: r['fan_in'])
    lines.append(dict(x=[r['fan_in'] for r in rs], y=[r['measured'] / 2 for r in rs],
                      label=f'gamma {gamma:g}', style='o'))
    lines.append(dict(x=[r['fan_in'] for r in rs], y=[r['he_expected'] / 2 for r in rs],
                      label=f'gamma {gamma:g}', style='--', legend=False))
  widest = max(square, key=lambda r: r['fan_in'])
  at = [r for r in square if r['fan_in'] == widest['fan_in'] and abs(r['gamma'] - 1e-3) < 1e-12]
  ratio = at[0]['measured'] / 2 if at else float('nan')
  expected = at[0]['he_expected'] / 2 if at else float('nan')
  fo = [r for r in rows if r['mode'] == 'fan_out' and r['cin'] != r['cout']]
  fo_note = '; '.join(
      f'{r["cin"]}->{r["cout"]} channels, gamma {r["gamma"]:g}: {r["measured"] / 2:.3f} '
      f'(fan_in mode {next(q["measured"] for q in rows if q["mode"] == "fan_in" and q["cin"] == r["cin"] and q["cout"] == r["cout"] and q["gamma"] == r["gamma"]) / 2:.3f})'  # noqa: E501
      for r in fo if abs(r['gamma'] - 1e-3) < 1e-12)
  claims = [Claim(
      claim='PWS\'s per-filter sum of squares is (2n/fan) alpha^2 sigma^2 / (sigma^2 + gamma): '
            'gamma attenuates wide layers at He init (3x3 conv, gain^2 relative to He init at '
            'gamma 1e-3 for the widest layer)',
      paper_value='2 alpha^2 sigma^2 / (sigma^2 + gamma) in fan_in mode, which follows from the '
                  'PWS formula: 0.30 of He for a 3x3x512 filter at gamma 1e-3',
      measured=round(ratio, 3),
      unit=f'gain^2 / He, fan_in {widest["fan_in"]} (formula {expected:.3f})', scale=study.scale,
      verdict=verdict_from([err < 1e-5, abs(ratio - expected) < 0.02]),
      note=f'max relative error of the measured sums against the formula with each filter\'s own '
           f'sigma^2, over {len(rows)} (layer, mode, gamma) settings: {err:.1g}. The He-init '
           'expectation uses sigma^2 = 2 / fan. fan_out mode scales by fan_in / fan_out: '
           + (fo_note or 'no layer with C_in != C_out measured') + '. Figure pws_gamma.png.')]
  panel = dict(title='PWS filter sum of squares / 2 at init (3x3 conv, C_in = C_out)',
               xlabel='fan_in', ylabel='gain^2 relative to He init', logx=True, logx_base=2,
               logy=True, lines=lines)
  return claims, panel


def _gamma_configs(c) -> dict:
  return {(float(g), mode): run_config(c, 'pws', epochs=c.accuracy.epochs, pws_gamma=float(g),
                                       pws_mode=mode)
          for g, mode in c.gamma.runs}


def _gamma(c, study: StudyDir) -> dict:
  return {f'{g:g}@{mode}': study.train(f'gamma/{mode}/g{g:g}', cfg)
          for (g, mode), cfg in _gamma_configs(c).items()}


def _gamma_claims(c, study: StudyDir, res: dict) -> tuple[list[Claim], dict]:
  acc = {k: _acc(s) for k, s in res.items()}
  ref_key = '0.001@fan_in' if '0.001@fan_in' in acc else next(iter(acc))
  ref = acc[ref_key]
  tol = c.gamma.tolerance
  fan_in = sorted(((float(k.split('@')[0]), a) for k, a in acc.items()
                   if k.endswith('@fan_in')))
  fan_out = sorted(((float(k.split('@')[0]), a) for k, a in acc.items()
                    if k.endswith('@fan_out')))
  lines = [dict(x=[g for g, _ in fan_in], y=[np.nan_to_num(a) for _, a in fan_in],
                label='PWS fan_in', style='o-')]
  if fan_out:
    lines.append(dict(x=[g for g, _ in fan_out], y=[np.nan_to_num(a) for _, a in fan_out],
                      label='PWS fan_out', style='s--'))
  dev = {k: 100 * (a - ref) for k, a in acc.items()}
  worst = min(dev.values()) if dev else float('nan')
  claims = [Claim(
      claim='PWS trains across gamma from 1e-5 to 1e-1 and with either fan mode: test accuracy '
            'within the tolerance of the default (gamma 1e-3, fan_in); worst deviation',
      paper_value='gamma 1e-3 (CIFAR-10) and 1e-4 (ImageNet), fan_in, in the official configs '
                  '(the paper\'s gamma ablation was not available)',
      measured=round(worst, 2), unit='accuracy points vs gamma 1e-3 fan_in', scale=study.scale,
      verdict=verdict_from([all(np.isfinite(a) for a in acc.values()), worst >= -tol]),
      note=f'tolerance {tol:g} points; ' + ', '.join(
          f'gamma {k.split("@")[0]} {k.split("@")[1]}: {_pct(a)}%' for k, a in acc.items())
      + '. Figure pws_gamma.png.')]
  panel = dict(title=f'PWS test accuracy against gamma ({c.train.dataset})', xlabel='gamma',
               ylabel='test accuracy', logx=True, lines=lines)
  return claims, panel


# -- Part 5: the ImageNet table (full scale only) --------------------------------------------------

def imagenet_run_configs(c) -> dict:
  """The official ImageNet ResNet-50 runs (BN, PWS, GN) as training configs (``full`` scale)."""
  from jaxnorm.training.config import model_config

  im = c.imagenet
  out = {}
  for v in names(im.variants):
    t = copy.deepcopy(c.train)
    t.dataset = 'imagenet2012'
    t.image_size = im.image_size
    # pws_resnet(50): norm 'pws' is gamma 1e-4, fan_in, data-dependent alpha; the BN baseline
    # does not zero-initialize its last BN on ImageNet.
    t.model = model_config('pws_resnet', depth=50, norm=c.variants[v]['norm'])
    t.batch_size = im.batch_size
    t.eval_batch_size = 1000
    t.total_steps = im.epochs * im.train_examples // im.batch_size
    t.optimizer.learning_rate = im.learning_rate
    t.optimizer.weight_decay = im.weight_decay
    t.schedule.name = 'step'
    t.schedule.step_boundaries = tuple(im.step_boundaries)
    t.checkpoint_every = 10_000
    t.seed = c.seed
    out[f'imagenet/{v}'] = t
  return out


def _imagenet_claims(c, study: StudyDir, res: dict | None) -> list[Claim]:
  paper = 'ImageNet ResNet-50 top-1: BN 76.4 / PWS 76.0 / GN 75.7 (official code README)'
  if res is None:
    return [Claim(
        claim='On ImageNet ResNet-50, PWS is close to BatchNorm and above GroupNorm',
        paper_value=paper, measured=None, unit='% top-1', scale=study.scale, verdict='not_run',
        note='needs an accelerator and the TFDS ImageNet: --scale=full (100 epochs, batch 64, '
             'lr 0.025, PWS gamma 1e-4 with data-dependent alpha).')]
  acc = {v: _acc(s) for v, s in res.items()}
  return [Claim(
      claim='On ImageNet ResNet-50, PWS is close to BatchNorm and above GroupNorm',
      paper_value=paper, measured=' / '.join(f'{LABELS[v]} {_pct(a)}' for v, a in acc.items()),
      unit='% top-1', scale=study.scale,
      verdict=verdict_from([abs(100 * acc[v] - p) <= 0.5 for v, p in IMAGENET_TABLE.items()
                            if v in acc]))]


# -- The study ------------------------------------------------------------------------------------

def run_configs(c) -> dict:
  """Every training run of the study at ``c.scale``, by run name."""
  out = {_accuracy_name(v, s): cfg for (v, s), cfg in _accuracy_configs(c).items()}
  out.update({f'batch/{v}/b{bs}': cfg for (v, bs), cfg in _batch_configs(c).items()})
  out.update({f'shift/{v}/lr{lr:g}': cfg for (v, lr), cfg in _shift_configs(c).items()})
  out.update({f'gamma/{mode}/g{g:g}': cfg for (g, mode), cfg in _gamma_configs(c).items()})
  if c.imagenet.enabled:
    out.update(imagenet_run_configs(c))
  return out


def run(c, study: StudyDir) -> list[Claim]:
  """The PWS study; returns its claims."""
  from jaxnorm.studies.figures import save_panels

  accuracy = _accuracy(c, study)
  claims = _accuracy_claims(c, study, accuracy)
  batch = _batch(c, study)
  independence = study.part('batch/independence', lambda: _independence(c),
                            key=[c.model.to_dict(), c.variants.to_dict(), c.batch.variants,
                                 c.batch.probe_batch, c.seed])
  batch_claims, batch_lines = _batch_claims(c, study, batch, independence)
  claims += batch_claims
  acc = {v: _mean_acc(s) for v, s in accuracy.items()}
  save_panels(study.figure('pws_accuracy'), [
      dict(title=f'final test accuracy, {c.accuracy.epochs:g} epochs (mean of '
                 f'{len(c.accuracy.seeds)} seed{"s" if len(c.accuracy.seeds) > 1 else ""})',
           xlabel='variant',
           ylabel='test accuracy',
           lines=[dict(x=[i], y=[np.nan_to_num(a)], label=LABELS[v], style='o')
                  for i, (v, a) in enumerate(acc.items())]),
      dict(title=f'test accuracy against batch size, {c.batch.epochs:g} epochs', logx=True,
           logx_base=2, xlabel='batch size', ylabel='test accuracy', lines=batch_lines)],
      suptitle=f'PWS ResNet on {c.train.dataset}: normalizations and batch size')

  shift = _shift(c, study)
  shift_claims, (shift_lines, grad_lines) = _shift_claims(c, study, shift)
  claims += shift_claims
  save_panels(study.figure('pws_shift'), [
      dict(title='shift Var_o(n mean(W_o)) of the applied kernels (median over conv layers)',
           xlabel='step', ylabel='shift', logy=True, lines=shift_lines),
      dict(title='share of dL/dW along the all-ones direction (median over layers)',
           xlabel='step', ylabel='RMS over filters of |<g_o, 1>| / (sqrt(n) ||g_o||)',
           logy=True, lines=grad_lines)],
      suptitle=f'The shift of the average gradient ({c.train.dataset}, constant lr; values below '
               '1e-30 drawn at 1e-30)' if c.shift.schedule == 'constant' else
               f'The shift of the average gradient ({c.train.dataset})')

  gain = study.part('gain', lambda: _gain_measure(c), key=[c.gain.to_dict(), c.seed])
  gain_claims, gain_panel = _gain_claims(c, study, gain)
  gamma_claims, gamma_panel = _gamma_claims(c, study, _gamma(c, study))
  claims += gain_claims + gamma_claims
  save_panels(study.figure('pws_gamma'), [gain_panel, gamma_panel],
              suptitle='PWS gamma: the gain at init (markers: measured, dashed: formula at '
                       'sigma^2 = 2/fan) and the accuracy after training')

  imagenet = None
  if c.imagenet.enabled:
    imagenet = {name.split('/')[1]: study.train(name, cfg)
                for name, cfg in imagenet_run_configs(c).items()}
  claims += _imagenet_claims(c, study, imagenet)
  return claims
