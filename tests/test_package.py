"""The package surface: ``import jaxnorm`` gives every subpackage, lazily."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_import_jaxnorm_alone_gives_every_subpackage_lazily():
  code = '\n'.join([
      'import sys, jaxnorm',
      "assert 'jax' not in sys.modules, 'import jaxnorm must not import jax'",
      'names = ("functional", "linen", "nnx", "models", "diagnostics", "training")',
      'for n in names:',
      '  assert getattr(jaxnorm, n).__name__ == "jaxnorm." + n',
      'assert jaxnorm.linen.BatchNorm and jaxnorm.training.train',
      "assert set(names) <= set(dir(jaxnorm))",
      'try:',
      '  jaxnorm.no_such_thing',
      'except AttributeError as e:',
      "  assert 'no_such_thing' in str(e)",
      'else:',
      '  raise AssertionError("no AttributeError")',
  ])
  env = dict(os.environ, PYTHONPATH=ROOT)  # This checkout, not another installed jaxnorm.
  subprocess.run([sys.executable, '-c', code], check=True, timeout=120, env=env)


def test_functional_exports_functions_and_keeps_its_modules_private():
  import types

  import jaxnorm.functional as F
  from jaxnorm.functional import batch_norm

  names = ('batch_norm', 'batch_statistics', 'normalize', 'backward_grad_norm',
           'normalize_gradient', 'standardize_kernel', 'pws_init_alpha', 'conv', 'skip_init',
           'signal_metrics', 'variance_scaling', 'he_normal', 'lecun_normal')
  for name in names:
    obj = getattr(F, name)
    assert callable(obj) and not isinstance(obj, types.ModuleType), name
  assert batch_norm is F.batch_norm
  public_modules = [n for n, v in vars(F).items()
                    if isinstance(v, types.ModuleType) and not n.startswith('_')]
  assert public_modules == []
