"""Config validation: every bad value is named, with what was expected."""

from __future__ import annotations

import pytest

from jaxnorm.training.config import ConfigError, default_config, validate_config


def test_default_config_is_valid():
  validate_config(default_config(), num_devices=8)


@pytest.mark.parametrize('field, value', [
    ('dataset', 'svhn'),
    ('total_steps', 0),
    ('batch_size', -4),
    ('checkpoint_every', 0),
    ('optimizer.name', 'lion'),
    ('optimizer.learning_rate', 0.0),
    ('optimizer.momentum', 1.0),
    ('schedule.name', 'linear'),
    ('schedule.warmup_steps', 5000),
    ('schedule.step_boundaries', (0.5, 1.5)),
    ('label_smoothing', 1.0),
    ('compute_dtype', 'float16'),
    ('keep_checkpoints', 1),
    ('synthetic.shape', (8, 8)),
])
def test_invalid_value_raises_one_line_error_naming_the_field(field, value):
  c = default_config()
  *parents, leaf = field.split('.')
  target = c
  for part in parents:
    target = target[part]
  target[leaf] = value
  with pytest.raises(ConfigError) as err:
    validate_config(c)
  assert err.value.field == field
  assert str(err.value).startswith(f'config.{field}: expected ')
  assert '\n' not in str(err.value)


def test_batch_size_must_split_over_devices():
  c = default_config()
  c.batch_size = 100
  with pytest.raises(ConfigError, match=r'config.batch_size: expected a multiple of the number '
                     r'of devices \(8\), got 100'):
    validate_config(c, num_devices=8)


@pytest.mark.parametrize('mask', ['kernels', 'all', 'all_but_alpha'])
def test_decay_mask_is_a_choice_whose_default_is_the_kernels_mask(mask):
  c = default_config()
  assert c.optimizer.decay_mask == 'kernels'  # what runs written before the field trained with
  validate_config(c)
  c.optimizer.decay_mask = mask
  validate_config(c)


def test_an_unknown_decay_mask_names_the_field_and_the_choices():
  c = default_config()
  c.optimizer.decay_mask = 'biases'
  with pytest.raises(ConfigError) as err:
    validate_config(c)
  assert err.value.field == 'optimizer.decay_mask'
  assert str(err.value) == ("config.optimizer.decay_mask: expected one of 'kernels', 'all', "
                            "'all_but_alpha', got 'biases'.")


def test_nesterov_needs_momentum():
  c = default_config()
  c.optimizer.momentum = 0.0
  c.optimizer.nesterov = True
  with pytest.raises(ConfigError, match='config.optimizer.nesterov'):
    validate_config(c)


@pytest.mark.parametrize('name', ['cifar_resnet', 'wide_resnet', 'resnet50', 'pws_resnet',
                                  'MLP', 'ResidualMLP'])
def test_model_section_holds_every_keyword_of_the_factory(name):
  import dataclasses
  import inspect

  from jaxnorm import models
  from jaxnorm.training.config import model_config

  factory = getattr(models, name)
  section = model_config(name)
  params = inspect.signature(factory).parameters
  named = {p for p, v in params.items()
           if v.kind not in (v.VAR_KEYWORD, v.VAR_POSITIONAL) and p not in ('num_classes', 'parent',
                                                                               'name')}
  assert named <= set(section) - {'name'}
  for p in named:
    if params[p].default is not inspect.Parameter.empty:
      assert section[p] == params[p].default, p
  if any(v.kind == v.VAR_KEYWORD for v in params.values()):
    # Keywords forwarded to the module (e.g. skip_init, bgn of the ResNet presets) are there too.
    module = factory()
    forwarded = {f.name for f in dataclasses.fields(module) if f.init} - named - {
        'parent', 'name', 'num_classes'}
    accepted = set()
    for f in forwarded:
      try:
        factory(**{f: getattr(module, f)})
        accepted.add(f)
      except TypeError:
        pass
    assert accepted <= set(section)
    assert {'skip_init', 'bgn'} <= set(section)


def test_model_section_rejects_a_keyword_the_factory_lacks():
  from jaxnorm.training.config import model_config

  with pytest.raises(ConfigError, match='model.skip_intt'):
    model_config('cifar_resnet', skip_intt=0.0)
  with pytest.raises(ConfigError, match='model.name'):
    model_config('no_such_factory')
