r"""Cabana & Lago-Fernandez (2021): Backward Gradient Normalization in very deep plain MLPs.

The study of ``experiments/configs/bgn.py`` (``python -m experiments.reproduce --paper=bgn``).
A BGN node is the identity in the forward pass and rescales the gradient arriving at it,
:math:`g = \partial L/\partial y`, in the backward pass:

.. math::

   y = x, \qquad \frac{\partial L}{\partial x} = s\,\frac{g}{\lVert g\rVert_2 + \epsilon},

so the gradient that continues towards the input has norm :math:`s` wherever the node sits (here,
by default, a per-sample norm with :math:`s = \sqrt{\text{width}}`, after every hidden layer's
activation). The paper's claims (its abstract; the body is not public): the nodes "permit a
well-scaled gradient flow that reaches the deepest network layers without experimenting
vanishing or explosion", and BGN improves accuracy "in several experimental conditions" of very
deep networks. Measured here:

- at initialization, the norm of :math:`\partial L/\partial W_l` (``jax.grad`` of the mean
  cross-entropy with respect to each hidden layer's ``dense`` kernel, in float64 so that a
  vanishing gradient of :math:`10^{-60}` is a number, not an underflow) for depths up to 100 and
  sigmoid, tanh and ReLU, with and without BGN on the same parameters, and its first/last-layer
  ratio :math:`\lVert\partial L/\partial W_1\rVert / \lVert\partial L/\partial W_D\rVert`;
- the same at every checkpoint of training runs on real data;
- final train and test accuracy against depth, with and without BGN, each arm at the best
  learning rate of its own grid (BGN changes the gradient's scale, so one shared learning rate
  would compare step sizes rather than methods);
- each reconstruction choice (norm per sample or per batch, target :math:`\sqrt{n}` or 1, a node
  after every layer or every k-th, on the activation's output or input), at initialization and
  in training, so the claims are shown under each choice and not only under jaxnorm's default.

References:
  Cabana & Lago-Fernandez (2021), "Backward Gradient Normalization in Deep Neural Networks",
  arXiv:2106.09475, https://arxiv.org/abs/2106.09475.
"""

from __future__ import annotations

import copy
import functools
import math

import numpy as np

from jaxnorm.studies.harness import Claim, StudyDir, as_float, fixed_batch, verdict_from

PAPER_ARXIV = 'arXiv:2106.09475'
IMPROVES = 0.02  # BGN "improves" a condition when its best test accuracy is 2 points higher
TRAINS = 0.2  # ...and at least twice chance (10 classes): a gain at chance level is noise
ORDER_ONE = 1.0  # |log10 ratio| <= 1: the first/last-layer ratio is within a factor 10 of 1


def _names(value) -> list[str]:
  if isinstance(value, str):
    return [v.strip() for v in value.split(',') if v.strip()]
  return list(value)


def _lr_name(lr: float) -> str:
  return f'lr{float(lr):.0e}'.replace('e-0', 'e-').replace('e+0', 'e+')


def _log10_ratio(norms) -> float:
  """``log10(||dL/dW_first|| / ||dL/dW_last||)`` of a per-layer list of norms."""
  n = np.asarray([as_float(v) for v in norms], np.float64)
  if not (n[0] > 0 and n[-1] > 0):
    return float('-inf') if n[-1] > 0 else float('nan')
  return float(np.log10(n[0] / n[-1]))


# -- Weight-gradient norms (float64) --------------------------------------------------------------

_GRAD_FNS: dict = {}
_INIT_FNS: dict = {}


def weight_grad_norms(model, params, images, labels) -> tuple[float, list[float]]:
  """The loss and ``||dL/dW_l||`` of every hidden layer's ``dense`` kernel of an MLP, in float64.

  ``L`` is the mean softmax cross-entropy of ``model.apply({'params': params}, images)`` against
  ``labels``; the gradient is ``jax.grad`` of it with respect to the parameters, cast to float64
  first, so that a gradient far below float32's range is still measured. One compiled function
  per model (jaxnorm's models are hashable), so a run's checkpoints reuse the compilation of its
  measurement at initialization.
  """
  import jax
  import jax.numpy as jnp

  fn = _GRAD_FNS.get(model)
  if fn is None:
    def norms(p, x, y):
      def loss(p):
        logp = jax.nn.log_softmax(model.apply({'params': p}, x))
        return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))

      value, g = jax.value_and_grad(loss)(p)
      return value, jnp.stack([jnp.linalg.norm(g[f'layer_{i}']['dense']['kernel'])
                               for i in range(model.depth)])

    fn = _GRAD_FNS[model] = jax.jit(norms)
  with jax.enable_x64(True):
    p64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
    value, n = fn(p64, jnp.asarray(images, jnp.float64), jnp.asarray(labels, jnp.int32))
    return float(value), np.asarray(n, np.float64).tolist()


def _mlp(c, depth: int, activation: str, arm: str):
  from jaxnorm import models

  kw = {} if arm == 'none' else dict(c.variants[arm])
  return models.MLP(depth, c.width, activation=activation, **kw)


def _batch(c, dataset: str, size: int) -> dict:
  """A fixed training batch (the first of an unshuffled-order iterator with the study's seed)."""
  return _batch_of(dataset, c.train.data_dir or None, int(size), int(c.seed))


@functools.cache
def _batch_of(dataset: str, data_dir, size: int, seed: int) -> dict:
  b = fixed_batch(dataset, data_dir, size, seed)
  return {'image': np.asarray(b['image']).reshape(len(b['label']), -1),
          'label': np.asarray(b['label'])}


# -- Part 1: at initialization ---------------------------------------------------------------------

def _init_measure(c, depth: int, activation: str, arms) -> dict:
  """``{arm: {'loss', 'norms'}}`` at init; every arm on the same parameters (BGN has none)."""
  import jax

  b = _batch(c, c.init.dataset, c.init.batch_size)
  model = _mlp(c, depth, activation, 'none')
  if model not in _INIT_FNS:
    _INIT_FNS[model] = jax.jit(model.init)
  params = _INIT_FNS[model](jax.random.PRNGKey(c.seed), b['image'][:1])
  out = {}
  for arm in arms:
    loss, norms = weight_grad_norms(_mlp(c, depth, activation, arm), params['params'],
                                    b['image'], b['label'])
    out[arm] = {'loss': loss, 'norms': norms}
  return out


def _init_key(c, arms) -> list:
  """What an init measurement is computed from: the batch, width, seed and the arms' keywords."""
  return [c.init.dataset, c.init.batch_size, c.train.data_dir, c.width, c.seed,
          {arm: dict(c.variants[arm]) for arm in arms if arm != 'none'}]


def _init_part(c, study: StudyDir) -> dict:
  i = c.init
  ladder = {act: {str(d): study.part(f'init/{act}/d{d}',
                                     lambda d=d, act=act: _init_measure(c, d, act, ('none', 'bgn')),
                                     key=_init_key(c, ('bgn',)))
                  for d in i.depths} for act in i.activations}
  variants = study.part(f'init/variants/{i.variant_activation}/d{i.variant_depth}',
                        lambda: _init_measure(c, i.variant_depth, i.variant_activation,
                                              ('none', *c.variants)),
                        key=_init_key(c, c.variants))
  return {'ladder': ladder, 'variants': variants}


def per_layer_factor(norms) -> float:
  """The geometric mean factor by which ``||dL/dW_l||`` shrinks per layer towards the input."""
  n = np.asarray([as_float(v) for v in norms], np.float64)
  return float((n[0] / n[-1]) ** (1.0 / max(1, len(n) - 1)))


def _init_claims(c, study: StudyDir, m: dict) -> list[Claim]:
  from jaxnorm.studies.figures import save_panels

  i = c.init
  depths = [int(d) for d in i.depths]
  deepest = str(max(depths))
  acts = list(i.activations)
  lad = m['ladder']
  ratio = {(a, arm): [_log10_ratio(lad[a][str(d)][arm]['norms']) for d in depths]
           for a in acts for arm in ('none', 'bgn')}
  panels = []
  for a in acts:
    lines = []
    for arm, label, style in (('none', 'no BGN', '-'), ('bgn', 'BGN (default)', '-')):
      n = lad[a][deepest][arm]['norms']
      lines.append(dict(x=np.arange(1, len(n) + 1), y=n, label=label, style=style))
    panels.append(dict(title=f'{a}, {deepest} layers, width {c.width}: ||dL/dW_l|| at init',
                       xlabel='layer l', ylabel='weight-gradient norm', logy=True, lines=lines))
  panels.append(dict(
      title='first/last-layer ratio against depth (solid: no BGN, dashed: BGN)',
      xlabel='hidden layers D', ylabel='log10 ||dL/dW_1|| / ||dL/dW_D||', hlines=[{'y': 0}],
      lines=[dict(x=depths, y=ratio[(a, arm)], label=a, style='o-' if arm == 'none' else 'o--',
                  legend=arm == 'none') for a in acts for arm in ('none', 'bgn')]))
  var = m['variants']
  panels.append(dict(
      title=f'reconstruction choices, {i.variant_activation}, {i.variant_depth} layers',
      xlabel='layer l', ylabel='weight-gradient norm', logy=True,
      lines=[dict(x=np.arange(1, len(v['norms']) + 1), y=v['norms'], label=k, style='-')
             for k, v in var.items()]))
  save_panels(study.figure('bgn_init'), panels, ncols=2,
              suptitle=f'Weight-gradient norms at initialization ({i.dataset} batch of '
                       f'{i.batch_size}, float64)')

  scale = study.scale
  last = {(a, arm): ratio[(a, arm)][-1] for a in acts for arm in ('none', 'bgn')}
  saturating = [a for a in acts if a in ('sigmoid', 'tanh')]
  factor = {a: per_layer_factor(lad[a][deepest]['none']['norms']) for a in acts}
  bgn_all = [r for a in acts for r in ratio[(a, 'bgn')]]
  worst = max(bgn_all, key=abs)
  spread = {a: float(np.log10(max(lad[a][deepest]['bgn']['norms'])
                              / min(lad[a][deepest]['bgn']['norms']))) for a in acts}
  var_ratio = {k: _log10_ratio(v['norms']) for k, v in var.items()}
  k_every = int(c.variants.every_k.get('bgn_every', 1)) if 'every_k' in c.variants else 1
  non_k = [k for k in var_ratio if k not in ('none', 'every_k')]
  seg = (k_every - 1) * math.log10(per_layer_factor(var['none']['norms']))
  claims = [
      Claim(claim='Without BGN the first layers of a deep plain MLP receive a vanishing weight '
                  'gradient: saturating activations lose tens of orders of magnitude by depth '
                  f'{deepest} (log10 first/last ratio, ' + ' / '.join(acts) + ')',
            paper_value='vanishing gradients in very deep networks (abstract)',
            measured=' / '.join(f'{last[(a, "none")]:.1f}' for a in acts),
            unit=f'log10 ratio at depth {deepest}', scale=scale,
            verdict=verdict_from([last[(a, 'none')] < -10 for a in saturating]
                                 or [min(last[(a, 'none')] for a in acts) < -10]),
            note='per-layer factor (geometric mean) ' + ', '.join(
                f'{a} {factor[a]:.3f}' for a in acts) + f'; depths {depths}, width {c.width}, '
                'LeCun-normal init (He for ReLU), float64 gradients. Figure bgn_init.png.'),
      Claim(claim='With a BGN node after every hidden layer the first/last weight-gradient ratio '
                  'is O(1) at every depth and activation (largest |log10 ratio|)',
            paper_value='a well-scaled gradient that reaches the deepest layers (abstract)',
            measured=round(abs(worst), 3), unit='max |log10 ratio| over depths x activations',
            scale=scale, verdict=verdict_from([abs(r) <= ORDER_ONE for r in bgn_all]),
            note='log10 ratio with BGN / without, per depth ' + str(depths) + ': ' + '; '.join(
                f'{a} ' + ', '.join(f'{r:.2f}' for r in ratio[(a, 'bgn')]) + ' / ' + ', '.join(
                    f'{r:.2f}' for r in ratio[(a, 'none')]) for a in acts)
                 + f'; log10(max/min) over all layers at depth {deepest} with BGN: '
                 + ', '.join(f'{a} {spread[a]:.2f}' for a in acts) + '. Same parameters with and '
                 'without BGN (it has none).'),
      Claim(claim='The O(1) gradient flow holds under each reconstruction choice of norm axes, '
                  'target and position; a node every k layers leaves the decay within each '
                  f'segment (log10 ratio at depth {i.variant_depth}, {i.variant_activation})',
            paper_value='not specified (reconstruction choices)',
            measured=', '.join(f'{k} {v:.2f}' for k, v in var_ratio.items()),
            unit='log10 first/last ratio', scale=scale,
            verdict=verdict_from([abs(var_ratio[k]) <= ORDER_ONE for k in non_k]
                                 + ([var_ratio['every_k'] > var_ratio['none'] + 3]
                                    if 'every_k' in var_ratio else [])),
            note=(f'every_k puts a node every {k_every} layers: the expected decay within a '
                  f'segment is (per-layer factor)^(k-1) = {seg:.1f} decades. '
                  if 'every_k' in var_ratio else '')
                 + "'unit' divides the default's gradient by sqrt(width) at every node, which "
                   'leaves every ratio unchanged; per_batch rescales each layer\'s whole gradient '
                   'by one number, keeping the per-example weighting of the loss.'),
  ]
  return claims


# -- Part 2: training on real data -----------------------------------------------------------------

def run_config(c, dataset: str, depth: int, activation: str, arm: str, learning_rate: float,
               steps: int):
  """The training config of one run: a plain MLP (``arm``: 'none' or a key of ``variants``)."""
  from jaxnorm.training.config import model_config

  t = copy.deepcopy(c.train)
  t.dataset = dataset
  t.eval_batch_size = {'digits': 304, 'mnist_subset': 1000}.get(dataset, t.eval_batch_size)
  kw = {} if arm == 'none' else dict(c.variants[arm])
  t.model = model_config('MLP', depth=depth, width=c.width, activation=activation, **kw)
  t.optimizer.learning_rate = float(learning_rate)
  t.total_steps = int(steps)
  # Intermediate checkpoints only where the gradients during training are measured.
  measured = dataset == c.init.dataset and depth == c.ladder.gradient_depth
  n = c.ladder.checkpoints if measured else 1
  t.checkpoint_every = max(1, t.total_steps // n)
  t.keep_checkpoints = n + 1
  t.log_every = min(t.log_every, t.total_steps)
  t.seed = c.seed
  return t


def _grid(c, arm: str, base=None) -> list[float]:
  """The learning rates of ``arm``: the plain grid, or the BGN grid (``base``) times its factor."""
  lrs = c.ladder.learning_rates
  if arm == 'none':
    return [float(v) for v in lrs['none']]
  base = lrs['bgn'] if base is None else base
  return [float(v) * float(c.lr_factors.get(arm, 1.0)) for v in base]


def _ladder_runs(c) -> dict:
  """``{(dataset, activation, depth, arm, lr): (name, config)}`` of the depth ladder."""
  lad = c.ladder
  out = {}
  for k, ds in enumerate(lad.datasets):
    for act in lad.activations[k]:
      for depth in lad.depths[k]:
        for arm in ('none', 'bgn'):
          for lr in _grid(c, arm):
            out[(ds, act, depth, arm, lr)] = (
                f'ladder/{ds}/{act}/d{depth}/{arm}/{_lr_name(lr)}',
                run_config(c, ds, depth, act, arm, lr, lad.steps[k]))
  return out


def _steps_of(c, dataset: str) -> int:
  return int(c.ladder.steps[list(c.ladder.datasets).index(dataset)])


def _choice_runs(c) -> dict:
  """``{(arm, lr): (name, config)}``: every reconstruction choice at one setting, and the plain."""
  ch = c.choices
  steps = _steps_of(c, ch.dataset)
  out = {}
  for arm in ('none', 'bgn', *ch.variants):
    for lr in _grid(c, arm, None if arm in ('none', 'bgn') else ch.learning_rates):
      out[(arm, lr)] = (f'choices/{ch.dataset}/{ch.activation}/d{ch.depth}/{arm}/{_lr_name(lr)}',
                        run_config(c, ch.dataset, ch.depth, ch.activation, arm, lr, steps))
  return out


def _best(runs: dict) -> dict:
  """The run of best test accuracy over a ``{lr: summary}`` grid (diverged runs count as 0)."""
  best = None
  for lr, s in runs.items():
    acc = 0.0 if s['diverged'] else np.nan_to_num(as_float(s.get('eval_accuracy')))
    if best is None or acc > best['test']:
      train = 0.0 if s['diverged'] else np.nan_to_num(as_float(s.get('train_accuracy')))
      best = {'lr': float(lr), 'test': float(acc), 'train': float(train),
              'diverged': bool(s['diverged']), 'summary': s}
  best['diverged_lrs'] = sum(bool(s['diverged']) for s in runs.values())
  best['grid'] = {str(lr): 0.0 if s['diverged'] else float(np.nan_to_num(
      as_float(s.get('eval_accuracy')))) for lr, s in runs.items()}
  return best


def _lr_note(best: dict) -> str:
  """The best learning rate, starred when it is at an end of a grid of several (not bracketed)."""
  grid = [float(v) for v in best['grid']]
  edge = len(grid) > 1 and best['lr'] in (min(grid), max(grid))
  return f'{best["lr"]:g}' + ('*' if edge else '')


def _checkpoint_norms(c, study: StudyDir, cfg, summary) -> list[dict]:
  """``||dL/dW_l||`` on the fixed init batch at every checkpoint of a run (None = init)."""
  b = _batch(c, cfg.dataset, c.init.batch_size)
  model, states = study.run_states(cfg, summary)
  rows = []
  for step, state in states:
    loss, norms = weight_grad_norms(model, state.params, b['image'], b['label'])
    rows.append({'step': step, 'loss': loss, 'norms': norms})
  return rows


def _ladder_part(c, study: StudyDir) -> dict:
  from jaxnorm.training import workdir as workdir_lib

  runs = _ladder_runs(c)
  res: dict = {}
  for (ds, act, depth, arm, lr), (name, cfg) in runs.items():
    res.setdefault(ds, {}).setdefault(act, {}).setdefault(str(depth), {}).setdefault(
        arm, {})[str(lr)] = study.train(name, cfg)
  best = {ds: {act: {d: {arm: _best(g) for arm, g in by_arm.items()}
                     for d, by_arm in by_depth.items()} for act, by_depth in by_act.items()}
          for ds, by_act in res.items()}
  grads = {}
  ds = c.init.dataset
  depth = str(c.ladder.gradient_depth)
  for act, by_depth in best.get(ds, {}).items():
    for arm, b in by_depth.get(depth, {}).items():
      cfg = runs[(ds, act, int(depth), arm, b['lr'])][1]
      grads[f'{act}/{arm}'] = study.part(
          f'ladder/{ds}/{act}/d{depth}/{arm}/gradients',
          lambda cfg=cfg, s=b['summary']: _checkpoint_norms(c, study, cfg, s),
          key=[workdir_lib.config_json(cfg), c.init.dataset, c.init.batch_size])
  return {'best': best, 'gradients': grads}


def _ladder_claims(c, study: StudyDir, m: dict) -> list[Claim]:
  from jaxnorm.studies.figures import save_panels

  best = m['best']
  panels = []
  for ds, by_act in best.items():
    lines = []
    for act, by_depth in by_act.items():
      depths = sorted(int(d) for d in by_depth)
      for arm, style in (('none', 'o-'), ('bgn', 's--')):
        lines.append(dict(x=depths, y=[by_depth[str(d)][arm]['test'] for d in depths],
                          label=f'{act} {"BGN" if arm == "bgn" else "plain"}', style=style))
    panels.append(dict(title=f'{ds}: best test accuracy over the lr grid (0 = diverged)',
                       xlabel='hidden layers', ylabel='test accuracy', lines=lines))
  for key, rows in m['gradients'].items():
    lines = [dict(x=np.arange(1, len(r['norms']) + 1), y=r['norms'], label=f'step {r["step"]}',
                  style='-') for r in rows]
    panels.append(dict(title=f'{c.init.dataset}, {key}, {c.ladder.gradient_depth} layers: '
                             '||dL/dW_l| during training', xlabel='layer l',
                       ylabel='weight-gradient norm', logy=True, lines=lines))
  save_panels(study.figure('bgn_training'), panels, ncols=2,
              suptitle=f'Plain MLPs (width {c.width}) with and without BGN, SGD + momentum')

  conds = []
  for ds, by_act in best.items():
    for act, by_depth in by_act.items():
      for d, arms in by_depth.items():
        conds.append((ds, act, int(d), arms['none'], arms['bgn']))
  conds.sort(key=lambda r: (r[0], r[1], r[2]))
  gain = [(ds, act, d, 100 * (b['test'] - n['test'])) for ds, act, d, n, b in conds]
  better = [g for g, r in zip(gain, conds, strict=True)
            if g[3] >= 100 * IMPROVES and r[4]['test'] >= TRAINS]
  worse = [g for g in gain if g[3] <= -100 * IMPROVES]

  def fmt(g):
    return f'{g[0]} {g[1]} d{g[2]} {g[3]:+.1f}'

  scale = study.scale
  grids = (' / '.join(f'{g:g}' for g in _grid(c, 'none')) + ' plain, '
           + ' / '.join(f'{g:g}' for g in _grid(c, 'bgn')) + ' BGN')
  table = '; '.join(f'{ds} {act} d{d}: plain {100 * n["test"]:.1f}% (train {100 * n["train"]:.1f}'
                    f'%, lr {_lr_note(n)}) vs BGN {100 * b["test"]:.1f}% (train '
                    f'{100 * b["train"]:.1f}%, lr {_lr_note(b)})' for ds, act, d, n, b in conds)
  claims = [Claim(
      claim='BGN improves the test accuracy of deep plain MLPs in several conditions (conditions '
            f'where BGN is >= {100 * IMPROVES:g} points better and >= {100 * TRAINS:g}%, of all '
            'data set x activation x depth conditions)',
      paper_value='"improving network accuracy on several experimental conditions" (abstract)',
      measured=f'{len(better)} of {len(gain)}', unit='conditions improved', scale=scale,
      verdict=verdict_from([len(better) >= 2, len(better) > len(worse)]),
      note='better: ' + (', '.join(fmt(g) for g in better) or 'none') + '; worse: '
           + (', '.join(fmt(g) for g in worse) or 'none') + '; points of test accuracy, each '
           f'arm at the best lr of its own grid ({grids}; * = at the grid\'s edge), train '
           f'accuracy over the last {c.train.log_every} steps. {table}. Figure '
           'bgn_training.png.')]

  gr = m['gradients']
  if gr:
    def ratios(key):
      return [_log10_ratio(r['norms']) for r in gr[key]]

    with_bgn = {k: ratios(k) for k in gr if k.endswith('/bgn')}
    without = {k: ratios(k) for k in gr if k.endswith('/none')}
    worst_bgn = max((abs(r) for v in with_bgn.values() for r in v), default=float('nan'))
    sat = [k for k in without if k.split('/')[0] in ('sigmoid', 'tanh')]
    claims.append(Claim(
        claim='During training BGN keeps the first/last weight-gradient ratio O(1) at every '
              'checkpoint, while without it the first layers of saturating networks keep a '
              'vanishing gradient (log10 ratio, max |.| with BGN; min over checkpoints without)',
        paper_value='no vanishing or explosion while training (abstract)',
        measured=f'{worst_bgn:.2f} / ' + ', '.join(f'{k.split("/")[0]} {min(v):.1f}'
                                                   for k, v in without.items()),
        unit='log10 ratio (BGN / plain)', scale=scale,
        verdict=verdict_from([worst_bgn <= ORDER_ONE]
                             + [max(without[k]) < -ORDER_ONE for k in sat]),
        note=f'{c.init.dataset}, {c.ladder.gradient_depth} layers, the best-lr run of each arm, '
             f'checkpoints every {_steps_of(c, c.init.dataset) // c.ladder.checkpoints} steps, '
             'on the fixed '
             'batch of the init measurement; per run log10 ratios: ' + '; '.join(
                 f'{k} ' + ', '.join(f'{r:.1f}' for r in ratios(k)) for k in gr) + '.'))
  return claims


def _choices_part(c, study: StudyDir) -> dict:
  res: dict = {}
  for (arm, lr), (name, cfg) in _choice_runs(c).items():
    res.setdefault(arm, {})[str(lr)] = study.train(name, cfg)
  return {arm: _best(g) for arm, g in res.items()}


def _choices_claims(c, study: StudyDir, m: dict) -> list[Claim]:
  from jaxnorm.studies.figures import save_panels

  ch = c.choices
  arms = list(m)
  x = np.arange(len(arms))
  save_panels(study.figure('bgn_choices'), [
      dict(title=f'{ch.dataset}, {ch.activation}, {ch.depth} layers: best over the lr grid',
           xlabel=', '.join(f'{i} {a}' for i, a in enumerate(arms)), ylabel='accuracy',
           lines=[dict(x=x, y=[m[a]['test'] for a in arms], label='test', style='o-'),
                  dict(x=x, y=[m[a]['train'] for a in arms], label='train', style='s--')]),
      dict(title='test accuracy against the learning rate (0 = diverged)', xlabel='learning rate',
           ylabel='test accuracy', logx=True,
           lines=[dict(x=[float(k) for k in sorted(m[a]['grid'], key=float)],
                       y=[m[a]['grid'][k] for k in sorted(m[a]['grid'], key=float)], label=a,
                       style='o-') for a in arms])],
      ncols=2, suptitle='BGN reconstruction choices (SGD + momentum)')
  plain = m['none']['test']
  others = [a for a in arms if a != 'none']
  return [Claim(
      claim=f'The accuracy gain over the plain network ({ch.dataset}, {ch.activation}, '
            f'{ch.depth} layers) holds under each BGN reconstruction choice (test accuracy '
            'minus plain, in points)',
      paper_value='not specified (reconstruction choices)',
      measured=', '.join(f'{a} {100 * (m[a]["test"] - plain):+.1f}' for a in others),
      unit='accuracy points vs plain', scale=study.scale,
      verdict=verdict_from([m[a]['test'] >= plain + IMPROVES and m[a]['test'] >= TRAINS
                            for a in others]),
      note=f'plain {100 * plain:.1f}% (lr {_lr_note(m["none"])}); '
           + ', '.join(f'{a} {100 * m[a]["test"]:.1f}% (lr {_lr_note(m[a])}'
                       + (f', {m[a]["diverged_lrs"]} lr diverged' if m[a]['diverged_lrs'] else '')
                       + ')' for a in others)
           + '. Choices: ' + ', '.join(f'{a} = {dict(c.variants[a])}' for a in others
                                        if a in c.variants)
           + '. Figure bgn_choices.png.')]


def run_configs(c) -> dict:
  """Every training run of the study at ``c.scale``, by run name."""
  out = {name: cfg for name, cfg in _ladder_runs(c).values()}
  out.update({name: cfg for name, cfg in _choice_runs(c).values()})
  return out


def run(c, study: StudyDir) -> list[Claim]:
  """The BGN study; returns its claims."""
  claims = _init_claims(c, study, _init_part(c, study))
  claims += _ladder_claims(c, study, _ladder_part(c, study))
  claims += _choices_claims(c, study, _choices_part(c, study))
  return claims
