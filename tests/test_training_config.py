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


def test_nesterov_needs_momentum():
  c = default_config()
  c.optimizer.momentum = 0.0
  c.optimizer.nesterov = True
  with pytest.raises(ConfigError, match='config.optimizer.nesterov'):
    validate_config(c)
