"""Section 6: the ResNet-20 training step in JAX (plain Flax and jaxnorm) against PyTorch, same CPU.

The PyTorch ResNet-20 is written here: He et al.'s CIFAR ResNet-20 (3x3 stem, 3 stages of 3 basic
blocks, widths 16/32/64, BatchNorm after every conv, 1x1-conv + BN projection shortcuts at stage
transitions like ``jaxnorm.models.cifar_resnet``), batch 128, SGD with momentum 0.9, cross
entropy, ``torch.set_num_threads(os.cpu_count())``. JAX and PyTorch steps are called in
interleaved rounds in one process, so they see the same machine load.

(a) the steps side by side; (b) where the time goes (forward only, step without BatchNorm, the
custom-VJP conv on / off); (c) XLA:CPU flags, each in a fresh subprocess (XLA reads ``XLA_FLAGS``
once per process), against PyTorch measured in that same subprocess.

Target: jaxnorm's ResNet-20 step no slower than PyTorch's (<= 1.00x).

PyTorch is optional (the ``bench`` extra); without it this section is skipped with a message.

References: He et al. 2016a §4.2. See BENCHMARKS.md, section 6.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import flax.linen as nn

from benchmarks.common import (
  Sizes,
  cifar_batch,
  emit,
  init_variables,
  new_table,
  ratio_rows,
  train_step_candidate,
)
from benchmarks.resnet20 import SwappableResNet, factory
from benchmarks.timing import Eager, Table, interleaved
from jaxnorm.linen import BatchNorm
from jaxnorm.linen.conv import Conv
from jaxnorm.models import cifar_resnet

TARGET = 1.00
TORCH = 'PyTorch (NCHW)'

# name -> XLA_FLAGS (or other environment) for the flag study; '' = defaults.
FLAG_VARIANTS = {
  'defaults': {},
  '--xla_cpu_use_onednn=true': {'XLA_FLAGS': '--xla_cpu_use_onednn=true'},
  '--xla_cpu_experimental_onednn_custom_call=true': {
    'XLA_FLAGS': '--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_custom_call=true'},
  '--xla_cpu_use_xnnpack=true': {'XLA_FLAGS': '--xla_cpu_use_xnnpack=true'},
  '--xla_cpu_multi_thread_eigen=false': {'XLA_FLAGS': '--xla_cpu_multi_thread_eigen=false'},
  'JAX_DEFAULT_MATMUL_PRECISION=bfloat16': {'JAX_DEFAULT_MATMUL_PRECISION': 'bfloat16'},
}


def torch_available() -> bool:
  try:
    import torch  # noqa: F401, PLC0415
  except ImportError:
    return False
  return True


def torch_resnet20(width: int = 16, num_classes: int = 10, batch_norm: bool = True,
                   depth: int = 20):
  """He et al.'s CIFAR ResNet-20 in PyTorch (projection shortcuts, as jaxnorm's cifar_resnet)."""
  import torch.nn as tnn  # noqa: PLC0415

  def norm(c):
    return tnn.BatchNorm2d(c, momentum=0.1) if batch_norm else tnn.Identity()

  class Block(tnn.Module):
    def __init__(self, cin, cout, stride):
      super().__init__()
      self.a = tnn.Sequential(tnn.Conv2d(cin, cout, 3, stride, 1, bias=not batch_norm),
                              norm(cout), tnn.ReLU(inplace=True),
                              tnn.Conv2d(cout, cout, 3, 1, 1, bias=not batch_norm), norm(cout))
      self.proj = (tnn.Sequential(tnn.Conv2d(cin, cout, 1, stride, 0, bias=not batch_norm),
                                  norm(cout)) if stride != 1 or cin != cout else tnn.Identity())
      self.relu = tnn.ReLU(inplace=True)

    def forward(self, x):
      return self.relu(self.proj(x) + self.a(x))

  layers = [tnn.Conv2d(3, width, 3, 1, 1, bias=not batch_norm), norm(width), tnn.ReLU(True)]
  cin = width
  for mult, stride in ((1, 1), (2, 2), (4, 2)):
    for i in range((depth - 2) // 6):
      layers.append(Block(cin, width * mult, stride if i == 0 else 1))
      cin = width * mult
  layers += [tnn.AdaptiveAvgPool2d(1), tnn.Flatten(), tnn.Linear(cin, num_classes)]
  return tnn.Sequential(*layers)


def torch_step_fn(batch: int, image: int, width: int = 16, channels_last: bool = False,
                  batch_norm: bool = True, forward_only: bool = False, depth: int = 20):
  """A zero-argument PyTorch SGD step (or forward-only pass) on a fixed random batch."""
  import torch  # noqa: PLC0415

  torch.set_num_threads(os.cpu_count())
  torch.manual_seed(0)
  model = torch_resnet20(width, batch_norm=batch_norm, depth=depth).train()
  x = torch.randn(batch, 3, image, image)
  y = torch.randint(0, 10, (batch,))
  if channels_last:
    model = model.to(memory_format=torch.channels_last)
    x = x.contiguous(memory_format=torch.channels_last)
  opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
  loss_fn = torch.nn.CrossEntropyLoss()

  def step():
    if forward_only:
      with torch.no_grad():
        return float(model(x).sum())
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(model(x), y)
    loss.backward()
    opt.step()
    return loss.item()

  return step


def _forward_candidate(model, x):
  variables = init_variables(model, x)

  def fwd(v, x):
    return model.apply(v, x, train=True, mutable=['batch_stats'])[0]

  return fwd, (variables, x)


def _flax(depth, width, norm=True):
  return SwappableResNet(depth, width, conv=factory(nn.Conv, use_bias=not norm),
                         norm=factory(nn.BatchNorm, momentum=0.9) if norm else None)


def _jaxnorm_swappable(depth, width, custom_backward):
  return SwappableResNet(depth, width, conv=factory(Conv, use_bias=False,
                                                 custom_backward=custom_backward),
                         norm=factory(BatchNorm, momentum=0.9))


def _core_candidates(sizes: Sizes, x, y, torch_ok: bool) -> dict:
  cands = {
    'plain Flax (nn.Conv + nn.BatchNorm)': train_step_candidate(
      _flax(sizes.resnet20, sizes.width), x, y),
    'jaxnorm cifar_resnet(20) (default)': train_step_candidate(
      cifar_resnet(sizes.resnet20, width=sizes.width), x, y),
  }
  if torch_ok:
    cands[TORCH] = (Eager(torch_step_fn(sizes.batch, sizes.image, sizes.width,
                                             depth=sizes.resnet20)), ())
  return cands


def measure_variant(sizes: Sizes) -> dict[str, float]:
  """Median step seconds of plain Flax, jaxnorm and PyTorch in this process (flag study)."""
  x, y = cifar_batch(sizes.batch, sizes.image)
  res = interleaved(_core_candidates(sizes, x, y, torch_available()),
                    repeats=max(sizes.repeats - 2, 1), warmup=sizes.warmup)
  return {n: m.median_s for n, m in res.items()} | {
    f'{n} compile': m.compile_s for n, m in res.items()}


def run(sizes: Sizes) -> list[Table]:
  """The tables of section 6 (skipped, with a note, without PyTorch)."""
  if not torch_available():
    t = Table('6. ResNet-20 training step: JAX vs PyTorch', ['status'],
              [['skipped: PyTorch is not installed (pip install jaxnorm[bench])']])
    return [t]
  import torch  # noqa: PLC0415

  x, y = cifar_batch(sizes.batch, sizes.image)
  cands = _core_candidates(sizes, x, y, True)
  cands['PyTorch (channels_last)'] = (Eager(torch_step_fn(
    sizes.batch, sizes.image, sizes.width, channels_last=True, depth=sizes.resnet20)), ())
  res = interleaved(cands, repeats=sizes.repeats, warmup=sizes.warmup)
  main = new_table(f'6a. ResNet-20 SGD step (batch {sizes.batch}): JAX vs PyTorch '
                   f'{torch.__version__} on the same CPU', sizes, [
    f'x baseline = median step / median PyTorch (NCHW) step, interleaved in one process; target: '
    f'jaxnorm <= {TARGET:.2f}x PyTorch.',
    f'torch.set_num_threads({os.cpu_count()}); JAX uses XLA:CPU defaults (Eigen thread pool).',
    'PyTorch compile s = its first call (no compilation; allocator and oneDNN warm-up).',
  ], memory=False)
  main.rows += ratio_rows(res, TORCH, TARGET, memory=False)
  emit(main)

  w, d = sizes.width, sizes.resnet20
  parts = {
    'Flax step (BN)': train_step_candidate(_flax(d, w), x, y),
    'Flax step (no BN, conv bias)': train_step_candidate(_flax(d, w, norm=False), x, y),
    'Flax forward only (train mode)': _forward_candidate(_flax(d, w), x),
    'jaxnorm Conv (custom VJP) + jaxnorm BN step': train_step_candidate(
      _jaxnorm_swappable(d, w, True), x, y),
    'jaxnorm Conv (autodiff) + jaxnorm BN step': train_step_candidate(
      _jaxnorm_swappable(d, w, False), x, y),
    'PyTorch step (BN)': (Eager(torch_step_fn(sizes.batch, sizes.image, w, depth=d)), ()),
    'PyTorch step (no BN, conv bias)': (Eager(torch_step_fn(
      sizes.batch, sizes.image, w, batch_norm=False, depth=d)), ()),
    'PyTorch forward only (train mode, no_grad)': (Eager(torch_step_fn(
      sizes.batch, sizes.image, w, forward_only=True, depth=d)), ()),
  }
  res = interleaved(parts, repeats=max(sizes.repeats - 1, 1), warmup=sizes.warmup)
  split = new_table('6b. Where the time goes: forward, backward, BatchNorm, custom-VJP conv',
                    sizes, [
    'x baseline = median / PyTorch step (BN). Forward-only and no-BN steps isolate the conv '
    'forward, the conv backward (step - forward) and BatchNorm (BN step - no-BN step).',
  ], memory=False)
  split.rows += ratio_rows(res, 'PyTorch step (BN)', None, memory=False)
  emit(split)
  tables = [main, split]
  if not sizes.smoke:
    tables.append(flag_study(sizes))
  return tables


def flag_study(sizes: Sizes) -> Table:
  """Each XLA flag variant in a fresh subprocess; ratios against PyTorch in the same process."""
  table = Table(f'6c. XLA:CPU flags: ResNet-20 step (batch {sizes.batch}), one subprocess each',
                ['variant', 'plain Flax ms', 'jaxnorm ms', 'PyTorch ms', 'jaxnorm x PyTorch',
                 'jaxnorm x defaults (jaxnorm)', 'jaxnorm compile s'],
                notes=['Each row: a fresh Python process with the flag in XLA_FLAGS (or the '
                       'environment), plain Flax, jaxnorm and PyTorch steps interleaved; ratios '
                       'are within a row, except the last ratio column (across processes, '
                       'noisier).'])
  base = None
  for name, env in FLAG_VARIANTS.items():
    cmd = [sys.executable, '-m', 'benchmarks.pytorch_resnet', '--variant-json']
    proc = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=900, check=False)
    if proc.returncode != 0:
      table.rows.append([name, 'failed: ' + proc.stderr.strip().splitlines()[-1][:120], '', '', '',
                         '', ''])
      continue
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    jn = r['jaxnorm cifar_resnet(20) (default)']
    base = jn if base is None else base
    table.rows.append([name, r['plain Flax (nn.Conv + nn.BatchNorm)'] * 1e3, jn * 1e3,
                       r[TORCH] * 1e3, jn / r[TORCH], jn / base,
                       r['jaxnorm cifar_resnet(20) (default) compile']])
  return table


if __name__ == '__main__':
  parser = argparse.ArgumentParser()
  parser.add_argument('--variant-json', action='store_true',
                      help='print the medians of one flag variant (used by flag_study) as JSON')
  args = parser.parse_args()
  if args.variant_json:
    from benchmarks.common import FULL  # noqa: PLC0415
    print(json.dumps(measure_variant(FULL)))
