"""The training config (``ml_collections.ConfigDict``): defaults and validation.

Study configs start from :func:`default_config` and change fields. :func:`validate_config` checks
every field before anything is built and raises :class:`ConfigError`, whose one-line message names
the field, what was expected and what was given; the launcher prints it and exits non-zero.

Fields (defaults in :func:`default_config`):

- ``dataset`` (one of ``jaxnorm.training.data.DATASETS``), ``data_dir``, ``image_size``,
  ``augment``; ``synthetic.{shape, num_classes, num_examples}`` for the Gaussian source.
- ``model``: :func:`model_config` -- ``model.name`` (a factory in ``jaxnorm.models``, e.g.
  ``'cifar_resnet'``, or ``'package.module:factory'``) and every keyword of that factory with its
  default, derived from the factory's signature (:func:`factory_keywords`), so each one can be set
  on the command line (``--config.model.skip_init=0.0``). ``num_classes`` comes from the data set.
- ``batch_size`` (global), ``eval_batch_size``, ``total_steps``, ``seed``.
- ``optimizer.{name, learning_rate, momentum, nesterov, weight_decay, b1, b2, eps, agc_clip,
  decay_mask}``; ``decay_mask`` is which parameters weight decay touches, one of
  ``jaxnorm.training.optim.DECAY_MASKS``: ``'kernels'`` (default, ``jaxnorm.models.decay_mask``:
  kernels only), ``'all'`` (every parameter) or ``'all_but_alpha'`` (every parameter but PWS's
  ``alpha``, the official PWS parameter groups). A run written before the field existed resumes
  under ``'kernels'``, what it trained with.
- ``schedule.{name, warmup_steps, step_boundaries, step_decay}``.
- ``label_smoothing``, ``compute_dtype`` (``'float32'`` or ``'bfloat16'``).
- ``log_every``, ``eval_every`` (0: only at the end), ``checkpoint_every``, ``keep_checkpoints``,
  ``async_checkpoints``, ``progress_bar``.

References:
  big_vision / scenic config conventions (``get_config(arg)``), ml_collections.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import types
import typing
from typing import Any

import ml_collections
from ml_collections import config_dict

from jaxnorm.training.data import DATASETS
from jaxnorm.training.optim import DECAY_MASKS, OPTIMIZERS, SCHEDULES

COMPUTE_DTYPES = ('float32', 'bfloat16')


class ConfigError(ValueError):
  """An invalid config value; the message names the field."""

  def __init__(self, field: str, expected: str, got):
    self.field = field
    super().__init__(f'config.{field}: expected {expected}, got {got!r}.')


def default_config() -> ml_collections.ConfigDict:
  """The default training config (a small ResNet on the embedded digits set)."""
  c = ml_collections.ConfigDict()
  c.dataset = 'digits'
  c.data_dir = ''  # '' = TFDS default (TFDS_DATA_DIR or ~/tensorflow_datasets).
  c.image_size = 224  # ImageNet only.
  c.augment = True
  c.synthetic = ml_collections.ConfigDict(
      {'shape': (8, 8, 1), 'num_classes': 10, 'num_examples': 1024})

  c.model = model_config('cifar_resnet', depth=8, norm='batch_norm')

  c.seed = 0
  c.batch_size = 128
  c.eval_batch_size = 256
  c.total_steps = 1000

  c.optimizer = ml_collections.ConfigDict({
      'name': 'sgd', 'learning_rate': 0.1, 'momentum': 0.9, 'nesterov': False,
      'weight_decay': 5e-4, 'b1': 0.9, 'b2': 0.999, 'eps': 1e-8, 'agc_clip': 0.0,
      'decay_mask': 'kernels'})
  c.schedule = ml_collections.ConfigDict({
      'name': 'cosine', 'warmup_steps': 0, 'step_boundaries': (0.5, 0.75), 'step_decay': 0.1})
  c.label_smoothing = 0.0
  c.compute_dtype = 'float32'

  c.log_every = 10
  c.eval_every = 0
  c.checkpoint_every = 500
  c.keep_checkpoints = 3
  c.async_checkpoints = False
  c.progress_bar = True
  return c


# Keywords a model factory receives from the launcher, never from the config.
_NOT_CONFIGURABLE = ('num_classes', 'parent', 'name')


def resolve_factory(name: str):
  """The model factory ``name``: ``jaxnorm.models.<name>`` or ``'package.module:factory'``.

  Raises:
    ConfigError: naming ``model.name`` when there is no such callable.
  """
  expected = "a factory in jaxnorm.models or 'package.module:factory'"
  if not isinstance(name, str) or not name:
    raise ConfigError('model.name', expected, name)
  module_name, attr = name.split(':', 1) if ':' in name else ('jaxnorm.models', name)
  try:
    factory = getattr(importlib.import_module(module_name), attr, None)
  except ImportError:
    factory = None
  if factory is None or not callable(factory):
    raise ConfigError('model.name', expected, name)
  return factory


def factory_keywords(name: str) -> dict[str, Any]:
  """Every keyword of model factory ``name`` with its default (``inspect.Parameter.empty``: none).

  The keywords are the factory's named parameters (``num_classes`` excluded: it comes from the data
  set). A ``jaxnorm.models`` factory whose ``**kwargs`` go on to the module it builds (the ResNet
  presets) also takes that module's dataclass fields it does not set itself; those are found by
  calling the factory with each field and keeping the ones it accepts, and their default is the
  value in the module the factory builds with no arguments (e.g. ``style='v2'`` for
  ``wide_resnet``). Deriving them from the code keeps the config in step with the factories.
  """
  return dict(_factory_keywords(name))


@functools.cache
def _factory_keywords(name: str) -> dict[str, Any]:
  factory = resolve_factory(name)
  out: dict[str, Any] = {}
  forwards_kwargs = False
  for p in inspect.signature(factory).parameters.values():
    if p.kind == p.VAR_KEYWORD:
      forwards_kwargs = True
    elif p.kind != p.VAR_POSITIONAL and p.name not in _NOT_CONFIGURABLE:
      out[p.name] = p.default
  if forwards_kwargs and ':' not in name:
    module = factory()
    for f in dataclasses.fields(module) if dataclasses.is_dataclass(module) else ():
      if f.name in out or f.name in _NOT_CONFIGURABLE or not f.init:
        continue
      value = getattr(module, f.name)
      try:
        factory(**{f.name: value})
      except TypeError:  # "got multiple values for keyword argument": the factory sets it.
        continue
      out[f.name] = value
  return out


_PARSED_TYPES = {'int': int, 'float': float, 'str': str, 'bool': bool}


def _is_union(annotation) -> bool:
  """Whether a keyword's annotation (a string under postponed evaluation) is a union type."""
  if isinstance(annotation, str):
    return '|' in annotation or annotation.startswith(('Union[', 'Optional['))
  return typing.get_origin(annotation) in (typing.Union, types.UnionType)


def _field(default, annotation) -> Any:
  """A config field for a factory keyword, typed so that the command line can set it."""
  if default is inspect.Parameter.empty:  # Required: a typed placeholder (None until set).
    kind = _PARSED_TYPES.get(annotation if isinstance(annotation, str) else
                             getattr(annotation, '__name__', ''), object)
    return config_dict.placeholder(kind)
  if (default is None or _is_union(annotation)
      or not isinstance(default, bool | int | float | str | tuple)):
    # None means "automatic" or "off" and the alternatives have other types (skip_init: a float
    # or 'inv_sqrt_depth'); a union keyword takes values of several types (bgn_target: 'unit' or
    # a float). `object` fields parse a Python literal, else keep the string.
    return config_dict.FieldReference(default, field_type=object)
  return default


def model_config(name: str = 'cifar_resnet', **values) -> ml_collections.ConfigDict:
  """The ``model`` section for factory ``name``: every keyword of it, with its default.

  Args:
    name: a factory in ``jaxnorm.models`` or ``'package.module:factory'``.
    **values: keywords to set (each must be a keyword of the factory).

  Returns:
    ``ConfigDict(name=name, <keyword>=<default>, ...)``; keywords without a default are ``None``
    until set (``validate_config`` asks for them).

  Raises:
    ConfigError: an unknown factory or keyword.
  """
  keywords = factory_keywords(name)
  factory = resolve_factory(name)
  annotations = {p.name: p.annotation for p in inspect.signature(factory).parameters.values()}
  c = ml_collections.ConfigDict({'name': name})
  for key, default in keywords.items():
    c[key] = _field(default, annotations.get(key, inspect.Parameter.empty))
  for key, value in values.items():
    if key not in keywords:
      raise ConfigError(f'model.{key}', f'a keyword of {name} ({", ".join(keywords)})', value)
    c[key] = value
  return c


def _int(c, field, *, minimum=1):
  value = _get(c, field)
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise ConfigError(field, f'an integer >= {minimum}', value)


def _num(c, field, lo, hi, *, lo_open=False, hi_open=False):
  value = _get(c, field)
  ok = isinstance(value, int | float) and not isinstance(value, bool)
  if ok:
    ok = (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
  if not ok:
    interval = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    raise ConfigError(field, f'a number in {interval}', value)


def _choice(c, field, choices):
  value = _get(c, field)
  if value not in choices:
    raise ConfigError(field, 'one of ' + ', '.join(repr(x) for x in choices), value)


def _get(c, field):
  value = c
  for part in field.split('.'):
    if part not in value:
      raise ConfigError(field, 'a value (the field is missing)', None)
    value = value[part]
  return value


def _is_required(name: str, key: str) -> bool:
  try:
    return factory_keywords(name).get(key) is inspect.Parameter.empty
  except ConfigError:
    return False  # An unknown factory is reported when the model is built.


def validate_config(c: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
  """Checks every field; raises :class:`ConfigError` naming the first bad one.

  Args:
    c: the config.
    num_devices: if given, ``batch_size`` and ``eval_batch_size`` must be multiples of it.
  """
  _choice(c, 'dataset', DATASETS)
  _int(c, 'image_size')
  _int(c, 'batch_size')
  _int(c, 'eval_batch_size')
  _int(c, 'total_steps')
  _int(c, 'seed', minimum=0)
  _int(c, 'log_every')
  _int(c, 'eval_every', minimum=0)
  _int(c, 'checkpoint_every')
  _int(c, 'keep_checkpoints', minimum=2)
  _int(c, 'synthetic.num_classes', minimum=2)
  _int(c, 'synthetic.num_examples')
  shape = _get(c, 'synthetic.shape')
  if len(shape) != 3 or any(not isinstance(s, int) or s < 1 for s in shape):
    raise ConfigError('synthetic.shape', 'three positive integers (H, W, C)', shape)
  if not isinstance(_get(c, 'model.name'), str) or not c.model.name:
    raise ConfigError('model.name', 'the name of a model factory in jaxnorm.models',
                      c.model.name)
  for key, value in c.model.items():
    if value is None and _is_required(c.model.name, key):
      raise ConfigError(f'model.{key}', f'a value (required by {c.model.name})', None)
  _choice(c, 'optimizer.name', OPTIMIZERS)
  _num(c, 'optimizer.learning_rate', 0, float('inf'), lo_open=True, hi_open=True)
  _num(c, 'optimizer.momentum', 0, 1, hi_open=True)
  _num(c, 'optimizer.weight_decay', 0, float('inf'), hi_open=True)
  _num(c, 'optimizer.b1', 0, 1, hi_open=True)
  _num(c, 'optimizer.b2', 0, 1, hi_open=True)
  _num(c, 'optimizer.eps', 0, float('inf'), hi_open=True)
  _num(c, 'optimizer.agc_clip', 0, float('inf'), hi_open=True)
  if c.optimizer.nesterov and c.optimizer.momentum == 0:
    raise ConfigError('optimizer.nesterov', 'False when optimizer.momentum is 0', True)
  _choice(c, 'optimizer.decay_mask', DECAY_MASKS)
  _choice(c, 'schedule.name', SCHEDULES)
  _int(c, 'schedule.warmup_steps', minimum=0)
  if c.schedule.warmup_steps >= c.total_steps:
    raise ConfigError('schedule.warmup_steps', f'fewer than total_steps={c.total_steps}',
                      c.schedule.warmup_steps)
  for f in _get(c, 'schedule.step_boundaries'):
    if not 0 < f < 1:
      raise ConfigError('schedule.step_boundaries', 'fractions of training in (0, 1)',
                        tuple(c.schedule.step_boundaries))
  _num(c, 'schedule.step_decay', 0, 1, lo_open=True)
  _num(c, 'label_smoothing', 0, 1, hi_open=True)
  _choice(c, 'compute_dtype', COMPUTE_DTYPES)
  if num_devices is not None:
    for field in ('batch_size', 'eval_batch_size'):
      if _get(c, field) % num_devices:
        raise ConfigError(field, f'a multiple of the number of devices ({num_devices})',
                          _get(c, field))


def flag_error_line(e: BaseException) -> str:
  """One line describing an error raised while parsing absl / ml_collections config flags.

  ml_collections reports an unknown ``--config.<field>`` as a ``KeyError`` / ``AttributeError``
  whose text is the quoted field name and, on the next line, its "did you mean" suggestion; an
  error inside a config file's ``get_config`` arrives as a flag error holding a whole traceback,
  whose last line is the message. Launchers print this line instead of a traceback.
  """
  if isinstance(e, (KeyError, AttributeError)):
    text = str(e).replace('\\n', '\n').replace("\\'", "'")
    lines = [line.strip().strip('"\'') for line in text.splitlines() if line.strip()]
    if lines:
      return ' '.join([f'unknown config field {lines[0]!r}.', *lines[1:]])
  lines = [line.strip() for line in str(e).splitlines() if line.strip()]
  if not lines:
    return repr(e)
  if len(lines) > 1 and lines[0].startswith('flag --config') and 'Traceback' in lines[0]:
    return f'{lines[0].split(":", 1)[0]}: {lines[-1]}'
  return lines[-1]
