"""Convolution whose backward pass is written as canonical forward convolutions.

``conv(x, kernel, ...)`` computes the same function as ``lax.conv_general_dilated`` with
channels-last inputs (``NHWC``, or ``NWC`` / ``NDHWC``) and ``HWIO`` kernels. Its backward pass is a
``jax.custom_vjp`` made of two *forward* convolutions in the canonical ``NHWC`` / ``HWIO`` layout:

- input gradient: ``dx = conv(dilate(g, strides), flip(w) with I and O swapped)``, i.e. a stride-1
  convolution of the output gradient ``g`` (``lhs_dilation = strides``,
  ``rhs_dilation = kernel_dilation``) with the spatially flipped kernel, padded by
  ``(k_eff - 1 - lo, in + lo - (out - 1) * s - 1)`` per spatial axis;
- kernel gradient: ``dw[k, i, o] = sum_{n, p} x_pad[n, p*s + k*d, i] * g[n, p, o]``, i.e. a
  convolution whose "batch" is the input channels of ``x`` (``x`` transposed to ``(Cin, H, W, N)``),
  whose "input features" are the batch (``g`` transposed to ``(Ho, Wo, N, Cout)`` as an ``HWIO``
  kernel), with ``window_strides = kernel_dilation`` and ``rhs_dilation = strides``. On XLA:CPU,
  for batches of 64 and more, it is summed over chunks of 8 examples in a ``lax.scan``
  (``KERNEL_GRAD_BATCH_CHUNK``): the same sum in another order, 2-3x faster there.

Why: JAX's own transpose rules express both gradients through ``dimension_numbers`` (no transposes).
Inside a ``lax.scan`` / ``nn.scan`` loop body XLA:CPU then keeps those convolutions in
non-canonical layouts and runs them on a slow path, 10x (input gradient) to 130x (kernel
gradient) slower than the same convolutions unrolled. With explicit transposes to canonical
layouts the loop body runs at close to the unrolled speed (measured numbers: BENCHMARKS.md /
ECOSYSTEM.md "Depth: scan vs unrolled"). The gradients are the same function as autodiff's.

What the custom VJP rules out: forward-mode AD (``jax.jvp``, ``jax.jacfwd``, evaluating
``jax.linearize``) raises "can't apply forward-mode autodiff (jvp) to a custom_vjp function".
Pass ``custom_backward=False`` to get plain ``lax.conv_general_dilated`` (autodiff backward) there.
Reverse mode, reverse-over-reverse, ``jax.hessian`` (forward-over-reverse differentiates the
VJP's own ops, which are ordinary convolutions), ``vmap``, ``lax.scan`` and ``jax.checkpoint`` all
work (tested).

References:
  Layout finding: jaxnorm ECOSYSTEM.md, "Depth: scan vs unrolled (XLA:CPU)"; the padding algebra is
  the standard transpose of a strided, padded, dilated convolution (as in JAX's
  ``_conv_general_vjp_lhs_padding`` / ``_conv_general_vjp_rhs_padding``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxnorm.functional._checks import check_floating, fail

_LAYER = 'conv'

PaddingLike = str | int | Sequence[int] | Sequence[tuple[int, int]]


def _dimension_numbers(num_spatial: int) -> lax.ConvDimensionNumbers:
  """Channels-last (N, *spatial, C) inputs/outputs and (*spatial, I, O) kernels."""
  n = num_spatial
  spatial = tuple(range(1, n + 1))
  return lax.ConvDimensionNumbers(
      lhs_spec=(0, n + 1) + spatial,
      rhs_spec=(n + 1, n) + tuple(range(n)),
      out_spec=(0, n + 1) + spatial,
  )


def _as_tuple(layer: str, arg: str, value, n: int) -> tuple[int, ...]:
  """Broadcasts an int (or a length-n sequence of ints) to a tuple of n positive ints."""
  if isinstance(value, int | np.integer):
    value = (int(value),) * n
  value = tuple(value)
  if len(value) != n or not all(isinstance(v, int | np.integer) and v >= 1 for v in value):
    fail(layer, arg, f'a positive int or a sequence of {n} positive ints', repr(value))
  return tuple(int(v) for v in value)


def resolve_padding(
    padding: PaddingLike,
    in_shape: Sequence[int],
    kernel_shape: Sequence[int],
    strides: Sequence[int],
    kernel_dilation: Sequence[int],
    *,
    layer: str = _LAYER,
) -> tuple[tuple[int, int], ...]:
  """Turns ``padding`` into explicit ``(lo, hi)`` pairs, one per spatial axis.

  Args:
    padding: ``'SAME'`` (output size ``ceil(in / stride)``, the extra pad element at the end, as in
      ``lax``/TensorFlow), ``'VALID'`` (no padding), an int (the same pad on both sides of every
      axis), a sequence of ints (per axis, both sides) or a sequence of ``(lo, hi)`` pairs.
      (``'CIRCULAR'`` / ``'REFLECT'`` are handled by ``conv`` itself, before this is called.)
    in_shape: spatial sizes of the input.
    kernel_shape: spatial sizes of the kernel.
    strides: window strides per spatial axis.
    kernel_dilation: kernel dilation per spatial axis.
    layer: layer name for error messages.

  Returns:
    A tuple of ``(lo, hi)`` int pairs.
  """
  n = len(in_shape)
  if isinstance(padding, str):
    mode = padding.upper()
    if mode == 'VALID':
      return ((0, 0),) * n
    if mode == 'SAME':
      pads = []
      for size, k, s, d in zip(in_shape, kernel_shape, strides, kernel_dilation, strict=True):
        k_eff = (k - 1) * d + 1
        out = -(-size // s)
        total = max((out - 1) * s + k_eff - size, 0)
        pads.append((total // 2, total - total // 2))
      return tuple(pads)
    fail(layer, 'padding', "'SAME', 'VALID', 'CIRCULAR', 'REFLECT', an int or a sequence of "
         '(lo, hi) pairs', repr(padding))
  if isinstance(padding, int | np.integer):
    return ((int(padding), int(padding)),) * n
  padding = tuple(padding)
  if len(padding) != n:
    fail(layer, 'padding', f'{n} entries (one per spatial axis)', repr(padding))
  pairs = []
  for p in padding:
    if isinstance(p, int | np.integer):
      pairs.append((int(p), int(p)))
    elif len(tuple(p)) == 2 and all(isinstance(v, int | np.integer) for v in p):
      pairs.append((int(p[0]), int(p[1])))
    else:
      fail(layer, 'padding', 'ints or (lo, hi) pairs of ints', repr(padding))
  return tuple(pairs)


def _forward(x, w, strides, pads, dilation, precision, dn):
  return lax.conv_general_dilated(
      x, w, window_strides=strides, padding=pads, rhs_dilation=dilation,
      dimension_numbers=dn, precision=precision)


def _input_grad(g, w, x_spatial, strides, pads, dilation, precision, dn):
  """dx = stride-1 conv of dilate(g, strides) with flip(w) (I and O swapped), canonical layouts."""
  n = len(strides)
  out_spatial = g.shape[1:n + 1]
  k_spatial = w.shape[:n]
  # Flip every spatial axis and swap (I, O) -> (O, I): an ordinary HWIO kernel mapping Cout -> Cin.
  w_t = jnp.swapaxes(jnp.flip(w, axis=tuple(range(n))), n, n + 1)
  grad_pads = []
  for size, out, k, s, d, (lo, _) in zip(
      x_spatial, out_spatial, k_spatial, strides, dilation, pads, strict=True):
    k_eff = (k - 1) * d + 1
    before = k_eff - 1 - lo
    after = size + lo - (out - 1) * s - 1
    grad_pads.append((before, after))
  return lax.conv_general_dilated(
      g, w_t, window_strides=(1,) * n, padding=grad_pads, lhs_dilation=strides,
      rhs_dilation=dilation, dimension_numbers=dn, precision=precision)


def _kernel_grad_conv(x, g, k_spatial, strides, pads, dilation, precision, dn):
  """dw as a canonical conv: batch <- input channels, input features <- batch."""
  n = len(strides)
  x_spatial = x.shape[1:n + 1]
  out_spatial = g.shape[1:n + 1]
  spatial = tuple(range(1, n + 1))
  # x: (N, *S, Cin) -> (Cin, *S, N): the input channels become the batch, the batch the features.
  x_t = jnp.transpose(x, (n + 1,) + spatial + (0,))
  # g: (N, *So, Cout) -> (*So, N, Cout): an HWIO kernel with I = batch and O = output channels.
  g_t = jnp.transpose(g, spatial + (0, n + 1))
  grad_pads = []
  for size, out, k, s, d, (lo, _) in zip(
      x_spatial, out_spatial, k_spatial, strides, dilation, pads, strict=True):
    k_eff = (k - 1) * d + 1
    # Trim the high side so that exactly k windows (stride d) fit: hi = (out-1)*s + k_eff - lo - in.
    grad_pads.append((lo, (out - 1) * s + k_eff - lo - size))
  dw = lax.conv_general_dilated(
      x_t, g_t, window_strides=dilation, padding=grad_pads, rhs_dilation=strides,
      dimension_numbers=dn, precision=precision)
  # (Cin, *K, Cout) -> (*K, Cin, Cout).
  return jnp.transpose(dw, spatial + (0, n + 1))


# Batch chunk of the kernel gradient on XLA:CPU. Its kernel-gradient convolution slows down more
# than linearly with the batch (the contraction axis): at 128 x 32 x 32 x 16 one call over the batch
# took 40.6 ms, a lax.scan over 16 chunks of 8 examples 18.4 ms (0.33-0.46x at every ResNet-20
# layer shape). Whole ResNet-20 SGD step: 0.74x at batch 128, 0.90x at 64, but 1.12x at 32
# (BENCHMARKS.md, section 6). So: on CPU, from KERNEL_GRAD_MIN_BATCH examples up, when the batch is
# a multiple of the chunk. None turns it off; other backends never chunk.
KERNEL_GRAD_BATCH_CHUNK: int | None = 8
KERNEL_GRAD_MIN_BATCH = 64


def _kernel_grad(x, g, k_spatial, strides, pads, dilation, precision, dn):
  """dw, summed over batch chunks of ``KERNEL_GRAD_BATCH_CHUNK`` examples where that is faster."""
  batch, chunk = x.shape[0], KERNEL_GRAD_BATCH_CHUNK
  if (chunk is None or batch < KERNEL_GRAD_MIN_BATCH or batch % chunk
      or jax.default_backend() != 'cpu'):
    return _kernel_grad_conv(x, g, k_spatial, strides, pads, dilation, precision, dn)
  xs = x.reshape(batch // chunk, chunk, *x.shape[1:])
  gs = g.reshape(batch // chunk, chunk, *g.shape[1:])
  acc_dtype = jnp.promote_types(x.dtype, jnp.float32)

  def add_chunk(acc, xg):
    # Each chunk in (at least) float32, so bf16 inputs round once, at the end, not per chunk.
    xc, gc = xg[0].astype(acc_dtype), xg[1].astype(acc_dtype)
    return acc + _kernel_grad_conv(xc, gc, k_spatial, strides, pads, dilation, precision, dn), None

  shape = (*k_spatial, x.shape[-1], g.shape[-1])
  dw, _ = lax.scan(add_chunk, jnp.zeros(shape, acc_dtype), (xs, gs))
  return dw.astype(x.dtype)


def _make_conv(strides, pads, dilation, precision, n):
  """Builds the custom-VJP conv for one set of (Python) hyperparameters."""
  dn = _dimension_numbers(n)

  @jax.custom_vjp
  def conv_fn(x, w):
    return _forward(x, w, strides, pads, dilation, precision, dn)

  def fwd(x, w):
    # The primal conv itself (not `conv_fn`), so forward-over-reverse (jax.hessian) works.
    return _forward(x, w, strides, pads, dilation, precision, dn), (x, w)

  def bwd(res, g):
    x, w = res
    g = g.astype(x.dtype)
    dx = _input_grad(g, w, x.shape[1:n + 1], strides, pads, dilation, precision, dn)
    dw = _kernel_grad(x, g, w.shape[:n], strides, pads, dilation, precision, dn)
    return dx.astype(x.dtype), dw.astype(w.dtype)

  conv_fn.defvjp(fwd, bwd)
  return conv_fn


def conv(
    x: jax.Array,
    kernel: jax.Array,
    *,
    strides: int | Sequence[int] = 1,
    padding: PaddingLike = 'SAME',
    kernel_dilation: int | Sequence[int] = 1,
    feature_group_count: int = 1,
    precision: Any = None,
    custom_backward: bool = True,
) -> jax.Array:
  """Channels-last convolution with a canonical-layout backward pass.

  Computes ``y[n, p, o] = sum_{k, i} x_pad[n, p * s + k * d, i] * kernel[k, i, o]`` (per spatial
  axis), the same function as ``lax.conv_general_dilated`` with ``('NHWC', 'HWIO', 'NHWC')``.

  Args:
    x: input of shape ``(N, *spatial, Cin)`` (``NHWC`` for 2-D), 1 to 3 spatial axes.
    kernel: kernel of shape ``(*kernel_spatial, Cin, Cout)`` (``HWIO`` for 2-D). ``x`` and
      ``kernel`` are promoted to a common dtype first; the output has that dtype (bf16 in, bf16
      out).
    strides: window strides, an int or one per spatial axis.
    padding: ``'SAME'``, ``'VALID'``, an int, per-axis ints, or per-axis ``(lo, hi)`` pairs; or
      ``'CIRCULAR'`` / ``'REFLECT'`` (the input is padded by ``((k_eff - 1) // 2, k_eff // 2)``
      with ``jnp.pad`` mode ``'wrap'`` / ``'reflect'`` and then convolved ``'VALID'``, as in
      ``flax.linen.Conv``).
    kernel_dilation: kernel (atrous) dilation, an int or one per spatial axis.
    feature_group_count: only 1 is supported (grouped / depthwise convolutions are not).
    precision: ``lax.Precision`` passed to every convolution (forward and backward).
    custom_backward: if True (default), the backward pass is the ``jax.custom_vjp`` made of
      canonical forward convolutions (fast inside ``scan`` on XLA:CPU). It does not support
      forward-mode AD (``jax.jvp`` / ``jax.jacfwd``): pass False there, which uses
      ``lax.conv_general_dilated`` with JAX's autodiff.

  Returns:
    The output, shape ``(N, *out_spatial, Cout)``.

  References:
    jaxnorm ECOSYSTEM.md "Depth: scan vs unrolled (XLA:CPU)" (why the custom backward exists).
  """
  check_floating(_LAYER, 'x', x)
  check_floating(_LAYER, 'kernel', kernel)
  if x.ndim < 3 or x.ndim > 5:
    fail(_LAYER, 'x', 'an array of rank 3, 4 or 5 (N, *spatial, C)', f'rank {x.ndim} '
         f'(shape {x.shape})')
  if kernel.ndim != x.ndim:
    fail(_LAYER, 'kernel', f'an array of rank {x.ndim} (*spatial, Cin, Cout) to match `x`',
         f'rank {kernel.ndim} (shape {kernel.shape})')
  if feature_group_count != 1:
    fail(_LAYER, 'feature_group_count', '1 (grouped convolutions are not supported)',
         repr(feature_group_count))
  if kernel.shape[-2] != x.shape[-1]:
    fail(_LAYER, 'kernel', f'input-channel dimension {x.shape[-1]} (from `x`)',
         f'shape {kernel.shape}')
  n = x.ndim - 2
  strides = _as_tuple(_LAYER, 'strides', strides, n)
  dilation = _as_tuple(_LAYER, 'kernel_dilation', kernel_dilation, n)
  if isinstance(padding, str) and padding.upper() in ('CIRCULAR', 'REFLECT'):
    # Pad the input itself (periodic / mirrored), then convolve without further padding.
    edge = [((k - 1) * d) for k, d in zip(kernel.shape[:n], dilation, strict=True)]
    mode = {'CIRCULAR': 'wrap', 'REFLECT': 'reflect'}[padding.upper()]
    x = jnp.pad(x, [(0, 0)] + [(e // 2, e - e // 2) for e in edge] + [(0, 0)], mode=mode)
    padding = 'VALID'
  pads = resolve_padding(padding, x.shape[1:n + 1], kernel.shape[:n], strides, dilation)
  for size, k, d, (lo, hi) in zip(x.shape[1:n + 1], kernel.shape[:n], dilation, pads, strict=True):
    if size + lo + hi < (k - 1) * d + 1:
      fail(_LAYER, 'x', f'padded spatial size >= dilated kernel size {(k - 1) * d + 1}',
           f'shape {x.shape} with padding {pads}')
  dtype = jnp.result_type(x, kernel)
  x = jnp.asarray(x, dtype)
  kernel = jnp.asarray(kernel, dtype)
  if not custom_backward:
    return _forward(x, kernel, strides, pads, dilation, precision, _dimension_numbers(n))
  return _make_conv(strides, pads, dilation, precision, n)(x, kernel)
