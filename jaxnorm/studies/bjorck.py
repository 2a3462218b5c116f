r"""Bjorck, Gomes, Selman & Weinberger (2018): BatchNorm helps because it allows larger steps.

The study of ``experiments/configs/bjorck.py`` (``python -m experiments.reproduce
--paper=bjorck``). The paper's argument, measured here on He et al.'s CIFAR ResNet with
BatchNorm (BN) and without normalization:

- trained at the same small learning rate, the two networks end up alike; BN's gain comes from
  the larger rate it allows (runs at 0.1, 0.003, 0.0001 with BN; at 0.0001 without, and at 0.1,
  where the unnormalized network diverges);
- the relative loss of one gradient step of size :math:`\eta` on a fixed mini-batch :math:`B`,

  .. math::

    \rho(\eta) = \frac{L_B(\theta - \eta \nabla L_B(\theta))}{L_B(\theta)},

  exceeds :math:`10^3` (the step "diverges") at step sizes one to two orders of magnitude
  smaller without BN (``jaxnorm.diagnostics.relative_loss_sweep``);
- without BN the activations grow with depth, explode in the deep layers along a large step, the
  output gradient is dominated by one class for every input, and the gradients at
  initialization are heavy-tailed;
- products of :math:`M` Gaussian matrices have a largest singular value tending to
  :math:`\sqrt{(M+1)^{M+1}/M^M}` while most singular values shrink towards 0; the layer
  Jacobians of the real networks are compared with that picture;
- and, as a question the paper raises: how much of BN's benefit BN in the last blocks alone
  (``ResNet.norm_last_blocks``) recovers.

References:
  Bjorck, Gomes, Selman & Weinberger (2018), "Understanding Batch Normalization", NeurIPS 2018,
  arXiv:1806.02375, https://arxiv.org/abs/1806.02375.
  He, Zhang, Ren & Sun (2016), "Deep Residual Learning for Image Recognition", arXiv:1512.03385
  (the CIFAR ResNet-110).
"""

from __future__ import annotations

import copy
import json
import math
import os

import numpy as np

from jaxnorm.functional._checks import fail
from jaxnorm.studies.harness import Claim, StudyDir, as_float, load_states, verdict_from

_LAYER = 'jaxnorm.studies.bjorck'
PAPER_ARXIV = 'arXiv:1806.02375'
RESNET110_BLOCKS = 54  # the paper's network: 3 stages of 18 basic blocks (109 conv layers)
NAMES = {'bn': 'BatchNorm', 'none': 'no normalization'}


def _label(variant: str) -> str:
  if variant.startswith('last'):
    return f'BN in the last {variant[4:]} blocks'
  return NAMES[variant]


def _floats(values) -> np.ndarray:
  """A part's list of numbers (non-finite ones stored as strings) as a float64 array."""
  return np.asarray(_nested_floats(values), np.float64)


def _nested_floats(values):
  if isinstance(values, (list, tuple)):
    return [_nested_floats(v) for v in values]
  return as_float(values)


def _num_classes(c) -> int:
  return {'cifar100': 100, 'imagenet2012': 1000}.get(c.train.dataset, 10)


def _lr_name(lr: float) -> str:
  return f'lr{lr:g}'


# -- Runs ------------------------------------------------------------------------------------------

def model_kwargs(c, variant: str) -> dict:
  """The ``cifar_resnet`` keywords of ``variant``: 'bn', 'none' or 'last<k>' (BN in the last k)."""
  kw = dict(depth=c.model.depth, width=c.model.width, style=c.model.style)
  if variant == 'bn':
    return dict(kw, norm='batch_norm')
  if variant == 'none':
    return dict(kw, norm='none')
  if variant.startswith('last'):
    return dict(kw, norm='batch_norm', norm_last_blocks=int(variant[4:]))
  fail(_LAYER, 'variant', "'bn', 'none' or 'last<k>'", repr(variant))


def run_config(c, variant: str, learning_rate: float):
  """The training config of ``variant`` at ``learning_rate`` (``c.train`` otherwise)."""
  from jaxnorm.training.config import model_config

  t = copy.deepcopy(c.train)
  t.model = model_config('cifar_resnet', **model_kwargs(c, variant))
  t.optimizer.learning_rate = float(learning_rate)
  t.seed = c.seed
  return t


def _runs(c) -> dict:
  """``{run name: (variant, learning rate)}`` of every training run."""
  out = {}
  for lr in c.runs.bn_learning_rates:
    out[f'train/bn/{_lr_name(lr)}'] = ('bn', float(lr))
  for lr in c.runs.none_learning_rates:
    out[f'train/none/{_lr_name(lr)}'] = ('none', float(lr))
  for k in c.last.blocks:
    for lr in c.last.learning_rates:
      out[f'train/last{k}/{_lr_name(lr)}'] = (f'last{k}', float(lr))
  return out


def run_configs(c) -> dict:
  """Every training run of the study at ``c.scale``, by run name."""
  return {name: run_config(c, v, lr) for name, (v, lr) in _runs(c).items()}


def _variant_learning_rate(c, variant: str) -> float:
  """The rate of a variant's training steps before the sweep (``measure.trajectory_rates``)."""
  return float(c.measure.trajectory_rates['last' if variant.startswith('last') else variant])


# -- Measurement set-up ----------------------------------------------------------------------------

class _Context:
  """A variant's model, its initial variables (as its training run starts) and training batches."""

  def __init__(self, c, variant: str):
    import jax

    from jaxnorm.training import BatchIterator, load_dataset

    self.variant = variant
    self.cfg = run_config(c, variant, _variant_learning_rate(c, variant))
    cfg = self.cfg
    self.ds = load_dataset(cfg.dataset, 'train', data_dir=cfg.data_dir or None,
                           image_size=cfg.image_size)
    it = BatchIterator(self.ds, cfg.batch_size, seed=cfg.seed, train=cfg.augment)
    self.batches = [it.batch(i) for i in range(max(c.measure.sweep_batches))]
    # The run's own initial state (the jitted init of jaxnorm.training.train: with a persistent
    # compilation cache its executable is shared with the run's).
    # On the host: the state is replicated over every device, the measurements run on one.
    self.model, (state,) = load_states(cfg, None, [None])
    self.variables = jax.device_get(state.variables)
    self.rest = {k: v for k, v in self.variables.items() if k != 'params'}

  def loss_fn(self):
    from jaxnorm import diagnostics as D

    return D.classification_loss_fn(self.model, self.variables, train=True)


def _contexts(c):
  cache = {}

  def get(variant):
    if variant not in cache:
      cache[variant] = _Context(c, variant)
    return cache[variant]

  return get


def layer_blocks(num_blocks: int, layers) -> list[int]:
  """The 1-based blocks holding conv ``layers`` of ResNet-110, at proportional depth.

  In ResNet-110 layer 1 is the stem conv and block ``j`` holds layers ``2j`` and ``2j + 1``, so
  layer ``l`` is in block ``ceil((l - 1) / 2)`` of 54; a net of ``num_blocks`` blocks takes the
  same fraction of its depth.
  """
  return [min(num_blocks, max(1, math.ceil((lay - 1) / 2 * num_blocks / RESNET110_BLOCKS)))
          for lay in layers]


# -- Part: relative-loss sweeps --------------------------------------------------------------------

def _trajectory(ctx, learning_rate: float, steps: int):
  """The parameters at the start of training steps 1 .. ``steps`` at ``learning_rate``.

  Takes the run's optimizer (``jaxnorm.training.optim.optimizer_from_config``) at a constant
  rate on the run's first mini-batches. Returns the stacked params (leading axis = step).
  """
  import jax
  import jax.numpy as jnp
  import optax

  from jaxnorm.training import optim

  params = ctx.variables['params']
  if steps == 1:
    return jax.tree.map(lambda a: a[None], params)
  tx = optim.optimizer_from_config(ctx.cfg.optimizer, optax.constant_schedule(learning_rate))
  model, mutable = ctx.model, list(ctx.rest)
  xs = jnp.stack([b['image'] for b in ctx.batches[:steps - 1]])
  ys = jnp.stack([b['label'] for b in ctx.batches[:steps - 1]])

  @jax.jit
  def run(params, rest, xs, ys):
    def step(carry, xy):
      p, r, s = carry

      def loss(p):
        out = model.apply({**r, 'params': p}, xy[0], train=True, mutable=mutable or False)
        logits, new = (out if mutable else (out, r))
        ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), xy[1])
        return ce.mean(), dict(new)

      (_, new), g = jax.value_and_grad(loss, has_aux=True)(p)
      updates, s = tx.update(g, s, p)
      return (optax.apply_updates(p, updates), new, s), p

    (last, _, _), ps = jax.lax.scan(step, (params, rest, tx.init(params)), (xs, ys))
    return jax.tree.map(lambda a, b: jnp.concatenate([a, b[None]]), ps, last)

  return run(params, ctx.rest, xs, ys)


def _sweep_measure(c, ctx) -> dict:
  """Relative loss on training mini-batches ``sweep_batches`` at the parameters reached there.

  All batches share one compiled sweep: ``relative_loss_sweep`` gets the stacked parameters of
  every batch and a loss that picks batch ``i``'s own (its gradient w.r.t. the others is zero, so
  the step moves only them).
  """
  import jax

  from jaxnorm import diagnostics as D

  m = c.measure
  lr = _variant_learning_rate(c, ctx.variant)
  ks = [int(k) for k in m.sweep_batches]
  traj = _trajectory(ctx, lr, max(ks))
  stacked = jax.tree.map(lambda a: a[np.asarray([k - 1 for k in ks])], traj)
  base = ctx.loss_fn()

  def loss(p_all, batch):
    i, x, y = batch
    return base(jax.tree.map(lambda a: a[i], p_all), (x, y))

  batches = [(np.int32(i), ctx.batches[k - 1]['image'], ctx.batches[k - 1]['label'])
             for i, k in enumerate(ks)]
  etas, ratios = D.relative_loss_sweep(loss, stacked, batches, num=int(m.num), lo=float(m.lo),
                                       hi=float(m.hi))
  return {'batches': ks, 'learning_rate': lr, 'step_sizes': etas, 'ratios': ratios,
          'divergence': D.divergence_step_size(etas, ratios, m.threshold),
          'divergence_per_batch': [D.divergence_step_size(etas, r, m.threshold) for r in ratios]}


# -- Part: at initialization -----------------------------------------------------------------------

def _conv_kernels(tree) -> list:
  """The conv kernels (4-D leaves) of a param-shaped tree, scanned stacks unstacked."""
  import jax

  from jaxnorm.models import unstack_blocks

  return [a for a in jax.tree.leaves(unstack_blocks(tree)) if np.ndim(a) == 4]


def _middle_kernel(tree, stage_sizes) -> np.ndarray:
  """The first conv kernel of the network's middle block (layer 55 of ResNet-110)."""
  import jax

  from jaxnorm.models import unstack_blocks

  mid = sum(stage_sizes) // 2
  for s, n in enumerate(stage_sizes):
    if mid < n:
      sub = unstack_blocks(tree)[f'stage_{s}'][f'block_{mid}']['conv_0']
      return np.asarray(next(a for a in jax.tree.leaves(sub) if np.ndim(a) == 4))
    mid -= n
  raise AssertionError('unreachable')


def _tail_stats(g) -> dict:
  g = np.asarray(g, np.float64).ravel()
  std = float(g.std())
  z = (g - g.mean()) / std if std > 0 else np.zeros_like(g)
  return {'std': std, 'excess_kurtosis': float(np.mean(z ** 4) - 3.0),
          'max_over_std': float(np.abs(z).max()), 'median_abs': float(np.median(np.abs(g)))}


def _init_measure(c, ctx) -> dict:
  """At init, first training mini-batch: activations along one step, gradients, depth, logits."""
  import jax
  import jax.numpy as jnp

  from jaxnorm import diagnostics as D
  from jaxnorm.models import block_taps
  from jaxnorm.training import BatchIterator

  m = c.measure
  model, rest = ctx.model, ctx.rest
  x, y = ctx.batches[0]['image'], ctx.batches[0]['label']
  blocks = layer_blocks(model.num_blocks, m.layers)
  etas = float(m.step_size) * np.linspace(0.0, 1.0, int(m.fractions))
  base = ctx.loss_fn()

  @jax.jit
  def along(params, x, y, etas):
    loss0, g = jax.value_and_grad(base)(params, (x, y))

    def at(eta):
      p = jax.tree.map(lambda w, d: w - eta * d, params, g)
      _, state = model.apply({**rest, 'params': p}, x, train=True,
                             mutable=['intermediates', *rest])
      taps = block_taps(state['intermediates'], 'skip')
      sel = [taps[b - 1].astype(jnp.float32) for b in blocks]
      return ([a.mean((0, 1, 2)) for a in sel], [a.var((0, 1, 2)) for a in sel],
              base(p, (x, y)))

    means, variances, losses = jax.vmap(at)(etas)
    return means, variances, losses, loss0, g

  means, variances, losses, loss0, grads = jax.device_get(along(ctx.variables['params'], x, y,
                                                                etas))
  mid = _middle_kernel(grads, model.stage_sizes)
  every = np.concatenate([np.ravel(k) for k in _conv_kernels(grads)])
  rng = np.random.default_rng(c.seed)
  keep = min(int(m.histogram_values), mid.size)
  sample = rng.choice(mid.ravel(), keep, replace=False)

  depth = _depth_stats(D.channel_stats_by_depth(model, ctx.variables, x))
  lb = BatchIterator(ctx.ds, min(int(m.logit_batch), len(ctx.ds)), seed=c.seed,
                     train=False).batch(0)
  logit = D.logit_gradient_map(model, ctx.variables, lb['image'], lb['label'])
  return {
      'blocks': blocks, 'num_blocks': model.num_blocks, 'step_size': float(m.step_size),
      'fractions': (etas / float(m.step_size)).tolist(),
      'step_means': [np.asarray(a).T.tolist() for a in means],  # per tap: (C, fractions)
      'step_variances': [np.asarray(a).T.tolist() for a in variances],
      'step_losses': np.asarray(losses).tolist(), 'loss0': float(loss0),
      'grad_middle': _tail_stats(mid), 'grad_all': _tail_stats(every),
      'grad_middle_sample': sample.tolist(),
      'depth': depth,
      'logit_grad': np.asarray(logit['grad']).tolist(),
      'dominant_column': logit['dominant_column'],
      'dominant_column_fraction': logit['dominant_column_fraction'],
      'majority_prediction_fraction': logit['majority_prediction_fraction'],
  }


# -- Part: spectra ---------------------------------------------------------------------------------

def _gaussian_measure(c) -> dict:
  import jax

  from jaxnorm import diagnostics as D
  from jaxnorm.diagnostics import theory

  s = c.spectra
  out = {}
  for i, num in enumerate(s.num_matrices):
    sv = np.asarray(D.gaussian_product_singular_values(
        jax.random.fold_in(jax.random.PRNGKey(c.seed), i), int(s.size), int(num),
        num_samples=int(s.num_samples)), np.float64)
    top = theory.gaussian_product_max_singular_value(int(num))
    edges = np.linspace(0.0, 1.25 * top, 51)
    hist, _ = np.histogram(sv.ravel(), bins=edges, density=True)
    out[str(num)] = {'theory_max': float(top), 'max': sv.max(axis=1).tolist(),
                     'below_tenth_of_max': float(np.mean(sv < 0.1 * top)),
                     'hist': hist.tolist(), 'edges': edges.tolist()}
  return out


def _jacobian_measure(c, ctx) -> dict:
  """Spectra of each first-stage block's Jacobian and of their products, for one example.

  Each block maps example 0 with the rest of a ``jacobian_batch`` batch fixed (train mode: the
  batch statistics see example 0 too), on a ``jacobian_crop``-square centre crop of the stem
  output; the blocks are run in turn on the cropped batch.
  """
  import jax

  from jaxnorm import diagnostics as D
  from jaxnorm.models import ResidualBlock, block_taps, unstack_blocks
  from jaxnorm.models.registry import Layers, make_norm_spec

  s = c.spectra
  model = ctx.model
  x = ctx.batches[0]['image'][:int(s.jacobian_batch)]
  _, state = model.apply(ctx.variables, x, train=True, mutable=['intermediates', *ctx.rest])
  h = block_taps(state['intermediates'], 'stem')[0]
  crop = min(int(s.jacobian_crop), h.shape[1])
  top = (h.shape[1] - crop) // 2
  h = h[:, top:top + crop, top:top + crop]
  unrolled = {k: unstack_blocks(v) for k, v in ctx.variables.items()}
  block = ResidualBlock(layers=Layers(spec=make_norm_spec(model.norm)), features=model.widths[0],
                        style=model.style or 'v1')
  mutable = list(ctx.rest)

  @jax.jit
  def apply(v, batch):  # one compiled block for all blocks (same shapes), and its derivatives
    out = block.apply(v, batch, True, mutable=mutable or False)
    return out[0] if mutable else out

  layers, context = [], h
  for i in range(min(int(s.jacobian_blocks), model.stage_sizes[0])):
    v = {k: t['stage_0'][f'block_{i}'] for k, t in unrolled.items()}
    layers.append(lambda e, v=v, batch=context: apply(v, batch.at[0].set(e))[0])
    context = apply(v, context)
  spectra = D.layer_jacobian_spectra(layers, jax.device_get(h[0]))

  def summary(svs):
    return {'max': [float(a[0]) for a in svs], 'median': [float(np.median(a)) for a in svs],
            'min': [float(a[-1]) for a in svs]}

  return {'dim': int(np.prod(h.shape[1:])), 'layer': summary(spectra['layer']),
          'product': summary(spectra['product']),
          'product_spectra': {str(i + 1): np.asarray(spectra['product'][i]).tolist()
                              for i in sorted({0, len(layers) // 2, len(layers) - 1})}}


# -- Part: training --------------------------------------------------------------------------------

def _train_part(c, study: StudyDir) -> dict:
  from jaxnorm.training import read_metrics

  out = {}
  for name, (variant, lr) in _runs(c).items():
    summary = study.train(name, run_config(c, variant, lr))
    workdir = study.run_dir(summary)
    curve = []
    if os.path.exists(os.path.join(workdir, 'metrics.jsonl')):
      curve = [(r['step'], r['train_loss']) for r in read_metrics(workdir) if 'train_loss' in r]
    out[name] = dict(summary, variant=variant, learning_rate=lr, curve=curve)
  return out


# -- Figures ---------------------------------------------------------------------------------------

def _acc(s) -> float:
  """Test accuracy of a run summary; 0 for a run that diverged."""
  return 0.0 if s['diverged'] else float(np.nan_to_num(as_float(s.get('eval_accuracy'))))


def _figure_training(study, runs: dict):
  from jaxnorm.studies.figures import save_panels

  curves = []
  for r in runs.values():
    if r['curve']:
      steps, losses = zip(*r['curve'], strict=True)
      curves.append(dict(x=steps, y=_floats(list(losses)),
                         label=f'{_label(r["variant"])}, lr {r["learning_rate"]:g}', style='-'))
  bars = []
  for variant in dict.fromkeys(r['variant'] for r in runs.values()):
    rs = sorted((r for r in runs.values() if r['variant'] == variant),
                key=lambda r: r['learning_rate'])
    bars.append(dict(x=[r['learning_rate'] for r in rs], y=[_acc(r) for r in rs],
                     label=_label(variant), style='o-'))
  save_panels(study.figure('bjorck_learning_rates'), [
      dict(title='training loss', xlabel='step', ylabel='train loss', logy=True, lines=curves),
      dict(title='final test accuracy (0 = diverged)', xlabel='learning rate',
           ylabel='test accuracy', logx=True, lines=bars)],
      suptitle='Learning rates with and without BatchNorm')


def _figure_steps(study, sweeps: dict, init: dict, threshold: float):
  """Relative loss over eta; channel statistics along one step of the deepest and shallowest tap."""
  from jaxnorm.studies.figures import save_panels

  lines = []
  for variant, s in sweeps.items():
    etas, ratios = _floats(s['step_sizes']), _floats(s['ratios'])
    for k, r in zip(s['batches'], ratios, strict=True):
      lines.append(dict(x=etas, y=np.where(np.isfinite(r), r, 1e30), label=_label(variant),
                        style='o-' if k == 1 else '-', legend=k == s['batches'][0],
                        alpha=1.0 if k == 1 else 0.6))
  batches = ', '.join(str(k) for k in next(iter(sweeps.values()))['batches'])
  panels = [dict(title=f'L(theta - eta grad) / L(theta), mini-batches {batches}',
                 xlabel='step size eta', ylabel='relative loss (non-finite at 1e30)', logx=True,
                 logy=True, lines=lines,
                 hlines=[dict(y=threshold, label=f'divergence ({threshold:g})')])]
  any_variant = next(iter(init.values()))
  styles = ['-', '--', 'o-']
  for key, what in (('step_variances', 'channel variance'), ('step_means', '|channel mean|')):
    lines = []
    for variant, d in init.items():
      frac = 100 * np.asarray(d['fractions'])
      for j, b in enumerate(d['blocks']):
        vals = np.abs(_floats(d[key][j]))  # (C, fractions)
        lines.append(dict(x=frac, y=np.median(vals, 0), label=f'{_label(variant)}, block {b}',
                          style=styles[j % len(styles)],
                          color='C0' if variant == 'bn' else 'C1'))
    panels.append(dict(title=f'{what} (median over channels) along one step of '
                             f'{any_variant["step_size"]:g}',
                       xlabel='% of the step', ylabel=what, logy=True, lines=lines))
  save_panels(study.figure('bjorck_steps'), panels, ncols=3, width=4.6,
              suptitle=f'One gradient step with and without BatchNorm (blocks of '
                       f'{any_variant["num_blocks"]})')


def _figure_depth(study, init: dict, last_depth: dict):
  from jaxnorm.studies.figures import save_panels

  panels = []
  for key, title in (('log10_abs_mean_quantiles', 'log10 |channel mean|'),
                     ('log10_std_quantiles', 'log10 channel std')):
    lines = []
    for variant, d in {**init, **last_depth}.items():
      q = _floats(d['depth'][key])  # (taps, 3): 10%, 50%, 90% over the live channels
      x = np.arange(len(q))
      lines.append(dict(x=x, y=q[:, 1], label=_label(variant), style='-'))
      for i in (0, 2):
        lines.append(dict(x=x, y=q[:, i], label=_label(variant), style=':', legend=False))
    panels.append(dict(title=f'{title}: median over channels (dotted: 10% and 90%)',
                       xlabel='block (0 = stem)', ylabel=title, lines=lines))
  save_panels(study.figure('bjorck_channel_stats'), panels,
              suptitle='Channel statistics against depth at initialization')


def _figure_init_gradients(study, init: dict):
  """dL/dlogits heat maps (top) and histograms of the middle block's gradients (bottom)."""
  from matplotlib.figure import Figure

  fig = Figure(figsize=(4.4 * len(init), 8.0))
  axes = fig.subplots(2, len(init), squeeze=False)
  for j, (variant, d) in enumerate(init.items()):
    ax = axes[0, j]
    g = np.asarray(d['logit_grad'])
    lim = np.abs(g).max() or 1.0
    im = ax.imshow(g, aspect='auto', cmap='RdBu_r', vmin=-lim, vmax=lim, interpolation='nearest')
    ax.set_title(f'{_label(variant)}: dL/dlogits, column {d["dominant_column"]} carries '
                 f'{100 * d["dominant_column_fraction"]:.0f}%', fontsize=9)
    ax.set_xlabel('class', fontsize=8)
    ax.set_ylabel('image', fontsize=8)
    fig.colorbar(im, ax=ax)
    ax = axes[1, j]
    ax.hist(np.asarray(d['grad_middle_sample']), bins=60, color=f'C{j}')
    ax.set_yscale('log')
    st = d['grad_middle']
    ax.set_title(f'gradients: std {st["std"]:.2g}, excess kurtosis {st["excess_kurtosis"]:.1f}',
                 fontsize=9)
    ax.set_xlabel('entry of dL/dkernel (middle block, first conv)', fontsize=8)
  fig.suptitle('Output and weight gradients at initialization', fontsize=10)
  fig.tight_layout()
  fig.savefig(study.figure('bjorck_init_gradients'), dpi=100)


def _figure_spectra(study, gauss: dict, jac: dict):
  from jaxnorm.studies.figures import save_panels

  g_lines = []
  for num, d in gauss.items():
    edges = np.asarray(d['edges'])
    g_lines.append(dict(x=(edges[1:] + edges[:-1]) / 2, y=d['hist'], label=f'M = {num}',
                        style='-'))
  max_lines = [dict(x=[int(n) for n in gauss], y=[max(d['max']) for d in gauss.values()],
                    label='measured', style='o-'),
               dict(x=[int(n) for n in gauss], y=[d['theory_max'] for d in gauss.values()],
                    label='sqrt((M+1)^(M+1) / M^M)', style='--')]
  j_lines = []
  for variant, d in jac.items():
    for key, style in (('max', 'o-'), ('median', '--')):
      y = d['product'][key]
      j_lines.append(dict(x=np.arange(1, len(y) + 1), y=y, label=_label(variant), style=style,
                          legend=key == 'max'))
  s_lines = []
  for variant, d in jac.items():
    blocks = len(d['layer']['max'])
    for k, sv in d['product_spectra'].items():
      sv = np.asarray(sv)
      s_lines.append(dict(x=np.arange(1, len(sv) + 1) / len(sv), y=sv, label=_label(variant),
                          style='-', legend=k == '1', alpha=0.3 + 0.7 * int(k) / blocks))
  save_panels(study.figure('bjorck_spectra'), [
      dict(title='singular values of M Gaussian matrices (density)', xlabel='singular value',
           ylabel='density', logy=True, lines=g_lines),
      dict(title='largest singular value vs theory', xlabel='M', ylabel='largest',
           lines=max_lines),
      dict(title='end-to-end Jacobian of the first blocks (solid: max, dashed: median)',
           xlabel='blocks', ylabel='singular value', logy=True, lines=j_lines),
      dict(title='its spectrum after 1, half, all blocks (darker: more)', xlabel='rank / dim',
           ylabel='singular value', logy=True, lines=s_lines)],
      suptitle='Random-matrix products and the networks\' layer Jacobians')


# -- Claims ----------------------------------------------------------------------------------------

def _training_claims(c, study: StudyDir, runs: dict) -> list[Claim]:
  by = {(r['variant'], r['learning_rate']): r for r in runs.values()}
  bn_lrs = sorted(float(v) for v in c.runs.bn_learning_rates)
  none_lrs = sorted(float(v) for v in c.runs.none_learning_rates)
  scale, claims = study.scale, []
  small = bn_lrs[0]
  if ('bn', small) in by and ('none', small) in by:
    a_bn, a_none = _acc(by[('bn', small)]), _acc(by[('none', small)])
    gap = 100 * (a_bn - a_none)
    # "Alike" means something only if the small rate trains at all in this budget.
    learned = min(a_bn, a_none) >= 2.0 / _num_classes(c)
    claims.append(Claim(
        claim=f'At the same small learning rate ({small:g}) BatchNorm brings no gain (BN minus '
              'no-BN test accuracy)',
        paper_value='about 0: the curves of BN at lr 0.0001 and no BN at lr 0.0001 end alike '
                    '(ResNet-110, CIFAR-10, learning-rate figure)',
        measured=round(gap, 1), unit='accuracy points', scale=scale,
        verdict=verdict_from([abs(gap) <= 5.0, learned]),
        note=f'BN {100 * a_bn:.1f}%, no BN {100 * a_none:.1f}% after {c.train.total_steps} steps '
             f'on {c.train.dataset} (ResNet-{c.model.depth}, width {c.model.width})'
             + ('' if learned else '; at this budget the small rate hardly trains either network '
                '(accuracy below twice chance), so "alike" says little')
             + '. Figure bjorck_learning_rates.png.'))
  if ('bn', bn_lrs[-1]) in by and ('bn', small) in by and len(bn_lrs) > 1:
    big = bn_lrs[-1]
    accs = [_acc(by[('bn', lr)]) for lr in bn_lrs]
    best_none = max((_acc(by[('none', lr)]) for lr in none_lrs if ('none', lr) in by),
                    default=float('nan'))
    gain = 100 * (accs[-1] - accs[0])
    checks = [gain >= 5.0, accs[-1] > best_none + 0.05,
              all(a <= b + 0.01 for a, b in zip(accs, accs[1:], strict=False))]
    if ('none', big) in by:  # the rate BN allows: the unnormalized network cannot train at it
      checks.append(by[('none', big)]['diverged'] or _acc(by[('none', big)]) < accs[-1] - 0.2)
    claims.append(Claim(
        claim=f'BatchNorm\'s gain comes from the larger rate it allows (BN at lr {big:g} minus BN '
              f'at lr {small:g})',
        paper_value='BN at lr 0.1 well above BN at 0.003 and 0.0001 and no BN at 0.0001',
        measured=round(gain, 1), unit='accuracy points', scale=scale,
        verdict=verdict_from(checks),
        note='BN test accuracy at lr ' + ', '.join(
            f'{lr:g}: {100 * a:.1f}%' for lr, a in zip(bn_lrs, accs, strict=True))
             + '; no BN ' + ', '.join(
            f'{lr:g}: ' + (f'diverged at step {by[("none", lr)]["step"]}'
                           if by[('none', lr)]['diverged'] else
                           f'{100 * _acc(by[("none", lr)]):.1f}%')
            for lr in none_lrs if ('none', lr) in by) + '.'))
  return claims


def _sweep_claims(c, study: StudyDir, sweeps: dict) -> list[Claim]:
  bn, none = as_float(sweeps['bn']['divergence']), as_float(sweeps['none']['divergence'])
  hi = float(c.measure.hi)
  ratio = min(bn, hi) / min(none, hi)
  bound = '' if math.isfinite(bn) else f' (lower bound: BN never diverged up to eta = {hi:g})'
  return [Claim(
      claim='Without BatchNorm one gradient step diverges (relative loss > 1e3) at step sizes one '
            'to two orders of magnitude smaller (BN / no-BN divergence step size)',
      paper_value='10 to 100 (relative-loss figure, mini-batches 1, 4, 7)',
      measured=float(f'{ratio:.3g}'), unit='ratio of divergence step sizes', scale=study.scale,
      verdict=verdict_from([ratio >= 10.0]),
      note=f'smallest diverging eta over batches {sweeps["none"]["batches"]}: no BN {none:.3g}, BN '
           f'{bn:.3g}{bound}; theta = the parameters reached there at each network\'s training '
           f'rate (BN {sweeps["bn"]["learning_rate"]:g}, no BN '
           f'{sweeps["none"]["learning_rate"]:g}); eta grid {c.measure.lo:g}..{hi:g}, '
           f'{c.measure.num} points. Figure bjorck_steps.png.')]


def _init_claims(c, study: StudyDir, init: dict) -> list[Claim]:
  scale = study.scale
  bn, none = init['bn'], init['none']
  claims = []

  # Activations along one step: decades of growth of the median channel variance at the first
  # point of the step (10% of it with 11 points); over the whole step (non-finite = overflow).
  def decades(d, j, upto=None):
    med = np.median(np.abs(_floats(d['step_variances'][j])), 0)
    med = np.where(np.isfinite(med), med, np.inf)[:upto]
    return float(np.log10(np.max(med[1:]) / med[0])) if med[0] > 0 else float('inf')

  taps = range(len(bn['blocks']))
  first = [decades(none, j, 2) for j in taps], [decades(bn, j, 2) for j in taps]
  whole = [decades(none, j) for j in taps], [decades(bn, j) for j in taps]
  deep, pct = len(bn['blocks']) - 1, 100 * none['fractions'][1]

  def fmt(v):
    return ', '.join('overflow' if not math.isfinite(x) else f'{x:.2f}' for x in v)

  claims.append(Claim(
      claim='Along one large gradient step the unnormalized network\'s activations explode in '
            f'the deep layers (decades of growth of the median channel variance over {pct:.0f}% '
            'of the step, deepest tap, no BN vs BN)',
      paper_value='means and variances of layer 80 grow by orders of magnitude along the step, '
                  'layer 8 little (no BN; "% of step" figure)',
      measured=f'{first[0][deep]:.1f} vs {first[1][deep]:.2f}', unit='decades', scale=scale,
      verdict=verdict_from([first[0][deep] >= 1.0 + max(first[1][deep], 0.0),
                            first[0][deep] > first[0][0] + 1.0]),
      note=f'step of size {none["step_size"]:g} along -grad on the first training mini-batch at '
           f'init; blocks {none["blocks"]} of {none["num_blocks"]} (layers '
           f'{list(c.measure.layers)} of ResNet-110); decades at {pct:.0f}% of the step: no BN '
           f'{fmt(first[0])}, BN {fmt(first[1])}; largest over the whole step: no BN '
           f'{fmt(whole[0])}, BN {fmt(whole[1])}. Figure bjorck_steps.png.'))

  # Channel statistics against depth.
  def rise(d, key):  # the median channel's, mean over the last third of the taps minus the stem's
    y = _floats(d['depth'][key])[:, 1]
    return float(np.nanmean(y[-max(1, (len(y) - 1) // 3):]) - y[0])

  r_none, r_bn = rise(none, 'log10_std_quantiles'), rise(bn, 'log10_std_quantiles')
  m_none = rise(none, 'log10_abs_mean_quantiles')
  m_bn = rise(bn, 'log10_abs_mean_quantiles')
  dead = max(none['depth']['dead_channels'])
  claims.append(Claim(
      claim='Without BatchNorm channel means and stds grow with depth; with it they stay flat '
            '(rise of the median channel\'s log10 std from the stem to the last third of the '
            'blocks, no BN vs BN)',
      paper_value='steady growth over depth without BN (log-scale depth figure); flat with BN',
      measured=f'{r_none:.2f} vs {r_bn:.2f}', unit='decades', scale=scale,
      verdict=verdict_from([r_none >= 1.0, abs(r_bn) < 0.5 * r_none]),
      note=f'at init on a training batch; the median channel\'s log10 |mean| rises {m_none:.2f} '
           f'(no BN) vs {m_bn:.2f} (BN) decades; medians over the live channels (up to {dead} '
           'channels of a tap are dead relus without BN, at the stage transitions). Figure '
           'bjorck_channel_stats.png.'))

  claims.append(Claim(
      claim='Without BatchNorm the output gradient is dominated by one class column and the '
            'network predicts one class for every input (share of the largest column of '
            'dL/dlogits, no BN vs BN)',
      paper_value='one dominant column without BN (heat map over a batch of 128), none with BN',
      measured=f'{none["dominant_column_fraction"]:.2f} vs {bn["dominant_column_fraction"]:.2f}',
      unit='fraction of squared gradient (1/classes = even)', scale=scale,
      verdict=verdict_from([none['dominant_column_fraction'] >= 0.45,
                            none['majority_prediction_fraction'] >= 0.9,
                            bn['dominant_column_fraction']
                            < 0.6 * none['dominant_column_fraction']]),
      note='a net that predicts one class for every image with certainty puts 1/2 of the squared '
           'gradient in that column (+1 in every row but its own class, against -1 spread over '
           'the true classes); majority-class share of the predictions: no BN '
           f'{none["majority_prediction_fraction"]:.2f}, BN '
           f'{bn["majority_prediction_fraction"]:.2f} over {len(none["logit_grad"])} training '
           'images at init. Figure bjorck_init_gradients.png.'))

  k_none, k_bn = none['grad_middle']['excess_kurtosis'], bn['grad_middle']['excess_kurtosis']
  s_ratio = none['grad_middle']['std'] / bn['grad_middle']['std']
  claims.append(Claim(
      claim='At initialization the unnormalized network\'s gradients are heavy-tailed and much '
            'larger (excess kurtosis of the middle block\'s first-conv gradient, no BN vs BN)',
      paper_value='heavy-tailed, far larger gradients without BN (histograms of layer 55)',
      measured=f'{k_none:.1f} vs {k_bn:.1f}', unit='excess kurtosis (0 = Gaussian)', scale=scale,
      verdict=verdict_from([k_none > max(2 * k_bn, 1.0), s_ratio >= 10]),
      note=f'gradient std ratio no BN / BN {s_ratio:.3g}; over all conv kernels: excess kurtosis '
           f'{none["grad_all"]["excess_kurtosis"]:.1f} vs {bn["grad_all"]["excess_kurtosis"]:.1f},'
           f' max |g| / std {none["grad_all"]["max_over_std"]:.0f} vs '
           f'{bn["grad_all"]["max_over_std"]:.0f}. Figure bjorck_init_gradients.png.'))
  return claims


def _spectra_claims(c, study: StudyDir, gauss: dict, jac: dict) -> list[Claim]:
  scale = study.scale
  dev = {n: max(d['max']) / d['theory_max'] - 1 for n, d in gauss.items()}
  below = {n: d['below_tenth_of_max'] for n, d in gauss.items()}
  nums = sorted(gauss, key=int)
  claims = [Claim(
      claim='The largest singular value of a product of M Gaussian matrices tends to '
            'sqrt((M+1)^(M+1) / M^M) (measured / theory - 1, M = ' + ', '.join(nums) + ')',
      paper_value='2, 3.08, 3.86 for M = 1, 3, 5 (random-matrix section)',
      measured=' / '.join(f'{dev[n]:+.3f}' for n in nums), unit='relative deviation',
      scale=scale,
      verdict=verdict_from([abs(dev[n]) < 0.1 for n in nums]
                           + [below[nums[-1]] > below[nums[0]]]),
      note=f'{c.spectra.num_samples} products of {c.spectra.size}x{c.spectra.size} matrices; '
           'share of singular values below a tenth of the limit: '
           + ', '.join(f'M={n}: {below[n]:.2f}' for n in nums)
           + ' (the mass piles up near 0 as M grows). Figure bjorck_spectra.png.')]
  cond = {v: np.log10(np.asarray(d['product']['max']) / np.asarray(d['product']['median']))
          for v, d in jac.items()}
  smax = {v: np.asarray(d['product']['max']) for v, d in jac.items()}
  nb = len(smax['none'])
  claims.append(Claim(
      claim='Like a product of Gaussian matrices, the unnormalized network\'s end-to-end Jacobian '
            'grows ill-conditioned with depth, more than with BatchNorm (log10 of largest / '
            'median singular value after the first-stage blocks, no BN vs BN)',
      paper_value='products of layer Jacobians behave like products of Gaussians: the spread of '
                  'the singular values grows with depth (random-matrix section)',
      measured=f'{cond["none"][-1]:.2f} vs {cond["bn"][-1]:.2f}', unit='decades',
      scale=scale,
      verdict=verdict_from([cond['none'][-1] > cond['none'][0],
                            cond['none'][-1] > cond['bn'][-1]]),
      note=f'Jacobian of {nb} blocks w.r.t. one {jac["none"]["dim"]}-dim example (batch '
           f'{c.spectra.jacobian_batch}, train mode); largest singular value after 1 / {nb} '
           f'blocks: no BN {smax["none"][0]:.3g} / {smax["none"][-1]:.3g}, BN '
           f'{smax["bn"][0]:.3g} / {smax["bn"][-1]:.3g}. Figure bjorck_spectra.png.'))
  return claims


def _last_claims(c, study: StudyDir, sweeps: dict, runs: dict) -> list[Claim]:
  claims = []
  scale = study.scale
  d_bn, d_none = as_float(sweeps['bn']['divergence']), as_float(sweeps['none']['divergence'])
  hi = float(c.measure.hi)
  bn_lr = float(max(c.runs.bn_learning_rates))
  acc_bn = _acc(next((r for r in runs.values()
                      if r['variant'] == 'bn' and r['learning_rate'] == bn_lr), None)
                or {'diverged': True})
  acc_none = max((_acc(r) for r in runs.values() if r['variant'] == 'none'), default=0.0)
  for k in c.last.blocks:
    v = f'last{k}'
    d_last = as_float(sweeps[v]['divergence'])
    top = math.log10(min(d_bn, hi) / min(d_none, hi))
    got = math.log10(min(d_last, hi) / min(d_none, hi))
    frac = got / top if top > 0 else float('nan')
    rs = [r for r in runs.values() if r['variant'] == v]
    best = max(rs, key=_acc) if rs else None
    note = (f'divergence step size: BN {d_bn:.3g}, BN in the last {k} blocks {d_last:.3g}, no BN '
            f'{d_none:.3g} (log scale; one that never diverged counts at the largest eta, {hi:g}).')
    checks = [frac >= 0.5]
    acc_frac = None
    if best is not None and acc_bn > acc_none:
      # A run that diverged recovers nothing (not less than nothing).
      acc_frac = max(0.0, (_acc(best) - acc_none) / (acc_bn - acc_none))
      checks.append(acc_frac >= 0.5)
      note += (f' Test accuracy: BN in the last {k} blocks '
               + ', '.join(f'{100 * _acc(r):.1f}% at lr {r["learning_rate"]:g}'
                           + (f' (diverged at step {r["step"]})' if r['diverged'] else '')
                           for r in sorted(rs, key=lambda r: -r['learning_rate']))
               + f'; BN {100 * acc_bn:.1f}% (lr {bn_lr:g}), no BN {100 * acc_none:.1f}% (best '
               f'rate): its best rate recovers {acc_frac:.2f} of BN\'s gain.')
    at_bn_rate = [r for r in rs if r['learning_rate'] == bn_lr]
    if at_bn_rate:  # BN's benefit is its large rate: does this network train at it?
      checks.append(not at_bn_rate[0]['diverged'])
    measured = f'{frac:.2f}' + ('' if acc_frac is None else f' / {acc_frac:.2f}')
    claims.append(Claim(
        claim=f'BatchNorm in the last {k} of {3 * ((c.model.depth - 2) // 6)} blocks only '
              'recovers most of BatchNorm\'s benefit (share of the log divergence step size'
              + (' / of the test-accuracy gain' if acc_frac is not None else '')
              + (f'; and it trains at BN\'s rate {bn_lr:g}' if at_bn_rate else '') + ')',
        paper_value='not a number of the paper: the question follows from its finding that the '
                    'deep layers and the output explode without BN',
        measured=measured, unit='fraction of BN\'s benefit (1 = all)', scale=scale,
        verdict=verdict_from(checks),
        note=note + ' Figures bjorck_steps.png, bjorck_learning_rates.png.'))
  return claims


def _full_claim(study: StudyDir) -> list[Claim]:
  if study.scale == 'full':
    return []
  return [Claim(
      claim='ResNet-110 on CIFAR-10 at the paper\'s learning rates (test accuracy of BN at 0.1 / '
            '0.003 / 0.0001 and no BN at 0.0001)',
      paper_value='BN at lr 0.1 best; BN and no BN alike at lr 0.0001 (learning-rate figure)',
      measured=None, unit='% test accuracy', scale=study.scale, verdict='not_run',
      note='needs an accelerator and the TFDS data set: --scale=full.')]


def run(c, study: StudyDir) -> list[Claim]:
  """The Bjorck et al. study; returns its claims."""
  ctx = _contexts(c)
  last = [f'last{k}' for k in c.last.blocks]
  m, seed = c.measure.to_dict(), c.seed

  def key(v, *sections):  # what a part of variant v is computed from
    cfg = run_config(c, v, _variant_learning_rate(c, v))
    return [json.loads(cfg.to_json()), seed, *sections]

  sweeps = {v: study.part(f'sweep/{v}', lambda v=v: _sweep_measure(c, ctx(v)), key=key(v, m))
            for v in ('bn', 'none', *last)}
  init = {v: study.part(f'init/{v}', lambda v=v: _init_measure(c, ctx(v)), key=key(v, m))
          for v in ('bn', 'none')}
  last_depth = {v: study.part(f'depth/{v}', lambda v=v: _depth_measure(ctx(v)), key=key(v))
                for v in last}
  gauss = study.part('spectra/gaussian', lambda: _gaussian_measure(c),
                     key=[c.spectra.to_dict(), seed])
  jac = {v: study.part(f'spectra/jacobian/{v}', lambda v=v: _jacobian_measure(c, ctx(v)),
                       key=key(v, c.spectra.to_dict())) for v in ('bn', 'none')}
  runs = _train_part(c, study)

  _figure_training(study, runs)
  _figure_steps(study, sweeps, init, float(c.measure.threshold))
  _figure_depth(study, init, last_depth)
  _figure_init_gradients(study, init)
  _figure_spectra(study, gauss, jac)

  claims = _training_claims(c, study, runs)
  claims += _sweep_claims(c, study, sweeps)
  claims += _init_claims(c, study, init)
  claims += _spectra_claims(c, study, gauss, jac)
  claims += _last_claims(c, study, sweeps, runs)
  claims += _full_claim(study)
  return claims


def _depth_measure(ctx) -> dict:
  """Channel statistics against depth at init (for the BN-in-the-last-blocks networks)."""
  from jaxnorm import diagnostics as D

  return {'depth': _depth_stats(D.channel_stats_by_depth(ctx.model, ctx.variables,
                                                         ctx.batches[0]['image']))}


def _depth_stats(stats) -> dict:
  """Per tap: ``ChannelStats.log10_summary()`` and quantiles over the live channels.

  A relu channel that is 0 for the whole batch (std 0) enters the summary's mean of log10 at
  -30; the quantiles (10%, 50%, 90% over channels) leave such dead channels out and count them.
  """
  out = {k: v.tolist() for k, v in stats.log10_summary().items()}
  for key, values in (('abs_mean', stats.means), ('std', stats.stds)):
    q = []
    for v, sd in zip(values, stats.stds, strict=True):
      live = np.abs(np.asarray(v, np.float64))[np.asarray(sd) > 0]
      q.append(np.percentile(np.log10(live), (10, 50, 90)).tolist() if live.size else
               [float('nan')] * 3)
    out[f'log10_{key}_quantiles'] = q
  out['dead_channels'] = [int(np.sum(np.asarray(sd) == 0)) for sd in stats.stds]
  return out
