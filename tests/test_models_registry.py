"""Tests of the models' `norm` registry: spec validation, SkipInit resolution, NF betas."""

from __future__ import annotations

import math

import pytest

from jaxnorm.models.registry import NORMS, NormSpec, make_norm_spec, resolve_skip_init
from jaxnorm.models.resnet import nf_betas


def test_unknown_norm_names_the_argument_and_the_choices():
  with pytest.raises(ValueError, match=r"`norm`.*'batch_norm'.*'pws'.*got 'layer_norm'"):
    make_norm_spec('layer_norm', 'ResNet')


def test_norm_spec_of_a_string_has_defaults_and_every_spec_resolves():
  for name in NORMS:
    assert make_norm_spec(name).name == name
  spec = NormSpec(name='pws', pws_gamma=1e-4)
  assert make_norm_spec(spec) is spec


def test_skip_init_inv_sqrt_depth_is_one_over_sqrt_number_of_blocks():
  assert resolve_skip_init('inv_sqrt_depth', 54) == pytest.approx(1 / math.sqrt(54))
  assert resolve_skip_init(None, 54) is None
  assert resolve_skip_init(0, 54) == 0.0


@pytest.mark.parametrize('bad', ['sqrt_depth', True, [0.0]])
def test_bad_skip_init_fails_fast(bad):
  with pytest.raises((ValueError, TypeError), match='`skip_init`'):
    resolve_skip_init(bad, 10)


def test_nf_betas_follow_the_expected_variance_recurrence():
  # Brock et al.: beta_i = 1/expected_std; expected var resets to 1 at a stage's first block,
  # then grows by alpha^2 per block, so the j-th block of a stage (j >= 1) sees 1 + j alpha^2.
  alpha = 0.2
  betas = nf_betas([3, 2], alpha)
  a2 = alpha**2
  assert betas[0] == pytest.approx([1.0, 1 / math.sqrt(1 + a2), 1 / math.sqrt(1 + 2 * a2)])
  assert betas[1] == pytest.approx([1 / math.sqrt(1 + 3 * a2), 1 / math.sqrt(1 + a2)])
