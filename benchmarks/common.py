"""What every benchmark section shares: sizes (full / smoke), data, init and SGD training steps.

A training step is the whole of one optimizer update: forward in training mode (batch statistics),
softmax cross-entropy, backward, SGD with momentum 0.9, new parameters and running statistics. It
is one jitted function of ``(params, state, opt_state, x, y)``, timed on fixed inputs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from benchmarks.timing import Measurement, Table, mib, verdict


@dataclasses.dataclass(frozen=True)
class Sizes:
  """Problem sizes and repeat counts of one run (``FULL`` or ``SMOKE``)."""

  smoke: bool
  repeats: int
  warmup: int
  batch: int  # CIFAR ResNet batch (128 in the issue).
  width: int  # CIFAR ResNet first-stage width (16 in He et al.).
  image: int  # CIFAR image side (32).
  resnet20: int  # depth of the "ResNet-20" of the issue (8 = ResNet-8 in smoke mode).
  resnet56: int  # depth of the "ResNet-56".
  mlp_depth: int  # depth of the "50-layer MLP".


FULL = Sizes(smoke=False, repeats=3, warmup=1, batch=128, width=16, image=32, resnet20=20,
             resnet56=56, mlp_depth=50)
SMOKE = Sizes(smoke=True, repeats=1, warmup=0, batch=4, width=4, image=8, resnet20=8,
              resnet56=8, mlp_depth=4)


# id(table) -> its Markdown when last logged: run.py logs a table again if rows came after.
_EMITTED: dict[int, str] = {}
_EMIT = [None]


def emit(table: Table) -> Table:
  """Logs a finished table at once (``run.py`` installs the logger), so a long run that is
  interrupted still leaves every table it finished. Returns the table."""
  if _EMIT[0] is not None:
    text = table.to_markdown()
    _EMIT[0](text)
    _EMITTED[id(table)] = text
  return table


def cifar_batch(batch: int, image: int, num_classes: int = 10, seed: int = 0):
  """A fixed random CIFAR-shaped batch ``(x: (B, H, W, 3) float32, y: (B,) int32)``."""
  kx, ky = jax.random.split(jax.random.PRNGKey(seed))
  x = jax.random.normal(kx, (batch, image, image, 3), jnp.float32)
  y = jax.random.randint(ky, (batch,), 0, num_classes)
  return x, y


def init_variables(model: nn.Module, x, **kwargs) -> dict[str, Any]:
  """Jitted ``model.init`` on the first two examples (parameters do not depend on the batch)."""
  init = jax.jit(lambda k, xs: model.init(k, xs, train=False, **kwargs))
  return jax.device_get(init(jax.random.PRNGKey(0), x[:2]))


def make_train_step(model: nn.Module, lr: float = 0.1, momentum: float = 0.9) -> tuple[
    Callable[..., Any], optax.GradientTransformation]:
  """An SGD-with-momentum training step of a linen classifier called as ``apply(v, x, train)``.

  Returns:
    ``(step, tx)``; ``step(params, state, opt_state, x, y) -> (params, state, opt_state, loss)``
    where ``state`` holds every non-param collection the model updates in training
    (``batch_stats``; empty for normalizer-free models).
  """
  tx = optax.sgd(lr, momentum=momentum)

  def step(params, state, opt_state, x, y):
    def loss_fn(p):
      logits, new_state = model.apply({'params': p, **state}, x, train=True,
                                      mutable=list(state))
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
      return loss, new_state

    (loss, new_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), dict(new_state), opt_state, loss

  return step, tx


def train_step_candidate(model: nn.Module, x, y, variables=None) -> tuple[Callable, tuple]:
  """``(step, args)`` for ``timing.interleaved``: the model's training step on ``(x, y)``."""
  if variables is None:
    variables = init_variables(model, x)
  params = variables['params']
  state = {k: v for k, v in variables.items()
           if k not in ('params', 'intermediates', 'perturbations')}
  step, tx = make_train_step(model)
  return step, (params, state, tx.init(params), x, y)


def ratio_rows(results: dict[str, Measurement], baseline: str, target: float | None = None,
               memory: bool = True, label: str = '') -> list[list[Any]]:
  """Table rows: candidate, median ms, +/- ms, ratio vs baseline, [peak MiB], compile s, verdict.

  The baseline row's verdict is 'baseline'; other rows get met / missed against ``target`` (or
  '' with no target).
  """
  base = results[baseline].median_s
  rows = []
  for name, m in results.items():
    ratio = m.median_s / base
    v = 'baseline' if name == baseline else (verdict(ratio, target) if target else '')
    row = [f'{label}{name}', m.median_s * 1e3, m.spread_s * 1e3, ratio]
    if memory:
      row.append(mib(m.peak_bytes))
    row += [m.compile_s, v]
    rows.append(row)
  return rows


RATIO_COLUMNS = ['candidate', 'median ms', '+/- ms', 'x baseline', 'XLA peak MiB', 'compile s',
                 'target']


def new_table(title: str, sizes: Sizes, notes: list[str], memory: bool = True) -> Table:
  """A table with the standard ratio columns and a note on the sizes used."""
  cols = list(RATIO_COLUMNS) if memory else [c for c in RATIO_COLUMNS if c != 'XLA peak MiB']
  extra = (f'SMOKE sizes (batch {sizes.batch}, width {sizes.width}, {sizes.image}x{sizes.image}, '
           f'ResNet-{sizes.resnet20} for ResNet-20/56, MLP-{sizes.mlp_depth}); numbers are '
           'meaningless') if sizes.smoke else None
  return Table(title=title, columns=cols, notes=([extra] if extra else []) + notes)
