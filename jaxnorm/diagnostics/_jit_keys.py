"""Jit keys for linen models: the model itself when hashable, else a stand-in compared by value.

The linen pass of ``signal_propagation`` is one module-level ``jax.jit`` with the model as a
static argument, so a second call on an equal model with arrays of the same shapes reuses the
compiled computation. jaxnorm's models are hashable and are the key themselves. A model that is
not (a list field, as in Flax's ResNet examples) is keyed on a frozen copy of its configuration
(``_ByValue``: lists become tuples, submodules tuples of their fields), so an equal model still
hits the cache; one that cannot even be frozen (an array field) is keyed on its identity
(``_ByIdentity``).
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn


class _Unfreezable(Exception):
  pass


def _freeze(obj, depth: int = 0):
  """A hashable value equal for equal configurations: lists become tuples, modules field tuples.

  Raises ``_Unfreezable`` for anything unhashable it does not know (an array field, ...).
  """
  if depth > 64:
    raise _Unfreezable
  rec = functools.partial(_freeze, depth=depth + 1)
  if isinstance(obj, nn.Module):
    return ('module', type(obj), tuple((f.name, rec(getattr(obj, f.name)))
                                       for f in dataclasses.fields(obj) if f.name != 'parent'))
  if isinstance(obj, (list, tuple)):
    return (type(obj), tuple(rec(v) for v in obj))
  if isinstance(obj, dict):
    return (type(obj), tuple((rec(k), rec(v)) for k, v in obj.items()))
  if isinstance(obj, (set, frozenset)):
    return (type(obj), frozenset(rec(v) for v in obj))
  if isinstance(obj, functools.partial):
    return ('partial', rec(obj.func), rec(obj.args), rec(obj.keywords))
  try:
    hash(obj)
  except TypeError:
    raise _Unfreezable from None
  return obj


class _ByValue:
  """A static jit argument standing for an unhashable model, equal when the configs are equal."""

  def __init__(self, model, key):
    self.model, self.key = model, key

  def __hash__(self):
    return hash(self.key)

  def __eq__(self, other):
    return isinstance(other, _ByValue) and self.key == other.key


class _ByIdentity:
  """A static jit argument for a model that cannot even be frozen: equal only to itself.

  The jit cache holds this wrapper, hence the model: its ``id`` cannot be reused while cached.
  """

  def __init__(self, model):
    self.model = model

  def __hash__(self):
    return id(self.model)

  def __eq__(self, other):
    return isinstance(other, _ByIdentity) and self.model is other.model


def static_model(model):
  """``model`` itself when hashable (jaxnorm's models), else a hashable stand-in for jit."""
  try:
    hash(model)
    return model
  except TypeError:
    pass
  try:
    return _ByValue(model, _freeze(model))
  except _Unfreezable:
    return _ByIdentity(model)


def unwrap(model):
  return model.model if isinstance(model, (_ByValue, _ByIdentity)) else model

