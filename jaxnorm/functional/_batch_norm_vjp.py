"""The closed-form backward of the training-mode BatchNorm layer, as one ``jax.custom_vjp``.

With ``x_hat = (x - mu) / sqrt(var + eps)`` and ``g = dL/dy`` (``mean_B``: mean over the
reduction axes of a channel, ``m`` values)::

  dL/dx     = gamma / sqrt(var + eps) * (g - mean_B(g) - x_hat * mean_B(g * x_hat))
  dL/dgamma = sum_B(g * x_hat),   dL/dbeta = sum_B(g)

plus, when a loss also uses the returned statistics, ``(g_mu + 2 g_var (x - mu)) / m``. The
statistics are computed inside the forward rule, so the residuals are differentiable functions of
the inputs and the backward rule (plain JAX) differentiates to the true second derivatives.

References:
  Ioffe & Szegedy (2015), "Batch Normalization: Accelerating Deep Network Training by Reducing
  Internal Covariate Shift", arXiv:1502.03167, section 3 (the chain rule through the statistics).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from jaxnorm.functional._batch_norm_stats import moments


def _varying_axes(a) -> frozenset:
  """The ``shard_map`` mesh axes along which ``a`` varies (empty outside ``shard_map``)."""
  aval = jax.typeof(a)
  manual = getattr(aval, 'manual_axis_type', None)  # jax >= 0.9; older: ``aval.vma``
  return frozenset(manual.varying if manual is not None else getattr(aval, 'vma', ()))


def _like(cotangent, primal):
  """``cotangent`` in the dtype and the ``shard_map`` device-variance of ``primal``.

  Inside ``shard_map`` a parameter replicated over a mesh axis (the usual case) must get a
  cotangent replicated over it too: the per-device sums are ``psum``-ed over every axis along which
  the cotangent varies and the parameter does not, which is what autodiff does for
  ``x_hat * scale`` (the transpose of the implicit ``pvary`` of ``scale``).
  """
  extra = tuple(sorted(_varying_axes(cotangent) - _varying_axes(primal)))
  if extra:
    cotangent = lax.psum(cotangent, extra)
  return cotangent.astype(primal.dtype)


def is_manual(x, axis_name) -> bool:
  """Whether every name in ``axis_name`` is a ``shard_map`` mesh axis along which ``x`` varies.

  Only then may a collective sit in the closed-form backward: ``jax.vmap``'s batching rule for a
  ``custom_vjp`` maps the backward without binding the axis name (an "unbound axis name" error),
  and a ``pmap`` axis or a ``shard_map(check_vma=False)`` axis is not visible in the type of ``x``.
  """
  names = tuple(axis_name) if isinstance(axis_name, (tuple, list)) else (axis_name,)
  return set(names) <= _varying_axes(x)


def affine(x, mu, inv_std, scale, bias):
  """``(x - mu) * (inv_std * scale) + bias`` in the statistics dtype (flax's operation order);
  ``scale`` / ``bias`` may be None."""
  mul = inv_std if scale is None else inv_std * scale
  y = (x.astype(mu.dtype) - mu) * mul
  return y if bias is None else y + bias


def closed_form_batch_norm(gaxes, param_axes, epsilon, sdtype, axis_name, axis_index_groups,
                            n_total):
  """Returns ``f(x, scale, bias) = (y, mu, var)``, the whole training-mode layer (statistics,
  normalization, affine step) as one ``jax.custom_vjp`` with the closed-form backward.

  ``mu`` and ``var`` are the keepdims statistics of ``x`` over ``gaxes`` (``pmean``-ed over
  ``axis_name``; ``n_total`` values per channel in all). The statistics are computed inside the
  forward rule, so the residuals (``x`` itself in its own dtype, ``mu``, ``1/sqrt(var + eps)``,
  ``scale``, ``bias``) are differentiable functions of the primal inputs and the backward rule,
  plain JAX, is an exact formula of them: differentiating it (reverse-over-reverse,
  ``jax.hessian``) gives the true second derivatives. The backward also takes the cotangents of
  the returned statistics: ``d mu/dx = 1/n`` and ``d var/dx = 2 (x - mu)/n`` per channel.
  ``x_hat`` is recomputed inside the backward's fused passes instead of being stored.
  ``scale`` and ``bias`` are broadcastable against ``x`` (1 on ``param_axes``) or None.
  Hyperparameters are closed-over Python values.
  """

  def forward(x, scale, bias):
    mu, var = moments(x, gaxes, sdtype, axis_name, axis_index_groups, None)
    inv_std = lax.rsqrt(var + epsilon)
    return (affine(x, mu, inv_std, scale, bias), mu, var), (x, mu, inv_std, scale, bias)

  @jax.custom_vjp
  def bn(x, scale, bias):
    return forward(x, scale, bias)[0]

  def bwd(res, cotangents):
    x, mu, inv_std, scale, bias = res
    g, g_mu, g_var = cotangents
    x_hat = (x.astype(mu.dtype) - mu) * inv_std
    g = g.astype(jnp.promote_types(g.dtype, mu.dtype))
    # sum_B(g) and sum_B(g * x_hat): dbeta and dgamma summed over this device's batch (the
    # cotangents of replicated parameters, as autodiff gives them), and, divided by the count
    # and averaged across devices when axis_name is given, the two means of dL/dx.
    sum_g = jnp.sum(g, axis=gaxes, keepdims=True)
    sum_gx = jnp.sum(g * x_hat, axis=gaxes, keepdims=True)
    count = math.prod(x.shape[a] for a in gaxes)
    terms = (sum_g / count, sum_gx / count)
    if axis_name is not None:
      terms = lax.pmean(terms, axis_name, axis_index_groups=axis_index_groups)
    mul = inv_std if scale is None else inv_std * scale
    # dL/dx = mul (g - mean_B(g) - x_hat mean_B(g x_hat)) + (g_mu + 2 g_var (x - mu)) / n, with
    # x - mu = x_hat / inv_std: per-channel coefficients of 1 and of x_hat, one fused pass.
    c0 = mul * terms[0] - g_mu / n_total
    c1 = mul * terms[1] - (2.0 / n_total) * g_var / inv_std
    dx = mul * g - c0 - x_hat * c1
    # Ghost groups: the parameters are shared by every group (axis 0 of x), sum over it as well.
    extra = tuple(a for a in param_axes if a not in gaxes)
    dscale = None if scale is None else _like(jnp.sum(sum_gx, axis=extra, keepdims=True), scale)
    dbias = None if bias is None else _like(jnp.sum(sum_g, axis=extra, keepdims=True), bias)
    return dx.astype(x.dtype), dscale, dbias

  bn.defvjp(forward, bwd)
  return bn


